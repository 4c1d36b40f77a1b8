"""One cell: train the task's parameters with the estimator and measure along the way.

A cell records, in one long-form frame: gradient quality at the checkpoints (phase
``gradient``), the sampled and exact loss and the training wall-clock along training (phase
``train``), and the cost of an estimate (phase ``throughput``). :mod:`estbench.run` runs many
cells into a run directory; this module knows nothing of files, executors or locks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from estbench.contracts import Estimator, Params, Task
from estbench.gradients import (
    flatten_gradients,
    group_indices,
    reference_gradient,
    reference_logits_gradient,
    stream_draws,
)
from estbench.memory import budget_bytes, headroom_bytes, memory_budget
from estbench.metrics import MetricValue, StreamingGradientMetrics, gradient_metrics
from estbench.registry import ESTIMATORS, TASKS
from estbench.spec import Cell, Measure
from estbench.store import to_rows
from estbench.throughput import measure_throughput

__all__ = ["run_cell", "cell_frame", "build", "CellSkipped", "NonFiniteError"]


class CellSkipped(Exception):
    """The estimator cannot run on the task's latent kind (recorded as a skip, not a failure)."""


class NonFiniteError(RuntimeError):
    """A loss or gradient estimate was NaN or infinite."""


def _optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _records(phase: str, step: int, values: list[MetricValue]) -> list[dict[str, Any]]:
    return [
        {"phase": phase, "step": step, "metric": v.metric, "value": v.value,
         "ci_low": v.ci_low, "ci_high": v.ci_high}
        for v in values
    ]


def build(cell: Cell) -> tuple[Task, Estimator]:
    """Instantiate the cell's task and estimator (raises :class:`CellSkipped` if incompatible)."""
    task = TASKS.get(cell.task).from_params(cell.task_params)
    estimator = ESTIMATORS.get(cell.estimator).from_params(cell.estimator_params)
    if task.latent.kind not in estimator.supports:
        raise CellSkipped(
            f"estimator '{cell.estimator}' does not support {task.latent.kind} latents"
        )
    estimator.check_latent(task.latent)
    return task, estimator


#: above this many stored values (M x P), gradient metrics are streamed instead of exact (the
#: exact ones cost M^2 P for tr(Sigma^2)); below it they are streamed when the budget is short
EXACT_METRICS_MAX_VALUES = 50_000_000
#: bytes per stored value of the exact metrics: float32 draws, float64 copy, centred, squares
EXACT_BYTES_PER_VALUE = 4 + 3 * 8
#: bytes per value of a streamed chunk: a group's float32 copy, then float64 copy, squares,
#: errors from the reference and their squares, pair differences
STREAM_BYTES_PER_VALUE = 4 + 5 * 8


def _moments(task: Task, estimator: Estimator, params: Params, batch: Any, count: int,
             measure: Measure) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean and variance-of-the-mean of ``count`` draws (parameters, then logits), streamed.
    A deterministic estimator's mean is its one draw, with variance 0."""
    if estimator.deterministic:
        grads, logit_grads = next(stream_draws(task, estimator, params, batch, 1))
        zero, logit_zero = torch.zeros_like(grads[0]), torch.zeros_like(logit_grads[0])
        return grads[0], zero, logit_grads[0], logit_zero
    stats, logit_stats = StreamingGradientMetrics(None), StreamingGradientMetrics(None)
    size = sum(p.numel() for p in params.values()) + _logits_size(task, params, batch)
    for grads, logit_grads in stream_draws(task, estimator, params, batch, count,
                                           chunk_size=measure.gradient_chunk or None,
                                           per_draw_bytes=STREAM_BYTES_PER_VALUE * size):
        stats.add(grads)
        logit_stats.add(logit_grads)
    return (*stats.moments(), *logit_stats.moments())


def _logits_size(task: Task, params: Params, batch: Any) -> int:
    with torch.no_grad():
        return task.logits({n: p.detach() for n, p in params.items()}, batch).numel()


