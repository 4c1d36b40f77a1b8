"""Toy tasks with closed-form objectives and gradients.

``bernoulli-toy`` (the REBAR / RELAX toy, Tucker et al. 2017 arXiv 1703.07370, Grathwohl et al.
2018 arXiv 1711.00123, made D-dimensional): b_i ~ Bernoulli(sigmoid(theta_i)),
f(b) = (1/D) sum_i (b_i - t)^2, so L = (1/D) sum_i [p_i (1-t)^2 + (1-p_i) t^2] and
dL/dtheta_i = p_i (1 - p_i)(1 - 2t) / D.

``categorical-toy`` (after the IndeCateR synthetic task, De Smet et al. 2023 arXiv 2311.12569):
x_i ~ Cat(softmax(theta_i)) with values 0..K-1, a fixed point c ~ U(0, K-1)^D drawn from the seed,
f(x) = (1/D) sum_i |x_i - c_i|. With a_ik = |k - c_i| and pi = softmax(theta_i):
L = (1/D) sum_ik pi_ik a_ik and dL/dtheta_ik = pi_ik (a_ik - sum_j pi_ij a_ij) / D.
On relaxed inputs x_i = sum_k k y_ik.
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

__all__ = ["BernoulliToy", "CategoricalToy"]


@register_task("bernoulli-toy")
@dataclass(kw_only=True)
class BernoulliToy(Task):
    """D independent Bernoullis, f(b) = mean_i (b_i - target)^2; exact gradient in closed form."""

    cost_depends_on_params = False
    description = "D Bernoullis, f = mean_i (b_i - target)^2 (REBAR/RELAX toy)"

    dim: int = hyper(1, ge=1, doc="number of Bernoulli variables D")
    target: float = hyper(0.45, doc="t in (b - t)^2; 0.45 and 0.499 are the classic values")
    init_logit: float = hyper(0.0, doc="initial value of every logit")
    batch_size: int = hyper(1, ge=1, doc="independent samples averaged per training step")

    @property
    def latent(self) -> Latent:
        return Latent("bernoulli", self.dim)

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu") -> Params:
        logits = torch.full((self.dim,), float(self.init_logit), device=device)
        return {"logits": logits.requires_grad_(True)}

    def logits(self, params: Params, batch: Any) -> Tensor:
        return params["logits"].expand(self.batch_size, self.dim)

    def cost(self, params: Params, batch: Any) -> Cost:
        return lambda z: ((z - self.target) ** 2).mean(-1)

    def exact_objective(self, params: Params, batch: Any = None) -> Tensor:
        p = torch.sigmoid(params["logits"])
        return (p * (1 - self.target) ** 2 + (1 - p) * self.target**2).mean()

    def exact_gradient(self, params: Params, batch: Any = None) -> Params:
        p = torch.sigmoid(params["logits"].detach())
        return {"logits": p * (1 - p) * (1 - 2 * self.target) / self.dim}


@register_task("categorical-toy")
@dataclass(kw_only=True)
class CategoricalToy(Task):
    """D categoricals over 0..K-1, f(x) = mean_i |x_i - c_i| for a random point c."""

    cost_depends_on_params = False
    description = "D categoricals over 0..K-1, f = mean_i |x_i - c_i| (IndeCateR-style)"

    dim: int = hyper(3, ge=1, doc="number of categorical variables D")
    categories: int = hyper(3, ge=2, doc="categories K per variable")
    init_mean: float = hyper(0.0, doc="mean of the N(init_mean, init_std^2) initial logits")
    init_std: float = hyper(1.0, ge=0.0, doc="std of the initial logits")
    batch_size: int = hyper(1, ge=1, doc="independent samples averaged per training step")

    @property
    def latent(self) -> Latent:
        return Latent("categorical", self.dim, self.categories)

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu") -> Params:
        shape = (self.dim, self.categories)
        self._point = (torch.rand(self.dim, generator=generator) * (self.categories - 1)).to(device)
        self._values = torch.arange(self.categories, dtype=torch.float32, device=device)
        logits = self.init_mean + self.init_std * torch.randn(shape, generator=generator)
        return {"logits": logits.to(device).requires_grad_(True)}

    def logits(self, params: Params, batch: Any) -> Tensor:
        return params["logits"].expand(self.batch_size, self.dim, self.categories)

    def cost(self, params: Params, batch: Any) -> Cost:
        values, point = self._values, self._point
        return lambda z: ((z * values.to(z.dtype)).sum(-1) - point.to(z.dtype)).abs().mean(-1)

    def _distances(self, like: Tensor) -> Tensor:
        return (self._values.to(like.dtype) - self._point.to(like.dtype).unsqueeze(-1)).abs()

    def exact_objective(self, params: Params, batch: Any = None) -> Tensor:
        probs = torch.softmax(params["logits"], -1)
        return (probs * self._distances(probs)).sum(-1).mean()

    def exact_gradient(self, params: Params, batch: Any = None) -> Params:
        probs = torch.softmax(params["logits"].detach(), -1)
        a = self._distances(probs)
        centred = a - (probs * a).sum(-1, keepdim=True)
        return {"logits": probs * centred / self.dim}
