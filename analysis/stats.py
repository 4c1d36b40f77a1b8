"""Interval estimates over seeds: pure functions from the results table to tidy tables.

Every aggregate comes with a percentile-bootstrap confidence interval over **seeds** (the
independent replications), drawn with an explicit random state, as recommended by Agarwal et al.
2021 (rliable, arXiv 2108.13264). Statistics: mean, median, interquartile mean (IQM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from analysis.tidy import KEYS, select

__all__ = [
    "STATISTICS",
    "interquartile_mean",
    "bootstrap_ci",
    "aggregate",
    "curves",
    "probability_of_improvement",
    "rank_estimators",
]


def interquartile_mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean of the middle 50% of ``values`` along ``axis`` (25% trimmed from each end)."""
    values = np.sort(np.asarray(values, dtype=float), axis=axis)
    n = values.shape[axis]
    cut = int(np.floor(0.25 * n))
    kept = np.take(values, np.arange(cut, n - cut), axis=axis)
    return kept.mean(axis=axis)


STATISTICS: dict[str, Callable[..., np.ndarray]] = {
    "mean": lambda x, axis=-1: np.mean(x, axis=axis),
    "median": lambda x, axis=-1: np.median(x, axis=axis),
    "iqm": interquartile_mean,
}


def bootstrap_ci(values: Sequence[float], statistic: str = "mean", level: float = 0.95,
                 n_boot: int = 2000, random_state: int | np.random.Generator = 0
                 ) -> tuple[float, float, float]:
    """(point estimate, low, high): percentile bootstrap over the given per-seed values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    fn = STATISTICS[statistic]
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    point = float(fn(x))
    if x.size == 1:
        return (point, np.nan, np.nan)
    rng = np.random.default_rng(random_state)
    resamples = x[rng.integers(0, x.size, size=(n_boot, x.size))]
    stats = fn(resamples, axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return (point, float(low), float(high))


def _per_seed(rows: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """One value per (configuration, seed): the mean over any repeated observations."""
    return rows.groupby([*by, "seed"], dropna=False)["value"].mean().reset_index()


def aggregate(results: pd.DataFrame, metric: str, *, phase: str | None = None,
              step: str | int | None = "last", by: Sequence[str] = tuple(KEYS),
              statistics: Sequence[str] = ("mean", "median", "iqm"), level: float = 0.95,
              n_boot: int = 2000, random_state: int = 0) -> pd.DataFrame:
    """Aggregate one metric per configuration with bootstrap intervals over seeds.

    Returns a tidy frame: ``*by, metric, statistic, value, ci_low, ci_high, seeds``.
    """
    rows = select(results, metric, phase, step)
    out = []
    if not rows.empty:
        rng = np.random.default_rng(random_state)
        for key, group in _per_seed(rows, by).groupby(list(by), dropna=False, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            for stat in statistics:
                point, low, high = bootstrap_ci(group["value"], stat, level, n_boot, rng)
                out.append({**dict(zip(by, key)), "metric": metric, "statistic": stat,
                            "value": point, "ci_low": low, "ci_high": high,
                            "seeds": int(group["seed"].nunique())})
    columns = [*by, "metric", "statistic", "value", "ci_low", "ci_high", "seeds"]
    return pd.DataFrame(out, columns=columns)


def curves(results: pd.DataFrame, metric: str, *, phase: str, by: Sequence[str] = tuple(KEYS),
           statistic: str = "mean", level: float = 0.95, n_boot: int = 1000,
           random_state: int = 0) -> pd.DataFrame:
    """A metric along training: per configuration and step, the statistic over seeds with a
    bootstrap interval, plus ``wall_time_s`` (mean over seeds) where the run recorded it.

    Returns ``*by, step, wall_time_s, value, ci_low, ci_high, seeds``.
    """
    rows = select(results, metric, phase)
    columns = [*by, "step", "wall_time_s", "value", "ci_low", "ci_high", "seeds"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rng = np.random.default_rng(random_state)
    out = []
    for key, group in _per_seed(rows, [*by, "step"]).groupby([*by, "step"], sort=True):
        point, low, high = bootstrap_ci(group["value"], statistic, level, n_boot, rng)
        out.append({**dict(zip([*by, "step"], key)), "value": point, "ci_low": low,
                    "ci_high": high, "seeds": int(group["seed"].nunique())})
    table = pd.DataFrame(out)
    wall = select(results, "wall_time_s", "train")
    if wall.empty:
        table["wall_time_s"] = np.nan
    else:
        mean_wall = wall.groupby([*by, "step"])["value"].mean().rename("wall_time_s")
        table = table.merge(mean_wall.reset_index(), on=[*by, "step"], how="left")
    return table[columns]


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    """P(X < Y) for independent runs X of one estimator and Y of another (ties count 1/2):
    the chance that a run of the first has the lower (better) value."""
    x = np.asarray(x, dtype=float)[:, None]
    y = np.asarray(y, dtype=float)[None, :]
    return float(np.mean((x < y) + 0.5 * (x == y)))


def rank_estimators(results: pd.DataFrame, metric: str, *, phase: str | None = None,
                    step: str | int | None = "last", lower_is_better: bool = True,
                    level: float = 0.95, n_boot: int = 2000, random_state: int = 0
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rank estimator configurations per task by the mean over seeds, and the probability that
    each beats each other one (with a bootstrap interval over seeds of both).

    Returns ``(ranking, pairwise)``: ``task_label, estimator_label, mean, rank`` and
    ``task_label, estimator, other, p_better, ci_low, ci_high``.
    """
    rows = select(results, metric, phase, step)
    per_seed = _per_seed(rows, KEYS) if not rows.empty else pd.DataFrame(
        columns=[*KEYS, "seed", "value"])
    sign = 1.0 if lower_is_better else -1.0
    rng = np.random.default_rng(random_state)
    ranking, pairwise = [], []
    for task, group in per_seed.groupby("task_label", sort=True):
        values = {e: sign * g["value"].to_numpy(float) for e, g in group.groupby("estimator_label")}
        means = pd.Series({e: v.mean() for e, v in values.items()})
        ranks = means.rank(method="min")
        for est in means.index:
            ranking.append({"task_label": task, "estimator_label": est,
                            "mean": sign * means[est], "rank": int(ranks[est])})
        for a, xa in values.items():
            for b, xb in values.items():
                if a == b:
                    continue
                boots = [probability_of_improvement(xa[rng.integers(0, xa.size, xa.size)],
                                                    xb[rng.integers(0, xb.size, xb.size)])
                         for _ in range(n_boot // 10)]
                alpha = (1 - level) / 2
                low, high = np.quantile(boots, [alpha, 1 - alpha])
                pairwise.append({"task_label": task, "estimator": a, "other": b,
                                 "p_better": probability_of_improvement(xa, xb),
                                 "ci_low": float(low), "ci_high": float(high)})
    ranking_df = pd.DataFrame(ranking, columns=["task_label", "estimator_label", "mean", "rank"])
    pairwise_df = pd.DataFrame(pairwise, columns=["task_label", "estimator", "other", "p_better",
                                                  "ci_low", "ci_high"])
    return ranking_df.sort_values(["task_label", "rank"]).reset_index(drop=True), pairwise_df
