"""The report end to end on a small run: figures decode, tables are filled, notebooks execute."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import stat
import textwrap
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import pytest

from analysis import panels
from analysis.report import _rankings, combined_results, load_runs
from analysis.summary import SUMMARY_METRICS
from analysis.tidy import run_labels
from estbench.cli import main
from estbench.errors import EstbenchError
from estbench.store import load_results

SPEC = """
name = "small"
seeds = [0, 1, 2]

[measure]
gradient_samples = 300
checkpoints = [0, 20]
steps = 20
log_every = 5
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
name = "rloo"

[[estimator]]
name = "gumbel-softmax"
temperature = [0.5, 1.0]
"""


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    spec = root / "small.toml"
    spec.write_text(textwrap.dedent(SPEC))
    assert main(["run", str(spec), "--out", str(root / "small"), "--no-progress"]) == 0
    return root / "small"


def _images(page: str) -> dict[str, bytes]:
    found = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([^']+)'>", page)
    return {name: base64.b64decode(data) for name, data in found}


def test_report_figures_decode_and_tables_are_filled(small_run, capsys):
    assert main(["report", str(small_run)]) == 0
    assert "report written:" in capsys.readouterr().out
    out = small_run / "report"
    page = (out / "report.html").read_text()
    images = _images(page)
    results = load_results(small_run)
    along = set(results.loc[results["phase"].isin(["train", "eval"]), "metric"]) - {"wall_time_s"}
    expected = {"gradient_variance", "bias_variance", "variance_at_equal_cost", "temperature",
                "throughput", "performance_profile",
                *(f"training_{m}_{x}" for m in along for x in ("steps", "wallclock"))}
    assert set(images) == expected
    for name, data in images.items():
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300, name
        assert (out / "figures" / f"{name}.png").is_file()
        assert (out / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
        assert (out / "figures" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    tables = re.findall(r"<table.*?</table>", page, flags=re.S)
    assert len(tables) >= 4
    for table in tables:
        assert table.count("<tr>") >= 2, "a table without data rows"
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert "<pre>" in page and "gumbel-softmax" in page and "torch_version" in page
    assert "Ranking by final loss_exact" in page and "p_better" in page
    assert "P(beats next) [95%]" in page and "interval by Student t" in page
    summary = (out / "summary.md").read_text()
    assert "## bernoulli-toy" in summary and "| rloo |" in summary


@pytest.fixture(scope="module")
def lr_runs(small_run, tmp_path_factory) -> list[Path]:
    """The small run, the same spec at another lr, and a copy of the first under another
    parent folder with the same directory name."""
    root = tmp_path_factory.mktemp("lr")
    spec = root / "other.toml"
    spec.write_text(textwrap.dedent(SPEC).replace("lr = 0.05", "lr = 0.2"))
    other = root / "small"
    assert main(["run", str(spec), "--out", str(other), "--no-progress"]) == 0
    copy = root / "copy" / "small"
    shutil.copytree(small_run, copy, ignore=shutil.ignore_patterns("report*"))
    spec_file = copy / "spec.toml"
    spec_file.write_text(spec_file.read_text().replace("lr = 0.05", "lr = 0.9"))  # edited later
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["cells"]["skipped-cell"] = {"status": "skipped", "reason": "needs a Bernoulli latent"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return [small_run, other, copy]


def test_run_labels_are_unique_and_a_run_given_twice_is_refused(tmp_path):
    a, b = tmp_path / "x" / "runs" / "quick", tmp_path / "y" / "runs" / "quick"
    assert run_labels([a, b, tmp_path / "z"]) == ["x/runs/quick", "y/runs/quick", "z"]
    with pytest.raises(EstbenchError, match="given twice"):
        run_labels([a, tmp_path / "x" / "runs" / ".." / "runs" / "quick"])


def test_two_runs_of_one_spec_differing_in_lr_lose_no_row(lr_runs, tmp_path):
    runs = load_runs(lr_runs[:2])
    labels = [r.label for r in runs]
    assert len(set(labels)) == 2
    assert not runs[0].results["cell"].isin(runs[1].results["cell"]).any()  # ids cover [measure]
    combined = combined_results(runs)
    assert len(combined) == sum(len(r.results) for r in runs)
    configs = {(r.label, t, e) for r in runs
               for t, e in zip(r.results["task_label"], r.results["estimator_label"])}
    assert len(configs) == 2 * len({c[1:] for c in configs})
    _, frames = _rankings(combined, multi_run=True)
    ranked = set(zip(frames[0]["task_label"], frames[0]["estimator_label"]))
    assert ranked == {(t, f"{run}: {e}") for run, t, e in configs}
    for table in (panels.variance_curve(combined), panels.bias_variance_table(combined),
                  panels.equal_cost_table(combined), panels.throughput_table(combined),
                  panels.training_curve(combined, "loss_exact")):
        assert set(zip(table["run_label"], table["task_label"], table["estimator_label"])) \
            == configs
    profile = panels.performance_profile(combined)
    assert set(zip(profile["run_label"], profile["estimator_label"])) \
        == {(run, e) for run, _, e in configs}
    temperature = panels.temperature_table(combined)
    assert set(temperature["run_label"]) == set(labels)
    deltas = panels.run_deltas(combined, labels[0], SUMMARY_METRICS)
    assert set(zip(deltas["task_label"], deltas["estimator_label"])) \
        == {c[1:] for c in configs}
    lr_effect = deltas[deltas["metric"] == "final exact loss"]
    assert (lr_effect["delta"] != 0).any() and (lr_effect["seeds"] == 3).all()


def test_report_compares_three_runs(lr_runs, tmp_path):
    """Three runs, filtered; files readable per the umask; the manifest's spec and skip reasons."""
    out = tmp_path / "cmp"
    old = os.umask(0o027)
    try:
        assert main(["report", *map(str, lr_runs), "--out", str(out), "--tasks", "bernoulli*",
                     "--estimators", "rloo,gumbel-softmax(temperature=0.5)"]) == 0
    finally:
        os.umask(old)
    assert not plt.get_fignums()
    for path in [out / "report.html", out / "summary.md", *(out / "figures").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    page = (out / "report.html").read_text()
    assert '"lr": 0.05' in html.unescape(page) and "lr = 0.9" not in page
    assert "skipped-cell" in page and "needs a Bernoulli latent" in page
    labels = run_labels(lr_runs)
    for label in labels:
        assert f"<td>{label}</td>" in page and f"{label}: rloo" in page
    assert "Differences from run" in page and "categorical-toy" not in page.split("<h2>Run")[0]
    images = _images(page)
    assert {"gradient_variance", "bias_variance", "performance_profile"} <= set(images)
    assert "temperature" not in images  # one temperature per line is left after the filter
    copy_delta = re.search(r"<td>copy/small</td>\s*<td>rloo</td>\s*<td>([^<]*)</td>", page)
    assert copy_delta and copy_delta.group(1) == "0"  # an identical copy: no difference at all


def test_report_filters_reject_unknown_names(small_run, tmp_path, capsys):
    assert main(["report", str(small_run), "--out", str(tmp_path / "r"),
                 "--estimators", "gumbel"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gumbel' matches no estimator" in err
    assert "known: gumbel-softmax, gumbel-softmax(temperature=0.5), rloo" in err


def test_report_out_naming_a_file_is_one_line_and_exit_2(small_run, tmp_path, capsys):
    target = tmp_path / "file.html"
    target.write_text("x")
    assert main(["report", str(small_run), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, not a directory" in err


def test_report_lists_failed_cells(small_run, tmp_path):
    plugin = tmp_path / "boom.py"
    plugin.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from estbench import Estimator, register_estimator

        @register_estimator("boom")
        @dataclass(kw_only=True)
        class Boom(Estimator):
            def _estimate(self, logits, f, latent):
                raise RuntimeError("deliberate failure")
    """))
    spec = tmp_path / "boom.toml"
    spec.write_text(textwrap.dedent(SPEC) + '\n[[estimator]]\nname = "boom"\n')
    run = tmp_path / "boomrun"
    assert main(["run", str(spec), "--out", str(run), "--plugin", str(plugin),
                 "--no-progress"]) == 1
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "report.html").read_text()
    assert "deliberate failure" in page and page.count("failed") >= 6
    assert "Failed and skipped cells" in (run / "report" / "summary.md").read_text()


def test_report_rejects_a_non_run_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("notebook", ["overview.ipynb", "gradient_quality.ipynb"])
def test_notebooks_execute_on_a_small_run(small_run, notebook, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).parent.parent / "analysis" / "notebooks" / notebook
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code")
    monkeypatch.setenv("ESTBENCH_RUN_DIR", str(small_run))
    NotebookClient(book, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    images = [out for cell in book.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) >= 3
