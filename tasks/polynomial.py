"""Polynomial programming (Liu et al. 2023, ReinMax, NeurIPS, arXiv 2304.08612).

D variables with two categories; z_i is the first coordinate of the one-hot sample, so
P(z_i = 1) = q_i = softmax(theta_i)_0. Cost f = (1/D) sum_i |z_i - 0.45|^p, averaged over a batch
of samples. Closed form per coordinate: E|z_i - 0.45|^p = q_i 0.55^p + (1 - q_i) 0.45^p, hence
dL/dtheta_i0 = -dL/dtheta_i1 = q_i (1 - q_i)(0.55^p - 0.45^p) / D. Logits start U(-0.01, 0.01).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from estbench.contracts import Cost, Params, Task
from estbench.hyperparams import hyper
from estbench.latents import Latent
from estbench.registry import register_task

__all__ = ["Polynomial"]

SHIFT = 0.45


@register_task("polynomial")
@dataclass(kw_only=True)
class Polynomial(Task):
    """ReinMax's polynomial programming: f = mean_i |z_i - 0.45|^p over 2-category variables."""

    cost_depends_on_params = False
    description = "ReinMax polynomial programming, f = mean_i |z_i - 0.45|^p"

    dim: int = hyper(128, ge=1, doc="number of two-category variables (128 in the paper)")
    power: float = hyper(2.0, gt=0.0, doc="exponent p; the paper uses 1.5, 2 and 3")
    batch_size: int = hyper(64, ge=1, doc="samples averaged per step (64 in the paper)")

    @property
    def latent(self) -> Latent:
        return Latent("categorical", self.dim, 2)

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu") -> Params:
        logits = (torch.rand(self.dim, 2, generator=generator) * 2 - 1) * 0.01
        return {"logits": logits.to(device).requires_grad_(True)}

    def logits(self, params: Params, batch: Any) -> Tensor:
        return params["logits"].expand(self.batch_size, self.dim, 2)

    def cost(self, params: Params, batch: Any) -> Cost:
        return lambda z: (z[..., 0] - SHIFT).abs().pow(self.power).mean(-1)

    def _gap(self) -> float:
        return (1 - SHIFT) ** self.power - SHIFT**self.power

    def exact_objective(self, params: Params, batch: Any = None) -> Tensor:
        q = torch.softmax(params["logits"], -1)[:, 0]
        return (SHIFT**self.power + q * self._gap()).mean()

    def exact_gradient(self, params: Params, batch: Any = None) -> Params:
        q = torch.softmax(params["logits"].detach(), -1)[:, 0]
        g0 = q * (1 - q) * self._gap() / self.dim
        return {"logits": torch.stack([g0, -g0], -1)}
