"""Figures. Each function takes a table from :mod:`analysis.stats` (or the summary) and returns a
matplotlib figure; none computes a statistic. Intervals are drawn as bands or error bars."""

from __future__ import annotations

import sys

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # headless: files only; notebooks keep their inline backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = [
    "plot_curves",
    "plot_bias_variance",
    "plot_against_temperature",
    "plot_throughput",
]

sns.set_theme(context="notebook", style="whitegrid")

#: on a log axis, a line whose largest value is below this fraction of the panel's is zero
ZERO_ON_LOG = 1e-12


def _palette(labels) -> dict[str, tuple]:
    labels = sorted(set(labels))
    return dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "husl",
                                                 len(labels))))


def _facets(tasks, width: float = 5.2, height: float = 3.8):
    tasks = sorted(set(tasks))
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(width * max(len(tasks), 1), height),
                             squeeze=False)
    return fig, dict(zip(tasks, axes[0]))


def _span_is_wide(values: pd.Series) -> bool:
    v = values[np.isfinite(values) & (values > 0)]
    return len(v) > 1 and v.max() / v.min() > 30


def _legend(fig: Figure, handles_from) -> None:
    handles, labels = handles_from.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                   title="estimator")


def plot_curves(table: pd.DataFrame, *, x: str = "step", ylabel: str, log_y: bool | None = None,
                title: str = "") -> Figure:
    """Lines per estimator with interval bands, one panel per task, from :func:`stats.curves`.
    ``x`` is 'step' or 'wall_time_s'. ``log_y`` defaults to True when values span >30x."""
    fig, axes = _facets(table["task_label"])
    colors = _palette(table["estimator_label"])
    log_y = _span_is_wide(table["value"]) if log_y is None else log_y
    panel_max = table.groupby("task_label")["value"].max()
    hidden: dict[str, list[str]] = {}
    for (task, est), rows in table.sort_values("step").groupby(["task_label", "estimator_label"]):
        ax = axes[task]
        if log_y and not rows["value"].max() > ZERO_ON_LOG * panel_max[task]:
            hidden.setdefault(task, []).append(est)  # numerically zero: no place on a log axis
            continue
        xs = rows[x].to_numpy(float)
        ax.plot(xs, rows["value"], marker="o" if len(rows) < 4 else None, ms=4, lw=1.6,
                color=colors[est], label=est)
        ax.fill_between(xs, rows["ci_low"], rows["ci_high"], color=colors[est], alpha=0.18, lw=0)
    for task, ax in axes.items():
        ax.set_title(task, fontsize=11)
        ax.set_xlabel("training step" if x == "step" else "training wall-clock (s)")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        if task in hidden:
            ax.text(0.02, 0.02, "≈ 0, not shown: " + ", ".join(hidden[task]),
                    transform=ax.transAxes, fontsize=8, color="0.35")
    if title:
        fig.suptitle(title)
    _legend(fig, next(iter(axes.values())))
    fig.tight_layout()
    return fig


def _errorbars(ax, xs, ys, x_lo, x_hi, y_lo, y_hi, color, label, marker="o"):
    xerr = np.vstack([np.clip(xs - x_lo, 0, None), np.clip(x_hi - xs, 0, None)])
    yerr = np.vstack([np.clip(ys - y_lo, 0, None), np.clip(y_hi - ys, 0, None)])
    ax.errorbar(xs, ys, xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), fmt=marker,
                color=color, ms=6, capsize=2, lw=1, label=label)


