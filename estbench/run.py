"""Run a whole spec into a run directory: checks, lock, manifest, executors, resume.

A spec run writes one parquet file per finished cell; failed cells leave their traceback in
``errors/`` and the matrix goes on. Every argument is checked before the run directory is
touched. A run directory can be extended: a spec that only adds seeds, estimator configurations
or tasks runs the new cells and keeps the old ones; a spec that would change the numbers of the
cells already there (``[measure]``, the device, a task's or estimator's parameters) or drop some
is refused, naming the first difference. A spec that differs only in ``name`` is accepted: a run
keeps the name it was created with. What happens inside one cell lives in :mod:`estbench.cell`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from estbench.errors import EstbenchError, RunInterrupted
from estbench.executors import CellOutcome, Hooks, Job, check_executor, make_executor
from estbench.lock import RunLock
from estbench.provenance import provenance
from estbench.registry import TASKS
from estbench.spec import NOT_IN_IDENTITY, Spec
from estbench.store import (
    atomic_write_text,
    cell_path,
    cell_problem,
    checkpoint_path,
    error_path,
    read_json,
    write_cell,
    write_json,
)

__all__ = ["run_spec", "RunSummary", "RunInterrupted"]


@dataclass
class RunSummary:
    run_dir: Path
    done: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    interrupted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


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
    return f"{path}: {_short(old)} -> {_short(new)}"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dropped_config(kind: str, old: list, new: list) -> str | None:
    """How the configurations ``new`` fail to keep every one of ``old`` (None if they do)."""
    for index, config in enumerate(old):
        if config in new:
            continue
        name, params = config
        same_name = [p for n, p in new if n == name]
        if len(same_name) == 1:
            return _first_difference(params, same_name[0], f"spec.{kind}[{index}] ({name})")
        return f"spec.{kind}[{index}]: {name} {_short(params)} is no longer in the spec"
    return None


def _incompatibility(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why a run directory made with spec record ``old`` cannot take spec record ``new``: it would
    change or drop cells already there. None when ``new`` only adds cells."""
    if old.get("device") != new["device"]:
        return _first_difference(old.get("device"), new["device"], "spec.device")
    old_measure = {k: v for k, v in old.get("measure", {}).items() if k not in NOT_IN_IDENTITY}
    new_measure = {k: v for k, v in new["measure"].items() if k not in NOT_IN_IDENTITY}
    if old_measure != new_measure:
        return _first_difference(old_measure, new_measure, "spec.measure")
    dropped = [s for s in old.get("seeds", []) if s not in new["seeds"]]
    if dropped:
        return f"spec.seeds: seed {dropped[0]} is no longer in the spec"
    return (_dropped_config("tasks", old.get("tasks", []), new["tasks"])
            or _dropped_config("estimators", old.get("estimators", []), new["estimators"]))


def _previous_manifest(run_dir: Path, record: dict[str, Any], force: bool) -> dict | None:
    """The manifest already in ``run_dir`` (None if none, or if ``force``); refuses a spec that
    would change or drop the cells it holds."""
    path = run_dir / "manifest.json"
    if force or not path.is_file():
        return None
    try:
        previous = read_json(path)
        change = _incompatibility(previous["spec"], record)
    except (OSError, ValueError, KeyError, TypeError):
        raise EstbenchError(
            f"'{path}' is unreadable or not an estbench manifest; pass --out NEW_DIR, or "
            f"--force to replace that directory's results"
        ) from None
    if change:
        raise EstbenchError(
            f"'{run_dir}' holds results that this spec would change ({change}); pass --out "
            f"NEW_DIR, or --force to replace those results"
        )
    return previous


class _StopSignals:
    """While active, SIGINT and SIGTERM only note that the run should stop (the executor then
    stops its workers in order); the first signal's number is kept."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.saved[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)


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
    on_step: Callable[[str, int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run every cell of ``spec`` into ``run_dir`` with the chosen executor. Verified finished
    cells of an earlier run are kept (resume, extension); damaged or foreign cell files are re-run
    with a ``warn(line)``. ``progress(cell_id, status)`` is called when a cell starts ('running')
    and ends ('done', 'failed', 'skipped', 'interrupted'); ``on_step(cell_id, done, total)``
    along a running cell's training. Raises :class:`RunInterrupted` after SIGINT or SIGTERM."""
    device = device or spec.device
    _check_device(device)
    check_executor(executor, workers, address)
    for task_name, task_params in spec.tasks:
        TASKS.get(task_name).from_params(task_params).preflight()
    run_dir = Path(run_dir)
    record = _spec_record(spec, device)
    _previous_manifest(run_dir, record, force)  # refuse early, before anything is written
    pool = make_executor(executor, workers, address, tuple(plugins))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(run_dir):
            previous = _previous_manifest(run_dir, record, force)
            _clean(run_dir, force)
            hooks = Hooks(stepped=on_step or (lambda cell_id, done, total: None))
            run = _Run(spec, run_dir, device, record, previous, progress, warn)
            return run.execute(pool, executor, hooks)
    finally:
        pool.close()


