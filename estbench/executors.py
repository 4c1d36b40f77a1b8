"""Where cells run: in local worker processes or on a Ray cluster.

Every executor runs the same function, :func:`execute_cell`, which returns the cell's rows (or its
error) to the driver; the driver alone writes result files, so a run directory looks the same
whichever executor filled it.

Local workers are child processes, one cell at a time each, even with one worker: a cell that
kills its process (``os._exit``, a segfault, the OOM killer) fails that cell only, named with the
exit code or signal, and a fresh worker takes the next cell. Workers watch the driver through a
pipe that only the driver holds open, and stop when it dies, however it dies.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pandas as pd

from estbench.errors import EstbenchError

__all__ = ["CellOutcome", "Job", "Hooks", "execute_cell", "make_executor", "check_executor",
           "EXECUTORS", "available_cores"]

EXECUTORS = ("local", "ray")
#: seconds between two step messages of one worker (progress inside a cell)
STEP_MESSAGE_INTERVAL_S = 0.5
#: modules the fork server imports once for all workers (torch._dynamo: torch.func's first call
#: imports it, about 3 s per fresh worker otherwise)
PRELOAD = ["estbench.executors", "estbench.cell", "estbench.estimators", "estbench.tasks",
           "torch._dynamo"]
#: seconds a worker asked to stop (SIGTERM) gets to save its checkpoint before it is killed
STOP_GRACE_S = 20.0


@dataclass
class CellOutcome:
    """What a worker sends back: the rows of a finished cell, or why it did not finish.
    ``status`` is 'done', 'failed', 'skipped' or 'interrupted' (stopped on request: pending)."""

    cell_id: str
    status: str
    rows: pd.DataFrame | None = None
    message: str = ""


@dataclass(frozen=True)
class Job:
    """One cell to run, with what its rows need: the run's name, provenance and, where the
    worker shares the driver's file system, the cell's checkpoint file."""

    cell: Any
    run_name: str
    prov: dict[str, Any]
    checkpoint: Path | None = None


@dataclass
class Hooks:
    """The driver's side of a run: called when a cell starts and after its training steps, and
    asked whether the run should stop (a signal reached the driver)."""

    started: Callable[[str], None] = lambda cell_id: None
    stepped: Callable[[str, int, int], None] = lambda cell_id, done, total: None
    stop_requested: Callable[[], bool] = lambda: False


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


def execute_cell(job: Job, on_step: Callable[[int, int], None] | None = None) -> CellOutcome:
    """Run one cell (in whatever process this is) with ``cell.measure.threads`` torch threads
    and return its outcome; never raises."""
    import torch

    from estbench.cell import CellInterrupted, CellSkipped, cell_frame, run_cell

    cell = job.cell
    try:
        torch.set_num_threads(cell.measure.threads)
        records = run_cell(cell, cell.measure, cell.device, checkpoint=job.checkpoint,
                           on_step=on_step)
        return CellOutcome(cell.id, "done",
                           cell_frame(cell, records, job.run_name, cell.device, job.prov))
    except CellSkipped as skip:
        return CellOutcome(cell.id, "skipped", message=str(skip))
    except (CellInterrupted, KeyboardInterrupt):  # SIGINT/SIGTERM: stopped, stays pending
        return CellOutcome(cell.id, "interrupted", message="stopped on request")
    except (Exception, SystemExit) as err:  # a failed cell never stops the matrix
        text = f"cell {cell.id}\n{type(err).__name__}: {err}\n\n{traceback.format_exc()}"
        return CellOutcome(cell.id, "failed", message=text)


def _sending(conn: Connection, message: Any) -> None:
    """Send with SIGINT and SIGTERM held back, so that a stop request never cuts a message."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        conn.send(message)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _watch_driver(alive: Connection) -> None:
    """Stop this worker when the driver is gone: the pipe's only writer was the driver, so EOF
    means it died. SIGTERM first (a running cell saves its checkpoint), then a hard exit."""
    try:
        alive.recv()
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    os._exit(1)


