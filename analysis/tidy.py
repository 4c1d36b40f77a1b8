"""Readable labels and per-cell selections over the results table."""

from __future__ import annotations

import json

import pandas as pd

__all__ = ["add_labels", "select", "KEYS"]

#: the columns that identify a configuration (one line or point in a figure)
KEYS = ["task_label", "estimator_label"]


def _task_labels(results: pd.DataFrame) -> pd.Series:
    """Task name, plus the parameters that differ between configurations of the same task."""
    labels = {}
    for task, group in results.groupby("task"):
        configs = {p: json.loads(p) for p in group["task_params"].unique()}
        varying = sorted(
            k for k in set().union(*configs.values())
            if len({json.dumps(c.get(k)) for c in configs.values()}) > 1
        )
        for raw, params in configs.items():
            inner = ", ".join(f"{k}={params.get(k)}" for k in varying)
            labels[(task, raw)] = f"{task}({inner})" if inner else task
    return pd.Series([labels[(t, p)] for t, p in zip(results["task"], results["task_params"])],
                     index=results.index, dtype="string")


def add_labels(results: pd.DataFrame) -> pd.DataFrame:
    """A copy with ``task_label`` added (``estimator_label`` is already in the table)."""
    out = results.copy()
    out["task_label"] = _task_labels(out) if len(out) else pd.Series(dtype="string")
    return out


def select(results: pd.DataFrame, metric: str, phase: str | None = None,
           step: str | int | None = None) -> pd.DataFrame:
    """Rows of one metric; ``step`` = 'first' / 'last' keeps each cell's earliest / latest step,
    an integer keeps that step, ``None`` keeps all."""
    rows = results[results["metric"] == metric]
    if phase is not None:
        rows = rows[rows["phase"] == phase]
    if step is None or rows.empty:
        return rows
    if isinstance(step, int):
        return rows[rows["step"] == step]
    rows = rows.sort_values("step", kind="stable")
    grouped = rows.groupby("cell", sort=False)
    return grouped.head(1) if step == "first" else grouped.tail(1)