def _reference(task: Task, params: Params, batch: Any, measure: Measure,
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(g*, its variance, g*_logits, its variance): exact where the task has it (enumeration in
    chunks within the budget), else the mean of ``reference_samples`` draws of an unbiased
    estimator (variance = per-coordinate SE^2)."""
    exact = reference_gradient(task, params, batch)
    exact_logits = reference_logits_gradient(task, params, batch) if task.logits_metrics else None
    if exact is not None:
        return exact, None, exact_logits, None
    count = measure.reference_samples or 10 * measure.gradient_samples
    estimator = ESTIMATORS.get(measure.reference_estimator)()
    mean, var, logit_mean, logit_var = _moments(task, estimator, params, batch, count, measure)
    if exact_logits is not None:
        logit_mean, logit_var = exact_logits, None
    return mean, var, logit_mean, logit_var


def _prefixed(prefix: str, values: list[MetricValue]) -> list[MetricValue]:
    return [v._replace(metric=prefix + v.metric) for v in values]


def _subset(x: Tensor | None, index: Tensor | None) -> Tensor | None:
    """The coordinates ``index`` of ``x`` (all of them when ``index`` is None)."""
    return x if x is None or index is None else x[..., index]


def _gradient_phase(
    task: Task, estimator: Estimator, params: Params, measure: Measure,
    generator: torch.Generator, step: int,
) -> list[dict[str, Any]]:
    """Gradient quality at fixed parameters for all parameters, each parameter group and (where
    the task asks) the logits, within the memory budget (``measure.memory_budget_mb``; on CPU
    the process's resident set, see :func:`estbench.memory.headroom_bytes`): exact
    metrics from stored draws when they are small, streamed statistics otherwise. A
    deterministic estimator is drawn once; its metrics are those of M identical draws (zero
    variance), which two identical rows give exactly."""
    device = next(iter(params.values())).device
    headroom = headroom_bytes(budget_bytes(measure.memory_budget_mb, device), device)
    with memory_budget(headroom):
        return _measure_gradients(task, estimator, params, measure, generator, step, headroom)


def _measure_gradients(
    task: Task, estimator: Estimator, params: Params, measure: Measure,
    generator: torch.Generator, step: int, budget: int,
) -> list[dict[str, Any]]:
    batch = task.gradient_batch(generator)
    reference, reference_var, logit_ref, logit_ref_var = _reference(task, params, batch, measure)
    # view key -> (coordinates of the parameter gradient or None for all, is it the logits view)
    views: dict[str, tuple[Tensor | None, bool]] = {"": (None, False)}
    for group, index in group_indices(params, task.parameter_groups()).items():
        views[f"{group}/"] = (index, False)
    if task.logits_metrics:
        views["logits/"] = (None, True)
    refs = {key: (logit_ref, logit_ref_var) if is_logits
            else (_subset(reference, index), _subset(reference_var, index))
            for key, (index, is_logits) in views.items()}
    total = sum(p.numel() for p in params.values())
    sizes = {key: (_logits_size(task, params, batch) if is_logits
                   else total if index is None else index.numel())
             for key, (index, is_logits) in views.items()}
    values_per_draw = sum(sizes.values())
    count = 2 if estimator.deterministic else measure.gradient_samples
    stored_bytes = count * values_per_draw * EXACT_BYTES_PER_VALUE
    exact = (count * total <= EXACT_METRICS_MAX_VALUES and stored_bytes <= budget // 2)
    per_draw = 4 * values_per_draw if exact else STREAM_BYTES_PER_VALUE * values_per_draw
    draw_budget = budget - (stored_bytes if exact else 4 * 8 * values_per_draw)
    stored: dict[str, list[Tensor]] = {key: [] for key in views}
    streams = {} if exact else {key: StreamingGradientMetrics(refs[key][0]) for key in views}
    for grads, logit_grads in stream_draws(
            task, estimator, params, batch, count, method=measure.gradient_method,
            chunk_size=measure.gradient_chunk or None, budget=draw_budget,
            per_draw_bytes=per_draw):
        if not torch.isfinite(grads).all():
            raise NonFiniteError(f"non-finite gradient estimate at step {step}")
        for key, (index, is_logits) in views.items():
            part = logit_grads if is_logits else _subset(grads, index)
            if exact:
                stored[key].append(part)
            else:
                streams[key].add(part)
    values: list[MetricValue] = []
    for key in views:
        ref, ref_var = refs[key]
        if exact:
            metrics = gradient_metrics(torch.cat(stored[key]), ref, ref_var)
        else:
            metrics = streams[key].metrics(ref_var)
        values += _prefixed(key, metrics)
    if reference_var is not None:
        values.append(MetricValue("grad_ref_se_norm", float(reference_var.sum().sqrt())))
    return _records("gradient", step, values)


class TrajectoryVariance:
    """Exponential moving averages (decay beta, bias-corrected) of the training gradient g and
    of g^2, per coordinate: the variance along training used by REBAR and DisARM, reported as
    the mean over coordinates of E[g^2] - E[g]^2."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.mean: Tensor | None = None
        self.square: Tensor | None = None

    def add(self, gradient: Tensor) -> None:
        g = gradient.detach().double()
        if self.mean is None:
            self.mean, self.square = torch.zeros_like(g), torch.zeros_like(g)
        self.mean.mul_(self.decay).add_(g, alpha=1 - self.decay)
        self.square.mul_(self.decay).add_(g * g, alpha=1 - self.decay)
        self.steps += 1

    def value(self, index: Tensor | None = None) -> float:
        if self.mean is None:
            return float("nan")
        correction = 1 - self.decay**self.steps
        mean, square = self.mean / correction, self.square / correction
        if index is not None:
            mean, square = mean[index], square[index]
        return float((square - mean * mean).clamp_min(0).mean())


def run_cell(cell: Cell, measure: Measure, device: str = "cpu", *,
             checkpoint: Path | None = None,
             on_step: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Train and measure one cell; returns its observations (without the shared columns).

    ``checkpoint``: the file where the cell saves its whole state every
    ``measure.checkpoint_every`` steps and from which it resumes. ``on_step(done, total)`` is
    called after every training step (progress inside the cell)."""
    torch.manual_seed(cell.seed)
    generator = torch.Generator().manual_seed(cell.seed)
    task, estimator = build(cell)
    target = torch.device(device)
    params = task.init(generator, target)
    optimizer = _optimizer(measure.optimizer, list(params.values()), measure.lr)
    checkpoints = set(measure.checkpoints)
    records: list[dict[str, Any]] = []
    train_time = 0.0
    window: list[torch.Tensor] = []

    trajectory = TrajectoryVariance(measure.ema_decay)
    groups = group_indices(params, task.parameter_groups())
    eval_every = measure.eval_every or measure.log_every
    for step in range(measure.steps + 1):
        if step in checkpoints:
            estimator.train(False)
            records += _gradient_phase(task, estimator, params, measure, generator, step)
        last = step == measure.steps
        if step % measure.log_every == 0 or last:
            logged = [MetricValue("wall_time_s", train_time)]
            if window:
                loss = float(torch.stack(window).mean())
                if not math.isfinite(loss):
                    raise NonFiniteError(f"non-finite training loss before step {step}")
                logged.append(MetricValue("loss", loss))
                logged.append(MetricValue("grad_var_ema", trajectory.value()))
                logged += [MetricValue(f"{g}/grad_var_ema", trajectory.value(i))
                           for g, i in groups.items()]
                window = []
            records += _records("train", step, logged)
        if step % eval_every == 0 or last:
            evaluation = task.evaluate(params, generator)
            records += _records("train", step, [MetricValue(k, v) for k, v in evaluation.items()])
        if step == measure.steps:
            break
        started = time.perf_counter()
        estimator.train(True)
        estimator.begin_step(step)
        batch = task.sample_batch(generator)
        estimate = estimator.estimate(
            task.logits(params, batch), task.cost(params, batch), task.latent
        )
        optimizer.zero_grad(set_to_none=True)
        estimate.surrogate.mean().backward()
        optimizer.step()
        estimator.update(estimate)
        _sync(target)
        train_time += time.perf_counter() - started
        window.append(estimate.value.detach().mean())
        if on_step is not None:
            on_step(step + 1, measure.steps)
        leaves = list(params.values())
        trajectory.add(flatten_gradients([p.grad for p in leaves], leaves))

    if measure.throughput:
        estimator.train(True)  # time what a training step pays; update() is never called here
        estimator.begin_step(0)
        batch = task.sample_batch(generator)
        records += _records(
            "throughput", 0,
            measure_throughput(task, estimator, params, batch, measure.throughput_min_time),
        )
    return records


def cell_frame(cell: Cell, records: list[dict[str, Any]], run: str, device: str,
               prov: dict[str, Any]) -> pd.DataFrame:
    """Attach the shared identity and provenance columns to a cell's observations."""
    task_cls = TASKS.get(cell.task)
    label = ESTIMATORS.get(cell.estimator).from_params(cell.estimator_params).label()
    common = {
        "run": run,
        "cell": cell.id,
        "task": cell.task,
        "task_version": str(task_cls.version),
        "task_params": json.dumps(cell.task_params, sort_keys=True),
        "estimator": cell.estimator,
        "estimator_params": json.dumps(cell.estimator_params, sort_keys=True),
        "estimator_label": label,
        "seed": cell.seed,
        "device": device,
        "package_version": prov["package_version"],
        "git_sha": prov["git_sha"],
        "torch_version": prov["torch_version"],
        "device_name": prov["device_name"],
        "timestamp": pd.Timestamp.now(tz="UTC"),
    }
    return to_rows(records, common)
