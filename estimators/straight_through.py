"""Straight-through estimators: a hard sample forward, a surrogate's Jacobian backward.

``straight-through`` (Bengio, Leonard, Courville 2013, arXiv 1308.3432): z ~ p_theta forward,
backward as if z were p_tau = softmax(theta / tau) (sigmoid(theta / tau) for Bernoulli), so
g = (1/tau) J(p_tau)^T grad_z f(z). tau is used only in the backward pass.

``st-gumbel-softmax`` (Jang, Gu, Poole 2017, arXiv 1611.01144): z = onehot(argmax(theta + G)), an
exact sample, and backward through y = softmax((theta + G) / tau), so g = (1/tau) J(y)^T grad_z f(z)
(Bernoulli: z = 1[theta + L > 0], y = sigmoid((theta + L) / tau)).

``reinmax`` (Liu, Dong, Liu, Yu, Gao 2023, NeurIPS, arXiv 2304.08612): D ~ Cat(softmax(theta))
forward (tau is not used there); with g = grad_D f(D), pi = softmax(theta),
pi_tau = softmax(theta / tau) and pi~ = (D + pi_tau) / 2, the backward pass is the second-order
(Heun-type) g_hat = 2 J(pi~) g - 1/2 J(pi) g, where J(q) = diag(q) - q q^T; no 1/tau factor.
Requires tau >= 1 as its authors do.

``gst`` / ``gst-p`` (Fan, Chi, Rudnicky, Ramadge 2022, ICML, arXiv 2206.07235): D ~ Cat(pi) with
index d and m = argmax theta; the gapped logits put theta'_d = theta_m and
theta'_k = min(theta_k, theta_m - gap) for k != d, then centre them; the output is D + p - sg(p)
with p = softmax(theta' / tau). ``gst`` has gap = 1; ``gst-p`` has gap = -log(1 - pi_d) / pi_d.
Detach convention (a named parameter, default ``detach = true``): the shift theta' - theta is held
constant, so g_hat = (1/tau) J(p) grad_D f(D) with J at the gapped point; ``detach = false``
differentiates through theta_m, the clipping and (gst-p) the gap, as in the authors' VAE script.

``gumbel-rao`` (Paulus, Maddison, Krause 2021, ICLR, arXiv 2010.04838), GR-MCK with
K = ``samples``: D ~ Cat(pi); K conditional Gumbel draws zeta^k ~ (theta + G | argmax = D); output
D + p_bar - sg(p_bar), p_bar = (1/K) sum_k softmax((theta + G^k) / tau). Detach convention
(pinned): G^k = zeta^k - theta is held fixed, so g_hat = E[ST-GS estimate | D] by Monte Carlo: the
same mean as ST-Gumbel-Softmax with no larger variance (K = 1 is distributed as ST-GS).

All are biased (the gradient of f at a hard point, not of E f), with 1 evaluation of f, and
need f to be differentiable at hard points. Bernoulli latents run as 2-class categoricals with
logits [0, theta] where the method is categorical (ReinMax, GST, Gumbel-Rao).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from estbench.contracts import Cost, Estimate, Estimator
from estbench.hyperparams import hyper
from estbench.latents import Latent, as_categorical, conditional_gumbel, one_hot
from estbench.pathwise import (
    hard_forward,
    probs_jacobian_product,
    softmax_jacobian_product,
    straight_through,
)
from estbench.registry import register_estimator
from estbench.schedules import TemperatureSchedule
from estimators.relaxed import relaxed_sample

__all__ = [
    "StraightThrough",
    "STGumbelSoftmax",
    "ReinMax",
    "GST",
    "GSTP",
    "GumbelRao",
]


@register_estimator("straight-through")
@dataclass(kw_only=True)
class StraightThrough(TemperatureSchedule, Estimator):
    """Straight-through: hard z ~ p_theta forward, d p_tau / d theta backward. Biased."""

    description = "straight-through: hard sample forward, tempered probabilities backward"
    reparameterised = True

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        z = latent.sample(logits)
        tau = self.current_temperature()
        p = latent.probs(logits.detach() / tau)
        cost = f(hard_forward(z, logits, lambda g: probs_jacobian_product(latent, p, g) / tau))
        return Estimate(cost, cost.detach(), 1)


@register_estimator("st-gumbel-softmax")
@dataclass(kw_only=True)
class STGumbelSoftmax(TemperatureSchedule, Estimator):
    """Straight-through Gumbel-Softmax: Gumbel-max sample forward, relaxed sample backward."""

    description = "straight-through Gumbel-Softmax: Gumbel-max forward, relaxed sample backward"
    reparameterised = True

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        tau = self.current_temperature()
        perturbed, y = relaxed_sample(logits.detach(), latent, tau)
        if latent.kind == "bernoulli":
            z = (perturbed > 0).to(logits.dtype)
        else:
            z = one_hot(perturbed.argmax(-1), latent.categories, logits.dtype)
        cost = f(hard_forward(z, logits, lambda g: probs_jacobian_product(latent, y, g) / tau))
        return Estimate(cost, cost.detach(), 1)


@register_estimator("reinmax")
@dataclass(kw_only=True)
class ReinMax(TemperatureSchedule, Estimator):
    """ReinMax: hard sample forward, g = 2 J(pi~) g_D - 1/2 J(pi) g_D backward. Biased."""

    description = "ReinMax: second-order straight-through (Heun's method)"
    reparameterised = True

    temperature: float = hyper(1.0, ge=1.0, doc="tau >= 1, used only in pi_tau (backward)")
    min_temperature: float = hyper(1.0, ge=1.0, doc="floor of the annealed temperature (>= 1)")

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        latent, logits, f = as_categorical(latent, logits, f)
        z = latent.sample(logits)
        theta = logits.detach()
        pi = torch.softmax(theta, -1)
        pi_tilde = 0.5 * (z + torch.softmax(theta / self.current_temperature(), -1))

        def backward(g: Tensor) -> Tensor:  # 2 J(pi~) g - 1/2 J(pi) g
            return 2 * softmax_jacobian_product(pi_tilde, g) - 0.5 * softmax_jacobian_product(pi, g)

        cost = f(hard_forward(z, logits, backward))
        return Estimate(cost, cost.detach(), 1)


@register_estimator("gst")
@dataclass(kw_only=True)
class GST(TemperatureSchedule, Estimator):
    """Gapped straight-through with a fixed gap (GST-1.0 for gap = 1). Biased."""

    description = "gapped straight-through, fixed gap (GST-1.0)"
    reparameterised = True

    gap: float = hyper(1.0, gt=0.0, doc="every other logit ends at least this far below")
    detach: bool = hyper(True, doc="hold theta' - theta constant (see the module docstring)")

    def _gap(self, logits: Tensor, z: Tensor) -> Tensor | float:
        """The gap for each variable, ``[..., D, 1]`` or a number."""
        return self.gap

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        latent, logits, f = as_categorical(latent, logits, f)
        z = latent.sample(logits)
        source = logits.detach() if self.detach else logits
        top = source.max(-1, keepdim=True).values
        clipped = torch.minimum(source, top - self._gap(source, z))
        gapped = torch.where(z.bool(), top, clipped)
        gapped = gapped - gapped.mean(-1, keepdim=True)
        tau = self.current_temperature()
        p = torch.softmax(gapped / tau, -1)
        if self.detach:  # the shift theta' - theta held constant: d theta' / d theta = I
            p = p.detach()
            cost = f(hard_forward(z, logits, lambda g: softmax_jacobian_product(p, g) / tau))
        else:
            cost = f(straight_through(z, p))
        return Estimate(cost, cost.detach(), 1)


@register_estimator("gst-p")
@dataclass(kw_only=True)
class GSTP(GST):
    """Gapped straight-through with the probability-dependent gap -log(1 - pi_d) / pi_d. Biased."""

    description = "gapped straight-through, probability-dependent gap (GST-p)"

    def _gap(self, logits: Tensor, z: Tensor) -> Tensor:
        probs_d = (torch.softmax(logits, -1) * z).sum(-1, keepdim=True)
        shrunk = probs_d * (1 - 1e-5)  # keeps log(1 - pi_d) finite as pi_d -> 1
        return -torch.log1p(-shrunk) / shrunk


@register_estimator("gumbel-rao")
@dataclass(kw_only=True)
class GumbelRao(TemperatureSchedule, Estimator):
    """Gumbel-Rao (GR-MCK): ST-Gumbel-Softmax Rao-Blackwellised over ``samples`` conditional
    Gumbel draws. Biased (same mean as ST-GS); 1 evaluation of f."""

    description = "Gumbel-Rao: Rao-Blackwellised ST-Gumbel-Softmax (GR-MCK)"
    reparameterised = True

    samples: int = hyper(10, ge=1, doc="conditional Gumbel draws K per estimate")

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        latent, logits, f = as_categorical(latent, logits, f)
        z = latent.sample(logits)
        theta = logits.detach()
        tau = self.current_temperature()
        # y^k = softmax((theta + G^k) / tau) with G^k = zeta^k - theta held fixed
        y = torch.softmax(conditional_gumbel(theta, z, (self.samples,)) / tau, -1)

        def backward(g: Tensor) -> Tensor:  # (1/K) sum_k (1/tau) J(y^k) g
            return softmax_jacobian_product(y, g).mean(0) / tau

        cost = f(hard_forward(z, logits, backward))
        return Estimate(cost, cost.detach(), 1)
