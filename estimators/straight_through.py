"""Straight-through estimators: a hard sample forward, a surrogate's Jacobian backward.

``straight-through`` (Bengio, Leonard, Courville 2013, arXiv 1308.3432): z ~ p_theta forward,
backward as if z were p_tau = softmax(theta / tau) (sigmoid(theta / tau) for Bernoulli), so
g = (1/tau) J(p_tau)^T grad_z f(z). tau is used only in the backward pass.

``st-gumbel-softmax`` (Jang, Gu, Poole 2017, arXiv 1611.01144): z = onehot(argmax(theta + G)), an
exact sample, and backward through y = softmax((theta + G) / tau), so g = (1/tau) J(y)^T grad_z f(z)
(Bernoulli: z = 1[theta + L > 0], y = sigmoid((theta + L) / tau)).

Both are biased (the gradient of f at a hard point, not of E f), with 1 evaluation of f, and
need f to be differentiable at hard points.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from estbench.contracts import Cost, Estimate, Estimator
from estbench.latents import Latent, one_hot
from estbench.registry import register_estimator
from estbench.schedules import TemperatureSchedule
from estimators.relaxed import relaxed_sample

__all__ = ["StraightThrough", "STGumbelSoftmax", "straight_through"]


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value ``hard``, gradient of ``soft``."""
    return hard + soft - soft.detach()


@register_estimator("straight-through")
@dataclass(kw_only=True)
class StraightThrough(TemperatureSchedule, Estimator):
    """Straight-through: hard z ~ p_theta forward, d p_tau / d theta backward. Biased."""

    description = "straight-through: hard sample forward, tempered probabilities backward"
    reparameterised = True

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        z = latent.sample(logits)
        cost = f(straight_through(z, latent.probs(logits / self.current_temperature())))
        return Estimate(cost, cost.detach(), 1)


@register_estimator("st-gumbel-softmax")
@dataclass(kw_only=True)
class STGumbelSoftmax(TemperatureSchedule, Estimator):
    """Straight-through Gumbel-Softmax: Gumbel-max sample forward, relaxed sample backward."""

    description = "straight-through Gumbel-Softmax: Gumbel-max forward, relaxed sample backward"
    reparameterised = True

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        perturbed, y = relaxed_sample(logits, latent, self.current_temperature())
        if latent.kind == "bernoulli":
            z = (perturbed > 0).to(logits.dtype)
        else:
            z = one_hot(perturbed.argmax(-1), latent.categories, logits.dtype)
        cost = f(straight_through(z.detach(), y))
        return Estimate(cost, cost.detach(), 1)