def _clean(run_dir: Path, force: bool) -> None:
    if force:
        for sub in ("cells", "errors", "checkpoints"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    for stale in run_dir.rglob(".*.tmp"):
        stale.unlink()  # a write cut off by a crash; we hold the lock, so nobody is writing


class _Run:
    """One locked run of a spec into its directory: the manifest and the cells' files."""

    def __init__(self, spec: Spec, run_dir: Path, device: str, record: dict[str, Any],
                 previous: dict | None, progress: Callable[[str, str], None] | None,
                 warn: Callable[[str], None] | None) -> None:
        self.spec, self.run_dir, self.device = spec, run_dir, device
        self.previous = previous or {}
        self.progress = progress or (lambda cell_id, status: None)
        self.warn = warn or (lambda line: None)
        self.summary = RunSummary(run_dir)
        self.manifest = {
            "run": self.previous.get("run", spec.name),
            "spec_hash": spec.hash(),
            "spec": record,
            "spec_toml": Path(spec.source).read_text() if Path(spec.source).is_file() else "",
            "executor": None,
            "provenance": provenance(device),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(),
            "finished": None,
            "status": "running",
            "cells": {},
        }

    def _write_manifest(self) -> None:
        write_json(self.run_dir / "manifest.json", self.manifest)

    def _todo(self) -> list:
        """The cells to run; verified finished cells of the previous manifest are kept."""
        old_cells = self.previous.get("cells", {})
        todo = []
        for cell in self.spec.cells(self.device):
            info = {"task": cell.task, "estimator": cell.estimator, "seed": cell.seed}
            old = old_cells.get(cell.id, {})
            problem = cell_problem(self.run_dir, cell.id, old) if old.get("status") == "done" \
                else None
            if old.get("status") == "done" and problem is None:
                self.summary.reused.append(cell.id)
                self.manifest["cells"][cell.id] = old
                self.progress(cell.id, "done")
                continue
            if problem is None and cell_path(self.run_dir, cell.id).is_file():
                problem = "its file is not recorded as finished in the manifest"
            if problem is not None:
                self.warn(f"re-running cell {cell.id}: {problem}")
            self.manifest["cells"][cell.id] = {**info, "status": "pending"}
            todo.append(cell)
        return todo

    def execute(self, pool, executor: str, hooks: Hooks) -> RunSummary:
        if self.spec.source and Path(self.spec.source).is_file():
            atomic_write_text(self.run_dir / "spec.toml", self.manifest["spec_toml"])
        self.manifest["executor"] = executor
        todo = self._todo()
        self._write_manifest()
        prov = self.manifest["provenance"]
        jobs = [Job(cell, self.manifest["run"], prov, checkpoint_path(self.run_dir, cell.id))
                for cell in todo]
        with _StopSignals() as stop:
            hooks.started = lambda cell_id: self.progress(cell_id, "running")
            hooks.stop_requested = lambda: stop.signum is not None
            for outcome in pool.map(jobs, hooks):
                status = self._record(outcome)
                self.manifest["cells"][outcome.cell_id].update(status)
                self._write_manifest()
                self.progress(outcome.cell_id, status["status"])
        self.manifest["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
        self.manifest["status"] = ("interrupted" if self.summary.interrupted else
                                   "failed cells" if self.summary.failed else "complete")
        self._write_manifest()
        if self.summary.interrupted:
            raise RunInterrupted(stop.signum or signal.SIGINT, self.run_dir)
        return self.summary

    def _record(self, outcome: CellOutcome) -> dict[str, Any]:
        """Write a cell's outcome (its parquet file, or its error file); returns its manifest
        fields: status and, for skipped and failed cells, the reason in one line."""
        cell_id = outcome.cell_id
        errors = error_path(self.run_dir, cell_id)
        if outcome.status == "interrupted":
            self.summary.interrupted.append(cell_id)
            return {"status": "pending", "reason": "interrupted"}
        if outcome.status == "skipped":
            self.summary.skipped[cell_id] = outcome.message
            checkpoint_path(self.run_dir, cell_id).unlink(missing_ok=True)
            return {"status": "skipped", "reason": outcome.message}
        if outcome.status == "done":
            try:
                digest = write_cell(outcome.rows, cell_path(self.run_dir, cell_id),
                                    {"cell": cell_id, "run": self.manifest["run"],
                                     "spec_hash": self.manifest["spec_hash"]})
            except Exception as err:
                outcome = CellOutcome(cell_id, "failed",
                                      message=f"cell {cell_id}\nwriting results: {err}")
        if outcome.status == "failed":
            atomic_write_text(errors, outcome.message)
            self.summary.failed[cell_id] = str(errors)
            lines = outcome.message.splitlines()
            return {"status": "failed", "reason": lines[1] if len(lines) > 1 else outcome.message}
        errors.unlink(missing_ok=True)
        checkpoint_path(self.run_dir, cell_id).unlink(missing_ok=True)
        self.summary.done.append(cell_id)
        return {"status": "done", "reason": None, "sha256": digest}
