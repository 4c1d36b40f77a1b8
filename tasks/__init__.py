"""Built-in tasks; importing this package registers them all."""

from tasks import polynomial, toy

__all__ = ["polynomial", "toy"]
