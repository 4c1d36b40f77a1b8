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


def test_sigkill_then_resume_equals_an_uninterrupted_run(reference_run, tmp_path):
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
    live = {"pid": os.getppid(), "host": socket.gethostname(), "since": "earlier"}
    (run / ".lock").write_text(json.dumps(live))
    with pytest.raises(EstbenchError, match=f"in use by pid {os.getppid()} on host"):
        with RunLock(run):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({**live, "pid": dead.pid}))
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
