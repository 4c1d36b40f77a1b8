"""``estbench report``: figures (PNG, SVG, PDF), a self-contained ``report.html``, ``summary.md``.

Given one run directory, the report summarises it; given several, it compares them: every row
carries its run's label (the directory name, with parent folders where two names clash), every
table and figure keys on (run, task, estimator configuration), and a table gives each run's
per-metric differences from the first run with intervals over paired seeds. Failed and skipped
cells are listed with their error or skip reason.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import figures, panels
from analysis.stats import FEW_SEEDS, rank_estimators
from analysis.styles import config_styles
from analysis.bias import VERDICT_LEGEND
from analysis.summary import (SUMMARY_METRICS, format_summary, interval_caption, summary_table,
                              without_uniform_columns)
from analysis.tidy import KEYS, add_labels, filter_results, run_labels
from estbench.errors import EstbenchError
from estbench.store import atomic_write_text, load_results, read_json

__all__ = ["build_figures", "write_report", "load_runs", "combined_results"]

FIGURE_FORMATS = ("png", "svg", "pdf")


@dataclass
class Run:
    path: Path
    label: str
    results: pd.DataFrame
    manifest: dict


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Each run's results (labelled with the run's unique label) and manifest."""
    labels = run_labels(run_dirs)
    runs = []
    for raw, label in zip(run_dirs, labels):
        path = Path(raw)
        results = add_labels(load_results(path), run_label=label)
        manifest = read_json(path / "manifest.json") if (path / "manifest.json").is_file() else {}
        runs.append(Run(path, label, results, manifest))
    return runs


def combined_results(runs: Sequence[Run]) -> pd.DataFrame:
    """Every run's rows in one table, each with its ``run_label``."""
    non_empty = [r.results for r in runs if not r.results.empty]
    return pd.concat(non_empty, ignore_index=True) if non_empty else runs[0].results


CURVE_LABELS = {
    "loss_exact": "exact expected cost L(θ)",
    "loss": "cost f at hard samples",
    "loss_estimator": "cost the estimator evaluated",
    "grad_var_ema": "gradient variance along training (EMA)",
    "test_neg_elbo": "test -ELBO (mean over m samples)",
    "test_neg_iwae": "test -IWAE (m samples)",
    "test_neg_elbo_1": "test -ELBO (one sample)",
    "train_neg_elbo": "train -ELBO (mean over m samples)",
    "train_neg_iwae": "train -IWAE (m samples)",
    "train_neg_elbo_1": "train -ELBO (one sample)",
}


def _curve_metrics(results: pd.DataFrame) -> list[str]:
    """Every metric recorded along training (known ones first), except the clock itself."""
    along = results[results["phase"].isin(["train", "eval"])]["metric"].unique()
    found = [m for m in along if m != "wall_time_s"]
    known = list(CURVE_LABELS)
    return sorted(found, key=lambda m: (known.index(m) if m in known else len(known), m))


#: what a task is ranked and profiled by, in order of preference: the exact loss where a task
#: has it, the test -ELBO on VAEs (what papers report), else the loss at hard samples
HEADLINE_METRICS = (("loss_exact", "eval"), ("test_neg_elbo", "eval"), ("loss", "train"))


def _headline_metric(results: pd.DataFrame) -> tuple[str, str]:
    """The first of :data:`HEADLINE_METRICS` that ``results`` records (old runs kept evaluation
    metrics under phase ``train``). Returns ``(metric, phase)``."""
    for metric, preferred in HEADLINE_METRICS:
        phases = results.loc[results["metric"] == metric, "phase"].unique()
        if len(phases):
            return metric, (preferred if preferred in phases else phases[0])
    return HEADLINE_METRICS[0]


