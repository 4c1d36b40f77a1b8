"""The per-task summary table: headline metrics per estimator configuration, with intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.stats import aggregate
from analysis.tidy import KEYS, add_labels

__all__ = ["SUMMARY_METRICS", "summary_table", "format_summary"]

#: (column title, phase, metric, which step of each cell)
SUMMARY_METRICS = (
    ("final loss_exact", "eval", "loss_exact", "last"),
    ("final loss", "train", "loss", "last"),
    ("bias norm @0", "gradient", "grad_bias_norm", "first"),
    ("variance @0", "gradient", "grad_var_total", "first"),
    ("cosine @0", "gradient", "grad_cosine", "first"),
    ("time/estimate (s)", "throughput", "time_per_estimate_s", "first"),
    ("f evals", "throughput", "f_evals", "first"),
)


def summary_table(results: pd.DataFrame, statistic: str = "mean", n_boot: int = 1000,
                  random_state: int = 0) -> pd.DataFrame:
    """One row per (task, estimator configuration); for each headline metric the statistic over
    seeds and its bootstrap interval (columns ``<title>``, ``<title> lo``, ``<title> hi``)."""
    labelled = add_labels(results) if "task_label" not in results else results
    if labelled.empty:
        return pd.DataFrame(columns=[*KEYS, "seeds"])
    seeds = labelled.groupby(KEYS)["seed"].nunique().rename("seeds")
    parts = [seeds]
    for title, phase, metric, step in SUMMARY_METRICS:
        table = aggregate(labelled, metric, phase=phase, step=step, statistics=(statistic,),
                          n_boot=n_boot, random_state=random_state)
        if table.empty:
            continue
        table = table.set_index(KEYS)
        parts += [table["value"].rename(title), table["ci_low"].rename(f"{title} lo"),
                  table["ci_high"].rename(f"{title} hi")]
    out = pd.concat(parts, axis=1).reset_index()
    return out.sort_values(KEYS, kind="stable").reset_index(drop=True)


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.3g}"


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Render ``value [lo, hi]`` strings for display (tables in the CLI, report and markdown)."""
    titles = [t for t, *_ in SUMMARY_METRICS if t in table.columns]
    out = table[[*KEYS, "seeds"]].copy()
    for title in titles:
        lo, hi = table[f"{title} lo"], table[f"{title} hi"]
        out[title] = [
            _fmt(v) if np.isnan(a) or np.isnan(b) else f"{_fmt(v)} [{_fmt(a)}, {_fmt(b)}]"
            for v, a, b in zip(table[title], lo, hi)
        ]
    return out
