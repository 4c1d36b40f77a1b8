"""Interval estimates over seeds: pure functions from the results table to tidy tables.

Seeds are the independent replications; every aggregate carries an interval over seeds, the name
of the method that made it and the number of seeds (after Agarwal et al. 2021, rliable, arXiv
2108.13264). Intervals come from :func:`scipy.stats.bootstrap` with an explicit random state:

- ``t``           the mean of fewer than ``BCA_MIN_SEEDS`` seeds: Student t interval
                  mean +- t_{n-1} sd / sqrt(n) (a bootstrap of 3 values has 10 distinct
                  resamples and is far too narrow);
- ``bca``         ``BCA_MIN_SEEDS`` or more seeds: bias-corrected and accelerated bootstrap
                  (Efron 1987);
- ``percentile``  where BCa is degenerate (its jackknife has no spread) or, below
                  ``BCA_MIN_SEEDS``, for statistics other than the mean;
- ``constant``    every seed gave the same value: the interval is that value;
- ``none``        a single seed: no interval.

Fewer than ``FEW_SEEDS`` seeds make an interval that means little; tables say so in ``warning``.
Statistics: mean, median, interquartile mean (IQM).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.tidy import KEYS, select

__all__ = [
    "STATISTICS",
    "BCA_MIN_SEEDS",
    "FEW_SEEDS",
    "Interval",
    "interquartile_mean",
    "interval",
    "bootstrap_ci",
    "few_seeds_warning",
    "aggregate",
    "curves",
    "probability_of_improvement",
    "pairwise_improvement",
    "rank_estimators",
    "profile_fractions",
]

#: below this many seeds the mean gets a t interval instead of a bootstrap
BCA_MIN_SEEDS = 10
#: below this many seeds an interval is flagged as rough
FEW_SEEDS = 5


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


class Interval(NamedTuple):
    """A point estimate over ``seeds`` values with its interval and the method that made it."""

    value: float
    ci_low: float
    ci_high: float
    method: str
    seeds: int


def few_seeds_warning(seeds: int) -> str:
    """The note a table carries for an interval over too few seeds ('' when there are enough)."""
    if seeds < 2:
        return "one seed: no interval"
    return f"only {seeds} seeds: the interval is rough" if seeds < FEW_SEEDS else ""


_RNG_KEYWORD = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"


def _scipy_bootstrap(data: tuple[np.ndarray, ...], statistic: Callable, level: float,
                     n_boot: int, rng: np.random.Generator, method: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """scipy's bootstrap interval over axis 0 of each sample (later axes are a batch); NaN
    limits where it reports a degenerate distribution."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        result = sps.bootstrap(data, statistic, n_resamples=n_boot, confidence_level=level,
                               method=method, vectorized=True, axis=0, **{_RNG_KEYWORD: rng})
    return np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high)


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Callable, level: float, n_boot: int,
               rng: np.random.Generator, bca: bool) -> tuple[float, float, str]:
    """BCa when asked and not degenerate, else percentile: (low, high, method)."""
    if bca:
        low, high = _scipy_bootstrap(data, statistic, level, n_boot, rng, "BCa")
        if np.isfinite(low) and np.isfinite(high):
            return float(low), float(high), "bca"
    low, high = _scipy_bootstrap(data, statistic, level, n_boot, rng, "percentile")
    return float(low), float(high), "percentile"


def _t_interval(x: np.ndarray, level: float) -> tuple[float, float]:
    half = sps.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def interval(values: Sequence[float], statistic: str = "mean", level: float = 0.95,
             n_boot: int = 2000, random_state: int | np.random.Generator = 0,
             bounds: tuple[float, float] | None = None) -> Interval:
    """The statistic of the finite per-seed ``values`` with its interval (module docstring).
    ``bounds``: the range the quantity lives in (e.g. ``(0, inf)`` for a variance or a time);
    the interval is intersected with it, which keeps its coverage."""
    iv = _interval(values, statistic, level, n_boot, random_state)
    if bounds is None:
        return iv
    low, high = bounds
    return iv._replace(ci_low=float(np.clip(iv.ci_low, low, high)),
                       ci_high=float(np.clip(iv.ci_high, low, high)))