def build_figures(results: pd.DataFrame) -> dict[str, Figure]:
    """Every report figure that the results support, by file stem. Each configuration keeps
    one style (colour: family; line style and marker: variant) across all figures."""
    styles = config_styles(zip(results["estimator_label"], results["estimator"]))
    out: dict[str, Figure] = {}
    var = panels.variance_curve(results)
    if not var.empty:
        out["gradient_variance"] = figures.plot_curves(
            var, ylabel="gradient variance tr Cov", log_y=True, styles=styles,
            title="Gradient variance at each checkpoint (mean over seeds, 95% interval)")
    bv = panels.bias_variance_table(results)
    if not bv.empty:
        out["bias_variance"] = figures.plot_bias_variance(
            bv, styles=styles, title="Bias (combined over seeds) against variance at every "
                                     "checkpoint (95% intervals)")
    cost = panels.equal_cost_table(results)
    if not cost.empty:
        out["variance_at_equal_cost"] = figures.plot_equal_cost(
            cost, styles=styles,
            title="Variance at equal cost at the first checkpoint (mean over seeds, 95% interval)")
    temp = panels.temperature_table(results)
    if not temp.empty:
        out["temperature"] = figures.plot_against_temperature(
            temp, title="Bias and variance against temperature, at the first checkpoint")
    for metric in _curve_metrics(results):
        curve = panels.training_curve(results, metric)
        if curve.empty:
            continue
        ylabel, stem = CURVE_LABELS.get(metric, metric), metric.replace("/", "_")
        out[f"training_{stem}_steps"] = figures.plot_curves(
            curve, x="step", ylabel=ylabel, styles=styles,
            title=f"{metric} against steps (mean over seeds, 95% band)")
        if curve["wall_time_s"].notna().any():
            out[f"training_{stem}_wallclock"] = figures.plot_curves(
                curve.dropna(subset=["wall_time_s"]), x="wall_time_s", ylabel=ylabel,
                styles=styles, title=f"{metric} against training wall-clock (95% band)")
    metric, phase = _headline_metric(results)
    profile = panels.performance_profile(results, metric, phase=phase)
    if not profile.empty:
        out["performance_profile"] = figures.plot_performance_profile(
            profile, metric=f"final {metric}", styles=styles,
            title=f"Performance profile of the final {metric} (95% stratified bootstrap band)")
    thr = panels.throughput_table(results)
    if not thr.empty:
        out["throughput"] = figures.plot_throughput(
            thr, styles=styles, title="Time per estimate (median; bars: interquartile range)")
    return out


def _save(fig: Figure, directory: Path, stem: str) -> bytes:
    """Write the figure in every format; returns the PNG bytes for embedding. The layout and
    the tight bounding box are computed once and then frozen, so each format is drawn once."""
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    bbox = fig.get_tightbbox().padded(0.1)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches=bbox)
    png = buffer.getvalue()
    (directory / f"{stem}.png").write_bytes(png)
    for fmt in FIGURE_FORMATS[1:]:
        fig.savefig(directory / f"{stem}.{fmt}", bbox_inches=bbox)
    return png


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _summary(runs: list[Run], results: pd.DataFrame) -> pd.DataFrame:
    """The formatted summary per (task, configuration); with several runs, one row per run
    under each configuration (column ``run``)."""
    if len(runs) == 1:
        return format_summary(summary_table(results))
    tables = [format_summary(summary_table(rows)).assign(run=label)
              for label, rows in results.groupby("run_label", sort=False)]
    table = pd.concat(tables, ignore_index=True)
    order = {r.label: i for i, r in enumerate(runs)}
    table = table.sort_values(["task_label", "estimator_label", "run"],
                              key=lambda c: c.map(order) if c.name == "run" else c)
    columns = ["task_label", "estimator_label", "run"]
    return table[columns + [c for c in table.columns if c not in columns]].fillna("–")


def _fmt(value: float) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3g}"


def _deltas(runs: list[Run], results: pd.DataFrame) -> pd.DataFrame:
    """Per task and configuration, each later run's difference from the first run, per metric:
    ``Δ [lo, hi]`` (paired by seed; mean over common seeds)."""
    table = panels.run_deltas(results, runs[0].label, SUMMARY_METRICS)
    if table.empty:
        return table
    table = table.assign(text=[
        (_fmt(d) if d == lo == hi else f"{_fmt(d)} [{_fmt(lo)}, {_fmt(hi)}]")
        + ("" if n > 1 else " (1 seed)")
        for d, lo, hi, n in zip(table["delta"], table["ci_low"], table["ci_high"],
                                table["seeds"])])
    order = [t for t, *_ in SUMMARY_METRICS if t in set(table["metric"])]
    wide = table.pivot_table(index=["run_label", *KEYS], columns="metric", values="text",
                             aggfunc="first")
    return wide[order].reset_index().rename_axis(columns=None)


