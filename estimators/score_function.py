"""Score-function (REINFORCE) estimators with composable baselines.

    g = (1/n) sum_s [f(z_s) - b_s] grad log p(z_s) + (1/n) sum_s grad f(z_s),  z_s ~ p iid

where the second term is the pathwise gradient of parameters inside ``f`` (zero for toy costs).
Unbiased whenever ``b_s`` does not depend on ``z_s``: no baseline, an exponential moving average of
earlier steps, or the leave-one-out mean of the other samples (RLOO).

References: Williams 1992, Machine Learning 8:229-256 (REINFORCE); Kool, van Hoof, Welling 2019,
"Buy 4 REINFORCE samples, get a baseline for free!", ICLR workshop (RLOO).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from estbench.contracts import Cost, Estimate, Estimator
from estbench.hyperparams import hyper
from estbench.latents import Latent
from estbench.registry import register_estimator
from estimators.baselines import make_baseline

__all__ = ["Reinforce", "RLOO"]


@register_estimator("reinforce")
@dataclass(kw_only=True)
class Reinforce(Estimator):
    """REINFORCE with ``samples`` iid draws and a baseline ('none', 'ema' or 'loo').

    Unbiased (the EMA baseline is updated after use; 'loo' needs samples >= 2). Costs ``samples``
    evaluations of ``f``.
    """

    description = "score function (REINFORCE) with none / EMA / leave-one-out baselines"
    unbiased = True

    baseline: str = hyper("none", choices=("none", "ema", "loo"), doc="baseline subtracted from f")
    samples: int = hyper(1, ge=1, doc="independent samples averaged per estimate")
    decay: float = hyper(0.9, ge=0.0, le=0.9999, doc="EMA decay (baseline='ema' only)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.baseline == "loo" and self.samples < 2:
            self._fail("samples", ">= 2 for the leave-one-out baseline", self.samples,
                       "set samples = 2 or more, or choose baseline = 'none' or 'ema'")
        self._baseline = make_baseline(self.baseline, self.decay)

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        z = latent.sample(logits, (self.samples,))  # [n, *batch, *event]
        costs = f(z)  # [n, *batch]
        signal = costs.detach() - self._baseline(costs.detach())
        surrogate = (signal * latent.log_prob(logits, z) + costs).mean(0)
        return Estimate(surrogate, costs.detach().mean(0), self.samples)

    def update(self, estimate: Estimate) -> None:
        self._baseline.update(estimate.value)


@register_estimator("rloo")
@dataclass(kw_only=True)
class RLOO(Reinforce):
    """REINFORCE with the leave-one-out baseline over ``samples >= 2`` draws:
    g = 1/(n-1) sum_s (f(z_s) - mean f) grad log p(z_s). Unbiased; ``samples`` evaluations."""

    description = "REINFORCE with a leave-one-out baseline (RLOO)"

    baseline: str = hyper("loo", choices=("loo",), doc="fixed to the leave-one-out baseline")
    samples: int = hyper(2, ge=2, doc="independent samples per estimate")
