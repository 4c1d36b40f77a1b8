"""Run cells and whole specs.

A cell trains the task's parameters with the estimator and records, in one long-form frame:
gradient quality at the checkpoints (phase ``gradient``), the sampled and exact loss and the
training wall-clock along training (phase ``train``), and the cost of an estimate (phase
``throughput``). A spec run writes one parquet file per finished cell; failed cells leave their
traceback in ``errors/`` and the matrix goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from estbench.contracts import Estimator, Params, Task
from estbench.errors import EstbenchError
from estbench.gradients import (
    flatten_gradients,
    group_indices,
    reference_gradient,
    reference_logits_gradient,
    stream_draws,
)
from estbench.metrics import MetricValue, StreamingGradientMetrics, gradient_metrics
from estbench.provenance import provenance
from estbench.registry import ESTIMATORS, TASKS
from estbench.spec import Cell, Measure, Spec
from estbench.store import atomic_write_text, cell_path, error_path, read_json, to_rows, write_cell, write_json
from estbench.executors import CellOutcome, make_executor
from estbench.lock import RunLock
from estbench.throughput import measure_throughput

__all__ = ["run_cell", "run_spec", "RunSummary", "CellSkipped", "NonFiniteError"]


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


#: above this many stored values (M x P), gradient metrics are streamed instead of exact
EXACT_METRICS_MAX_VALUES = 50_000_000


def _moments(task: Task, estimator: Estimator, params: Params, batch: Any, count: int,
             measure: Measure) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean and variance-of-the-mean of ``count`` draws (parameters, then logits), streamed."""
    stats, logit_stats = StreamingGradientMetrics(None), StreamingGradientMetrics(None)
    for grads, logit_grads in stream_draws(task, estimator, params, batch, count,
                                           chunk_size=measure.gradient_chunk or None):
        stats.add(grads)
        logit_stats.add(logit_grads)
    return (*stats.moments(), *logit_stats.moments())


