"""Temperature schedule shared by the relaxed and straight-through estimators."""

from __future__ import annotations

import math
from dataclasses import dataclass

from estbench.hyperparams import hyper

__all__ = ["TemperatureSchedule"]


@dataclass(kw_only=True)
class TemperatureSchedule:
    """Fields and rule of the temperature schedule (Jang et al. 2017, arXiv 1611.01144):

    ``tau_t = max(min_temperature, temperature * exp(-anneal_rate * N * floor(t / N)))`` with
    ``N = anneal_every``; ``anneal_rate = 0`` (the default) keeps ``tau = temperature``.
    """

    temperature: float = hyper(1.0, gt=0.0, doc="initial (or constant) temperature tau_0")
    anneal_rate: float = hyper(0.0, ge=0.0, doc="decay rate r per step; 0 keeps tau constant")
    min_temperature: float = hyper(0.5, gt=0.0, doc="floor of the annealed temperature")
    anneal_every: int = hyper(1, ge=1, doc="update the temperature every N steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anneal_rate > 0 and self.min_temperature > self.temperature:
            self._fail(
                "min_temperature",
                f"<= temperature ({self.temperature}) when annealing",
                self.min_temperature,
                "lower min_temperature or raise temperature",
            )

    def current_temperature(self) -> float:
        """The temperature at the current training step ``self.step``."""
        if self.anneal_rate == 0:
            return self.temperature
        every = self.anneal_every
        decayed = self.temperature * math.exp(-self.anneal_rate * every * (self.step // every))
        return max(self.min_temperature, decayed)
