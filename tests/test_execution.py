"""Execution at scale: worker processes, the run lock, crash and resume, a real Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from estbench import EstbenchError, load_results
from estbench.cli import main
from estbench.lock import RunLock

SPEC = """
name = "exec"
seeds = [0, 1, 2]

[measure]
gradient_samples = 200
checkpoints = [0, 40]
steps = 40
log_every = 10
lr = 0.05
throughput = false

[[task]]
name = "bernoulli-toy"
dim = 4

[[task]]
name = "categorical-toy"
dim = 2
categories = 3

[[estimator]]
name = "reinforce"
baseline = ["none", "ema"]

[[estimator]]
name = "rloo"
samples = [2, 3]
"""
KEY = ["cell", "phase", "step", "metric"]


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "exec.toml"
    path.write_text(textwrap.dedent(SPEC))
    return path


def _values(run_dir: Path) -> pd.DataFrame:
    frame = load_results(run_dir)
    frame = frame[frame["metric"] != "wall_time_s"]
    return frame.sort_values(KEY).reset_index(drop=True)[KEY + ["value", "ci_low", "ci_high"]]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exec")
    out = root / "reference"
    assert main(["run", str(_spec(root)), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0
    return out


def test_worker_processes_give_the_same_table(reference_run, tmp_path):
    out = tmp_path / "parallel"
    assert main(["run", str(_spec(tmp_path)), "--out", str(out), "--workers", "2",
                 "--no-progress"]) == 0
    pd.testing.assert_frame_equal(_values(reference_run), _values(out), rtol=1e-6)


def test_sigkill_then_resume_equals_an_uninterrupted_run(reference_run, tmp_path, capsys):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "estbench.cli", "run", str(_spec(tmp_path)), "--out", str(out),
           "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "cells").glob("*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "cells").glob("*.parquet")))
    assert 3 <= finished < 24, "the run must be killed mid-way"
    assert (out / ".lock").is_file()  # left behind by the killed run: stale
    assert main(["show", str(out)]) == 0
    assert "stopped mid-run" in capsys.readouterr().out
    assert main(["run", str(_spec(tmp_path)), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0
    resumed = _values(out)
    assert not resumed.duplicated(KEY).any()
    pd.testing.assert_frame_equal(_values(reference_run), resumed, rtol=1e-6)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]
    assert not leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert {"git_sha", "git_dirty", "torch_version", "cuda_version", "device_name", "host"} <= set(
        manifest["provenance"])
    assert manifest["started"] and manifest["finished"] and manifest["spec_hash"]


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    run = tmp_path / "locked"
    run.mkdir()
    with RunLock(run):
        with pytest.raises(EstbenchError, match=f"in use by pid {os.getpid()} on host"):
            with RunLock(run):
                pass
    assert not (run / ".lock").exists()
    elsewhere = {"pid": 1, "host": "another-host", "since": "earlier"}
    (run / ".lock").write_text(json.dumps(elsewhere))
    with pytest.raises(EstbenchError, match="in use by pid 1 on host another-host"):
        with RunLock(run):
            pass
    here = {**elsewhere, "host": socket.gethostname(), "pid": os.getppid()}
    (run / ".lock").write_text(json.dumps(here))  # a live pid, but nobody holds the flock
    with RunLock(run):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not (run / ".lock").exists()


def test_changed_spec_is_refused_naming_the_change(reference_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    changed = tmp_path / "changed.toml"
    changed.write_text(textwrap.dedent(SPEC).replace("lr = 0.05", "lr = 0.1"))
    assert main(["run", str(changed), "--out", str(out), "--no-progress"]) == 2
    assert "spec.measure.lr: 0.05 -> 0.1" in capsys.readouterr().err


def test_unreachable_ray_cluster_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("ray")
    assert main(["run", str(_spec(tmp_path)), "--out", str(tmp_path / "r"), "--executor", "ray",
                 "--address", "127.0.0.1:1", "--no-progress"]) == 2
    assert "could not connect to a Ray cluster at '127.0.0.1:1'" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_cluster_on_localhost_gives_the_same_table(reference_run, tmp_path):
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    port = 36379
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"]
    worker = [str(ray_bin), "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
              "--num-cpus=1"]
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
        subprocess.run(worker, check=True, env=env, capture_output=True, timeout=180)
        out = tmp_path / "ray"
        cmd = [sys.executable, "-m", "estbench.cli", "run", str(_spec(tmp_path)), "--out",
               str(out), "--executor", "ray", "--address", f"127.0.0.1:{port}", "--no-progress"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        pd.testing.assert_frame_equal(_values(reference_run), _values(out), rtol=1e-6)
        assert json.loads((out / "manifest.json").read_text())["executor"] == "ray"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)


def test_ray_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # make `import ray` fail
    assert main(["run", str(_spec(tmp_path)), "--out", str(tmp_path / "r"), "--executor", "ray",
                 "--no-progress"]) == 2
    assert "pip install 'estbench[ray]'" in capsys.readouterr().err


def _vae_spec(tmp_path: Path) -> Path:
    from conftest import SMALL_VAE

    params = "\n".join(f"{k} = {json.dumps(v)}" for k, v in SMALL_VAE["bernoulli-vae"].items())
    text = textwrap.dedent("""
        name = "vae-workers"
        seeds = [0, 1]

        [measure]
        gradient_samples = 20
        checkpoints = [0, 6]
        steps = 6
        log_every = 3
        throughput = false

        [[task]]
        name = "bernoulli-vae"
        """) + params + '\n\n[[estimator]]\nname = "rloo"\n\n[[estimator]]\nname = "disarm"\n'
    path = tmp_path / "vae.toml"
    path.write_text(text)
    return path


def test_vae_tables_are_bit_equal_with_one_and_two_workers(tmp_path):
    spec = _vae_spec(tmp_path)
    tables = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert main(["run", str(spec), "--out", str(out), "--workers", workers,
                     "--no-progress"]) == 0
        tables.append(_values(out))
    assert len(tables[0]) > 100 and tables[0]["value"].notna().all()
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)


def test_cell_ids_cover_everything_that_changes_the_numbers():
    from dataclasses import replace

    from estbench.spec import Cell, Measure

    base = Cell("bernoulli-toy", {"dim": 4}, "reinforce", {"baseline": "none"}, 0)
    changed = [replace(base, task_params={"dim": 5}), replace(base, estimator="rloo"),
               replace(base, estimator_params={"baseline": "ema"}), replace(base, seed=1),
               replace(base, measure=Measure(lr=0.1)), replace(base, measure=Measure(threads=2)),
               replace(base, device="cuda")]
    assert len({base.id} | {c.id for c in changed}) == 1 + len(changed)
    unchanged = replace(base, measure=Measure(time_limit_s=60))  # never alters the numbers
    assert unchanged.id == base.id


def test_an_extended_spec_runs_only_its_new_cells(tmp_path, capsys):
    spec = _spec(tmp_path)
    small = tmp_path / "small.toml"
    small.write_text(spec.read_text().replace("seeds = [0, 1, 2]", "seeds = [0]")
                     .replace("samples = [2, 3]", "samples = 2"))
    out = tmp_path / "run"
    assert main(["run", str(small), "--out", str(out), "--no-progress"]) == 0
    kept = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.parquet")}
    assert len(kept) == 6
    renamed = tmp_path / "renamed.toml"
    renamed.write_text(spec.read_text().replace('name = "exec"', 'name = "other-name"')
                       .replace("seeds = [0, 1, 2]", "seeds = [0, 1]"))
    capsys.readouterr()
    assert main(["run", str(renamed), "--out", str(out), "--no-progress"]) == 0
    assert "10 cells run, 6 reused" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"] == "exec" and len(manifest["cells"]) == 16
    assert set(load_results(out)["run"]) == {"exec"}  # a run keeps the name it was created with


def test_steps_inside_cells_reach_the_driver(tmp_path):
    from estbench.run import run_spec
    from estbench.spec import load_spec

    spec = load_spec(_spec(tmp_path))
    steps: dict[str, list[tuple[int, int]]] = {}
    summary = run_spec(spec, tmp_path / "run", workers=2,
                       on_step=lambda cell, done, total: steps.setdefault(cell, []).append(
                           (done, total)))
    assert summary.ok and set(steps) == set(summary.done)
    for reports in steps.values():
        assert reports[-1] == (40, 40) and len(reports) <= 40
        assert [done for done, _ in reports] == sorted(done for done, _ in reports)


def test_checkpoints_go_to_the_cell_and_are_removed_once_its_file_is_written(tmp_path,
                                                                          monkeypatch):
    import estbench.cell
    from estbench.executors import Job, execute_cell
    from estbench.spec import load_spec
    from estbench.store import checkpoint_path

    spec = load_spec(_spec(tmp_path))
    cell = spec.cells()[0]
    seen = {}

    def fake_run_cell(cell, measure, device, *, checkpoint=None, on_step=None):
        seen["checkpoint"] = checkpoint
        raise RuntimeError("stop here")

    monkeypatch.setattr(estbench.cell, "run_cell", fake_run_cell)
    target = checkpoint_path(tmp_path / "run", cell.id)
    assert execute_cell(Job(cell, "exec", {}, target)).status == "failed"
    assert seen["checkpoint"] == target
    monkeypatch.undo()

    out = tmp_path / "run"
    for c in spec.cells()[:2]:
        checkpoint_path(out, c.id).parent.mkdir(parents=True, exist_ok=True)
        checkpoint_path(out, c.id).write_bytes(b"state")
    assert main(["run", str(_spec(tmp_path)), "--out", str(out), "--no-progress"]) == 0
    assert not list((out / "checkpoints").iterdir())
    checkpoint_path(out, "left-over").write_bytes(b"state")
    assert main(["run", str(_spec(tmp_path)), "--out", str(out), "--no-progress",
                 "--force"]) == 0
    assert not (out / "checkpoints").exists()


def test_skip_reasons_are_recorded_and_shown(tmp_path, capsys):
    spec = _spec(tmp_path)
    spec.write_text(spec.read_text().replace('name = "rloo"', 'name = "arm"')
                    .replace("samples = [2, 3]", "").replace("seeds = [0, 1, 2]", "seeds = [0]"))
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out)]) == 0
    assert "cell/s" not in capsys.readouterr().err  # no progress bar: stderr is not a terminal
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    skipped = {c: i["reason"] for c, i in cells.items() if i["status"] == "skipped"}
    assert list(skipped) == [c for c in cells if c.startswith("categorical-toy__arm")]
    assert skipped[next(iter(skipped))] == "estimator 'arm' does not support categorical latents"
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    assert (f"SKIPPED {next(iter(skipped))}: estimator 'arm' does not support categorical "
            "latents") in capsys.readouterr().out


def test_progress_line_names_each_running_cell_with_its_steps_and_time_left():
    from estbench.cli import _CellSteps

    steps = _CellSteps(done=30, total=100, first_time=10.0, first_done=10, last_time=12.0)
    text = steps.text("bernoulli-toy__rloo__s2__abcdef0123")
    assert text == "bernoulli-toy/rloo/s2/abcd 30/100 ~7s left"  # 70 steps at 10 steps/s
    assert _CellSteps().text("t__e__s0__ffff") == "t/e/s0/ffff"
