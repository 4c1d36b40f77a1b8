"""The report end to end on a small run: figures decode, tables are filled, notebooks execute."""

from __future__ import annotations

import base64
import io
import re
import textwrap
from pathlib import Path

import matplotlib.image
import pytest

from estbench.cli import main

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
    expected = {"gradient_variance", "bias_variance", "temperature", "throughput",
                "training_loss_exact_steps", "training_loss_exact_wallclock",
                "training_loss_steps", "training_loss_wallclock",
                "training_loss_estimator_steps", "training_loss_estimator_wallclock",
                "training_grad_var_ema_steps", "training_grad_var_ema_wallclock"}
    assert set(images) == expected
    for name, data in images.items():
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300, name
        assert (out / "figures" / f"{name}.png").is_file()
        assert (out / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    tables = re.findall(r"<table.*?</table>", page, flags=re.S)
    assert len(tables) >= 4
    for table in tables:
        assert table.count("<tr>") >= 2, "a table without data rows"
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert "<pre>" in page and "gumbel-softmax" in page and "torch_version" in page
    summary = (out / "summary.md").read_text()
    assert "## bernoulli-toy" in summary and "| rloo |" in summary


def test_compare_two_runs_side_by_side(small_run, tmp_path):
    other = tmp_path / "other"
    spec = tmp_path / "other.toml"
    spec.write_text(textwrap.dedent(SPEC).replace("lr = 0.05", "lr = 0.2"))
    assert main(["run", str(spec), "--out", str(other), "--no-progress"]) == 0
    out = tmp_path / "cmp"
    assert main(["report", str(small_run), str(other), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "final loss_exact [small]" in page and "final loss_exact [other]" in page
    assert "small: rloo" in page or "other: rloo" in page
    assert len(_images(page)) >= 6


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