def _interval(values: Sequence[float], statistic: str, level: float, n_boot: int,
              random_state: int | np.random.Generator) -> Interval:
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    fn = STATISTICS[statistic]
    if x.size == 0:
        return Interval(np.nan, np.nan, np.nan, "none", 0)
    point = float(fn(x))
    if x.size == 1:
        return Interval(point, np.nan, np.nan, "none", 1)
    if np.all(x == x[0]):
        return Interval(point, point, point, "constant", x.size)
    if statistic == "mean" and x.size < BCA_MIN_SEEDS:
        return Interval(point, *_t_interval(x, level), "t", x.size)
    rng = np.random.default_rng(random_state)
    low, high, method = _bootstrap((x,), fn, level, n_boot, rng, x.size >= BCA_MIN_SEEDS)
    return Interval(point, low, high, method, x.size)


def bootstrap_ci(values: Sequence[float], statistic: str = "mean", level: float = 0.95,
                 n_boot: int = 2000, random_state: int | np.random.Generator = 0
                 ) -> tuple[float, float, float]:
    """(point estimate, low, high) of :func:`interval` (kept for callers that want a tuple):
    despite the name, a Student t interval for the mean of fewer than 10 seeds."""
    return tuple(interval(values, statistic, level, n_boot, random_state)[:3])


