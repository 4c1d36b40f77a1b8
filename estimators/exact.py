"""The exact gradient by enumeration: a reference, not an estimator one would train with.

surrogate = sum_z p_theta(z) f(z) over all K^D states, so its gradient is exactly
grad E[f(z)] (through p and through parameters inside f). Unbiased with zero variance; costs
K^D evaluations of f, and refuses latent spaces larger than ``max_states``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from estbench.contracts import Cost, Estimate, Estimator
from estbench.hyperparams import hyper
from estbench.latents import DEFAULT_MAX_STATES, Latent, expectation_by_enumeration
from estbench.registry import register_estimator

__all__ = ["Exact"]


@register_estimator("exact")
@dataclass(kw_only=True)
class Exact(Estimator):
    """Exact expectation by enumerating every latent state. Unbiased, zero variance."""

    description = "exact gradient by enumerating the latent space (reference)"
    unbiased = True
    deterministic = True

    max_states: int = hyper(DEFAULT_MAX_STATES, ge=1, doc="largest latent space to enumerate")

    def check_latent(self, latent: Latent) -> None:
        latent.check_enumerable(self.max_states, who="estimator 'exact'")

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        expectation = expectation_by_enumeration(latent, logits, f, self.max_states)
        return Estimate(expectation, expectation.detach(), latent.num_states)