def _worker_main(conn: Connection, alive: Connection, plugins: tuple[str, ...],
                 environ: dict[str, str]) -> None:
    """A worker process: run the jobs the driver sends, one at a time, until it closes the pipe
    or the process is asked to stop."""
    os.setpgrp()  # out of the terminal's group: a Ctrl-C reaches the driver, which stops us once
    os.environ.clear()
    os.environ.update(environ)  # the driver's environment now, not the fork server's at its start
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
    threading.Thread(target=_watch_driver, args=(alive,), daemon=True).start()
    try:
        _load_plugins(plugins)
        while True:
            job = conn.recv()
            _sending(conn, ("started", job.cell.id))
            last = 0.0

            def on_step(done: int, total: int, cell_id: str = job.cell.id) -> None:
                nonlocal last
                now = time.monotonic()
                if now - last >= STEP_MESSAGE_INTERVAL_S or done == total:
                    last = now
                    try:
                        _sending(conn, ("step", cell_id, done, total))
                    except OSError:  # the driver is gone: _watch_driver stops the cell, which
                        pass  # saves its checkpoint then (a failed cell would not save)

            _sending(conn, ("outcome", execute_cell(job, on_step)))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        return "its worker process vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"its worker process was killed by {name} (exit code {exitcode})"
    return f"its worker process exited with status {exitcode}"


class _Worker:
    """One worker process and the job it runs."""

    def __init__(self, context, alive: Connection, plugins: tuple[str, ...]) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, name="estbench-worker", daemon=True,
                                       args=(child, alive, plugins, dict(os.environ)))
        self.process.start()
        child.close()
        self.job: Job | None = None
        self.since: float | None = None  # when the worker began the job's cell

    def submit(self, job: Job) -> None:
        self.conn.send(job)
        self.job, self.since = job, None

    def messages(self) -> Iterator[tuple]:
        """The messages waiting in the pipe; stops at EOF or an unreadable message."""
        try:
            while self.conn.poll():
                yield self.conn.recv()
        except (EOFError, OSError, ValueError, TypeError, AttributeError, ImportError):
            return  # a message cut by the worker's death

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)

    def close(self) -> None:
        self.conn.close()
        self.process.join(5)
        self.kill()


class LocalProcesses:
    """``workers`` child processes (fork server, so torch is imported once), one cell each at a
    time; a dead worker fails its cell only and is replaced."""

    def __init__(self, workers: int, plugins: tuple[str, ...]) -> None:
        self.size = workers
        self.plugins = plugins
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.alive, self.alive_writer = self.context.Pipe(duplex=False)
        self.workers: list[_Worker] = []

    def _worker(self) -> _Worker:
        return _Worker(self.context, self.alive, self.plugins)

    def map(self, jobs: list[Job], hooks: Hooks) -> Iterator[CellOutcome]:
        queue = deque(jobs)
        while queue or any(w.job for w in self.workers):
            while queue and len(self.workers) < min(self.size, len(jobs)):
                self.workers.append(self._worker())
            for index, worker in enumerate(self.workers):
                if worker.job is None and queue:
                    if not worker.process.is_alive():  # died with its last cell, or while idle
                        worker.close()
                        worker = self.workers[index] = self._worker()
                    worker.submit(queue.popleft())
                    hooks.started(worker.job.cell.id)
            busy = [w for w in self.workers if w.job]
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.2)
            if hooks.stop_requested():  # before reading outcomes: a cell cut by the stop is pending
                yield from self._stop(hooks)
                for job in queue:  # never started: pending too
                    yield CellOutcome(job.cell.id, "interrupted", message="stopped on request")
                return
            for worker in self.workers:  # a dead worker is replaced when there is work for it
                outcome = self._poll(worker, hooks)
                if outcome is not None:
                    yield outcome

    def _poll(self, worker: _Worker, hooks: Hooks) -> CellOutcome | None:
        """The outcome of ``worker``'s cell if it has one now (finished, died, out of time)."""
        if worker.job is None:
            return None
        cell = worker.job.cell
        for message in worker.messages():
            if message[0] == "started":
                worker.since = time.monotonic()  # the time limit counts from here
            elif message[0] == "step":
                hooks.stepped(*message[1:])
            elif message[0] == "outcome":
                worker.job = None
                return message[1]
        if not worker.process.is_alive():
            worker.job = None
            when = "while running this cell" if worker.since is not None else (
                "before it began this cell (a script that calls run_spec needs "
                "`if __name__ == '__main__':`; see the worker's stderr)")
            return CellOutcome(cell.id, "failed", message=f"cell {cell.id}\nWorkerDied: "
                               f"{_death(worker.process.exitcode)} {when}")
        limit = cell.measure.time_limit_s
        if limit and worker.since is not None and time.monotonic() - worker.since > limit:
            worker.kill()
            worker.job = None
            return CellOutcome(cell.id, "failed", message=f"cell {cell.id}\nTimeLimit: ran past "
                               f"[measure] time_limit_s = {limit:g} s and was killed")
        return None

    def _stop(self, hooks: Hooks) -> Iterator[CellOutcome]:
        """Ask running cells to stop (SIGTERM: they save their checkpoints), wait a bounded
        time, then kill what is left. A cell that finished meanwhile is still returned."""
        busy = [w for w in self.workers if w.job]
        for worker in self.workers:
            if worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while busy and time.monotonic() < deadline:
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.2)
            for worker in list(busy):
                outcome = self._poll(worker, hooks)
                if outcome is not None:
                    busy.remove(worker)
                    yield outcome if outcome.status == "done" else CellOutcome(
                        outcome.cell_id, "interrupted", message="stopped on request")
        for worker in busy:
            yield CellOutcome(worker.job.cell.id, "interrupted", message="stopped on request")

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = []
        self.alive_writer.close()
        self.alive.close()


