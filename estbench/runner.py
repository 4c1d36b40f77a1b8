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

from estbench.contracts import Estimator, Params, Task
from estbench.errors import EstbenchError
from estbench.gradients import reference_gradient, sample_gradients
from estbench.metrics import MetricValue, gradient_metrics
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


def _gradient_phase(
    task: Task, estimator: Estimator, params: Params, measure: Measure,
    generator: torch.Generator, step: int,
) -> list[dict[str, Any]]:
    batch = task.sample_batch(generator)
    samples = sample_gradients(
        task, estimator, params, batch, measure.gradient_samples,
        method=measure.gradient_method, chunk_size=measure.gradient_chunk,
    )
    if not torch.isfinite(samples).all():
        raise NonFiniteError(f"non-finite gradient estimate at step {step}")
    reference = reference_gradient(task, params, batch)
    return _records("gradient", step, gradient_metrics(samples, reference))


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

    for step in range(measure.steps + 1):
        if step in checkpoints:
            estimator.train(False)
            records += _gradient_phase(task, estimator, params, measure, generator, step)
        if step % measure.log_every == 0 or step == measure.steps:
            if window:
                loss = float(torch.stack(window).mean())
                if not math.isfinite(loss):
                    raise NonFiniteError(f"non-finite training loss before step {step}")
                records += _records("train", step, [MetricValue("loss", loss)])
                window = []
            evaluation = task.evaluate(params, generator)
            records += _records(
                "train", step,
                [MetricValue(k, v) for k, v in evaluation.items()]
                + [MetricValue("wall_time_s", train_time)],
            )
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