def plot_bias_variance(table: pd.DataFrame, title: str = "") -> Figure:
    """Bias norm against total variance (log-log), one point per estimator configuration with
    interval bars. ``table`` has, per ``task_label, estimator_label``: ``variance``,
    ``variance_lo``, ``variance_hi``, ``bias``, ``bias_lo``, ``bias_hi``."""
    fig, axes = _facets(table["task_label"])
    colors = _palette(table["estimator_label"])
    for (task, est), row in table.groupby(["task_label", "estimator_label"]):
        floor = 1e-12  # zero bias (e.g. an exact reference) sits on the floor of the log axis
        _errorbars(axes[task], row["variance"].clip(lower=floor), row["bias"].clip(lower=floor),
                   row["variance_lo"].clip(lower=floor), row["variance_hi"].clip(lower=floor),
                   row["bias_lo"].clip(lower=floor), row["bias_hi"].clip(lower=floor),
                   colors[est], est)
    for task, ax in axes.items():
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(task, fontsize=11)
        ax.set_xlabel("gradient variance tr Cov (log)")
        ax.set_ylabel("bias norm ‖E ĝ − ∇L‖ (log)")
    if title:
        fig.suptitle(title)
    _legend(fig, next(iter(axes.values())))
    fig.tight_layout()
    return fig


def plot_against_temperature(table: pd.DataFrame, title: str = "") -> Figure:
    """Bias and variance against temperature for the relaxed family. ``table`` has
    ``task_label, estimator, temperature, metric ('bias'|'variance'), value, ci_low, ci_high``."""
    metrics = ["bias", "variance"]
    tasks = sorted(set(table["task_label"]))
    fig, axes = plt.subplots(len(metrics), max(len(tasks), 1),
                             figsize=(5.2 * max(len(tasks), 1), 7.0), squeeze=False)
    colors = _palette(table["estimator"])
    for (task, est, metric), rows in table.sort_values("temperature").groupby(
            ["task_label", "estimator", "metric"]):
        ax = axes[metrics.index(metric)][tasks.index(task)]
        ax.plot(rows["temperature"], rows["value"].clip(lower=1e-12), marker="o", color=colors[est],
                label=est)
        ax.fill_between(rows["temperature"], rows["ci_low"].clip(lower=1e-12),
                        rows["ci_high"].clip(lower=1e-12), color=colors[est], alpha=0.18, lw=0)
    for i, metric in enumerate(metrics):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("temperature τ (log)")
            ax.set_ylabel("bias norm (log)" if metric == "bias" else "variance tr Cov (log)")
            ax.set_title(task, fontsize=11)
    if title:
        fig.suptitle(title)
    _legend(fig, axes[0][0])
    fig.tight_layout()
    return fig


def plot_throughput(table: pd.DataFrame, title: str = "") -> Figure:
    """Median time per estimate (forward + backward) per estimator, with the interquartile range
    as error bars; one panel per task, one colour per device. ``table`` has ``task_label,
    estimator_label, device, value, q25, q75`` (seconds)."""
    fig, axes = _facets(table["task_label"], height=0.45 * table["estimator_label"].nunique() + 1.6)
    devices = sorted(set(table["device"]))
    colors = dict(zip(devices, sns.color_palette("deep", len(devices))))
    offsets = {d: (i - (len(devices) - 1) / 2) * 0.35 for i, d in enumerate(devices)}
    for task, ax in axes.items():
        rows = table[table["task_label"] == task]
        order = sorted(set(rows["estimator_label"]))
        for device, dev_rows in rows.groupby("device"):
            pos = np.array([order.index(e) for e in dev_rows["estimator_label"]]) + offsets[device]
            values = dev_rows["value"].to_numpy(float) * 1e6
            err = np.vstack([values - dev_rows["q25"].to_numpy(float) * 1e6,
                             dev_rows["q75"].to_numpy(float) * 1e6 - values])
            ax.barh(pos, values, height=0.33, xerr=np.clip(err, 0, None), color=colors[device],
                    label=device, capsize=2)
        ax.set_yticks(range(len(order)), order, fontsize=9)
        ax.set_xlabel("time per estimate, fwd + bwd (µs)")
        ax.set_title(task, fontsize=11)
        if _span_is_wide(rows["value"]):
            ax.set_xscale("log")
    if title:
        fig.suptitle(title)
    handles, labels = next(iter(axes.values())).get_legend_handles_labels()
    if handles:
        fig.legend(handles[: len(devices)], labels[: len(devices)], loc="upper right",
                   title="device", frameon=False)
    fig.tight_layout()
    return fig
