"""Where cells run: in-process, in local worker processes, or on a Ray cluster.

Every executor runs the same pure function, :func:`execute_cell`, which returns the cell's rows
(or its error) to the driver; the driver alone writes files, so a run directory looks the same
whichever executor filled it.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import socket
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from estbench.errors import EstbenchError

__all__ = ["CellOutcome", "execute_cell", "make_executor", "EXECUTORS", "available_cores"]

EXECUTORS = ("local", "ray")


@dataclass
class CellOutcome:
    """What a worker sends back: the rows of a finished cell, or why it did not finish."""

    cell_id: str
    status: str  # "done", "failed" or "skipped"
    rows: pd.DataFrame | None = None
    message: str = ""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _load_plugins(plugins: Iterable[str]) -> None:
    from estbench.registry import load_builtins, load_plugin

    load_builtins()
    for plugin in plugins:
        load_plugin(plugin)


def execute_cell(cell, measure, device: str, run_name: str, prov: dict[str, Any],
                 plugins: tuple[str, ...] = (), threads: int | None = None) -> CellOutcome:
    """Run one cell (in whatever process this is) and return its outcome; never raises."""
    import torch

    from estbench.cell import CellSkipped, cell_frame, run_cell

    try:
        _load_plugins(plugins)
        if threads:
            torch.set_num_threads(threads)
        records = run_cell(cell, measure, device)
        return CellOutcome(cell.id, "done", cell_frame(cell, records, run_name, device, prov))
    except CellSkipped as skip:
        return CellOutcome(cell.id, "skipped", message=str(skip))
    except Exception as err:  # a failed cell never stops the matrix
        text = f"cell {cell.id}\n{type(err).__name__}: {err}\n\n{traceback.format_exc()}"
        return CellOutcome(cell.id, "failed", message=text)


Job = tuple[Any, ...]  # the arguments of execute_cell after the cell


class InProcess:
    """Cells one after another in this process (``--workers 1``)."""

    def __init__(self, plugins: tuple[str, ...]) -> None:
        self.plugins = plugins

    def map(self, cells: list, job: Job, started: Callable[[str], None]) -> Iterator[CellOutcome]:
        for cell in cells:
            started(cell.id)
            yield execute_cell(cell, *job, plugins=self.plugins)

    def close(self) -> None:
        pass


class LocalProcesses:
    """A pool of ``workers`` spawned processes, each with cores / workers torch threads."""

    def __init__(self, workers: int, plugins: tuple[str, ...]) -> None:
        self.workers = workers
        self.plugins = plugins
        self.threads = max(1, available_cores() // workers)
        context = multiprocessing.get_context("spawn")
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                           initializer=_load_plugins, initargs=(plugins,))

    def map(self, cells: list, job: Job, started: Callable[[str], None]) -> Iterator[CellOutcome]:
        futures = {}
        for cell in cells:
            future = self.pool.submit(execute_cell, cell, *job, self.plugins, self.threads)
            futures[future] = cell.id
        running = set()
        pending = set(futures)
        while pending:
            for future in pending:
                if future.running() and future not in running:
                    running.add(future)
                    started(futures[future])
            finished, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                if future not in running:
                    started(futures[future])
                try:
                    yield future.result()
                except Exception as err:  # the worker process itself died (e.g. killed by OOM)
                    yield CellOutcome(futures[future], "failed",
                                      message=f"cell {futures[future]}\nworker died: {err!r}")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayCluster:
    """Cells as Ray tasks on a running cluster (``ray start``); results return to the driver."""

    def __init__(self, address: str | None, plugins: tuple[str, ...]) -> None:
        try:
            import ray
        except ImportError:
            raise EstbenchError(
                "--executor ray needs Ray: pip install 'estbench[ray]' (or pip install ray)"
            ) from None
        self.ray = ray
        self.plugins = plugins
        if address and address != "auto":
            _check_reachable(address)
        if not ray.is_initialized():
            try:
                ray.init(address=address or "auto", log_to_driver=False,
                         logging_level="ERROR", include_dashboard=False)
            except ConnectionError as err:
                raise EstbenchError(
                    f"could not connect to a Ray cluster at {address or 'auto'!r} ({err}); start "
                    f"one with `ray start --head` and pass --address HOST:PORT"
                ) from None
        self.remote = ray.remote(num_cpus=1)(execute_cell)

    def map(self, cells: list, job: Job, started: Callable[[str], None]) -> Iterator[CellOutcome]:
        refs = {}
        for cell in cells:
            refs[self.remote.remote(cell, *job, self.plugins, 1)] = cell.id
            started(cell.id)
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield self.ray.get(ref)
                except Exception as err:  # the task or its node died
                    yield CellOutcome(refs[ref], "failed",
                                      message=f"cell {refs[ref]}\nRay task failed: {err!r}")

    def close(self) -> None:
        self.ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail fast (Ray itself retries for minutes) when nothing listens at HOST:PORT."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EstbenchError(f"--address must be HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise EstbenchError(
            f"could not connect to a Ray cluster at {address!r} ({err.strerror or err}); start "
            f"one with `ray start --head` and pass its address"
        ) from None


def make_executor(kind: str, workers: int | None, address: str | None,
                  plugins: tuple[str, ...]):
    """The executor for ``kind`` ('local' or 'ray')."""
    if kind not in EXECUTORS:
        raise EstbenchError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if kind == "ray":
        return RayCluster(address, plugins)
    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise EstbenchError(f"--workers must be >= 1, got {workers}")
    return InProcess(plugins) if workers == 1 else LocalProcesses(workers, plugins)
