"""Pathwise building blocks: a value whose backward pass is a closed-form Jacobian product.

Straight-through and relaxed estimators all produce gradients of the form M^T grad_z f with a
known M (a softmax or sigmoid Jacobian at some point). Applying M^T directly in the backward pass
costs one fused product instead of the several elementwise passes autograd would take through the
construction, which keeps each estimator as fast as a hand-written version of its formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from estbench.latents import Latent

__all__ = [
    "hard_forward",
    "straight_through",
    "softmax_jacobian_product",
    "probs_jacobian_product",
]


class _HardForward(torch.autograd.Function):
    """Forward: ``hard``. Backward: ``backward(g)`` to ``logits``, for the gradient g reaching
    the sample; ``backward`` is the estimator's closed-form Jacobian-transpose."""

    generate_vmap_rule = True  # forward and backward are plain tensor code: torch.func batches them

    @staticmethod
    def forward(hard: Tensor, logits: Tensor, backward: Callable[[Tensor], Tensor]) -> Tensor:
        return hard.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.backward_fn = inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        return None, ctx.backward_fn(grad), None


def hard_forward(hard: Tensor, logits: Tensor, backward: Callable[[Tensor], Tensor]) -> Tensor:
    """The value ``hard`` whose gradient w.r.t. ``logits`` is ``backward(grad_hard)``."""
    return _HardForward.apply(hard.detach(), logits, backward)


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value ``hard``, gradient of ``soft`` (hard + soft - sg(soft))."""
    return hard.detach() + (soft - soft.detach())


def softmax_jacobian_product(q: Tensor, v: Tensor) -> Tensor:
    """J(q) v = q * v - q (q . v) over the last axis (J(q) = diag(q) - q q^T is symmetric)."""
    return q * v - q * (q * v).sum(-1, keepdim=True)


def probs_jacobian_product(latent: Latent, q: Tensor, v: Tensor) -> Tensor:
    """(d probs / d logits)^T v at probabilities q: q(1 - q) v, or J(q) v."""
    if latent.kind == "bernoulli":
        return q * (1 - q) * v
    return softmax_jacobian_product(q, v)
