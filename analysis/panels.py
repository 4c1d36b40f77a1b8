"""The tables behind each report figure (statistics only; drawing is in :mod:`analysis.figures`).

Every table keys on :data:`analysis.tidy.CONFIG` (run label, task, estimator configuration) and
carries the registered ``estimator`` name, so nothing from one run hides another's and figures
can style each configuration by its family.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd

from analysis.bias import bias_tests
from analysis.stats import aggregate, bootstrap_ci, curves, profile_fractions
from analysis.tidy import CONFIG, select
from estbench.errors import EstbenchError
from estbench.registry import ESTIMATORS

__all__ = [
    "variance_curve",
    "training_curve",
    "bias_variance_table",
    "temperature_table",
    "equal_cost_table",
    "throughput_table",
    "performance_profile",
    "run_deltas",
]


def _with_estimator(table: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the registered estimator name of each configuration label."""
    names = results[["estimator_label", "estimator"]].drop_duplicates("estimator_label")
    return table.merge(names, on="estimator_label", how="left")


def variance_curve(results: pd.DataFrame, random_state: int = 0) -> pd.DataFrame:
    """``grad_var_total`` at every checkpoint, mean over seeds with its interval
    (:func:`analysis.stats.curves`; the ``interval`` column names the method)."""
    table = curves(results, "grad_var_total", phase="gradient", by=CONFIG,
                   random_state=random_state)
    return _with_estimator(table, results)


def training_curve(results: pd.DataFrame, metric: str, random_state: int = 0) -> pd.DataFrame:
    """A metric recorded along training (phase ``train`` or ``eval``: ``loss``, ``loss_exact``,
    test -ELBO, ...) against steps and wall-clock."""
    phases = results.loc[results["metric"] == metric, "phase"].unique()
    phase = "train" if "train" in phases or not len(phases) else phases[0]
    table = curves(results, metric, phase=phase, by=CONFIG, random_state=random_state)
    return _with_estimator(table, results)


def _mean_ci(results: pd.DataFrame, metric: str, by: list[str], step, random_state: int,
             phase: str = "gradient") -> pd.DataFrame:
    table = aggregate(results, metric, phase=phase, step=step, by=by, statistics=("mean",),
                      random_state=random_state)
    return table.set_index(by)[["value", "ci_low", "ci_high"]]


def _bias_size(results: pd.DataFrame, by: list[str], step) -> pd.DataFrame:
    """The bias norm per ``by`` at one checkpoint (``step``: an int or 'first'), combined over
    seeds as :func:`analysis.bias.bias_tests` does (the mean of the unclipped squared norms,
    then one root of it and of its interval limits), never a mean of clipped per-seed norms,
    which is positive for every unbiased estimator."""
    sizes = bias_tests(results, step=step, by=by)
    return sizes.set_index(by)[["bias_norm", "ci_low", "ci_high"]]


def bias_variance_table(results: pd.DataFrame, random_state: int = 0) -> pd.DataFrame:
    """Bias norm (:func:`_bias_size`) and total variance at every checkpoint (``step``), per
    configuration."""
    columns = [*CONFIG, "estimator", "step", "variance", "variance_lo", "variance_hi", "bias",
               "bias_lo", "bias_hi"]
    if select(results, "grad_bias_sq", "gradient").empty:
        return pd.DataFrame(columns=columns)
    by = [*CONFIG, "step"]
    var = _mean_ci(results, "grad_var_total", by, None, random_state)
    steps = sorted(select(results, "grad_bias_sq", "gradient")["step"].unique())
    bias = pd.concat([_bias_size(results, CONFIG, int(step)).assign(step=step)
                      .set_index("step", append=True) for step in steps])
    var.columns = ["variance", "variance_lo", "variance_hi"]
    bias.columns = ["bias", "bias_lo", "bias_hi"]
    table = var.join(bias, how="inner").reset_index()
    return _with_estimator(table, results)[columns]


def _temperature(estimator: str, params: str) -> float | None:
    """The temperature of a configuration: its own, else the registered estimator's default."""
    given = json.loads(params).get("temperature")
    if given is not None:
        return float(given)
    try:
        fields = {f.name: f for f in dataclasses.fields(ESTIMATORS.get(estimator))}
    except (EstbenchError, TypeError):
        return None
    field = fields.get("temperature")
    return None if field is None or field.default is dataclasses.MISSING else float(field.default)