NEXT_TITLE = "P(beats next) [95%]"


def _beats_next(ranking: pd.DataFrame, pairs: pd.DataFrame) -> list[str]:
    """Per row of one task's ranking, the probability that a run of it beats a run of the
    configuration ranked just below, with its interval where there are enough seeds ('–' for
    the last)."""
    pairs = pairs.set_index(["estimator", "other"])
    names = list(ranking["estimator_label"])
    out = []
    for name, below in zip(names, names[1:] + [None]):
        if below is None or (name, below) not in pairs.index:
            out.append("–")
            continue
        row = pairs.loc[(name, below)]
        interval = (f" [{row['ci_low']:.2g}, {row['ci_high']:.2g}]"
                    if np.isfinite(row["ci_low"]) else "")
        out.append(f"{row['p_better']:.2g}{interval}")
    return out


def _rankings(results: pd.DataFrame, multi_run: bool) -> tuple[str, list[pd.DataFrame]]:
    """What :func:`analysis.stats.rank_estimators` returns, each task ranked by its own headline
    metric (:func:`_headline_metric`, named in the column ``ranked by``), as a list of frames.
    With several runs a configuration is ``run: estimator`` so no run hides another."""
    view = add_labels(results) if "task_label" not in results else results
    if multi_run:
        view = view.assign(estimator_label=view["run_label"].astype(str) + ": "
                           + view["estimator_label"].astype(str))
    rankings, pairwise, used = [], [], []
    for _, rows in view.groupby("task_label", sort=True):
        metric, phase = _headline_metric(rows)
        if rows[rows["metric"] == metric].empty:
            continue
        ranking, pairs = rank_estimators(rows, metric, phase=phase, step="last")
        ranking = ranking.assign(**{NEXT_TITLE: _beats_next(ranking, pairs),
                                    "ranked by": f"final {metric}"})
        rankings.append(ranking)
        pairwise.append(pairs.assign(**{"ranked by": f"final {metric}"}))
        used.append(metric)
    if not rankings:
        return "", []
    return ", ".join(dict.fromkeys(used)), [pd.concat(rankings, ignore_index=True),
                                             pd.concat(pairwise, ignore_index=True)]


def _render(frame: pd.DataFrame) -> str:
    """Any DataFrame as an HTML table (floats to 4 significant digits)."""
    table = frame.to_html(index=False, border=0, escape=True, na_rep="–",
                          float_format="{:.4g}".format)
    return f"<div class='scroll'>{table}</div>"


def _render_per_task(frame: pd.DataFrame) -> str:
    """A frame with a ``task_label`` column as one table per task, side by side."""
    if "task_label" not in frame or frame["task_label"].nunique() < 2:
        return _render(frame)
    tables = [f"<div><h3>{html.escape(str(task))}</h3>{_render(rows.drop(columns='task_label'))}"
              f"</div>" for task, rows in frame.groupby("task_label", sort=True)]
    return f"<div class='row'>{''.join(tables)}</div>"


