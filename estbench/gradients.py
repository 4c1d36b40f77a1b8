"""Draw many independent gradient estimates at fixed parameters, vectorised over replicas.

``batched``: the parameters are stacked into M replicas ``[M, ...]`` (leaf tensors), the task's
``logits`` and ``cost`` are mapped over replicas with ``torch.func.vmap``, and the estimator runs
**once** on logits ``[M, *batch, *event]`` (every estimator accepts leading batch dims). Replica m's
loss depends only on replica m's parameters, so one backward pass of the summed losses yields the
M per-replica gradients ``[M, P]``: no Python loop over draws. ``loop``: one estimate and one
``autograd.grad`` per draw, for estimators that declare ``vectorisable = False``. Both give draws
from the same distribution (the estimator's own randomness, from the ambient generator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from estbench.contracts import Cost, Estimator, Params, Task
from estbench.errors import EstbenchError

__all__ = ["sample_gradients", "flatten", "reference_gradient", "METHODS"]

METHODS = ("auto", "batched", "loop")


def flatten(grads: Params, names: Sequence[str]) -> Tensor:
    """Concatenate per-parameter tensors into one flat vector ``[P]`` in ``names`` order."""
    return torch.cat([grads[n].reshape(-1) for n in names])


def reference_gradient(task: Task, params: Params, batch: Any) -> Tensor | None:
    """The task's exact gradient, flattened in parameter order, or ``None`` when unavailable."""
    exact = task.exact_gradient(params, batch)
    if exact is None:
        return None
    return flatten({name: g.detach() for name, g in exact.items()}, list(params))


def _replicated_cost(task: Task, replicas: Params, batch: Any, tail_ndim: int) -> Cost:
    """``f`` for stacked replicas: z ``[*S, M, *batch, *event]`` -> ``[*S, M, *batch]``, applying
    replica m's cost to slice m of the replica dim (found from the end: batch + event dims)."""

    def per_replica(p: Params, z: Tensor) -> Tensor:
        return task.cost(p, batch)(z)

    def cost(z: Tensor) -> Tensor:
        dim = z.dim() - tail_ndim - 1
        return vmap(per_replica, in_dims=(0, dim), out_dims=dim)(replicas, z)

    return cost


def _batched(
    task: Task, estimator: Estimator, params: Params, batch: Any, count: int
) -> Tensor:
    names = list(params)
    replicas = {
        n: p.detach().unsqueeze(0).expand(count, *p.shape).clone().requires_grad_(True)
        for n, p in params.items()
    }
    logits = vmap(task.logits, in_dims=(0, None))(replicas, batch)
    if task.cost_depends_on_params:
        f = _replicated_cost(task, replicas, batch, tail_ndim=logits.dim() - 1)
    else:
        f = task.cost(params, batch)
    estimate = estimator.estimate(logits, f, task.latent)
    loss = estimate.surrogate.reshape(count, -1).mean(1).sum()
    grads = torch.autograd.grad(loss, [replicas[n] for n in names], allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(replicas[n]) if g is None else g).reshape(count, -1)
            for n, g in zip(names, grads)
        ],
        dim=1,
    )


def _loop(task: Task, estimator: Estimator, params: Params, batch: Any, count: int) -> Tensor:
    names = list(params)
    rows = []
    for _ in range(count):
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        estimate = estimator.estimate(
            task.logits(leaves, batch), task.cost(leaves, batch), task.latent
        )
        grads = torch.autograd.grad(
            estimate.surrogate.mean(), [leaves[n] for n in names], allow_unused=True
        )
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(leaves[n]) if g is None else g).reshape(-1)
                    for n, g in zip(names, grads)
                ]
            )
        )
    return torch.stack(rows)


def sample_gradients(
    task: Task,
    estimator: Estimator,
    params: Params,
    batch: Any,
    num_samples: int,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """``num_samples`` independent estimates of ``grad_params E[f]``, flattened: ``[M, P]``.

    method: 'batched' (replicas in one pass, in chunks of ``chunk_size``), 'loop' (one draw at a
    time), or 'auto' (batched when the estimator is ``vectorisable``). Estimator state is frozen.
    """
    if method not in METHODS:
        raise EstbenchError(f"gradient method must be one of {METHODS}, got {method!r}")
    if num_samples < 1:
        raise EstbenchError(f"gradient_samples must be >= 1, got {num_samples}")
    if method == "auto":
        method = "batched" if estimator.vectorisable else "loop"
    draw = _batched if method == "batched" else _loop
    chunk = num_samples if chunk_size is None else max(1, min(chunk_size, num_samples))
    with torch.enable_grad():
        parts = [
            draw(task, estimator, params, batch, min(chunk, num_samples - start))
            for start in range(0, num_samples, chunk)
        ]
    return torch.cat(parts).detach()
