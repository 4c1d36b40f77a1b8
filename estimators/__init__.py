"""Built-in estimators, one module per family; importing this package registers them all."""

from estimators import (
    antithetic,
    control_variates,
    exact,
    multi_sample,
    relaxed,
    score_function,
    straight_through,
)

__all__ = [
    "antithetic",
    "control_variates",
    "exact",
    "multi_sample",
    "relaxed",
    "score_function",
    "straight_through",
]
