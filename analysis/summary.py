"""A compact per-task, per-estimator summary of a run's results table."""

from __future__ import annotations

import pandas as pd

__all__ = ["summary_table", "SUMMARY_METRICS"]

#: (phase, metric, which step, column title)
SUMMARY_METRICS = (
    ("train", "loss_exact", "last", "final loss_exact"),
    ("gradient", "grad_var_total", "first", "grad_var_total@0"),
    ("gradient", "grad_bias_norm", "first", "grad_bias_norm@0"),
    ("gradient", "grad_cosine", "first", "grad_cosine@0"),
    ("throughput", "time_per_estimate_s", "first", "time/estimate (s)"),
    ("throughput", "f_evals", "first", "f_evals"),
)


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of headline metrics, one row per (task, task_params, estimator config).

    'first' takes each cell's earliest step (the initial parameters), 'last' its final step.
    """
    keys = ["task", "task_params", "estimator_label"]
    if results.empty:
        return pd.DataFrame(columns=keys + [title for *_, title in SUMMARY_METRICS])
    columns = []
    for phase, metric, which, title in SUMMARY_METRICS:
        rows = results[(results["phase"] == phase) & (results["metric"] == metric)]
        if rows.empty:
            continue
        rows = rows.sort_values("step")
        pick = rows.groupby("cell").head(1) if which == "first" else rows.groupby("cell").tail(1)
        columns.append(pick.groupby(keys)["value"].mean().rename(title))
    seeds = results.groupby(keys)["seed"].nunique().rename("seeds")
    table = pd.concat([seeds, *columns], axis=1).reset_index()
    return table.sort_values(keys, kind="stable").reset_index(drop=True)
