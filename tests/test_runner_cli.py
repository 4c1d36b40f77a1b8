"""The runner end to end through the CLI, resumption, failure isolation, and the error paths."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from estbench import SCHEMA, load_results
from estbench.cli import main
from estbench.spec import load_spec

TINY = """
name = "tiny"
seeds = [0, 1]

[measure]
gradient_samples = 200
checkpoints = [0, 20]
steps = 20
log_every = 10
lr = 0.05
throughput_min_time = 0.01

[[task]]
name = "bernoulli-toy"
dim = 3

[[task]]
name = "categorical-toy"
dim = 2
categories = 3

[[estimator]]
name = "reinforce"
baseline = ["none", "ema"]

[[estimator]]
name = "gumbel-softmax"
temperature = 0.5
"""


def _write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _run(args: list[str]) -> int:
    return main(["run", *args, "--no-progress"])


def test_end_to_end_tiny_matrix(tmp_path, capsys):
    spec = _write(tmp_path, TINY)
    out = tmp_path / "run"
    assert _run([str(spec), "--out", str(out)]) == 0
    results = load_results(out)
    assert list(results.columns) == SCHEMA.names
    assert results["cell"].nunique() == 2 * 3 * 2  # tasks x estimator configs x seeds
    assert set(results["phase"]) == {"gradient", "train", "eval", "throughput"}
    grad = results[results["phase"] == "gradient"]
    assert set(grad["step"]) == {0, 20}
    assert {"grad_bias_norm", "grad_var_total", "grad_cosine", "grad_snr"} <= set(grad["metric"])
    train = results[results["phase"] == "train"]
    assert {"loss", "loss_estimator", "wall_time_s"} <= set(train["metric"])
    evaluation = results[results["phase"] == "eval"]
    assert set(evaluation["metric"]) == {"loss_exact"}
    assert set(evaluation["step"]) == {0, 10, 20}
    thr = results[results["phase"] == "throughput"].set_index(["cell", "metric"])["value"]
    assert (thr.xs("time_per_estimate_s", level="metric") > 0).all()
    assert json.loads(results["estimator_params"].iloc[0])
    assert (results["torch_version"] != "").all() and results["timestamp"].notna().all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["cells"]) == 12
    assert (out / "spec.toml").read_text() == spec.read_text()
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    printed = capsys.readouterr().out
    assert "12 cells run" in printed and "== bernoulli-toy" in printed

    assert main(["show", str(out)]) == 0
    assert "reinforce(baseline=ema)" in capsys.readouterr().out


def test_same_seed_same_results_and_resume(tmp_path):
    spec = _write(tmp_path, TINY)
    out = tmp_path / "run"
    assert _run([str(spec), "--out", str(out)]) == 0
    first = load_results(out)
    victim = sorted((out / "cells").glob("*.parquet"))[3]
    victim.unlink()
    others = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.parquet")}
    assert _run([str(spec), "--out", str(out)]) == 0
    assert victim.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())  # finished cells kept
    second = load_results(out)
    stable = ["cell", "phase", "step", "metric"]

    def deterministic(frame: pd.DataFrame) -> pd.DataFrame:
        keep = (frame["phase"] != "throughput") & (frame["metric"] != "wall_time_s")
        return frame[keep].sort_values(stable).reset_index(drop=True)[stable + ["value"]]

    pd.testing.assert_frame_equal(deterministic(first), deterministic(second))


def test_failed_cell_is_recorded_and_the_matrix_goes_on(tmp_path, capsys):
    plugin = _write(tmp_path, """
        from dataclasses import dataclass
        from estbench import Estimator, register_estimator

        @register_estimator("always-nan")
        @dataclass(kw_only=True)
        class AlwaysNaN(Estimator):
            def _estimate(self, logits, f, latent):
                from estbench import Estimate
                bad = logits.sum(-1) * float("nan")
                return Estimate(bad, bad.detach(), 1)
    """, "nan_plugin.py")
    spec = _write(tmp_path, TINY.replace('temperature = 0.5', 'temperature = 0.5\n\n'
                                         '[[estimator]]\nname = "always-nan"'))
    out = tmp_path / "run"
    assert _run([str(spec), "--out", str(out), "--plugin", str(plugin)]) == 1
    errors = sorted((out / "errors").glob("*.txt"))
    assert len(errors) == 4 and "non-finite" in errors[0].read_text()
    assert load_results(out)["cell"].nunique() == 12
    assert "FAILED" in capsys.readouterr().err
    assert main(["show", str(out)]) == 0
    assert "FAILED" in capsys.readouterr().out


def test_a_different_spec_into_the_same_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run([str(_write(tmp_path, TINY)), "--out", str(out)]) == 0
    changed = _write(tmp_path, TINY.replace("lr = 0.05", "lr = 0.1"), "changed.toml")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _run([str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "would change (spec.measure.lr: 0.05 -> 0.1)" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _run([str(changed), "--out", str(out), "--force"]) == 0


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (("dim = 3", "dimm = 3"), "unknown parameter 'dimm' for task 'bernoulli-toy'. Did you mean: dim?"),
        (('name = "reinforce"', 'name = "reinforc"'), "Unknown estimator 'reinforc'. Did you mean: reinforce"),
        (('name = "bernoulli-toy"', 'name = "bernouli-toy"'), "Did you mean: bernoulli-toy"),
        (("temperature = 0.5", "temperature = 0"), "temperature must be > 0.0, got 0"),
        (("temperature = 0.5", 'temperature = "low"'), "temperature must be a number, got 'low'"),
        (('baseline = ["none", "ema"]', 'baseline = "loo"\nsamples = 1'), "samples must be >= 2"),
        (("steps = 20", "steps = 10"), "checkpoints [20] lie beyond steps = 10"),
        (("lr = 0.05", "lr = -1"), "'lr' must be a positive number"),
        (("lr = 0.05", "learning_rate = 0.05"), "unknown key 'learning_rate' in [measure]"),
        (("lr = 0.05", "lr = 0.05\nthreads = 0"), "'threads' must be an integer >= 1"),
        (("lr = 0.05", "lr = 0.05\ntime_limit_s = -1"),
         "'time_limit_s' must be a number of seconds >= 0 (0: none), got -1"),
        (('seeds = [0, 1]', 'seeds = 3'), "'seeds' must be a non-empty list"),
        (('name = "tiny"', 'name = "tiny"\ncolour = 1'), "unknown top-level key 'colour'"),
        (("dim = 2\ncategories = 3", "dim = 64\ncategories = 3\n\n[[estimator]]\nname = \"exact\""),
         "estimator 'exact': the categorical D=64 K=3 latent has 3^64"),
    ],
)
def test_bad_specs_fail_in_one_line_and_write_nothing(tmp_path, capsys, edit, pattern):
    old, new = edit
    assert old in TINY
    spec = _write(tmp_path, TINY.replace(old, new, 1))
    out = tmp_path / "run"
    assert _run([str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert pattern in err, err
    assert err.count("\n") == 1 and err.startswith("estbench: error: ")
    assert not out.exists()


def test_missing_spec_file(tmp_path, capsys):
    assert _run([str(tmp_path / "nope.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "spec file" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_cuda_unavailable_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path cannot be provoked")
    spec = _write(tmp_path, TINY)
    assert _run([str(spec), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_show_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_list_commands(capsys):
    assert main(["list", "estimators"]) == 0
    out = capsys.readouterr().out
    assert "gumbel-softmax" in out and "unbiased" in out
    assert main(["list", "tasks"]) == 0
    assert "polynomial" in capsys.readouterr().out


def test_committed_specs_are_valid():
    quick = load_spec("runs/quick.toml")
    names = {e for e, _ in quick.estimators}
    from estbench.registry import ESTIMATORS

    builtin = {n for n in ESTIMATORS.names() if ESTIMATORS.get(n).__module__.startswith("estimators")}
    assert builtin <= names  # every built-in estimator is in the quick matrix
    assert {t for t, _ in quick.tasks} == {"bernoulli-toy", "categorical-toy", "polynomial"}
    example = load_spec("runs/toy-bernoulli-045.toml")
    assert len(example.estimators) == 5 and len(example.cells()) == 15


def test_console_script_runs_the_plugin_example(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "estbench.cli", "run", "examples/plugin-demo.toml",
           "--plugin", "examples/my_estimators.py", "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fixed-baseline(b=0.0)" in done.stdout
    assert load_results(out)["estimator"].nunique() == 2


def test_every_committed_spec_parses():
    from pathlib import Path

    specs = sorted(Path("runs").glob("*.toml"))
    assert len(specs) >= 4
    for path in specs:
        assert load_spec(path).cells(), path
