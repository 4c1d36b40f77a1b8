"""Built-in tasks; importing this package registers them all."""

from tasks import polynomial, toy, vae

__all__ = ["polynomial", "toy", "vae"]
