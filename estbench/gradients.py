"""Draw many independent gradient estimates at fixed parameters, within a memory budget.

Three methods give draws from the same distribution (the estimator's own randomness, from the
ambient generator):

``flat``: per-draw gradients through the shared parameters, ``vmap(grad(one draw))`` over draws
(``torch.func``, randomness ``"different"``). Whatever does not depend on the draw (the encoder's
forward pass) runs once; the rest runs once over all m x batch draws as flat matrix products, and
the backward pass forms each draw's weight gradient as a batched product of its activations and
output gradients: one forward and backward pass plus the m x P gradients themselves.
``batched``: the parameters are stacked into m replicas ``[m, ...]``, the task's ``logits`` and
``cost`` are mapped over replicas with ``vmap``, and the estimator runs once on logits
``[m, *batch, *event]``; one backward pass of the summed losses yields the per-replica gradients.
``loop``: one estimate and one ``autograd.grad`` per draw (estimators with
``vectorisable = False``, and the reference of the other two).

``auto`` probes each method that can run on a small chunk (its peak memory for one draw, then its
time for a few draws). The default, ``batched``, is kept without timing the others when its
draws would take under :data:`AUTO_MIN_SECONDS`; otherwise another method is taken only when the
probe times it at least :data:`SWITCH_FACTOR` faster. The methods draw the same distribution but
not the same bits, so only a clear margin may change the method: a near-tie decided by timing
noise would make a rerun, another worker count or a resumed cell differ in the last digits.
Chunk sizes come from the measured peak (activations included), not from parameter sizes. A
deterministic estimator (``Estimator.deterministic``) is drawn once: its m draws are that one
draw repeated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from estbench.contracts import Cost, Estimator, Params, Task
from estbench.errors import EstbenchError
from estbench.latents import expectation_by_enumeration
from estbench.memory import MIB, bytes_of, current_budget, megabytes, peak_bytes

__all__ = [
    "sample_gradients",
    "stream_draws",
    "plan_draws",
    "DrawPlan",
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

METHODS = ("auto", "flat", "batched", "loop")


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


Draws = tuple[Tensor, Tensor]


def _batched(task: Task, estimator: Estimator, params: Params, batch: Any, count: int) -> Draws:
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


def _shifted_logits(task: Task, params: Params, batch: Any, shift: Tensor) -> Tensor:
    """The task's logits plus ``shift`` (zeros): the gradient w.r.t. ``shift`` is the gradient
    w.r.t. the logits as the estimator sees them, with f held fixed (as for the reference)."""
    return task.logits(params, batch) + shift


def _logits_shape(task: Task, params: Params, batch: Any) -> torch.Size:
    with torch.no_grad():
        return task.logits({n: p.detach() for n, p in params.items()}, batch).shape


def _flat(task: Task, estimator: Estimator, params: Params, batch: Any, count: int) -> Draws:
    names = list(params)
    shared = {n: p.detach() for n, p in params.items()}
    first = next(iter(shared.values()))
    shift = torch.zeros(_logits_shape(task, params, batch), dtype=first.dtype, device=first.device)

    def one_draw(p: Params, zero: Tensor, _draw: Tensor) -> Tensor:
        logits = _shifted_logits(task, p, batch, zero)
        return estimator.estimate(logits, task.cost(p, batch), task.latent).surrogate.mean()

    per_draw = vmap(grad(one_draw, argnums=(0, 1)), in_dims=(None, None, 0),
                    randomness="different")
    grads, logit_grads = per_draw(shared, shift, torch.arange(count, device=first.device))
    return (flatten_gradients([grads[n] for n in names], [params[n] for n in names], (count,)),
            logit_grads.reshape(count, -1))


def _loop(task: Task, estimator: Estimator, params: Params, batch: Any, count: int) -> Draws:
    names = list(params)
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    first = leaves[names[0]]
    shift = torch.zeros(_logits_shape(task, params, batch), dtype=first.dtype,
                        device=first.device, requires_grad=True)
    inputs = [leaves[n] for n in names] + [shift]
    rows, logit_rows = [], []
    for _ in range(count):
        logits = _shifted_logits(task, leaves, batch, shift)
        estimate = estimator.estimate(logits, task.cost(leaves, batch), task.latent)
        grads = torch.autograd.grad(estimate.surrogate.mean(), inputs, allow_unused=True)
        rows.append(flatten_gradients(grads[:-1], inputs[:-1]))
        logit_rows.append(flatten_gradients(grads[-1:], inputs[-1:]))
    return torch.stack(rows), torch.stack(logit_rows)


DRAW: dict[str, Callable[[Task, Estimator, Params, Any, int], Draws]] = {
    "flat": _flat, "batched": _batched, "loop": _loop,
}
#: draws timed per candidate method when ``auto`` chooses
PROBE_DRAWS = 8
#: ``auto`` keeps its default (``batched``) without timing the others when the default's draws
#: are estimated to take less than this: the choice then never depends on timing noise, so
#: small cells give the same numbers whatever the machine's load
AUTO_MIN_SECONDS = 2.0
#: a chunk's working set, at most: larger chunks only add page faults and cache misses (on the
#: 20x10 VAE, chunks of 10-20 draws ran 1.0x the physical limit, one chunk of 200 draws 1.9x)
CHUNK_TARGET_BYTES = 128 * MIB
#: draws per chunk below which the target does not go (streamed statistics pair draws up)
MIN_CHUNK = 8


@dataclass(frozen=True)
class DrawPlan:
    """How a stream of draws runs: the method, draws per chunk, and what the probe measured
    (peak bytes of one draw, seconds per draw; NaN when not probed)."""

    method: str
    chunk: int
    draw_bytes: int
    seconds_per_draw: float = float("nan")


def _draws(method: str, task: Task, estimator: Estimator, params: Params, batch: Any,
           count: int) -> Draws:
    with torch.enable_grad():
        grads, logit_grads = DRAW[method](task, estimator, params, batch, count)
    return grads.detach(), logit_grads.detach()


def _chunk_size(method: str, draw_bytes: int, out_bytes: int, per_draw_bytes: int,
                budget: int) -> int:
    """Draws per chunk: as many as fit ``budget`` up to a working set of about
    :data:`CHUNK_TARGET_BYTES` (at least :data:`MIN_CHUNK` draws, which streamed statistics pair
    up, when they fit); 0 when not one draw fits. A vectorised chunk of c draws holds about c
    times one draw's peak (an upper bound: the shared part is counted c times); the loop holds
    one draw's working memory and the c rows it has gathered, twice while it stacks them.
    ``per_draw_bytes``: the caller's own cost per draw."""
    fixed, per_draw = 0, draw_bytes + per_draw_bytes
    if method == "loop":
        fixed, per_draw = draw_bytes, 2 * out_bytes + per_draw_bytes
    fits = max(0, budget - fixed) // max(per_draw, 1)
    return min(fits, max(MIN_CHUNK, CHUNK_TARGET_BYTES // max(per_draw, 1)))


def _too_big(task: Task, estimator: Estimator, need: int, budget: int) -> EstbenchError:
    return EstbenchError(
        f"gradient phase: one draw of '{estimator.name}' on '{task.name}' needs "
        f"{megabytes(need)}, above the {megabytes(budget)} left of the memory budget; raise "
        f"[measure] memory_budget_mb (0: a quarter of free memory) or lower the task's "
        f"gradient batch size"
    )


def _probe(method: str, task: Task, estimator: Estimator, params: Params, batch: Any,
           num_samples: int, per_draw_bytes: int, budget: int, chunk_size: int | None,
           timed: bool) -> DrawPlan:
    device = next(iter(params.values())).device
    (grads, logit_grads), draw_bytes = peak_bytes(
        lambda: _draws(method, task, estimator, params, batch, 1), device)
    out_bytes = bytes_of(grads, logit_grads)
    fits = _chunk_size(method, draw_bytes, out_bytes, per_draw_bytes, budget)
    if fits < 1 and not chunk_size:
        raise _too_big(task, estimator, draw_bytes + per_draw_bytes, budget)
    chunk = min(chunk_size or fits, num_samples)
    if not timed:
        return DrawPlan(method, chunk, draw_bytes)
    count = min(PROBE_DRAWS, chunk)
    started = time.perf_counter()
    _draws(method, task, estimator, params, batch, count)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return DrawPlan(method, chunk, draw_bytes, (time.perf_counter() - started) / count)


def plan_draws(task: Task, estimator: Estimator, params: Params, batch: Any, num_samples: int,
               *, method: str = "auto", chunk_size: int | None = None,
               budget: int | None = None, per_draw_bytes: int = 0) -> DrawPlan:
    """Choose the method and chunk size of a stream of ``num_samples`` draws from measured
    probes (the probes' random draws do not touch the ambient generator's state). Every call
    probes afresh: what can run depends on the estimator's state at this moment (a fresh NVIL
    cannot run under ``vmap``), so a plan cached from another checkpoint or process would make a
    resumed cell draw differently from one that never stopped.

    budget: bytes the draws may hold at once (default :func:`~estbench.memory.current_budget`);
    per_draw_bytes: what the caller keeps or spends per draw on top (stored rows, statistics).
    Raises :class:`EstbenchError` when not even one draw fits."""
    if method not in METHODS:
        raise EstbenchError(f"gradient method must be one of {METHODS}, got {method!r}")
    if num_samples < 1:
        raise EstbenchError(f"gradient_samples must be >= 1, got {num_samples}")
    device = next(iter(params.values())).device
    budget = current_budget(device) if budget is None else budget
    return _choose(task, estimator, params, batch, num_samples, method, chunk_size, budget,
                   per_draw_bytes)


def _choose(task: Task, estimator: Estimator, params: Params, batch: Any, num_samples: int,
            method: str, chunk_size: int | None, budget: int, per_draw_bytes: int) -> DrawPlan:
    device = next(iter(params.values())).device
    if method != "auto":
        candidates = [method]
    else:
        candidates = ["batched", "flat", "loop"] if estimator.vectorisable else ["loop"]
    plans: list[DrawPlan] = []
    failures: list[Exception] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for candidate in candidates:
            if plans and plans[0].seconds_per_draw * num_samples < AUTO_MIN_SECONDS:
                break  # the default is fast enough: keep the choice free of timing noise
            try:
                plans.append(_probe(candidate, task, estimator, params, batch, num_samples,
                                    per_draw_bytes, budget, chunk_size, len(candidates) > 1))
            except EstbenchError as err:
                failures.append(err)
            except (RuntimeError, NotImplementedError, TypeError) as err:
                if len(candidates) == 1:
                    raise EstbenchError(
                        f"gradient method '{candidate}' cannot draw '{estimator.name}' on "
                        f"'{task.name}': {str(err).splitlines()[0]}; use gradient_method = "
                        f"\"auto\"") from err
                failures.append(err)
    if not plans:  # the budget's one-line error first, else the first method's error
        budget_errors = [err for err in failures if isinstance(err, EstbenchError)]
        raise (budget_errors or failures)[0]
    default = plans[0]
    faster = [plan for plan in plans[1:]
              if plan.seconds_per_draw * SWITCH_FACTOR <= default.seconds_per_draw]
    return min(faster, key=lambda plan: plan.seconds_per_draw) if faster else default


#: how much faster than the default (``batched``) the probe must time another method before
#: ``auto`` takes it: a clear margin, so that timing noise never changes the method (and with it
#: the bits) between reruns, worker counts or a resumed cell. Measured on the 20x10 VAE, ``flat``
#: runs 1.5-2x faster than ``batched``; the loop 5x on IndeCateR over ``polynomial``.
SWITCH_FACTOR = 1.25


def stream_draws(
    task: Task,
    estimator: Estimator,
    params: Params,
    batch: Any,
    num_samples: int,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    budget: int | None = None,
    per_draw_bytes: int = 0,
    plan: DrawPlan | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Chunks of independent draws: (gradients w.r.t. the parameters ``[m, P]``, gradients
    w.r.t. the logits ``[m, L]``), ``num_samples`` draws in all, each chunk within the memory
    budget (see :func:`plan_draws`). Estimator state is frozen. A deterministic estimator is
    drawn once and its chunks repeat that draw (views, no copies)."""
    if estimator.deterministic:  # its own work (enumeration) is chunked within the budget
        grads, logit_grads = _draws("loop", task, estimator, params, batch, 1)
        chunk = chunk_size or num_samples
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            yield grads.expand(count, -1), logit_grads.expand(count, -1)
        return
    plan = plan or plan_draws(task, estimator, params, batch, num_samples, method=method,
                              chunk_size=chunk_size, budget=budget, per_draw_bytes=per_draw_bytes)
    for start in range(0, num_samples, plan.chunk):
        yield _draws(plan.method, task, estimator, params, batch,
                     min(plan.chunk, num_samples - start))


def _row_bytes(params: Params) -> int:
    """Bytes a stored draw of the parameter gradients takes, with the copy that joins them."""
    return 2 * sum(p.numel() * p.element_size() for p in params.values())


def sample_gradients(
    task: Task,
    estimator: Estimator,
    params: Params,
    batch: Any,
    num_samples: int,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    budget: int | None = None,
    with_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``num_samples`` independent estimates of ``grad_params E[f]``, flattened: ``[M, P]``;
    with ``with_logits`` also the same draws' gradients w.r.t. the logits tensor ``[M, L]``.

    method: 'flat', 'batched', 'loop' or 'auto' (the fastest, from a probe; see the module
    docstring); ``chunk_size`` draws per pass (default: what fits ``budget`` bytes). Estimator
    state is frozen. All M x P values are kept: for large models use :func:`stream_draws` with
    :class:`~estbench.metrics.StreamingGradientMetrics`.
    """
    parts = list(stream_draws(task, estimator, params, batch, num_samples, method=method,
                              chunk_size=chunk_size, budget=budget,
                              per_draw_bytes=_row_bytes(params)))
    grads = torch.cat([p for p, _ in parts])
    if with_logits:
        return grads, torch.cat([g for _, g in parts])
    return grads
