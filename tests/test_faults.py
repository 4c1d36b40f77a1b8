"""Faults a user's bad luck brings: workers that die or hang, damaged or foreign cell files,
racing lock takers, a killed driver, refused arguments. Every run here has a bounded time."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from conftest import session_processes

from estbench import load_results
from estbench.cli import main
from estbench.store import ResultsWarning, cell_path

PLUGIN = '''
import ctypes
import os
import sys
import time
from dataclasses import dataclass

from estbench import Estimate, Estimator, hyper, register_estimator


@register_estimator("bad-luck")
@dataclass(kw_only=True)
class BadLuck(Estimator):
    """Kills or stalls the process that runs it, at its first estimate."""

    unbiased = True
    fault: str = hyper("exit", choices=("exit", "sys.exit", "segfault", "hang"))

    def _estimate(self, logits, f, latent):
        if self.fault == "exit":
            os._exit(3)
        if self.fault == "sys.exit":
            sys.exit(3)
        if self.fault == "segfault":
            ctypes.string_at(0)
        time.sleep(3600)
'''

SPEC = """
name = "faults"
seeds = [0, 1]

[measure]
gradient_samples = 50
checkpoints = [0]
steps = 5
log_every = 5
throughput = false
{measure}

[[task]]
name = "bernoulli-toy"
dim = 3

[[estimator]]
name = "bad-luck"
fault = {faults}

[[estimator]]
name = "reinforce"
baseline = ["none", "ema"]
"""


def _files(tmp_path: Path, faults: str = '["exit", "segfault"]', measure: str = "") -> tuple:
    plugin = tmp_path / "bad_luck.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    spec = tmp_path / "faults.toml"
    spec.write_text(textwrap.dedent(SPEC.format(faults=faults, measure=measure)))
    return spec, plugin


def _cli(*args: str, timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "estbench.cli", "run", *args, "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen)


def _statuses(out: Path) -> dict[str, str]:
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    return {cell_id: info["status"] for cell_id, info in cells.items()}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cells_that_kill_or_stall_their_worker_fail_alone_on_every_try(tmp_path, workers):
    spec, plugin = _files(tmp_path, faults='["exit", "sys.exit", "segfault", "hang"]',
                          measure="time_limit_s = 5")
    out = tmp_path / "run"
    for attempt in range(2 if workers == "2" else 1):
        done = _cli(str(spec), "--out", str(out), "--plugin", str(plugin), "--workers", workers)
        assert done.returncode == 1, done.stderr[-2000:]
        statuses = _statuses(out)
        failed = sorted(c for c, s in statuses.items() if s == "failed")
        assert failed == sorted(c for c in statuses if "__bad-luck__" in c) and len(failed) == 8
        assert all(s == "done" for c, s in statuses.items() if c not in failed)
        reused = "0 reused" if attempt == 0 else "4 reused"
        assert "8 failed" in done.stdout and reused in done.stdout
        for cell_id in failed:
            assert f"FAILED {cell_id}" in done.stderr
    reasons = {json.loads((out / "manifest.json").read_text())["cells"][c]["reason"]
               for c in failed}
    assert reasons == {"WorkerDied: its worker process exited with status 3 while running "
                       "this cell",
                       "WorkerDied: its worker process was killed by SIGSEGV (exit code -11) "
                       "while running this cell",
                       "TimeLimit: ran past [measure] time_limit_s = 5 s and was killed",
                       "SystemExit: 3"}
    assert load_results(out)["cell"].nunique() == 4


GOOD = SPEC.replace('name = "bad-luck"\nfault = {faults}\n\n[[estimator]]\n', "")


def _good_run(tmp_path: Path) -> tuple[Path, Path]:
    spec = tmp_path / "good.toml"
    spec.write_text(textwrap.dedent(GOOD.format(measure="")))
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--no-progress"]) == 0
    return spec, out


def test_damaged_and_foreign_cell_files_are_rerun_and_never_read(tmp_path, capsys):
    spec, out = _good_run(tmp_path)
    first = load_results(out)
    files = sorted((out / "cells").glob("*.parquet"))
    truncated, foreign, emptied = files[0], files[1], files[2]
    truncated.write_bytes(truncated.read_bytes()[:100])
    shutil.copyfile(files[3], foreign)  # another cell's (intact) file under this name
    emptied.write_bytes(b"")
    stray = out / "cells" / "elsewhere__reinforce__s0__0123456789.parquet"
    shutil.copyfile(files[3], stray)
    capsys.readouterr()
    with pytest.warns(ResultsWarning, match="4 file"):
        assert load_results(out)["cell"].nunique() == 1
    assert main(["show", str(out)]) == 0
    assert "left out elsewhere__reinforce" in capsys.readouterr().err

    assert main(["run", str(spec), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "3 cells run, 1 reused" in captured.out
    for path, why in ((truncated, "checksum"), (foreign, "checksum"), (emptied, "checksum")):
        assert f"re-running cell {path.stem}: its {why}" in captured.err
    assert "left out elsewhere__reinforce" in captured.err  # a stray file is named, never read
    again = load_results(out, on_skip=lambda name, why: None)
    columns = ["cell", "phase", "step", "metric"]
    keep = again["metric"] != "wall_time_s"
    assert again[keep].sort_values(columns)["value"].tolist() == \
        first[first["metric"] != "wall_time_s"].sort_values(columns)["value"].tolist()


def test_a_deleted_manifest_reruns_every_cell(tmp_path, capsys):
    spec, out = _good_run(tmp_path)
    (out / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["run", str(spec), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "4 cells run, 0 reused" in captured.out
    assert captured.err.count("not recorded as finished in the manifest") == 4


def _race(directory: str, barrier, wins, index: int, trials: int) -> None:
    from estbench.errors import EstbenchError
    from estbench.lock import RunLock

    for trial in range(trials):
        barrier.wait()
        lock = RunLock(Path(directory) / str(trial))
        try:
            lock.__enter__()
            won = True
        except EstbenchError:
            won = False
        wins[trial * 8 + index] = won
        barrier.wait()  # every contender has tried while the winner still holds the lock
        if won:
            lock.__exit__(None, None, None)


def race_lock_takers(root: Path, trials: int, takers: int) -> list[int]:
    """Winners per trial when ``takers`` processes take over the same stale lock at once."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": "earlier"})
    for trial in range(trials):
        (root / str(trial)).mkdir(parents=True)
        (root / str(trial) / ".lock").write_text(stale)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(takers)
    wins = context.Array("b", trials * 8)
    racers = [context.Process(target=_race, args=(str(root), barrier, wins, i, trials))
              for i in range(takers)]
    with warnings.catch_warnings():  # Python >= 3.12 warns about fork in a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        for racer in racers:
            racer.start()
    for racer in racers:
        racer.join(300)
    assert all(r.exitcode == 0 for r in racers)
    return [sum(wins[t * 8: t * 8 + takers]) for t in range(trials)]


