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

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from estbench.contracts import Cost, Estimator, Params, Task
from estbench.errors import EstbenchError
from estbench.latents import expectation_by_enumeration

__all__ = [
    "sample_gradients",
    "stream_draws",
    "auto_chunk",
    "flatten",
    "flatten_gradients",
    "group_indices",
    "reference_gradient",
    "reference_logits_gradient",
    "parameter_slices",
    "METHODS",
]


def parameter_slices(params: Params) -> dict[str, slice]:
    """Where each parameter lies in the flattened gradient vector."""
    out, start = {}, 0
    for name, p in params.items():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def group_indices(params: Params, groups: dict[str, list[str]]) -> dict[str, Tensor]:
    """For each named group of parameters, its coordinates in the flattened gradient vector."""
    slices = parameter_slices(params)
    device = next(iter(params.values())).device
    return {group: torch.cat([torch.arange(slices[n].start, slices[n].stop, device=device)
                              for n in names])
            for group, names in groups.items()}


def flatten_gradients(grads: Sequence[Tensor | None], like: Sequence[Tensor],
                      lead: tuple[int, ...] = ()) -> Tensor:
    """Concatenate gradients, each flattened after its ``lead`` dims, with zeros (shaped like the
    matching tensor of ``like``) where a gradient is ``None``: ``[*lead, sum of sizes]``."""
    return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(*lead, -1)
                      for g, t in zip(grads, like)], dim=len(lead))

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


def reference_logits_gradient(task: Task, params: Params, batch: Any) -> Tensor | None:
    """Exact gradient of E_{z ~ q(logits)} f(z) w.r.t. the logits tensor ``[*batch, *event]``
    flattened (f held fixed), by enumeration; ``None`` when the space is too large."""
    if task.latent.num_states > task.max_enumeration_states:
        return None
    detached = {k: v.detach() for k, v in params.items()}
    with torch.enable_grad():
        logits = task.logits(detached, batch).detach().requires_grad_(True)
        value = expectation_by_enumeration(
            task.latent, logits, task.cost(detached, batch), task.max_enumeration_states
        ).sum() / task.latent.batch_shape(logits).numel()
        (grad,) = torch.autograd.grad(value, logits)
    return grad.reshape(-1)


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
) -> tuple[Tensor, Tensor]:
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
    inputs = [replicas[n] for n in names] + [logits]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return (flatten_gradients(grads[:-1], inputs[:-1], (count,)),
            flatten_gradients(grads[-1:], inputs[-1:], (count,)))


def _loop(task: Task, estimator: Estimator, params: Params, batch: Any, count: int
          ) -> tuple[Tensor, Tensor]:
    names = list(params)
    rows, logit_rows = [], []
    for _ in range(count):
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        logits = task.logits(leaves, batch)
        estimate = estimator.estimate(logits, task.cost(leaves, batch), task.latent)
        inputs = [leaves[n] for n in names] + [logits]
        grads = torch.autograd.grad(estimate.surrogate.mean(), inputs, allow_unused=True)
        rows.append(flatten_gradients(grads[:-1], inputs[:-1]))
        logit_rows.append(flatten_gradients(grads[-1:], inputs[-1:]))
    return torch.stack(rows), torch.stack(logit_rows)


#: memory for replicated parameters, their gradients and working copies in one batched pass
REPLICA_BUDGET_BYTES = 1 << 30


def auto_chunk(params: Params, budget: int = REPLICA_BUDGET_BYTES) -> int:
    """Replicas per batched pass so that about ``budget`` bytes hold their parameters (four
    copies: the replicas, their gradients and autograd's working tensors); toy tasks get their
    thousands at once, a network of a million parameters a few dozen."""
    per_replica = sum(p.numel() * p.element_size() for p in params.values()) * 4
    return max(1, budget // max(per_replica, 1))


def stream_draws(
    task: Task,
    estimator: Estimator,
    params: Params,
    batch: Any,
    num_samples: int,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Chunks of independent draws: (gradients w.r.t. the parameters ``[m, P]``, gradients
    w.r.t. the logits ``[m, L]``), ``num_samples`` draws in all. Estimator state is frozen."""
    if method not in METHODS:
        raise EstbenchError(f"gradient method must be one of {METHODS}, got {method!r}")
    if num_samples < 1:
        raise EstbenchError(f"gradient_samples must be >= 1, got {num_samples}")
    if method == "auto":
        method = "batched" if estimator.vectorisable else "loop"
    draw = _batched if method == "batched" else _loop
    chunk = max(1, min(chunk_size or auto_chunk(params), num_samples))
    for start in range(0, num_samples, chunk):
        with torch.enable_grad():
            grads, logit_grads = draw(task, estimator, params, batch, min(chunk, num_samples - start))
        yield grads.detach(), logit_grads.detach()


def sample_gradients(
    task: Task,
    estimator: Estimator,
    params: Params,
    batch: Any,
    num_samples: int,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    with_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``num_samples`` independent estimates of ``grad_params E[f]``, flattened: ``[M, P]``;
    with ``with_logits`` also the same draws' gradients w.r.t. the logits tensor ``[M, L]``.

    method: 'batched' (replicas in one pass, in chunks of ``chunk_size``; default from a memory
    budget, :func:`auto_chunk`), 'loop' (one draw at a time), or 'auto' (batched when the
    estimator is ``vectorisable``). Estimator state is frozen. All M x P values are kept: for
    large models use :func:`stream_draws` with :class:`~estbench.metrics.StreamingGradientMetrics`.
    """
    parts = list(stream_draws(task, estimator, params, batch, num_samples, method=method,
                              chunk_size=chunk_size))
    grads = torch.cat([p for p, _ in parts])
    if with_logits:
        return grads, torch.cat([g for _, g in parts])
    return grads