def _without_temperature(label: str, estimator: str) -> str:
    """The configuration label with its temperature removed: the line a temperature sweep
    draws (other hyperparameters keep lines apart)."""
    inner = label[len(estimator) + 1:-1] if label.startswith(estimator + "(") else ""
    kept = [part for part in inner.split(", ") if part and not part.startswith("temperature=")]
    return f"{estimator}({', '.join(kept)})" if kept else estimator


def temperature_table(results: pd.DataFrame, random_state: int = 0) -> pd.DataFrame:
    """Bias (:func:`_bias_size`) and variance at the first checkpoint against temperature, for
    every estimator run at two or more temperatures. A configuration at the default temperature gets that default
    (read from the registered estimator). ``line`` is the configuration without its
    temperature."""
    columns = [*CONFIG, "estimator", "line", "temperature", "metric", "value", "ci_low",
               "ci_high"]
    rows = results[results["phase"] == "gradient"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    configs = rows[["estimator", "estimator_params", "estimator_label"]].drop_duplicates()
    configs = configs.assign(
        temperature=[_temperature(e, p) for e, p in zip(configs["estimator"],
                                                        configs["estimator_params"])],
        line=[_without_temperature(lab, e) for lab, e in zip(configs["estimator_label"],
                                                              configs["estimator"])])
    configs = configs.dropna(subset=["temperature"]).drop(columns="estimator_params")
    rows = rows.merge(configs.drop(columns="estimator"), on="estimator_label")
    if rows.empty:
        return pd.DataFrame(columns=columns)
    by = [*CONFIG, "line", "temperature"]
    bias = _bias_size(rows, by, "first")
    bias.columns = ["value", "ci_low", "ci_high"]
    out = [bias.reset_index().assign(metric="bias"),
           _mean_ci(rows, "grad_var_total", by, "first", random_state).reset_index()
           .assign(metric="variance")]
    table = _with_estimator(pd.concat(out, ignore_index=True), results)
    counts = table.groupby(["run_label", "task_label", "line"])["temperature"].transform("nunique")
    return table[counts > 1][columns].reset_index(drop=True)


def equal_cost_table(results: pd.DataFrame, random_state: int = 0) -> pd.DataFrame:
    """Variance at equal cost at the first checkpoint: ``grad_var_total`` times the cost of one
    estimate, per cell, then the mean over seeds with its interval
    (:func:`analysis.stats.interval`). Averaging n
    estimates divides the variance by n, so variance x cost is the variance a unit budget buys.
    ``cost`` is 'f evaluations' (``f_evals``) or 'time per estimate (s)'."""
    columns = [*CONFIG, "estimator", "cost", "value", "ci_low", "ci_high"]
    variance = select(results, "grad_var_total", "gradient", "first")
    if variance.empty:
        return pd.DataFrame(columns=columns)
    cell = ["run_label", "cell"]
    variance = variance.set_index(cell)
    out = []
    for metric, cost in (("f_evals", "f evaluations"), ("time_per_estimate_s",
                                                         "time per estimate (s)")):
        price = select(results, metric, "throughput", "first").set_index(cell)["value"]
        product = variance.join(price.rename("price"), how="inner")
        if product.empty:
            continue
        product = product.assign(value=product["value"] * product["price"],
                                 metric="equal_cost", phase="gradient").reset_index()
        table = _mean_ci(product, "equal_cost", CONFIG, None, random_state).reset_index()
        out.append(table.assign(cost=cost))
    if not out:
        return pd.DataFrame(columns=columns)
    return _with_estimator(pd.concat(out, ignore_index=True), results)[columns]


def throughput_table(results: pd.DataFrame) -> pd.DataFrame:
    """Time per estimate per configuration and device: the median over seeds of each cell's
    median, and of its 25th / 75th percentiles."""
    rows = select(results, "time_per_estimate_s", "throughput")
    columns = [*CONFIG, "estimator", "device", "value", "q25", "q75"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    grouped = rows.groupby([*CONFIG, "device"])
    table = pd.DataFrame({
        "value": grouped["value"].median(),
        "q25": grouped["ci_low"].median(),
        "q75": grouped["ci_high"].median(),
    }).reset_index()
    return _with_estimator(table, results)[columns].replace([np.inf, -np.inf], np.nan)


def _normalised_per_task(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Scores rescaled per task to [0, 1]: 0 the best run of any configuration, 1 the worst."""
    best = per_seed.groupby("task_label")["value"].transform("min")
    worst = per_seed.groupby("task_label")["value"].transform("max")
    span = (worst - best).where(worst > best, 1.0)
    return per_seed.assign(score=(per_seed["value"] - best) / span)


def performance_profile(results: pd.DataFrame, metric: str = "loss_exact", *,
                        phase: str = "eval", step: str = "last", taus: int = 101,
                        level: float = 0.95, n_boot: int = 500,
                        random_state: int = 0) -> pd.DataFrame:
    """Performance profile (Dolan & More 2002; rliable, Agarwal et al. 2021, arXiv 2108.13264):
    per configuration (run label, estimator label), the fraction of its runs (tasks x seeds)
    whose per-task normalised score ``(x - best) / (worst - best)`` is at most ``tau`` (lower
    metric is better), with a percentile-bootstrap band that resamples seeds within each task
    (:func:`analysis.stats.profile_fractions`). For one task's profile, pass that task's rows.

    Returns ``run_label, estimator_label, estimator, tau, fraction, lo, hi``; empty when no task
    has two or more seeds.
    """
    columns = ["run_label", "estimator_label", "estimator", "tau", "fraction", "lo", "hi"]
    rows = select(results, metric, phase, step)
    if rows.empty or rows.groupby([*CONFIG])["seed"].nunique().max() < 2:
        return pd.DataFrame(columns=columns)
    per_seed = rows.groupby([*CONFIG, "seed"])["value"].mean().reset_index()
    scored = _normalised_per_task(per_seed[np.isfinite(per_seed["value"])])
    grid = np.linspace(0.0, 1.0, taus)
    rng = np.random.default_rng(random_state)
    out = []
    for (run, est), group in scored.groupby(["run_label", "estimator_label"], sort=True):
        strata = [g["score"].to_numpy() for _, g in group.groupby("task_label")]
        fraction, low, high = profile_fractions(strata, grid, level=level, n_boot=n_boot,
                                                random_state=rng)
        out.append(pd.DataFrame({"run_label": run, "estimator_label": est, "tau": grid,
                                 "fraction": fraction, "lo": low, "hi": high}))
    return _with_estimator(pd.concat(out, ignore_index=True), results)[columns]


def _rows_in_phases(results: pd.DataFrame, metric: str, phases, step) -> pd.DataFrame:
    """Rows of ``metric`` from the first of ``phases`` (one name or several, in order of
    preference) that has any."""
    for phase in (phases,) if isinstance(phases, str) else tuple(phases):
        rows = select(results, metric, phase, step)
        if not rows.empty:
            return rows
    return results.iloc[0:0]


def run_deltas(results: pd.DataFrame, baseline: str, metrics, random_state: int = 0
               ) -> pd.DataFrame:
    """Per-metric differences of every run from ``baseline`` (a run label), per task and
    estimator configuration present in both: seeds are paired (the same seed in both runs), the
    delta is the mean over common seeds of ``other - baseline`` with its interval
    (:func:`analysis.stats.bootstrap_ci`: Student t below 10 seeds, BCa from 10). ``metrics``
    holds rows that start with ``(title, phase or phases, metric, step)``, as the summary
    table's do.

    Returns ``run_label, task_label, estimator_label, metric, baseline, value, delta, ci_low,
    ci_high, seeds``.
    """
    columns = ["run_label", "task_label", "estimator_label", "metric", "baseline", "value",
               "delta", "ci_low", "ci_high", "seeds"]
    rng = np.random.default_rng(random_state)
    out = []
    for title, phases, metric, step, *_ in metrics:
        rows = _rows_in_phases(results, metric, phases, step)
        if rows.empty:
            continue
        per_seed = rows.groupby([*CONFIG, "seed"])["value"].mean().unstack("run_label")
        if baseline not in per_seed:
            continue
        for run in [r for r in per_seed.columns if r != baseline]:
            pairs = per_seed[[baseline, run]].dropna()
            for (task, est), pair in pairs.groupby(level=["task_label", "estimator_label"]):
                delta = (pair[run] - pair[baseline]).to_numpy(float)
                point, low, high = bootstrap_ci(delta, "mean", random_state=rng)
                out.append({"run_label": run, "task_label": task, "estimator_label": est,
                            "metric": title, "baseline": pair[baseline].mean(),
                            "value": pair[run].mean(), "delta": point, "ci_low": low,
                            "ci_high": high, "seeds": len(delta)})
    return pd.DataFrame(out, columns=columns)
