"""``estbench report``: figures (PNG and SVG), a self-contained ``report.html`` and ``summary.md``.

Given one run directory, the report summarises it; given two, it compares them side by side
(lines and table columns are labelled with the run). Failed and skipped cells are listed.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analysis import figures, panels
from analysis.stats import rank_estimators
from analysis.summary import format_summary, summary_table
from analysis.tidy import KEYS, add_labels
from estbench.errors import EstbenchError
from estbench.store import atomic_write_text, load_results, read_json

__all__ = ["build_figures", "write_report", "load_runs"]


@dataclass
class Run:
    path: Path
    name: str
    results: pd.DataFrame
    manifest: dict
    spec_text: str


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    runs = []
    for raw in run_dirs:
        path = Path(raw)
        results = load_results(path)
        manifest = read_json(path / "manifest.json") if (path / "manifest.json").is_file() else {}
        spec = (path / "spec.toml").read_text() if (path / "spec.toml").is_file() else ""
        runs.append(Run(path, path.name, results, manifest, spec))
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        for i, run in enumerate(runs):
            run.name = f"{run.name}#{i + 1}"
    return runs


def _combined(runs: list[Run]) -> pd.DataFrame:
    frames = []
    for run in runs:
        frame = run.results.copy()
        if len(runs) > 1:
            frame["estimator_label"] = run.name + ": " + frame["estimator_label"]
        frames.append(frame)
    non_empty = [f for f in frames if not f.empty]
    return add_labels(pd.concat(non_empty, ignore_index=True) if non_empty else frames[0])


CURVE_LABELS = {
    "loss_exact": "exact expected cost L(θ)",
    "loss": "sampled cost f(z)",
    "grad_var_ema": "gradient variance along training (EMA 0.999)",
}


def _curve_metrics(results: pd.DataFrame) -> list[str]:
    """Every metric recorded along training (exact loss first), except the clock itself."""
    along = results[results["phase"].isin(["train", "eval"])]["metric"].unique()
    found = [m for m in along if m != "wall_time_s"]
    return sorted(found, key=lambda m: (m not in CURVE_LABELS, list(CURVE_LABELS).index(m)
                                        if m in CURVE_LABELS else 0, m))


def build_figures(results: pd.DataFrame) -> dict[str, plt.Figure]:
    """Every report figure that the results support, by file stem."""
    out: dict[str, plt.Figure] = {}
    var = panels.variance_curve(results)
    if not var.empty:
        out["gradient_variance"] = figures.plot_curves(
            var, ylabel="gradient variance tr Cov", log_y=True,
            title="Gradient variance along training (mean over seeds, 95% bootstrap band)")
    bv = panels.bias_variance_table(results)
    if not bv.empty:
        out["bias_variance"] = figures.plot_bias_variance(
            bv, title="Bias against variance at the first checkpoint (95% intervals)")
    temp = panels.temperature_table(results)
    if not temp.empty:
        out["temperature"] = figures.plot_against_temperature(
            temp, title="Relaxed estimators: bias and variance against temperature")
    for metric in _curve_metrics(results):
        ylabel = CURVE_LABELS.get(metric, metric)
        curve = panels.training_curve(results, metric)
        if curve.empty:
            continue
        stem = metric.replace("/", "_")
        out[f"training_{stem}_steps"] = figures.plot_curves(
            curve, x="step", ylabel=ylabel, title=f"{metric} against steps (95% band over seeds)")
        if curve["wall_time_s"].notna().any():
            out[f"training_{stem}_wallclock"] = figures.plot_curves(
                curve.dropna(subset=["wall_time_s"]), x="wall_time_s", ylabel=ylabel,
                title=f"{metric} against training wall-clock (95% band over seeds)")
    thr = panels.throughput_table(results)
    if not thr.empty:
        out["throughput"] = figures.plot_throughput(
            thr, title="Time per estimate (median; bars: interquartile range)")
    return out


def _png_bytes(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _side_by_side(runs: list[Run]) -> pd.DataFrame:
    """Formatted summaries of each run joined on (task, estimator) with run-suffixed columns."""
    tables = []
    for run in runs:
        table = format_summary(summary_table(add_labels(run.results)))
        table = table.set_index(KEYS).add_suffix(f" [{run.name}]")
        tables.append(table)
    return pd.concat(tables, axis=1, join="outer").fillna("–").reset_index()


def _cell_problems(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        for cell_id, info in run.manifest.get("cells", {}).items():
            if info.get("status") in ("failed", "skipped"):
                error = run.path / "errors" / f"{cell_id}.txt"
                first = error.read_text().splitlines()[1] if error.is_file() else ""
                rows.append({"run": run.name, "cell": cell_id, "status": info["status"],
                             "error": first, "traceback": str(error) if error.is_file() else ""})
    return pd.DataFrame(rows, columns=["run", "cell", "status", "error", "traceback"])


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1400px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f4} td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
pre{background:#f7f7f7;padding:.75rem;overflow-x:auto;font-size:.8rem}
.muted{color:#666;font-size:.9rem}
"""


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write figures, ``report.html`` and ``summary.md``; returns the path of the HTML report."""
    if not run_dirs or len(run_dirs) > 2:
        raise EstbenchError("report takes one run directory, or two to compare")
    runs = load_runs(run_dirs)
    out = Path(out_dir) if out_dir else runs[0].path / "report"
    if len(runs) == 2 and out_dir is None:
        out = runs[0].path / f"report-vs-{runs[1].name}"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    results = _combined(runs)
    title = " vs ".join(r.name for r in runs)

    figs = build_figures(results)
    embedded = {}
    for stem, fig in figs.items():
        png = _png_bytes(fig)  # rendered once: written to disk and embedded in the page
        (out / "figures" / f"{stem}.png").write_bytes(png)
        fig.savefig(out / "figures" / f"{stem}.svg", bbox_inches="tight")
        embedded[stem] = base64.b64encode(png).decode()
        plt.close(fig)

    summary = (format_summary(summary_table(results)) if len(runs) == 1 else _side_by_side(runs))
    ranking, _ = rank_estimators(results, "loss_exact", phase="eval", step="last")
    problems = _cell_problems(runs)

    parts = [f"<h1>estbench report: {html.escape(title)}</h1>",
             f"<p class='muted'>{len(results['cell'].unique()) if len(results) else 0} finished "
             f"cells; intervals are 95% percentile-bootstrap intervals over seeds.</p>"]
    parts.append("<h2>Summary per task</h2>")
    for task, rows in summary.groupby("task_label", sort=True):
        parts.append(f"<h3>{html.escape(str(task))}</h3>")
        parts.append(rows.drop(columns=["task_label"]).to_html(index=False, border=0, escape=True))
    if not ranking.empty:
        parts.append("<h2>Ranking by final exact loss</h2>")
        parts.append(ranking.to_html(index=False, border=0, float_format="{:.4g}".format))
    parts.append("<h2>Figures</h2>")
    for stem, data in embedded.items():
        parts.append(f"<h3>{stem.replace('_', ' ')}</h3>"
                     f"<img alt='{stem}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Failed and skipped cells</h2>")
    parts.append(problems.to_html(index=False, border=0) if not problems.empty
                 else "<p>None: every cell finished.</p>")
    for run in runs:
        parts.append(f"<h2>Run {html.escape(run.name)}</h2>")
        prov = run.manifest.get("provenance", {})
        meta = {"directory": str(run.path), "started": run.manifest.get("started"),
                "finished": run.manifest.get("finished"), "status": run.manifest.get("status"),
                "spec hash": run.manifest.get("spec_hash"), **prov}
        parts.append(pd.DataFrame({"field": list(meta), "value": [str(v) for v in meta.values()]})
                     .to_html(index=False, border=0))
        parts.append(f"<h3>Spec</h3><pre>{html.escape(run.spec_text)}</pre>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>estbench: "
            f"{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    atomic_write_text(out / "report.html", page)

    md = [f"# estbench report: {title}", "",
          "Mean over seeds with 95% bootstrap intervals over seeds.", ""]
    for task, rows in summary.groupby("task_label", sort=True):
        md += [f"## {task}", "", _markdown_table(rows.drop(columns=["task_label"])), ""]
    if not problems.empty:
        md += ["## Failed and skipped cells", "",
               _markdown_table(problems.drop(columns=["traceback"])), ""]
    atomic_write_text(out / "summary.md", "\n".join(md))
    atomic_write_text(out / "figures" / "index.json", json.dumps(sorted(embedded)) + "\n")
    return out / "report.html"