def test_racing_lock_takers_never_both_win(tmp_path):
    winners = race_lock_takers(tmp_path, trials=500, takers=4)
    assert winners == [1] * 500




def _start_hanging_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    spec, plugin = _files(tmp_path, faults='"hang"')
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "estbench.cli", "run", str(spec), "--out", str(out),
           "--plugin", str(plugin), "--workers", "2", "--no-progress"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # both workers busy with hanging cells
        if (out / "manifest.json").is_file() and len(session_processes(driver.pid)) >= 4:
            time.sleep(2)
            return driver, out
        time.sleep(0.2)
    driver.kill()
    pytest.fail("the run did not start its workers within 120 s")


def _wait_until_gone(sid: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return session_processes(sid)


def test_a_killed_driver_leaves_no_process_behind(tmp_path):
    driver, out = _start_hanging_run(tmp_path)
    os.kill(driver.pid, signal.SIGKILL)
    driver.communicate(timeout=60)  # returns once no process holds the output pipes
    left = _wait_until_gone(driver.pid, 30)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_sigterm_stops_the_workers_and_says_how_to_resume(tmp_path):
    driver, out = _start_hanging_run(tmp_path)
    os.kill(driver.pid, signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    left = _wait_until_gone(driver.pid, 30)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left
    assert driver.returncode == 128 + signal.SIGTERM
    assert err.strip().endswith("interrupted by SIGTERM; finished cells are kept in "
                                f"{out}, run the same command again to resume")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert {i["status"] for c, i in manifest["cells"].items() if "__bad-luck__" in c} == {"pending"}
    assert not (out / "errors").exists() and not (out / ".lock").exists()


def _tree(path: Path) -> dict[str, tuple[bytes, int]] | None:
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mode)
            for p in sorted(path.rglob("*"))}


REFUSALS = [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--executor", "ray", "--address", "garbage"], "--address must be HOST:PORT"),
    (["--address", "127.0.0.1:6379"], "--address is for --executor ray"),
    (["--executor", "ray", "--address", "127.0.0.1:1"], "could not connect to a Ray cluster"),
]


@pytest.mark.parametrize("args,message", REFUSALS, ids=["workers", "address", "local", "ray"])
def test_every_refusal_leaves_the_output_directory_as_it_was(tmp_path, capsys, args, message):
    if "ray" in args:
        pytest.importorskip("ray")
    spec = tmp_path / "good.toml"
    spec.write_text(textwrap.dedent(GOOD.format(measure="")))
    missing = tmp_path / "never"
    assert main(["run", str(spec), "--out", str(missing), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not missing.exists()


def test_refusals_leave_an_existing_run_as_it_was(tmp_path, capsys):
    spec, out = _good_run(tmp_path)
    before = _tree(out)
    renamed = spec.read_text().replace('name = "faults"', 'name = "faults-b"')
    for text, message in [
        (renamed.replace("seeds = [0, 1]", "seeds = [0]"), "spec.seeds: seed 1 is no longer"),
        (renamed.replace("dim = 3", "dim = 4"), "spec.tasks[0] (bernoulli-toy).dim: 3 -> 4"),
        (renamed.replace("steps = 5", "steps = 6"), "spec.measure.steps: 5 -> 6"),
    ]:
        changed = tmp_path / "changed.toml"
        changed.write_text(text)
        assert main(["run", str(changed), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and len(err) < 300
        assert _tree(out) == before
    assert main(["run", str(spec), "--out", str(out), "--no-progress", "--workers", "0"]) == 2
    assert _tree(out) == before


def test_cell_files_reject_a_copy_from_another_run(tmp_path):
    spec, out = _good_run(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    victim = sorted((out / "cells").glob("*.parquet"))[0]
    replacement = sorted((other / "cells").glob("*.parquet"))[1]
    shutil.copyfile(replacement, cell_path(out, victim.stem))
    with pytest.warns(ResultsWarning, match="checksum does not match"):
        assert load_results(out)["cell"].nunique() == 3
