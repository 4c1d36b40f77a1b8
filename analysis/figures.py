"""Figures. Each function takes a table from :mod:`analysis.panels` and returns a matplotlib
figure; none computes a statistic. Intervals are drawn as bands or error bars.

Figures are built without pyplot (no global figure registry, nothing to leak) inside a style
context, so importing or calling this module leaves the user's matplotlib and seaborn settings
as they were. Panels: one column per task, one row per run (and per checkpoint where a figure
has one). Each configuration keeps one style everywhere: colour by estimator family, line style
and marker by variant (:mod:`analysis.styles`). Values that a log axis cannot show (zero,
negative, infinite) are left off and named in a note under the figure.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Callable, Iterable

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.styles import Style, config_styles

__all__ = [
    "plot_curves",
    "plot_bias_variance",
    "plot_against_temperature",
    "plot_equal_cost",
    "plot_throughput",
    "plot_performance_profile",
    "styles_for",
]

PANEL_WIDTH, PANEL_HEIGHT = 5.0, 3.6
#: on a log axis, a value below this fraction of its panel's largest is round-off: treated as 0
ZERO_ON_LOG = 1e-10


def _style_rc() -> dict:
    """seaborn's whitegrid look at paper-friendly sizes, as rcParams for a context."""
    return {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85),
            "svg.fonttype": "none", "pdf.fonttype": 42}


def _styled(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    @functools.wraps(plot)
    def wrapper(*args, **kwargs) -> Figure:
        with mpl.rc_context(_style_rc()):
            return plot(*args, **kwargs)
    return wrapper


def styles_for(table: pd.DataFrame, label: str = "estimator_label") -> dict[str, Style]:
    """A style per configuration of ``table`` (columns ``label`` and ``estimator``)."""
    return config_styles(zip(table[label], table["estimator"]))


def _positive(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v) & (v > 0)]


def _on_log(values, reference) -> np.ndarray:
    """Which ``values`` a log axis can show: finite and above :data:`ZERO_ON_LOG` times the
    largest finite ``reference`` value (below that they are zero up to float round-off)."""
    v = np.asarray(values, dtype=float)
    top = _positive(reference)
    floor = ZERO_ON_LOG * top.max() if top.size else 0.0
    return np.isfinite(v) & (v > floor)


def _readable_log(axis, values) -> None:
    """Log scale with limits from the positive finite ``values`` (padded) and readable ticks."""
    v = _positive(values)
    if not v.size:
        _log_ticks(axis, *(axis.axes.get_xlim() if axis is axis.axes.xaxis
                           else axis.axes.get_ylim()), set_limits=False)
        return
    low, high = v.min(), v.max()
    if high / low < 1.2:
        low, high = low / 1.1, high * 1.1
    pad = max((high / low) ** 0.07, 1.3)
    _log_ticks(axis, low / pad, high * pad)


def _log_ticks(axis, low: float, high: float, set_limits: bool = True) -> None:
    """Limits ``low, high`` and labels that never overprint: powers of ten when two or more
    lie inside the limits, else 1-2-5 steps when two fit, else a few evenly spaced values;
    minor ticks unlabelled."""
    if set_limits:
        (axis.axes.set_xlim if axis is axis.axes.xaxis else axis.axes.set_ylim)(low, high)
    whole = (math.floor(math.log10(high)) - math.ceil(math.log10(low)) + 1
             if low > 0 and high > low else 3)  # powers of ten inside the limits
    if whole >= 2:
        axis.set_major_locator(ticker.LogLocator(base=10, numticks=7))
        axis.set_major_formatter(ticker.LogFormatterSciNotation())
        axis.set_minor_formatter(ticker.NullFormatter())
        return
    steps = [m * 10.0 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)))
             for m in (1, 2, 5) if low <= m * 10.0 ** e <= high]
    locator = (ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12) if len(steps) >= 2
               else ticker.MaxNLocator(nbins=4))
    axis.set_major_locator(locator)
    axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:.3g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _extent(values, low, high) -> np.ndarray:
    """What a log axis should span: the values, their upper interval ends, and the lower ends
    that lie within 1.5 decades of their value (a lower end near zero would squeeze the rest)."""
    values, low, high = (np.asarray(v, dtype=float) for v in (values, low, high))
    return np.concatenate([values, high, low[low >= values / 30]])


