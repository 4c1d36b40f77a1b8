"""Antithetic estimators for Bernoulli latents: ARM and DisARM (one antithetic pair each).

``arm`` (Yin & Zhou 2019, ICLR, arXiv 1807.11143): u ~ U(0,1)^D, b+ = 1[u > sigmoid(-theta)],
b- = 1[u < sigmoid(theta)] (both Bernoulli(sigmoid(theta))), and
    g_i = [f(b+) - f(b-)] (u_i - 1/2).
``disarm`` (Dong, Mnih, Tucker 2020, NeurIPS, arXiv 2006.10680): b = 1[u < sigmoid(theta)],
b~ = 1[1 - u < sigmoid(theta)], and
    g_i = 1/2 [f(b) - f(b~)] (-1)^{b~_i} 1[b_i != b~_i] sigmoid(|theta_i|),
ARM with u integrated out given the pair.

Both are unbiased with 2 evaluations of f (compare with RLOO at 2 samples); Bernoulli only. The
surrogate is sum_i sg(g_i) theta_i, so the estimate reaches parameters upstream of the logits,
plus the mean of the two costs for parameters inside f.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from estbench.contracts import Cost, Estimate, Estimator
from estbench.latents import Latent
from estbench.registry import register_estimator

__all__ = ["ARM", "DisARM"]


def _pair_estimate(logits: Tensor, f: Cost, first: Tensor, second: Tensor, weights: Tensor
                   ) -> Estimate:
    """Evaluate f on the pair in one call; g = [f(first) - f(second)] * weights."""
    costs = f(torch.stack([first, second]))  # [2, *batch]
    difference = (costs[0] - costs[1]).detach().unsqueeze(-1)
    surrogate = (difference * weights * logits).sum(-1) + costs.mean(0)
    return Estimate(surrogate, costs.detach().mean(0), 2)


@register_estimator("arm")
@dataclass(kw_only=True)
class ARM(Estimator):
    """Augment-REINFORCE-merge: one antithetic pair, g = [f(b+) - f(b-)](u - 1/2). Unbiased."""

    description = "ARM: antithetic augment-REINFORCE-merge (Bernoulli)"
    supports = frozenset({"bernoulli"})
    unbiased = True

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device)
        theta = logits.detach()
        plus = (u > torch.sigmoid(-theta)).to(logits.dtype)
        minus = (u < torch.sigmoid(theta)).to(logits.dtype)
        return _pair_estimate(logits, f, plus, minus, u - 0.5)


@register_estimator("disarm")
@dataclass(kw_only=True)
class DisARM(Estimator):
    """DisARM: ARM with the augmentation integrated out; never worse than ARM. Unbiased."""

    description = "DisARM: antithetic pair with u integrated out (Bernoulli)"
    supports = frozenset({"bernoulli"})
    unbiased = True

    def _estimate(self, logits: Tensor, f: Cost, latent: Latent) -> Estimate:
        u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device)
        theta = logits.detach()
        p = torch.sigmoid(theta)
        b = (u < p).to(logits.dtype)
        b_tilde = (1 - u < p).to(logits.dtype)
        sign = 1 - 2 * b_tilde  # (-1)^{b~_i}
        weights = 0.5 * sign * (b != b_tilde).to(logits.dtype) * torch.sigmoid(theta.abs())
        return _pair_estimate(logits, f, b, b_tilde, weights)
