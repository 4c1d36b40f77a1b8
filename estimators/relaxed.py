"""Gumbel-Softmax / Concrete relaxation (pathwise gradient of a relaxed sample).

Categorical: y = softmax((theta + G) / tau), G ~ Gumbel(0, 1); binary Concrete:
y = sigmoid((theta + L) / tau), L ~ Logistic(0, 1). The estimate is grad f(y).

Biased for E[f(z)] over discrete z: it is unbiased only for the relaxed objective E[f(y)]; the
bias shrinks as tau -> 0 while the variance grows. ``f`` must accept points of the simplex /
[0, 1]^D. The reported value is f at the relaxed point.

References: Jang, Gu, Poole 2017, ICLR, arXiv 1611.01144; Maddison, Mnih, Teh 2017, ICLR,
arXiv 1611.00712.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from estbench.contracts import Cost, Estimate, Estimator
from estbench.latents import Latent, gumbel, logistic
from estbench.pathwise import hard_forward, probs_jacobian_product
from estbench.registry import register_estimator
from estbench.schedules import TemperatureSchedule

__all__ = ["GumbelSoftmax", "relaxed_sample"]


def relaxed_sample(logits: Tensor, latent: Latent, temperature: float) -> tuple[Tensor, Tensor]:
    """Perturbed logits s = theta + noise and the relaxed sample y(s / tau), both like logits."""
    if latent.kind == "bernoulli":
        perturbed = logits + logistic(logits.shape, logits)  # ~ Logistic(theta, 1)
        return perturbed, torch.sigmoid(perturbed / temperature)
    perturbed = logits + gumbel(logits.shape, logits)  # theta + Gumbel(0, 1)
    return perturbed, torch.softmax(perturbed / temperature, -1)


@register_estimator("gumbel-softmax")
@dataclass(kw_only=True)
class GumbelSoftmax(TemperatureSchedule, Estimator):
    """Gumbel-Softmax / Concrete: grad f(y) at a relaxed sample y. Biased; 1 evaluation."""

    description = "Gumbel-Softmax / binary Concrete relaxation (f on relaxed samples)"
    reparameterised = True
    relaxed_inputs = True

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        tau = self.current_temperature()
        _, y = relaxed_sample(logits.detach(), latent, tau)
        # the relaxed sample y, with its Jacobian dy/dtheta = (1/tau) J(y) applied in closed form
        cost = f(hard_forward(y, logits, lambda g: probs_jacobian_product(latent, y, g) / tau))
        return Estimate(cost, cost.detach(), 1)
