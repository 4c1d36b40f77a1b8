"""Checkpoints inside a cell, end to end through ``estbench run`` in a subprocess: a long cell
stopped from outside (SIGKILL of every process of the run, SIGKILL of the driver alone, SIGTERM
to the driver) resumes from its checkpoint, loses at most one checkpoint interval, and ends with
the table of a run that never stopped, bit for bit apart from the wall-clock.

The estimator is REINFORCE with an EMA baseline (stateful: the baseline is in the checkpoint)
from a plugin that appends ``seed step`` to ``$ESTBENCH_STEP_LOG`` after every training step, so
each test sees which steps each invocation really ran: a resumed cell starts at its checkpoint's
step, never at 0. Every subprocess has a bounded time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import session_processes

from estbench import load_results
from estbench.cli import main

PLUGIN = '''
import os
from dataclasses import dataclass

import torch

from estbench import register_estimator
from estimators.score_function import Reinforce


@register_estimator("logged-reinforce")
@dataclass(kw_only=True)
class LoggedReinforce(Reinforce):
    """REINFORCE that logs each training step it runs (the cell's seed is torch's seed)."""

    def update(self, estimate):
        super().update(estimate)
        path = os.environ.get("ESTBENCH_STEP_LOG")
        if path:
            with open(path, "a") as log:
                log.write(f"{torch.initial_seed()} {self.step}\\n")
'''

STEPS = 2000
EVERY = 200
SPEC = """
name = "e2e"
seeds = [0, 1]

[measure]
gradient_samples = 100
checkpoints = [0, {half}, {steps}]
steps = {steps}
log_every = 100
lr = {lr}
throughput_min_time = 0.05
checkpoint_every = {every}
time_limit_s = {limit}

[[task]]
name = "bernoulli-toy"
dim = 8

[[estimator]]
name = "logged-reinforce"
baseline = "ema"
"""
KEY = ["cell", "phase", "step", "metric"]
#: what may differ between a resumed and an uninterrupted run: wall-clock, the timed estimate,
#: and the worker process's lifetime peak RSS (a property of the process, not of the cell)
TIMING = ["wall_time_s", "time_per_estimate_s", "peak_mem_bytes"]
#: seconds any one estbench process may take here
TIMEOUT = 120


def _files(root: Path, name: str = "spec.toml", lr: float = 0.02, every: int = EVERY,
           limit: float = 0) -> tuple[Path, Path]:
    plugin = root / "e2e_logged_steps.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    spec = root / name
    spec.write_text(textwrap.dedent(SPEC.format(lr=lr, every=every, limit=limit, steps=STEPS,
                                                half=STEPS // 2)))
    return spec, plugin


class _Run:
    """One ``estbench run`` subprocess in its own session, its output and its step log."""

    def __init__(self, spec: Path, out: Path, label: str, *args: str) -> None:
        plugin = spec.parent / "e2e_logged_steps.py"
        self.log = out.parent / f"{out.name}-{label}.steps"
        self.stdout, self.stderr = (out.parent / f"{out.name}-{label}.{k}" for k in ("out", "err"))
        cmd = [sys.executable, "-m", "estbench.cli", "run", str(spec), "--out", str(out),
               "--plugin", str(plugin), "--no-progress", *args]
        env = {**os.environ, "ESTBENCH_STEP_LOG": str(self.log)}
        with open(self.stdout, "w") as stdout, open(self.stderr, "w") as stderr:
            self.process = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env,
                                            start_new_session=True)

    def err(self) -> str:
        return self.stderr.read_text()

    def finish(self) -> int:
        try:
            return self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_everything(self)
            pytest.fail(f"estbench run did not end within {TIMEOUT} s:\n{self.err()}")

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                _kill_everything(self)
                pytest.fail(f"the run ended or timed out before {what}:\n{self.err()}")
            time.sleep(0.02)

    def steps(self) -> dict[int, list[int]]:
        """seed -> the training steps this invocation ran for that seed's cell, in order."""
        runs: dict[int, list[int]] = {}
        text = self.log.read_text() if self.log.is_file() else ""
        for line in text[: text.rfind("\n") + 1].splitlines():  # whole lines: one may be written
            seed, step = map(int, line.split())
            runs.setdefault(seed, []).append(step)
        return runs




