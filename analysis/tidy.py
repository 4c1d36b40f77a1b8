"""Readable labels, run labels, filters and per-cell selections over the results table."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from estbench.errors import EstbenchError

__all__ = ["add_labels", "run_labels", "select", "filter_results", "KEYS", "CONFIG"]

#: the columns that identify a configuration within one run
KEYS = ["task_label", "estimator_label"]
#: the columns that identify a configuration across runs: one line or point in a figure
CONFIG = ["run_label", *KEYS]


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """A unique, short label per run directory: its name, with as many parent folders as it takes
    to tell it from the others (``a/quick``, ``b/quick``, ``other``). The same directory twice
    is an error."""
    paths = [Path(p).resolve() for p in run_dirs]
    seen: dict[Path, str] = {}
    for raw, path in zip(run_dirs, paths):
        if path in seen:
            raise EstbenchError(f"run directory '{raw}' is given twice (as '{seen[path]}'); "
                                f"pass each run once")
        seen[path] = str(raw)
    return [_shortest_unique_suffix(path, [p for p in paths if p != path]) for path in paths]


def _shortest_unique_suffix(path: Path, others: list[Path]) -> str:
    """The last parts of ``path``, as few as tell it from every path in ``others``."""
    for depth in range(1, len(path.parts) + 1):
        label = "/".join(path.parts[-depth:])
        if all("/".join(o.parts[-depth:]) != label for o in others):
            return label.lstrip("/") or str(path)
    return str(path)


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


def add_labels(results: pd.DataFrame, run_label: str | None = None) -> pd.DataFrame:
    """A copy with ``task_label`` and ``run_label`` added (``estimator_label`` is already in the
    table). ``run_label`` defaults to an existing ``run_label`` column, else the spec name."""
    out = results.copy()
    out["task_label"] = _task_labels(out) if len(out) else pd.Series(dtype="string")
    if run_label is not None:
        out["run_label"] = run_label
    elif "run_label" not in out:
        out["run_label"] = out["run"]
    out["run_label"] = out["run_label"].astype("string")
    return out


def select(results: pd.DataFrame, metric: str, phase: str | None = None,
           step: str | int | None = None) -> pd.DataFrame:
    """Rows of one metric; ``step`` = 'first' / 'last' keeps each cell's earliest / latest step,
    an integer keeps that step, ``None`` keeps all. A cell is identified within its run, so the
    same cell id in two runs keeps both."""
    rows = results[results["metric"] == metric]
    if phase is not None:
        rows = rows[rows["phase"] == phase]
    if step is None or rows.empty:
        return rows
    if isinstance(step, int):
        return rows[rows["step"] == step]
    rows = rows.sort_values("step", kind="stable")
    cell = ["run_label", "cell"] if "run_label" in rows else ["cell"]
    grouped = rows.groupby(cell, sort=False)
    return grouped.head(1) if step == "first" else grouped.tail(1)


def _matching(patterns: Sequence[str], names: pd.Series, what: str, flag: str) -> pd.Series:
    """Rows whose name matches any pattern (exact or glob); a pattern that matches nothing is an
    error listing the known names."""
    known = sorted(set(names.dropna()))
    keep = pd.Series(False, index=names.index)
    for pattern in patterns:
        hits = names.map(lambda n, p=pattern: n == p or fnmatch.fnmatchcase(str(n), p))
        if not hits.any():
            raise EstbenchError(f"{flag} {pattern!r} matches no {what} in these runs; "
                                f"known: {', '.join(known)}")
        keep |= hits
    return keep


def filter_results(results: pd.DataFrame, estimators: Sequence[str] = (),
                   tasks: Sequence[str] = ()) -> pd.DataFrame:
    """Rows of the estimators and tasks named (exact names or globs such as ``'gumbel*'``),
    matched against the registered name or the configuration label; empty lists keep all."""
    keep = pd.Series(True, index=results.index)
    for patterns, name, label, what, flag in (
            (estimators, "estimator", "estimator_label", "estimator", "--estimators"),
            (tasks, "task", "task_label", "task", "--tasks")):
        if patterns:
            names = pd.concat([results[name], results[label]]).astype("string")
            matched = _matching(patterns, names, what, flag)
            keep &= matched.iloc[:len(results)].to_numpy() | matched.iloc[len(results):].to_numpy()
    return results[keep]