def _grid(rows: list, cols: list, height: float = PANEL_HEIGHT, width: float = PANEL_WIDTH,
          legend_entries: int = 0):
    """A figure with one panel per (row, column) key; returns ``(fig, {(row, col): ax})``."""
    nrows, ncols = max(len(rows), 1), max(len(cols), 1)
    fig_height = max(height * nrows, 0.24 * legend_entries / _legend_columns(legend_entries) + 1.0)
    fig = Figure(figsize=(width * ncols + (_LEGEND_WIDTH if legend_entries else 0), fig_height),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, {(r, c): axes[i][j] for i, r in enumerate(rows) for j, c in enumerate(cols)}


#: suptitle characters per inch of figure width (12 pt sans-serif, generous)
_TITLE_CHARS_PER_INCH = 10
#: the width a legend beside the panels may take
_LEGEND_WIDTH = 2.6


def _suptitle(fig: Figure, title: str) -> None:
    """The figure title, wrapped to the width left of a legend so the two never overlap."""
    width = fig.get_figwidth() - _LEGEND_WIDTH
    fig.suptitle(textwrap.fill(title, max(30, int(width * _TITLE_CHARS_PER_INCH))), x=0.01,
                 ha="left")


def _legend_columns(entries: int) -> int:
    return 1 if entries <= 22 else 2


def _legend(fig: Figure, styles: dict[str, Style], labels: Iterable[str], title: str,
            line: bool = True) -> None:
    """One legend entry per configuration drawn, grouped under bold family headers."""
    used = [label for label in styles if label in set(labels)]
    handles, texts, headers = [], [], set()
    family = None
    for label in used:
        style = styles[label]
        if style.family != family:
            family = style.family
            headers.add(len(handles))
            handles.append(Line2D([], [], linestyle="none"))
            texts.append(family)
        handles.append(Line2D([], [], color=style.color, marker=style.marker, ms=5,
                              linestyle=style.linestyle if line else "none", lw=1.5))
        texts.append(label)
    if not handles:
        return
    legend = fig.legend(handles, texts, loc="outside right upper", frameon=False, title=title,
                        fontsize=8, title_fontsize=9, ncols=_legend_columns(len(handles)),
                        handlelength=2.6)
    for i, text in enumerate(legend.get_texts()):
        if i in headers:
            text.set_fontweight("bold")


def _note(fig: Figure, hidden: dict[str, list[str]], what: str) -> None:
    """Name, under the figure, what was left off a log axis and why."""
    if not hidden:
        return
    body = "; ".join(f"[{panel}] {', '.join(sorted(set(names)))}"
                     for panel, names in sorted(hidden.items()))
    width = int(fig.get_figwidth() * 14)
    fig.text(0.01, 0.0, textwrap.fill(f"Not drawn ({what}): {body}", width), ha="left",
             va="top", fontsize=7.5, color="0.3")


def _share_columns(axes: dict, which: str = "y", group=lambda row: None) -> None:
    """Give every panel of a column (one task; rows are runs or checkpoints) the union of their
    limits, so runs compare at a glance; ``group(row)`` keeps rows of different quantities
    apart."""
    for col, kind in {(c, group(r)) for r, c in axes}:
        column = [ax for (r, c), ax in axes.items()
                  if c == col and group(r) == kind and ax.get_visible()]
        axis_of = (lambda ax: ax.yaxis) if which == "y" else (lambda ax: ax.xaxis)
        limits = [ax.get_ylim() if which == "y" else ax.get_xlim() for ax in column]
        low, high = min(lo for lo, _ in limits), max(hi for _, hi in limits)
        for ax in column:
            if axis_of(ax).get_scale() == "log":
                _log_ticks(axis_of(ax), low, high)
            else:
                (ax.set_ylim if which == "y" else ax.set_xlim)(low, high)


def _panel_name(row, col, multi_row: bool) -> str:
    return f"{row} | {col}" if multi_row else str(col)


def _rows(table: pd.DataFrame) -> list:
    return sorted(set(table["run_label"])) if len(table) else []


def _titles(axes: dict, multi_row: bool) -> None:
    for (row, col), ax in axes.items():
        ax.set_title(f"{row}\n{col}" if multi_row else str(col), fontsize=10)


@_styled
def plot_curves(table: pd.DataFrame, *, x: str = "step", ylabel: str, log_y: bool | None = None,
                title: str = "", styles: dict[str, Style] | None = None) -> Figure:
    """A metric along training (or at checkpoints), one line per configuration with a band, one
    panel per run and task, from :func:`panels.variance_curve` / :func:`panels.training_curve`.
    ``x`` is 'step' or 'wall_time_s'; ``log_y`` defaults to True when values span >30x. Where
    every configuration has at most two points on the x axis the values are drawn as points with
    interval bars side by side, not as lines through two points."""
    styles = styles or styles_for(table)
    runs, tasks = _rows(table), sorted(set(table["task_label"]))
    fig, axes = _grid(runs, tasks, legend_entries=len(set(table["estimator_label"])) + 7)
    values = table["value"].to_numpy(float)
    log_y = (_positive(values).size > 1 and _positive(values).max() / _positive(values).min()
             > 30) if log_y is None else log_y
    sparse = table.groupby(["run_label", "task_label", "estimator_label"])[x].nunique().max() <= 2
    hidden: dict[str, list[str]] = {}
    for (run, task), ax in axes.items():
        panel = table[(table["run_label"] == run) & (table["task_label"] == task)]
        drawn = _draw_points(ax, panel, x, styles, log_y) if sparse else \
            _draw_lines(ax, panel, x, styles, log_y)
        shown = panel[panel["estimator_label"].isin(drawn)]
        gone = sorted(set(panel["estimator_label"]) - drawn)
        if gone:
            hidden[_panel_name(run, task, len(runs) > 1)] = gone
        if x == "step":
            ax.set_xlabel("checkpoint step (configurations side by side, in legend order)"
                          if sparse else "training step")
        else:
            ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
            extent = _extent(shown["value"], shown["ci_low"], shown["ci_high"])
            _readable_log(ax.yaxis, extent[_on_log(extent, panel["value"])])
    _titles(axes, len(runs) > 1)
    _share_columns(axes)
    if title:
        _suptitle(fig, title)
    _legend(fig, styles, table["estimator_label"], "estimator (colour: family)", line=not sparse)
    _note(fig, hidden, "zero up to round-off, negative or infinite: no place on a log axis"
          if log_y else "no finite value")
    return fig


def _drawable(rows: pd.DataFrame, log_y: bool, panel: pd.DataFrame) -> pd.DataFrame:
    """Rows whose value the axis can show (on a log axis: not zero up to round-off)."""
    values = rows["value"].to_numpy(float)
    return rows[_on_log(values, panel["value"]) if log_y else np.isfinite(values)]


def _draw_lines(ax, panel: pd.DataFrame, x: str, styles: dict[str, Style], log_y: bool) -> set:
    drawn = set()
    for est, rows in panel.sort_values(x).groupby("estimator_label"):
        rows = _drawable(rows.dropna(subset=[x]), log_y, panel)
        if rows.empty:
            continue
        style = styles[est]
        xs = rows[x].to_numpy(float)
        ax.plot(xs, rows["value"], color=style.color, linestyle=style.linestyle, lw=1.5,
                marker=style.marker, ms=4, markevery=max(1, len(xs) // 6), label=est)
        lo, hi = rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float)
        if log_y:
            lo = np.where(lo > 0, lo, np.nan)
        ax.fill_between(xs, lo, hi, color=style.color, alpha=0.08, lw=0)
        drawn.add(est)
    return drawn


def _errorbar(ax, xs, ys, lo, hi, style: Style) -> None:
    ys, lo, hi = (np.asarray(v, dtype=float) for v in (ys, lo, hi))
    err = np.nan_to_num(np.vstack([np.clip(ys - lo, 0, None), np.clip(hi - ys, 0, None)]))
    ax.errorbar(xs, ys, yerr=err, fmt=style.marker, color=style.color, ms=5, capsize=2, lw=1)


def _draw_points(ax, panel: pd.DataFrame, x: str, styles: dict[str, Style], log_y: bool) -> set:
    """Each checkpoint a slot on the x axis; configurations side by side within it."""
    steps = sorted(set(panel[x].dropna()))
    order = [e for e in styles if e in set(panel["estimator_label"])]
    width = 0.8 / max(len(order), 1)
    drawn = set()
    for i, est in enumerate(order):
        rows = _drawable(panel[panel["estimator_label"] == est], log_y, panel)
        if rows.empty:
            continue
        xs = np.array([steps.index(s) for s in rows[x]]) - 0.4 + width * (i + 0.5)
        _errorbar(ax, xs, rows["value"], rows["ci_low"], rows["ci_high"], styles[est])
        drawn.add(est)
    ax.set_xticks(range(len(steps)), [f"{s:g}" for s in steps])
    ax.set_xlim(-0.5, len(steps) - 0.5)
    for boundary in np.arange(0.5, len(steps) - 1, 1.0):
        ax.axvline(boundary, color="0.8", lw=0.8)
    ax.grid(False, axis="x")
    return drawn


@_styled
def plot_bias_variance(table: pd.DataFrame, title: str = "",
                       styles: dict[str, Style] | None = None) -> Figure:
    """Bias norm against total variance (log-log) at every checkpoint, one point per
    configuration with interval bars; one panel per task (columns) and per run and checkpoint
    (rows). ``table`` is :func:`panels.bias_variance_table`."""
    styles = styles or styles_for(table)
    keys = sorted(set(zip(table["run_label"], table["step"])))
    tasks = sorted(set(table["task_label"]))
    fig, axes = _grid(keys, tasks, legend_entries=len(set(table["estimator_label"])) + 7)
    multi_run = len(set(table["run_label"])) > 1
    hidden: dict[str, list[str]] = {}
    for (key, task), ax in axes.items():
        run, step = key
        panel = table[(table["run_label"] == run) & (table["step"] == step)
                      & (table["task_label"] == task)]
        ok = pd.Series(_on_log(panel["variance"], panel["variance"])
                       & _on_log(panel["bias"], panel["bias"]), index=panel.index)
        name = f"{run}, step {step} | {task}" if multi_run else f"step {step} | {task}"
        if (~ok).any():
            hidden[name] = list(panel.loc[~ok, "estimator_label"])
        for _, row in panel[ok].iterrows():
            style = styles[row["estimator_label"]]
            x_err = np.nan_to_num([[max(row["variance"] - row["variance_lo"], 0)],
                                   [max(row["variance_hi"] - row["variance"], 0)]])
            ax.errorbar([row["variance"]], [row["bias"]], xerr=x_err,
                        yerr=np.nan_to_num([[max(row["bias"] - row["bias_lo"], 0)],
                                            [max(row["bias_hi"] - row["bias"], 0)]]),
                        fmt=style.marker, color=style.color, ms=6, capsize=2, lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        shown = panel[ok]
        _readable_log(ax.xaxis, _extent(shown["variance"], shown["variance_lo"],
                                         shown["variance_hi"]))
        _readable_log(ax.yaxis, _extent(shown["bias"], shown["bias_lo"], shown["bias_hi"]))
        ax.set_xlabel("gradient variance tr Cov")
        ax.set_ylabel("bias norm ‖E ĝ − ∇L‖")
        ax.set_title(f"{run}, step {step}\n{task}" if multi_run else f"step {step}\n{task}",
                     fontsize=10)
    _share_columns(axes, "x")
    _share_columns(axes, "y")
    if title:
        _suptitle(fig, title)
    _legend(fig, styles, table["estimator_label"], "estimator (colour: family)", line=False)
    _note(fig, hidden, "bias or variance zero (up to round-off) or not finite: no place on a "
                       "log axis")
    return fig


@_styled
def plot_against_temperature(table: pd.DataFrame, title: str = "") -> Figure:
    """Bias and variance at the first checkpoint against temperature: one line per
    configuration without its temperature (``line``), one panel per task (columns) and per run
    and metric (rows). ``table`` is :func:`panels.temperature_table`."""
    styles = styles_for(table, "line")
    keys = [(run, m) for run in _rows(table) for m in ("bias", "variance")]
    tasks = sorted(set(table["task_label"]))
    fig, axes = _grid(keys, tasks, legend_entries=len(set(table["line"])) + 7)
    multi_run = len(set(table["run_label"])) > 1
    hidden: dict[str, list[str]] = {}
    for ((run, metric), task), ax in axes.items():
        panel = table[(table["run_label"] == run) & (table["metric"] == metric)
                      & (table["task_label"] == task)].sort_values("temperature")
        for line, rows in panel.groupby("line"):
            shown = _drawable(rows, True, panel)
            if len(shown) < len(rows):
                hidden.setdefault(f"{metric} | {task}", []).append(line)
            if shown.empty:
                continue
            style = styles[line]
            ax.plot(shown["temperature"], shown["value"], color=style.color,
                    linestyle=style.linestyle, marker=style.marker, ms=5, lw=1.5)
            lo = np.where(shown["ci_low"] > 0, shown["ci_low"], np.nan)
            ax.fill_between(shown["temperature"], lo, shown["ci_high"], color=style.color,
                            alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _readable_log(ax.xaxis, panel["temperature"])
        _readable_log(ax.yaxis, _extent(panel["value"], panel["ci_low"], panel["ci_high"]))
        ax.set_xlabel("temperature τ")
        ax.set_ylabel("bias norm" if metric == "bias" else "variance tr Cov")
        ax.set_title(f"{run}\n{task}" if multi_run else task, fontsize=10)
    if title:
        _suptitle(fig, title)
    _legend(fig, styles, table["line"], "estimator (τ on the x axis)")
    _note(fig, hidden, "zero or not finite at some temperature")
    return fig


def _slot_note(ax, slot: int, text: str) -> None:
    """A grey word in a configuration's empty row of a dot plot, so it never reads as missing."""
    ax.text(0.01, slot, text, transform=ax.get_yaxis_transform(), va="center", fontsize=7,
            color="0.55")


def _bar_panels(table: pd.DataFrame, row_key: str, styles: dict[str, Style]):
    """Dot-plot figure skeleton: one row of panels per (``row_key`` value, run), one column per
    task, one slot per configuration in legend order."""
    keys = [(run, k) for k in sorted(set(table[row_key])) for run in _rows(table)]
    tasks = sorted(set(table["task_label"]))
    order = [e for e in styles if e in set(table["estimator_label"])]
    height = 0.24 * len(order) + 1.4
    fig, axes = _grid(keys, tasks, height=height, width=PANEL_WIDTH + 1.5)
    return fig, axes, order


@_styled
def plot_equal_cost(table: pd.DataFrame, title: str = "",
                    styles: dict[str, Style] | None = None) -> Figure:
    """Variance at equal cost: tr Cov x (f evaluations) and tr Cov x (time per estimate), one
    bar per configuration with its interval, log axis; one panel per task (columns) and per run
    and cost (rows). ``table`` is :func:`panels.equal_cost_table`."""
    styles = styles or styles_for(table)
    fig, axes, order = _bar_panels(table, "cost", styles)
    multi_run = len(set(table["run_label"])) > 1
    hidden: dict[str, list[str]] = {}
    for ((run, cost), task), ax in axes.items():
        panel = table[(table["run_label"] == run) & (table["cost"] == cost)
                      & (table["task_label"] == task)].set_index("estimator_label")
        for i, est in enumerate(order):
            if est not in panel.index:
                _slot_note(ax, i, "no result for this task")
                continue
            row = panel.loc[est]
            if not _on_log([row["value"]], panel["value"])[0]:
                hidden.setdefault(f"{cost} | {task}", []).append(est)
                _slot_note(ax, i, "≈ 0 (see note)")
                continue
            ax.errorbar([row["value"]], [i], xerr=np.nan_to_num(
                [[max(row["value"] - row["ci_low"], 0)], [max(row["ci_high"] - row["value"], 0)]]),
                fmt=styles[est].marker, color=styles[est].color, ms=5, capsize=2, lw=1)
        ax.set_yticks(range(len(order)), order, fontsize=8)
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.set_xscale("log")
        shown = panel[_on_log(panel["value"], panel["value"])]
        _readable_log(ax.xaxis, _extent(shown["value"], shown["ci_low"], shown["ci_high"]))
        unit = "f evaluations" if cost.startswith("f") else "s"
        ax.set_xlabel(f"variance x cost (tr Cov x {unit}; lower is better)")
        ax.set_title(f"{run}: {cost}\n{task}" if multi_run else f"{cost}\n{task}", fontsize=10)
    _share_columns(axes, "x", group=lambda row: row[1])
    if title:
        _suptitle(fig, title)
    _note(fig, hidden, "zero (up to round-off) or not finite: no place on a log axis")
    return fig


@_styled
def plot_throughput(table: pd.DataFrame, title: str = "",
                    styles: dict[str, Style] | None = None) -> Figure:
    """Median time per estimate (forward + backward) per configuration with the interquartile
    range as a bar; one panel per task (columns) and run (rows); one marker per device (filled:
    the first device). ``table`` is :func:`panels.throughput_table` (seconds)."""
    styles = styles or styles_for(table)
    table = table.assign(panel="time per estimate")
    fig, axes, order = _bar_panels(table, "panel", styles)
    devices = sorted(set(table["device"]))
    offsets = {d: (i - (len(devices) - 1) / 2) * 0.3 for i, d in enumerate(devices)}
    multi_run = len(set(table["run_label"])) > 1
    for ((run, _), task), ax in axes.items():
        panel = table[(table["run_label"] == run) & (table["task_label"] == task)]
        for i in [i for i, e in enumerate(order) if e not in set(panel["estimator_label"])]:
            _slot_note(ax, i, "no result for this task")
        for device, rows in panel.groupby("device"):
            for _, row in rows.iterrows():
                style = styles[row["estimator_label"]]
                micro = row["value"] * 1e6
                err = np.nan_to_num([[max(micro - row["q25"] * 1e6, 0)],
                                     [max(row["q75"] * 1e6 - micro, 0)]])
                ax.errorbar([micro], [order.index(row["estimator_label"]) + offsets[device]],
                            xerr=err, fmt=style.marker, color=style.color, ms=6, capsize=2,
                            lw=1.2, mfc=style.color if device == devices[0] else "white")
        ax.set_yticks(range(len(order)), order, fontsize=8)
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.set_xlabel("time per estimate, fwd + bwd (µs)")
        values = _positive(panel["value"])
        if values.size > 1 and values.max() / values.min() > 30:
            ax.set_xscale("log")
            _readable_log(ax.xaxis, np.concatenate([values, _positive(panel["q25"]),
                                                    _positive(panel["q75"])]) * 1e6)
        ax.set_title(f"{run}\n{task}" if multi_run else task, fontsize=10)
    _share_columns(axes, "x")
    if title:
        _suptitle(fig, title)
    if len(devices) > 1:
        handles = [Line2D([], [], marker="o", color="0.3", linestyle="none",
                          mfc="0.3" if d == devices[0] else "white", label=d) for d in devices]
        fig.legend(handles=handles, loc="outside right upper", title="device", frameon=False)
    return fig


@_styled
def plot_performance_profile(table: pd.DataFrame, *, metric: str, title: str = "",
                             styles: dict[str, Style] | None = None) -> Figure:
    """Performance profiles: for each configuration, the fraction of its runs (tasks x seeds)
    whose normalised score is at most tau, with a bootstrap band. One panel per estimator family
    (and run), with every other configuration drawn thin and grey behind it for comparison.
    ``table`` has ``run_label, estimator_label, estimator, tau, fraction, lo, hi``
    (:func:`panels.performance_profile`)."""
    styles = styles or styles_for(table)
    runs = _rows(table)
    families = list(dict.fromkeys(styles[e].family for e in styles
                                  if e in set(table["estimator_label"])))
    columns = min(len(families), 4)
    slots = [(run, i // columns) for run in runs for i in range(len(families))]
    keys = sorted(set(slots), key=slots.index)
    fig, axes = _grid(keys, list(range(columns)), height=PANEL_HEIGHT, width=PANEL_WIDTH - 0.8,
                      legend_entries=len(set(table["estimator_label"])) + len(families))
    for (run, row), col in [(k, c) for k in keys for c in range(columns)]:
        ax = axes[((run, row), col)]
        index = row * columns + col
        if index >= len(families):
            ax.set_visible(False)
            continue
        family = families[index]
        panel = table[table["run_label"] == run]
        for est, rows in panel.sort_values("tau").groupby("estimator_label"):
            style = styles[est]
            if style.family != family:
                ax.step(rows["tau"], rows["fraction"], where="post", color="0.8", lw=0.8)
        for est in [e for e in styles if styles[e].family == family]:
            rows = panel[panel["estimator_label"] == est].sort_values("tau")
            if rows.empty:
                continue
            style = styles[est]
            ax.step(rows["tau"], rows["fraction"], where="post", color=style.color,
                    linestyle=style.linestyle, lw=1.8)
            ax.fill_between(rows["tau"], rows["lo"], rows["hi"], step="post",
                            color=style.color, alpha=0.15, lw=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"τ (normalised {metric})")
        ax.set_ylabel("fraction of runs ≤ τ")
        ax.set_title(f"{run}: {family}" if len(runs) > 1 else family, fontsize=10)
    if title:
        _suptitle(fig, title)
    _legend(fig, styles, table["estimator_label"], "estimator (colour: family)")
    fig.text(0.01, 0.0, "τ: per task, 0 = the best run of any configuration, 1 = the worst; "
             "higher and further left is better. Grey: the other families.", ha="left",
             va="top", fontsize=7.5, color="0.3")
    return fig
