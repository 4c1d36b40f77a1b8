"""The tables behind each report figure (statistics only; drawing is in :mod:`analysis.figures`)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from analysis.stats import aggregate, curves
from analysis.tidy import KEYS, select

__all__ = [
    "variance_curve",
    "training_curve",
    "bias_variance_table",
    "temperature_table",
    "throughput_table",
]


def variance_curve(results: pd.DataFrame, random_state: int = 0) -> pd.DataFrame:
    """``grad_var_total`` at every checkpoint, mean over seeds with bootstrap intervals."""
    return curves(results, "grad_var_total", phase="gradient", random_state=random_state)


def training_curve(results: pd.DataFrame, metric: str, random_state: int = 0) -> pd.DataFrame:
    """A metric recorded along training (phase ``train`` or ``eval``: ``loss``, ``loss_exact``,
    test -ELBO, ...) against steps and wall-clock."""
    phases = results.loc[results["metric"] == metric, "phase"].unique()
    phase = "train" if "train" in phases or not len(phases) else phases[0]
    return curves(results, metric, phase=phase, random_state=random_state)


def _first_checkpoint(results: pd.DataFrame, metric: str, by, random_state: int) -> pd.DataFrame:
    table = aggregate(results, metric, phase="gradient", step="first", by=by,
                      statistics=("mean",), random_state=random_state)
    return table.set_index(list(by))[["value", "ci_low", "ci_high"]]


def bias_variance_table(results: pd.DataFrame, random_state: int = 0) -> pd.DataFrame:
    """Bias norm and total variance at the first checkpoint, per configuration."""
    columns = [*KEYS, "variance", "variance_lo", "variance_hi", "bias", "bias_lo", "bias_hi"]
    if select(results, "grad_bias_norm", "gradient").empty:
        return pd.DataFrame(columns=columns)
    var = _first_checkpoint(results, "grad_var_total", KEYS, random_state)
    bias = _first_checkpoint(results, "grad_bias_norm", KEYS, random_state)
    var.columns = ["variance", "variance_lo", "variance_hi"]
    bias.columns = ["bias", "bias_lo", "bias_hi"]
    return var.join(bias, how="inner").reset_index()[columns]


def temperature_table(results: pd.DataFrame, random_state: int = 0) -> pd.DataFrame:
    """Bias and variance at the first checkpoint against temperature, for every estimator
    configuration with a ``temperature`` hyperparameter. The line key is the estimator label
    with the temperature removed, so other hyperparameters stay apart."""
    columns = ["task_label", "estimator", "temperature", "metric", "value", "ci_low", "ci_high"]
    rows = results[results["phase"] == "gradient"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    temps = rows["estimator_params"].map(lambda p: json.loads(p).get("temperature"))
    rows = rows[temps.notna()].assign(temperature=temps[temps.notna()].astype(float))
    if rows.empty:
        return pd.DataFrame(columns=columns)
    line = rows["estimator_label"].map(
        lambda s: re.sub(r"\(\)$", "", re.sub(r",? ?temperature=[^,)]*,? ?", "", s).replace("(, ", "("))
    )
    rows = rows.assign(estimator=line)
    by = ["task_label", "estimator", "temperature"]
    out = []
    for metric, name in (("grad_bias_norm", "bias"), ("grad_var_total", "variance")):
        table = _first_checkpoint(rows, metric, by, random_state).reset_index()
        out.append(table.assign(metric=name))
    table = pd.concat(out, ignore_index=True)
    counts = table.groupby(["task_label", "estimator"])["temperature"].transform("nunique")
    return table[counts > 1][columns].reset_index(drop=True)


def throughput_table(results: pd.DataFrame) -> pd.DataFrame:
    """Time per estimate per configuration and device: the median over seeds of each cell's
    median, and of its 25th / 75th percentiles."""
    rows = select(results, "time_per_estimate_s", "throughput")
    columns = [*KEYS, "device", "value", "q25", "q75"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    grouped = rows.groupby([*KEYS, "device"])
    table = pd.DataFrame({
        "value": grouped["value"].median(),
        "q25": grouped["ci_low"].median(),
        "q75": grouped["ci_high"].median(),
    }).reset_index()
    return table[columns].replace([np.inf, -np.inf], np.nan)