def _wait_until_gone(sid: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return session_processes(sid)


def _kill_everything(run: _Run) -> None:
    """SIGKILL every process of the run at once, like a crash of the machine: all are stopped
    first (SIGSTOP), so that none sees another die and saves on its way out. Workers leave the
    driver's process group (so that Ctrl-C reaches the driver alone), not its session."""
    stopped: set[int] = set()
    while pids := set(session_processes(run.process.pid)) - stopped:
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        stopped |= pids
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    run.process.wait(timeout=30)
    assert not _wait_until_gone(run.process.pid, 30)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _seed(path: Path) -> int:
    return int(path.name.split("__")[2].removeprefix("s"))


def _checkpoints(out: Path) -> dict[int, int]:
    """seed -> the step saved in that cell's checkpoint file."""
    saved = {}
    for path in (out / "checkpoints").glob("*.pt"):
        try:
            saved[_seed(path)] = torch.load(path, weights_only=True)["step"]
        except FileNotFoundError:  # the cell finished meanwhile
            continue
    return saved


def _has_checkpoints(out: Path, count: int) -> Callable[[], bool]:
    return lambda: len(list((out / "checkpoints").glob("*.pt"))) >= count


def _ran_steps(run: _Run, seeds: tuple[int, ...], steps: int) -> Callable[[], bool]:
    return lambda: all(len(run.steps().get(seed, [])) >= steps for seed in seeds)


def _assert_resumed(run: _Run, starts: dict[int, int], finished: bool = True) -> None:
    """Each seed's cell ran from its checkpoint's step (0: started over), one step after another
    (to the last step when ``finished``)."""
    for seed, start in starts.items():
        ran = run.steps()[seed]
        assert ran[0] == start, f"seed {seed} began at step {ran[0]}, its checkpoint at {start}"
        assert ran == list(range(start, start + len(ran)))
        if finished:
            assert ran[-1] == STEPS - 1


def _assert_lost_at_most_one_interval(killed: _Run, saved: dict[int, int]) -> None:
    """SIGKILL loses the steps after the last periodic save, never more than ``EVERY``."""
    for seed, step in saved.items():
        reached = killed.steps()[seed][-1] + 1
        assert 0 < step <= reached <= step + EVERY, (seed, step, reached)
        assert step % EVERY == 0


def _table(out: Path) -> pd.DataFrame:
    frame = load_results(out)
    assert not frame.duplicated(KEY).any()
    frame = frame[~frame["metric"].isin(TIMING)].drop(columns=["timestamp"])
    return frame.sort_values(KEY).reset_index(drop=True)


def _assert_complete(out: Path, reference: pd.DataFrame) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert {info["status"] for info in manifest["cells"].values()} == {"done"}
    assert not list((out / "checkpoints").iterdir())  # a finished cell leaves no checkpoint
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]
    pd.testing.assert_frame_equal(_table(out), reference, check_exact=True)


class _Crash(Exception):
    pass


def _crash_at(step: int) -> Callable[[int, int], None]:
    def on_step(done: int, total: int) -> None:
        if done == step:
            raise _Crash

    return on_step


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from estbench.registry import ESTIMATORS, load_plugin

    path = tmp_path_factory.mktemp("e2e")
    _, plugin = _files(path)
    load_plugin(str(plugin))  # for the checks made in this process
    yield path
    ESTIMATORS.unregister("logged-reinforce")


@pytest.fixture(scope="module")
def killed_one_worker(root) -> tuple[Path, dict[int, int]]:
    """A one-worker run killed (every process, SIGKILL) after its first cell's first checkpoint."""
    spec, _ = _files(root)
    out = root / "killed-1"
    run = _Run(spec, out, "killed", "--workers", "1")
    run.wait_for(_has_checkpoints(out, 1), "the first checkpoint")
    _kill_everything(run)
    saved = _checkpoints(out)
    assert list(saved) == [0] and not list((out / "cells").glob("*"))
    _assert_lost_at_most_one_interval(run, saved)
    return out, saved


@pytest.fixture(scope="module")
def reference(root, killed_one_worker) -> pd.DataFrame:
    """A run that never stopped: --force in a copy of the killed run, whose checkpoint it must
    remove rather than resume from."""
    spec, _ = _files(root)
    out = root / "forced"
    shutil.copytree(killed_one_worker[0], out)
    run = _Run(spec, out, "forced", "--workers", "2", "--force")
    assert run.finish() == 0, run.err()
    _assert_resumed(run, {0: 0, 1: 0})  # every step of both cells, once
    assert not list((out / "checkpoints").iterdir())
    return _table(out)


def test_sigkill_of_every_process_resumes_from_the_checkpoint(root, killed_one_worker,
                                                              reference, capsys):
    """One worker: the same command again finishes the run, the killed cell from its last
    periodic checkpoint; a refused spec leaves the checkpoint alone, a checkpoint saved under
    another [measure] is ignored, and a save cut off by the kill is cleared."""
    from estbench.cell import run_cell
    from estbench.spec import load_spec
    from estbench.store import checkpoint_path

    out, saved = killed_one_worker
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    changed, plugin = _files(root, "changed.toml", lr=0.03)
    assert main(["run", str(changed), "--out", str(out), "--plugin", str(plugin),
                 "--no-progress"]) == 2
    assert "spec.measure.lr: 0.02 -> 0.03" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before

    spec, _ = _files(root)
    second = load_spec(spec).cells()[1]  # not started before the kill: no checkpoint yet
    path = checkpoint_path(out, second.id)
    with pytest.raises(_Crash):  # its periodic save with another lr, where it would resume
        run_cell(second, replace(second.measure, lr=0.03), checkpoint=path,
                 on_step=_crash_at(EVERY + 50))
    assert torch.load(path, weights_only=True)["step"] == EVERY
    (path.parent / f".{path.name}.cut.tmp").write_bytes(b"a save cut off by SIGKILL")

    run = _Run(spec, out, "resumed", "--workers", "1")
    assert run.finish() == 0, run.err()
    _assert_resumed(run, {0: saved[0], 1: 0})
    assert "belongs to another cell or setting (differs in: measure)" in run.err()
    _assert_complete(out, reference)