def _per_seed(rows: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """One value per (configuration, seed): the mean over any repeated observations."""
    return rows.groupby([*by, "seed"], dropna=False)["value"].mean().reset_index()


def _interval_row(iv: Interval) -> dict:
    return {"value": iv.value, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "interval": iv.method,
            "seeds": iv.seeds, "warning": few_seeds_warning(iv.seeds)}


_INTERVAL_COLUMNS = ["value", "ci_low", "ci_high", "interval", "seeds", "warning"]


def aggregate(results: pd.DataFrame, metric: str, *, phase: str | None = None,
              step: str | int | None = "last", by: Sequence[str] = tuple(KEYS),
              statistics: Sequence[str] = ("mean", "median", "iqm"), level: float = 0.95,
              n_boot: int = 2000, random_state: int = 0,
              bounds: tuple[float, float] | None = None) -> pd.DataFrame:
    """Aggregate one metric per configuration with intervals over seeds (``bounds``: see
    :func:`interval`).

    Returns a tidy frame: ``*by, metric, statistic, value, ci_low, ci_high, interval (method),
    seeds, warning``.
    """
    rows = select(results, metric, phase, step)
    out = []
    if not rows.empty:
        rng = np.random.default_rng(random_state)
        for key, group in _per_seed(rows, by).groupby(list(by), dropna=False, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            for stat in statistics:
                iv = interval(group["value"], stat, level, n_boot, rng, bounds)
                out.append({**dict(zip(by, key)), "metric": metric, "statistic": stat,
                            **_interval_row(iv)})
    return pd.DataFrame(out, columns=[*by, "metric", "statistic", *_INTERVAL_COLUMNS])


def curves(results: pd.DataFrame, metric: str, *, phase: str, by: Sequence[str] = tuple(KEYS),
           statistic: str = "mean", level: float = 0.95, n_boot: int = 1000,
           random_state: int = 0, bounds: tuple[float, float] | None = None) -> pd.DataFrame:
    """A metric along training: per configuration and step, the statistic over seeds with its
    interval (``bounds``: see :func:`interval`), plus ``wall_time_s`` (mean over seeds) where
    the run recorded it.

    Returns ``*by, step, wall_time_s, value, ci_low, ci_high, interval, seeds, warning``.
    """
    rows = select(results, metric, phase)
    columns = [*by, "step", "wall_time_s", *_INTERVAL_COLUMNS]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rng = np.random.default_rng(random_state)
    out = []
    for key, group in _per_seed(rows, [*by, "step"]).groupby([*by, "step"], sort=True):
        iv = interval(group["value"], statistic, level, n_boot, rng, bounds)
        out.append({**dict(zip([*by, "step"], key)), **_interval_row(iv)})
    table = pd.DataFrame(out)
    wall = select(results, "wall_time_s", "train")
    if wall.empty:
        table["wall_time_s"] = np.nan
    else:
        mean_wall = wall.groupby([*by, "step"])["value"].mean().rename("wall_time_s")
        table = table.merge(mean_wall.reset_index(), on=[*by, "step"], how="left")
    return table[columns]


def _improvement(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(X < Y) + P(X = Y) / 2 over all pairs, vectorised over leading (resample) dims."""
    x = np.moveaxis(np.asarray(x, dtype=float), axis, -1)[..., :, None]
    y = np.moveaxis(np.asarray(y, dtype=float), axis, -1)[..., None, :]
    return np.mean((x < y) + 0.5 * (x == y), axis=(-2, -1))


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    """P(X < Y) for independent runs X of one estimator and Y of another (ties count 1/2):
    the chance that a run of the first has the lower (better) value (the Mann-Whitney U / nm)."""
    return float(_improvement(np.asarray(x, dtype=float), np.asarray(y, dtype=float)))


def _improvement_interval(x: np.ndarray, y: np.ndarray, level: float, n_boot: int,
                          rng: np.random.Generator) -> tuple[float, float, str]:
    """Interval of P(X < Y), each sample resampled on its own (BCa from BCA_MIN_SEEDS each).
    None below FEW_SEEDS seeds on either side: with n x m pairs that all agree every resample
    agrees too, and the bootstrap would print [1, 1] for two seeds each."""
    point = probability_of_improvement(x, y)
    if min(x.size, y.size) < FEW_SEEDS:
        return np.nan, np.nan, "none"
    bca = min(x.size, y.size) >= BCA_MIN_SEEDS and 0 < point < 1
    return _bootstrap((x, y), _improvement, level, n_boot, rng, bca)


def _per_task_values(results: pd.DataFrame, metric: str, phase: str | None,
                     step: str | int | None, sign: float
                     ) -> dict[str, dict[str, np.ndarray]]:
    """task_label -> estimator_label -> per-seed values (times ``sign``: lower is better)."""
    rows = select(results, metric, phase, step)
    if rows.empty:
        return {}
    per_seed = _per_seed(rows, KEYS)
    per_seed = per_seed[np.isfinite(per_seed["value"].to_numpy(float))]
    return {task: {e: sign * g["value"].to_numpy(float)
                   for e, g in group.groupby("estimator_label", sort=True)}
            for task, group in per_seed.groupby("task_label", sort=True)}


def pairwise_improvement(results: pd.DataFrame, metric: str, *, phase: str | None = None,
                         step: str | int | None = "last", lower_is_better: bool = True,
                         level: float = 0.95, n_boot: int = 2000, random_state: int = 0
                         ) -> pd.DataFrame:
    """For every ordered pair of configurations of a task, the probability that a run of the
    first beats a run of the second, with a bootstrap interval over the seeds of both (none
    below ``FEW_SEEDS`` seeds on either side).

    Returns ``task_label, estimator, other, p_better, ci_low, ci_high, interval, seeds,
    other_seeds``.
    """
    sign = 1.0 if lower_is_better else -1.0
    rng = np.random.default_rng(random_state)
    out = []
    for task, values in _per_task_values(results, metric, phase, step, sign).items():
        for a, xa in values.items():
            for b, xb in values.items():
                if a == b:
                    continue
                low, high, method = _improvement_interval(xa, xb, level, n_boot, rng)
                out.append({"task_label": task, "estimator": a, "other": b,
                            "p_better": probability_of_improvement(xa, xb), "ci_low": low,
                            "ci_high": high, "interval": method, "seeds": xa.size,
                            "other_seeds": xb.size})
    return pd.DataFrame(out, columns=["task_label", "estimator", "other", "p_better", "ci_low",
                                      "ci_high", "interval", "seeds", "other_seeds"])


def _tied_ranks(table: pd.DataFrame) -> pd.Series:
    """Ranks with ties: sorted by mean, the best unranked configuration leads a group, and every
    unranked configuration whose interval overlaps the leader's joins it; the group shares the
    leader's competition rank (1 + the number ranked before it). An interval that is missing
    (one seed) is the point itself."""
    order = table.sort_values("mean", kind="stable").index
    low = table["ci_low"].fillna(table["mean"])
    high = table["ci_high"].fillna(table["mean"])
    ranks = pd.Series(0, index=table.index, dtype=int)
    ranked = 0
    for leader in order:
        if ranks[leader]:
            continue
        rank = ranked + 1
        for other in order:
            if not ranks[other] and low[other] <= high[leader] and low[leader] <= high[other]:
                ranks[other] = rank
                ranked += 1
    return ranks


def rank_estimators(results: pd.DataFrame, metric: str, *, phase: str | None = None,
                    step: str | int | None = "last", lower_is_better: bool = True,
                    level: float = 0.95, n_boot: int = 2000, random_state: int = 0
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rank configurations per task by their mean over seeds, with ties where intervals overlap
    (:func:`_tied_ranks`: a configuration whose interval overlaps the group leader's shares its
    rank), and the pairwise probabilities of improvement (:func:`pairwise_improvement`).

    Returns ``(ranking, pairwise)``; ranking: ``task_label, estimator_label, mean, ci_low,
    ci_high, interval, seeds, rank, tied`` (tied: the rank is shared), sorted by task and rank.
    """
    columns = ["task_label", "estimator_label", "mean", "ci_low", "ci_high", "interval", "seeds",
               "rank", "tied"]
    sign = 1.0 if lower_is_better else -1.0
    rng = np.random.default_rng(random_state)
    parts = []
    for task, values in _per_task_values(results, metric, phase, step, sign).items():
        rows = []
        for est, x in values.items():
            iv = interval(x, "mean", level, n_boot, rng)
            rows.append({"task_label": task, "estimator_label": est, "mean": iv.value,
                         "ci_low": iv.ci_low, "ci_high": iv.ci_high, "interval": iv.method,
                         "seeds": iv.seeds})
        table = pd.DataFrame(rows)
        table["rank"] = _tied_ranks(table)
        table["tied"] = table.groupby("rank")["rank"].transform("size") > 1
        if sign < 0:  # report values on their own scale
            table[["mean", "ci_low", "ci_high"]] = -table[["mean", "ci_high", "ci_low"]].to_numpy()
        parts.append(table)
    ranking = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    ranking = ranking[columns].sort_values(["task_label", "rank", "mean"], kind="stable")
    pairwise = pairwise_improvement(results, metric, phase=phase, step=step,
                                    lower_is_better=lower_is_better, level=level, n_boot=n_boot,
                                    random_state=random_state)
    return ranking.reset_index(drop=True), pairwise


def _fraction_at_most(taus: np.ndarray, fixed: np.ndarray) -> Callable[..., np.ndarray]:
    """The statistic: the fraction of the pooled strata (along ``axis``) and of the ``fixed``
    values at most each tau, with taus on the first axis (scipy's layout for a vector
    statistic)."""
    def fraction(*strata: np.ndarray, axis: int = -1) -> np.ndarray:
        moved = [np.moveaxis(s, axis, -1) for s in strata]
        batch = moved[0].shape[:-1] if moved else ()
        pooled = np.concatenate([*moved, np.broadcast_to(fixed, (*batch, fixed.size))], axis=-1)
        return np.moveaxis(np.mean(pooled[..., :, None] <= taus, axis=-2), -1, 0)
    return fraction


def profile_fractions(strata: Sequence[Sequence[float]], taus: Sequence[float], *,
                      level: float = 0.95, n_boot: int = 2000,
                      random_state: int | np.random.Generator = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One configuration's performance profile (Dolan & More 2002; rliable, Agarwal et al.
    2021, arXiv 2108.13264): for each ``tau``, the fraction of its runs, pooled over
    ``strata`` (one array of scores per task, one score per seed), with a score at most tau,
    and a stratified percentile-bootstrap band (each stratum resampled within itself, by
    :func:`scipy.stats.bootstrap`). Lower scores are better.

    Returns ``(fraction, low, high)``, each of shape ``[taus]``; a stratum of one run is held
    fixed, and the band is NaN when every stratum has one run.
    """
    strata = [np.asarray(s, dtype=float) for s in strata]
    grid = np.asarray(taus, dtype=float)
    varying = tuple(s for s in strata if s.size > 1)
    single = [s for s in strata if s.size == 1]  # a resample of one run is that run
    statistic = _fraction_at_most(grid, np.concatenate(single) if single else np.empty(0))
    fraction = statistic(*varying)
    if not varying:
        nan = np.full(grid.size, np.nan)
        return fraction, nan, nan
    rng = np.random.default_rng(random_state)
    low, high = _scipy_bootstrap(varying, statistic, level, n_boot, rng, "percentile")
    return fraction, np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)
