"""Run a whole spec into a run directory: lock, manifest, executors, resume.

A spec run writes one parquet file per finished cell; failed cells leave their traceback in
``errors/`` and the matrix goes on. What happens inside one cell lives in :mod:`estbench.cell`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from estbench.errors import EstbenchError
from estbench.executors import CellOutcome, make_executor
from estbench.lock import RunLock
from estbench.provenance import provenance
from estbench.registry import TASKS
from estbench.spec import Spec
from estbench.store import atomic_write_text, cell_path, error_path, read_json, write_cell, write_json

__all__ = ["run_spec", "RunSummary"]


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