def test_sigkill_with_two_workers_then_the_driver_then_sigterm_each_resume(root, reference):
    """Two workers, two long cells, stopped three times and resumed each time: SIGKILL of every
    process (at most one interval lost); SIGKILL of the driver alone (its workers save and exit,
    nothing is left); SIGTERM to the driver with checkpoint_every above the steps done and another
    time limit (the workers save, the driver says how to resume and exits 143, the cells stay
    pending). The last resume, with one worker, gives the uninterrupted run's table."""
    spec, _ = _files(root)
    out = root / "killed-2"
    killed = _Run(spec, out, "killed", "--workers", "2")
    killed.wait_for(_has_checkpoints(out, 2), "both cells' first checkpoints")
    _kill_everything(killed)
    saved = _checkpoints(out)
    assert sorted(saved) == [0, 1] and not list((out / "cells").glob("*"))
    _assert_lost_at_most_one_interval(killed, saved)

    orphaned = _Run(spec, out, "driver-killed", "--workers", "2")
    orphaned.wait_for(_ran_steps(orphaned, (0, 1), 200), "both cells ran 200 steps")
    os.kill(orphaned.process.pid, signal.SIGKILL)
    orphaned.process.wait(timeout=30)
    assert not _wait_until_gone(orphaned.process.pid, 30), "workers outlived their driver"
    _assert_resumed(orphaned, saved, finished=False)
    stopped_at = _checkpoints(out)
    # the workers saw the driver die and saved where they stopped: nothing lost at all
    assert stopped_at == {seed: ran[-1] + 1 for seed, ran in orphaned.steps().items()}
    assert not list((out / "cells").glob("*"))

    later, _ = _files(root, "later.toml", every=10 * STEPS, limit=600)
    terminated = _Run(later, out, "terminated", "--workers", "2")
    terminated.wait_for(_ran_steps(terminated, (0, 1), 200), "both cells ran 200 steps")
    os.kill(terminated.process.pid, signal.SIGTERM)
    assert terminated.finish() == 128 + signal.SIGTERM, terminated.err()
    assert not _wait_until_gone(terminated.process.pid, 30)
    assert terminated.err().strip().endswith(
        f"interrupted by SIGTERM; finished cells are kept in {out}, run the same command again "
        f"to resume")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert {info["status"] for info in manifest["cells"].values()} == {"pending"}
    # resumed although checkpoint_every and time_limit_s changed: they cannot change the numbers
    _assert_resumed(terminated, stopped_at, finished=False)
    final = _checkpoints(out)
    assert final == {seed: ran[-1] + 1 for seed, ran in terminated.steps().items()}
    assert all(final[seed] > stopped_at[seed] for seed in final)

    resumed = _Run(spec, out, "resumed", "--workers", "1")
    assert resumed.finish() == 0, resumed.err()
    _assert_resumed(resumed, final)
    _assert_complete(out, reference)


def test_a_stop_while_a_finished_cell_is_reported_keeps_it_and_says_the_rest_is_pending(root):
    """One worker, two cells: SIGTERM reaches the driver while the first cell's rows wait in its
    pipe (the driver is held by SIGSTOP while that cell ends). The finished cell is kept, the
    one never started stays pending, and the run says it was interrupted."""
    spec, _ = _files(root)
    out = root / "stopped-between"
    run = _Run(spec, out, "stopped", "--workers", "1")
    run.wait_for(lambda: run.steps().get(0, [0])[-1] == STEPS - 1, "the first cell's last step")
    os.kill(run.process.pid, signal.SIGSTOP)
    time.sleep(3)  # the first cell's last gradient phase and throughput, then its rows are sent
    os.kill(run.process.pid, signal.SIGTERM)
    os.kill(run.process.pid, signal.SIGCONT)
    assert run.finish() == 128 + signal.SIGTERM, run.err()
    assert run.err().strip().endswith("run the same command again to resume")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    statuses = {_seed(Path(cell)): info["status"] for cell, info in manifest["cells"].items()}
    assert statuses == {0: "done", 1: "pending"} and sorted(run.steps()) == [0]
    assert not list((out / "checkpoints").glob("*.pt"))  # the finished cell's is gone