class RayCluster:
    """Cells as Ray tasks on a running cluster (``ray start``); results return to the driver.
    Progress is reported per whole cell, cells do not checkpoint (a Ray worker may not share the
    driver's file system), and ``time_limit_s`` is not enforced (Ray does not say when a task
    starts)."""

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
        self.remote = ray.remote(num_cpus=1)(_ray_cell)

    def map(self, jobs: list[Job], hooks: Hooks) -> Iterator[CellOutcome]:
        refs = {}
        for job in jobs:
            refs[self.remote.remote(job, self.plugins)] = job.cell
            hooks.started(job.cell.id)
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in done:
                cell = refs[ref]
                try:
                    yield self.ray.get(ref)
                except Exception as err:  # the task or its node died
                    yield CellOutcome(cell.id, "failed",
                                      message=f"cell {cell.id}\nRay task failed: {err!r}")
            if hooks.stop_requested():
                for ref in pending:
                    self.ray.cancel(ref, force=True)
                    yield CellOutcome(refs[ref].id, "interrupted", message="stopped on request")
                return

    def close(self) -> None:
        self.ray.shutdown()


def _ray_cell(job: Job, plugins: tuple[str, ...]) -> CellOutcome:
    """A Ray task: load the plugins and run the cell, without a checkpoint file."""
    _load_plugins(plugins)
    return execute_cell(Job(job.cell, job.run_name, job.prov, None))


def _check_reachable(address: str) -> None:
    """Fail fast (Ray itself retries for minutes) when nothing listens at HOST:PORT."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise EstbenchError(
            f"could not connect to a Ray cluster at {address!r} ({err.strerror or err}); start "
            f"one with `ray start --head` and pass its address"
        ) from None


def _host_port(address: str) -> tuple[str, str]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EstbenchError(f"--address must be HOST:PORT (e.g. 127.0.0.1:6379), got {address!r}")
    return host, port


def check_executor(kind: str, workers: int | None, address: str | None) -> None:
    """Refuse bad executor arguments before anything is written or started."""
    if kind not in EXECUTORS:
        raise EstbenchError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if workers is not None and workers < 1:
        raise EstbenchError(f"--workers must be >= 1, got {workers}")
    if kind == "local" and address is not None:
        raise EstbenchError("--address is for --executor ray; drop it or add --executor ray")
    if kind == "ray" and address and address != "auto":
        _host_port(address)


def make_executor(kind: str, workers: int | None, address: str | None,
                  plugins: tuple[str, ...]):
    """The executor for ``kind`` ('local' or 'ray'); a Ray cluster is connected to now, local
    worker processes start with the first cell."""
    check_executor(kind, workers, address)
    if kind == "ray":
        return RayCluster(address, plugins)
    return LocalProcesses(available_cores() if workers is None else workers, plugins)
