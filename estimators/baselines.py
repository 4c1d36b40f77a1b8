"""Baselines for score-function estimators: small objects composed into REINFORCE.

A baseline maps the detached costs of ``n`` samples, ``[n, *batch]``, to the value subtracted from
each, and may keep state that the training loop moves through :meth:`update` after each step.
Each has a ``state_dict`` / ``load_state_dict`` pair, so a checkpoint of the estimator holding it
carries that state.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["NoBaseline", "EMABaseline", "LeaveOneOut", "make_baseline"]


class NoBaseline:
    """b = 0."""

    def __call__(self, costs: Tensor) -> Tensor | float:
        return 0.0

    def update(self, value: Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EMABaseline:
    """Scalar exponential moving average of past costs, ``b_t = decay b_{t-1} + (1-decay) f_t``.

    The value used at a step was formed from earlier steps only, so it is independent of the
    current sample and the estimator stays unbiased. It starts at 0 and is set to the first
    step's mean cost on the first update.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.value: float | None = None

    def __call__(self, costs: Tensor) -> Tensor | float:
        return 0.0 if self.value is None else self.value

    def update(self, value: Tensor) -> None:
        mean = float(value.detach().mean())
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class LeaveOneOut:
    """b_s = mean of the other n - 1 samples' costs (Kool et al. 2019; Salimans & Knowles 2014)."""

    def __call__(self, costs: Tensor) -> Tensor:
        n = costs.shape[0]
        return (costs.sum(0, keepdim=True) - costs) / (n - 1)

    def update(self, value: Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def make_baseline(kind: str, decay: float):
    """The baseline object for ``kind`` in {'none', 'ema', 'loo'}."""
    return {"none": NoBaseline, "ema": lambda: EMABaseline(decay), "loo": LeaveOneOut}[kind]()