def _reference(task: Task, params: Params, batch: Any, measure: Measure,
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(g*, its variance, g*_logits, its variance): exact where the task has it, else the mean of
    ``reference_samples`` draws of an unbiased estimator (variance = per-coordinate SE^2)."""
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
    the task asks) the logits: exact metrics from stored draws when they are small, streamed
    statistics otherwise."""
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
    exact = measure.gradient_samples * total <= EXACT_METRICS_MAX_VALUES
    stored: dict[str, list[Tensor]] = {key: [] for key in views}
    streams = {} if exact else {key: StreamingGradientMetrics(refs[key][0]) for key in views}
    for grads, logit_grads in stream_draws(
            task, estimator, params, batch, measure.gradient_samples,
            method=measure.gradient_method, chunk_size=measure.gradient_chunk or None):
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


def run_cell(cell: Cell, measure: Measure, device: str = "cpu") -> list[dict[str, Any]]:
    """Train and measure one cell; returns its observations (without the shared columns)."""
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


@dataclass
class RunSummary:
    run_dir: Path
    done: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EstbenchError(
            f"device '{device}' was requested but torch.cuda.is_available() is False on this "
            f"machine; use --device cpu"
        )


def _spec_record(spec: Spec, device: str) -> dict[str, Any]:
    return json.loads(json.dumps(
        {"seeds": spec.seeds, "device": device, "measure": asdict(spec.measure),
         "tasks": spec.tasks, "estimators": spec.estimators}, default=str))


def _first_difference(old: Any, new: Any, path: str = "spec") -> str:
    """The first place where two JSON-like values differ, e.g. 'spec.measure.lr: 0.05 -> 0.1'."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}")
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _first_difference(a, b, f"{path}[{i}]")
    return f"{path}: {json.dumps(old)} -> {json.dumps(new)}"


def _prepare_run_dir(spec: Spec, run_dir: Path, device: str, force: bool) -> None:
    manifest_file = run_dir / "manifest.json"
    if manifest_file.is_file() and not force:
        previous = read_json(manifest_file)
        if previous.get("spec_hash") != spec.hash():
            change = _first_difference(previous.get("spec", {}), _spec_record(spec, device))
            raise EstbenchError(
                f"'{run_dir}' holds results of a different spec ({change}); pass --out NEW_DIR, "
                f"or --force to replace those results"
            )
    if force and run_dir.exists():
        for sub in ("cells", "errors"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    for stale in run_dir.rglob(".*.tmp") if run_dir.exists() else ():
        stale.unlink()  # a write cut off by a crash; we hold the lock, so nobody is writing


def run_spec(
    spec: Spec,
    run_dir: str | Path,
    *,
    device: str | None = None,
    force: bool = False,
    executor: str = "local",
    workers: int | None = 1,
    address: str | None = None,
    plugins: tuple[str, ...] = (),
    progress: Callable[[str, str], None] | None = None,
) -> RunSummary:
    """Run every cell of ``spec`` into ``run_dir`` with the chosen executor. Finished cells of an
    earlier run of the same spec are kept (resume). ``progress(cell_id, status)`` is called when a
    cell starts ('running') and when it ends ('done', 'failed', 'skipped')."""
    device = device or spec.device
    _check_device(device)
    for task_name, task_params in spec.tasks:
        TASKS.get(task_name).from_params(task_params).preflight()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        _prepare_run_dir(spec, run_dir, device, force)
        return _run_locked(spec, run_dir, device, force, executor, workers, address, plugins,
                           progress or (lambda cell_id, status: None))


def _run_locked(spec: Spec, run_dir: Path, device: str, force: bool, executor: str,
                workers: int | None, address: str | None, plugins: tuple[str, ...],
                progress: Callable[[str, str], None]) -> RunSummary:
    prov = provenance(device)
    if spec.source and Path(spec.source).is_file():
        atomic_write_text(run_dir / "spec.toml", Path(spec.source).read_text())
    manifest = {
        "run": spec.name,
        "spec_hash": spec.hash(),
        "spec": _spec_record(spec, device),
        "executor": executor,
        "provenance": prov,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(),
        "finished": None,
        "status": "running",
        "cells": {},
    }
    summary = RunSummary(run_dir)
    todo = []
    for cell in spec.cells():
        info = {"task": cell.task, "estimator": cell.estimator, "seed": cell.seed}
        if cell_path(run_dir, cell.id).is_file() and not force:
            summary.reused.append(cell.id)
            manifest["cells"][cell.id] = {**info, "status": "done"}
            progress(cell.id, "done")
        else:
            manifest["cells"][cell.id] = {**info, "status": "pending"}
            todo.append(cell)
    write_json(run_dir / "manifest.json", manifest)
    pool = make_executor(executor, workers, address, tuple(plugins)) if todo else None
    try:
        outcomes = pool.map(todo, (spec.measure, device, spec.name, prov),
                            lambda cell_id: progress(cell_id, "running")) if pool else ()
        for outcome in outcomes:
            status = _record(outcome, run_dir, summary)
            manifest["cells"][outcome.cell_id]["status"] = status
            write_json(run_dir / "manifest.json", manifest)
            progress(outcome.cell_id, status)
    finally:
        if pool is not None:
            pool.close()
    manifest["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
    manifest["status"] = "complete" if summary.ok else "failed cells"
    write_json(run_dir / "manifest.json", manifest)
    return summary


def _record(outcome: CellOutcome, run_dir: Path, summary: RunSummary) -> str:
    """Write a cell's outcome: its parquet file, or its error file."""
    errors = error_path(run_dir, outcome.cell_id)
    if outcome.status == "skipped":
        summary.skipped[outcome.cell_id] = outcome.message
        return "skipped"
    if outcome.status == "done":
        try:
            write_cell(outcome.rows, cell_path(run_dir, outcome.cell_id))
        except Exception as err:
            outcome = CellOutcome(outcome.cell_id, "failed",
                                  message=f"cell {outcome.cell_id}\nwriting results: {err}")
    if outcome.status == "failed":
        atomic_write_text(errors, outcome.message)
        summary.failed[outcome.cell_id] = str(errors)
        return "failed"
    if errors.is_file():
        errors.unlink()
    summary.done.append(outcome.cell_id)
    return "done"