def _named(name: str | None, patterns: Sequence[str]) -> bool:
    return not patterns or name is None or any(
        name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _cell_problems(runs: list[Run], estimators: Sequence[str] = (),
                   tasks: Sequence[str] = ()) -> pd.DataFrame:
    """Failed and skipped cells of every run (of the estimators and tasks kept, by name), with
    the first line of the error or the skip reason."""
    rows = []
    for run in runs:
        for cell_id, info in run.manifest.get("cells", {}).items():
            status = info.get("status")
            if status not in ("failed", "skipped") or not (
                    _named(info.get("estimator"), estimators) and _named(info.get("task"), tasks)):
                continue
            error = run.path / "errors" / f"{cell_id}.txt"
            lines = error.read_text().splitlines() if error.is_file() else []
            reason = info.get("reason") or (lines[1] if len(lines) > 1 else "")
            if status == "skipped" and not reason:
                reason = "(no reason recorded in this run's manifest)"
            rows.append({"run": run.label, "cell": cell_id, "status": status, "reason": reason,
                         "traceback": str(error) if error.is_file() else ""})
    return pd.DataFrame(rows, columns=["run", "cell", "status", "reason", "traceback"])


def _spec_text(run: Run) -> tuple[str, str]:
    """The resolved spec the results came from (the manifest's record), else ``spec.toml``."""
    if "spec" in run.manifest:
        return "resolved spec, from manifest.json", _compact_spec(run.manifest["spec"])
    spec = run.path / "spec.toml"
    text = spec.read_text() if spec.is_file() else "(no spec recorded)"
    return "spec.toml (this run's manifest records no resolved spec)", text


def _compact_spec(spec: dict) -> str:
    """One line per key; lists of ``[name, params]`` pairs (tasks, estimators) one per line."""
    lines = []
    for key in sorted(spec):
        value = spec[key]
        pairs = isinstance(value, list) and value and all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) for v in value)
        if pairs:
            lines.append(f"{key}:")
            lines += [f"  {name} {json.dumps(params, sort_keys=True)}" for name, params in value]
        else:
            lines.append(f"{key}: {json.dumps(value, sort_keys=True)}")
    return "\n".join(lines)


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1400px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.8rem;margin:.5rem 0 1rem}
th,td{border:1px solid #ddd;padding:.2rem .45rem;text-align:right}
.scroll{overflow-x:auto} .row{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start}
th{background:#f4f4f4} td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
pre{background:#f7f7f7;padding:.75rem;overflow-x:auto;font-size:.8rem}
.muted{color:#666;font-size:.9rem} summary{cursor:pointer;color:#245}
"""


def _output_dir(runs: list[Run], out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise EstbenchError(f"--out '{out}' is a file, not a directory; pass a directory "
                                f"for the report (it is created if missing)")
        return out
    if len(runs) == 1:
        return runs[0].path / "report"
    others = "+".join(r.label.replace("/", "_") for r in runs[1:])
    return runs[0].path / f"report-vs-{others}"


def _page(title: str, runs: list[Run], results: pd.DataFrame, summary: pd.DataFrame,
          deltas: pd.DataFrame, ranking: tuple[str, list[pd.DataFrame]],
          problems: pd.DataFrame, embedded: dict[str, str], filters: str) -> str:
    parts = [f"<h1>estbench report: {html.escape(title)}</h1>",
             f"<p class='muted'>{results.groupby(['run_label', 'cell']).ngroups} finished cells"
             f"{html.escape(filters)}.</p>"]
    parts.append("<h2>Summary per task</h2>")
    parts.append(f"<p class='muted'>{html.escape(interval_caption(summary))}.</p>")
    shown = without_uniform_columns(summary)
    for task, rows in shown.groupby("task_label", sort=True):
        parts.append(f"<h3>{html.escape(str(task))}</h3>")
        parts.append(_render(rows.drop(columns=["task_label"])))
    if "bias note" in shown:
        parts.append(f"<p class='muted'>{html.escape(VERDICT_LEGEND)}</p>")
    if not deltas.empty:
        parts.append(f"<h2>Differences from run {html.escape(runs[0].label)}</h2>"
                     "<p class='muted'>other run minus the first, per metric: mean over the "
                     "seeds both runs have (paired by seed) [95% interval over those seeds]."
                     "</p>")
        for task, rows in deltas.groupby("task_label", sort=True):
            parts.append(f"<h3>{html.escape(str(task))}</h3>")
            parts.append(_render(rows.drop(columns=["task_label"])))
    metric, frames = ranking
    if frames:
        parts.append(f"<h2>Ranking by final {html.escape(metric)}</h2>"
                     "<p class='muted'>Each task is ranked by its own headline metric (column "
                     "<i>ranked by</i>): the exact loss where the task has one, the test -ELBO "
                     "on VAEs, else the loss at hard samples; lower is better. mean, ci_low, "
                     "ci_high: the mean over seeds and its 95% interval (method: column "
                     "<i>interval</i>). Configurations whose intervals overlap the group "
                     "leader's share its rank (<i>tied</i>). <i>P(beats next)</i>: the "
                     "probability that a run (seed) of this configuration has a lower value "
                     "than a run of the one ranked below it (ties count half; 0.5 = no "
                     "difference), with a 95% bootstrap interval over the seeds of both from "
                     f"{FEW_SEEDS} seeds each (with fewer, every resample can agree and an "
                     "interval would claim certainty: the value is shown alone).</p>")
        parts.append(_render_per_task(frames[0]))
        for frame in frames[1:]:
            parts.append(f"<details><summary>Every pair: P(a run of <i>estimator</i> beats a "
                         f"run of <i>other</i>), 95% interval over the seeds of both "
                         f"({len(frame)} rows)</summary>{_render(frame)}</details>")
    parts.append("<h2>Figures</h2>")
    for stem, data in embedded.items():
        parts.append(f"<h3>{stem.replace('_', ' ')}</h3>"
                     f"<img alt='{stem}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Failed and skipped cells</h2>")
    parts.append(_render(problems) if not problems.empty
                 else "<p>None: every cell finished.</p>")
    for run in runs:
        parts.append(f"<h2>Run {html.escape(run.label)}</h2>")
        prov = run.manifest.get("provenance", {})
        meta = {"directory": str(run.path), "started": run.manifest.get("started"),
                "finished": run.manifest.get("finished"), "status": run.manifest.get("status"),
                "spec hash": run.manifest.get("spec_hash"), **prov}
        parts.append(_render(pd.DataFrame({"field": list(meta),
                                           "value": [str(v) for v in meta.values()]})))
        source, text = _spec_text(run)
        parts.append(f"<h3>Spec ({html.escape(source)})</h3><pre>{html.escape(text)}</pre>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>estbench: "
            f"{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>")


def _markdown(title: str, summary: pd.DataFrame, deltas: pd.DataFrame,
              problems: pd.DataFrame) -> str:
    md = [f"# estbench report: {title}", "", interval_caption(summary) + ".", ""]
    shown = without_uniform_columns(summary)
    for task, rows in shown.groupby("task_label", sort=True):
        md += [f"## {task}", "", _markdown_table(rows.drop(columns=["task_label"])), ""]
    if "bias note" in shown:
        md += [VERDICT_LEGEND, ""]
    if not deltas.empty:
        md += ["## Differences from the first run (paired by seed, 95% interval)", "",
               _markdown_table(deltas), ""]
    if not problems.empty:
        md += ["## Failed and skipped cells", "",
               _markdown_table(problems.drop(columns=["traceback"])), ""]
    return "\n".join(md)


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, *,
                 estimators: Sequence[str] = (), tasks: Sequence[str] = ()) -> Path:
    """Write figures, ``report.html`` and ``summary.md`` for one or more runs; returns the path
    of the HTML report. ``estimators`` / ``tasks`` keep the names or globs given (matched
    against the registered name or the configuration label)."""
    if not run_dirs:
        raise EstbenchError("report takes at least one run directory")
    runs = load_runs(run_dirs)
    out = _output_dir(runs, out_dir)
    results = filter_results(combined_results(runs), estimators, tasks)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    title = " vs ".join(r.label for r in runs)

    embedded = {}
    for stem, fig in build_figures(results).items():
        embedded[stem] = base64.b64encode(_save(fig, out / "figures", stem)).decode()

    summary = _summary(runs, results)
    deltas = _deltas(runs, results) if len(runs) > 1 else pd.DataFrame()
    ranking = _rankings(results, len(runs) > 1)
    problems = _cell_problems(runs, estimators, tasks)
    filters = "".join(f"; {flag} {', '.join(values)}" for flag, values in
                      (("--estimators", estimators), ("--tasks", tasks)) if values)
    written = [out / "report.html", out / "summary.md", out / "figures" / "index.json"]
    atomic_write_text(written[0], _page(title, runs, results, summary, deltas, ranking,
                                        problems, embedded, filters))
    atomic_write_text(written[1], _markdown(title, summary, deltas, problems))
    atomic_write_text(written[2], json.dumps(sorted(embedded)) + "\n")
    return written[0]
