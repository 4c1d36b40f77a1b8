"""Built-in estimators, one module per family; importing this package registers them all."""

from estimators import exact, relaxed, score_function, straight_through

__all__ = ["exact", "relaxed", "score_function", "straight_through"]
