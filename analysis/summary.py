"""The per-task summary table: headline metrics per estimator configuration, with intervals.

Headlines, in this order where the run has them: the VAE bounds on the test set (``test -ELBO``
and ``test -IWAE``, each from m = the task's ``eval_samples`` samples per image, column ``m``),
the exact objective and the discrete objective f at hard samples at the end of training (``final
loss``; never the relaxed value an estimator may train on, which is ``loss_estimator``), whether
bias was detected at any checkpoint and the bias norm at step 0 (:mod:`analysis.bias`), variance,
cosine, cost. Each value is the mean over seeds with its interval (:mod:`analysis.stats`),
intersected with the range of the quantity (a variance or a time is not negative); the
``interval`` column names the method and ``note`` warns when there are too few seeds.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analysis.bias import BIAS_ALPHA, bias_tests, verdict_note
from analysis.stats import FEW_SEEDS, aggregate, few_seeds_warning
from analysis.tidy import KEYS, add_labels

__all__ = ["SUMMARY_METRICS", "summary_table", "format_summary", "interval_caption",
           "without_uniform_columns"]

POSITIVE = (0.0, np.inf)

#: (column title, phases to read in order of preference, metric, which step of each cell, the
#: range of the quantity or None); evaluation metrics moved from phase 'train' to 'eval': old
#: runs are read from 'train'
SUMMARY_METRICS = (
    ("test -ELBO", ("eval", "train"), "test_neg_elbo", "last", None),
    ("test -IWAE", ("eval", "train"), "test_neg_iwae", "last", None),
    ("final exact loss", ("eval", "train"), "loss_exact", "last", None),
    ("final loss at hard z", ("train",), "loss", "last", None),
    ("variance @0", ("gradient",), "grad_var_total", "first", POSITIVE),
    ("cosine @0", ("gradient",), "grad_cosine", "first", (-1.0, 1.0)),
    ("time/estimate (s)", ("throughput",), "time_per_estimate_s", "first", POSITIVE),
    ("f evals", ("throughput",), "f_evals", "first", POSITIVE),
)

#: where the bias columns go (after the losses)
_BIAS_AFTER = "final loss at hard z"
BIAS_TITLE = "bias norm @0"
DETECTED_TITLE = "bias detected"
NOTE_TITLE = "bias note"


def _preferred_phase(labelled: pd.DataFrame, phases: tuple[str, ...], metric: str
                     ) -> pd.DataFrame:
    """Rows of ``metric`` from, in each cell, the first of ``phases`` that has it (so runs from
    before evaluation moved to phase 'eval' still read, also beside newer runs)."""
    rows = labelled[(labelled["metric"] == metric) & labelled["phase"].isin(phases)]
    if rows.empty:
        return rows
    preference = rows["phase"].map({phase: i for i, phase in enumerate(phases)})
    best = preference.groupby(rows["cell"]).transform("min")
    return rows[preference == best]


def _metric_table(labelled: pd.DataFrame, phases: tuple[str, ...], metric: str, step: str,
                  bounds: tuple[float, float] | None, statistic: str, n_boot: int,
                  random_state: int) -> pd.DataFrame:
    """The aggregate of ``metric`` per configuration (empty if no cell has it)."""
    rows = _preferred_phase(labelled, phases, metric)
    if rows.empty:
        return pd.DataFrame()
    table = aggregate(rows, metric, step=step, statistics=(statistic,), n_boot=n_boot,
                      random_state=random_state, bounds=bounds)
    return table.set_index(KEYS)


def _eval_samples(labelled: pd.DataFrame) -> pd.Series:
    """m = ``eval_samples`` of each configuration's task (NaN where the task has none)."""
    first = labelled.groupby(KEYS)["task_params"].first()
    return first.map(lambda raw: json.loads(raw).get("eval_samples", np.nan)).astype(float)


def _bias_columns(labelled: pd.DataFrame, alpha: float) -> list[pd.Series]:
    detected = bias_tests(labelled, step=None, alpha=alpha).set_index(KEYS)
    at_zero = bias_tests(labelled, step="first", alpha=alpha).set_index(KEYS)
    if detected.empty:
        return []
    return [detected["bias_detected"].rename(DETECTED_TITLE),
            detected["pvalue"].rename(f"{DETECTED_TITLE} p"),
            detected["alpha"].rename(f"{DETECTED_TITLE} alpha"),
            at_zero["bias_norm"].rename(BIAS_TITLE), at_zero["ci_low"].rename(f"{BIAS_TITLE} lo"),
            at_zero["ci_high"].rename(f"{BIAS_TITLE} hi")]


def summary_table(results: pd.DataFrame, statistic: str = "mean", n_boot: int = 1000,
                  random_state: int = 0, alpha: float = BIAS_ALPHA) -> pd.DataFrame:
    """One row per (task, estimator configuration): ``seeds``, ``interval`` (method), ``note``,
    ``m``; for each headline metric the statistic over seeds and its interval (columns
    ``<title>``, ``<title> lo``, ``<title> hi``); ``bias detected`` (Holm over every seed and
    checkpoint at family-wise level ``alpha``), its combined p-value ``bias detected p``, the
    level ``bias detected alpha`` and ``bias norm @0`` with its interval
    (:func:`analysis.bias.bias_tests`). :func:`format_summary` states the level in the title."""
    labelled = add_labels(results) if "task_label" not in results else results
    if labelled.empty:
        return pd.DataFrame(columns=[*KEYS, "seeds"])
    seeds = labelled.groupby(KEYS)["seed"].nunique().rename("seeds")
    parts, methods = [seeds], []
    for title, phases, metric, step, bounds in SUMMARY_METRICS:
        table = _metric_table(labelled, phases, metric, step, bounds, statistic, n_boot,
                              random_state)
        if table.empty:
            continue
        parts += [table["value"].rename(title), table["ci_low"].rename(f"{title} lo"),
                  table["ci_high"].rename(f"{title} hi")]
        methods.append(table["interval"])
        if title == _BIAS_AFTER:
            parts += _bias_columns(labelled, alpha)
    if _BIAS_AFTER not in {p.name for p in parts}:
        parts += _bias_columns(labelled, alpha)
    out = pd.concat(parts, axis=1)
    out["interval"] = _methods(methods, out.index)
    out["note"] = [few_seeds_warning(int(s)) for s in out["seeds"]]
    out["m"] = _eval_samples(labelled).reindex(out.index)
    if DETECTED_TITLE in out:
        names = labelled.groupby(KEYS)["estimator"].first().reindex(out.index)
        out[NOTE_TITLE] = [verdict_note(name, None if pd.isna(d) else bool(d), lo, hi)
                           for name, d, lo, hi in zip(names, out[DETECTED_TITLE],
                                                      out[f"{BIAS_TITLE} lo"],
                                                      out[f"{BIAS_TITLE} hi"])]
    return out.reset_index().sort_values(KEYS, kind="stable").reset_index(drop=True)


def _methods(methods: list[pd.Series], index: pd.Index) -> pd.Series:
    """The interval methods a row used, other than 'constant' and 'none' (e.g. 't')."""
    if not methods:
        return pd.Series("", index=index)
    frame = pd.concat(methods, axis=1).reindex(index)
    return frame.apply(lambda row: ", ".join(sorted(
        {m for m in row.dropna() if m not in ("constant", "none")})), axis=1)


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.3g}"


def _with_interval(value: float, low: float, high: float) -> str:
    """``value [low, high]``, with more digits where 3 would print a narrow interval as a point;
    the value alone where there is no interval or it is one (every seed agrees)."""
    if np.isnan(low) or np.isnan(high) or low == high == value:
        return _fmt(value)
    digits = 3
    while digits < 7 and f"{low:.{digits}g}" == f"{high:.{digits}g}":
        digits += 1
    return f"{value:.{digits}g} [{low:.{digits}g}, {high:.{digits}g}]"


def _detected(value, pvalue: float) -> str:
    if value is pd.NA or value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{'yes' if value else 'no'} (p={_fmt(pvalue)})"


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Render ``value [lo, hi]`` strings for display (tables in the CLI, report and markdown);
    columns with no value in any row are left out."""
    out = table[[*KEYS, "seeds"]].copy()
    if "m" in table and table["m"].notna().any():
        out["m"] = [_fmt(v) for v in table["m"]]
    for title in [t for t, *_ in SUMMARY_METRICS]:
        if title not in table.columns:
            continue
        lo, hi = table[f"{title} lo"], table[f"{title} hi"]
        out[title] = [_with_interval(v, a, b) for v, a, b in zip(table[title], lo, hi)]
        if title == _BIAS_AFTER:
            _add_bias(out, table)
    if BIAS_TITLE not in out:
        _add_bias(out, table)
    for column in ("interval", "note"):
        if column in table:
            out[column] = table[column]
    shown = [c for c in out.columns
             if c in KEYS or c == "seeds" or not out[c].isin(["–", ""]).all()]
    return out[shown]


def _add_bias(out: pd.DataFrame, table: pd.DataFrame) -> None:
    if DETECTED_TITLE not in table:
        return
    alpha = table[f"{DETECTED_TITLE} alpha"].dropna()
    title = f"{DETECTED_TITLE} (Holm, {alpha.iloc[0]:g})" if len(alpha) else DETECTED_TITLE
    out[title] = [_detected(v, p) for v, p in
                  zip(table[DETECTED_TITLE], table[f"{DETECTED_TITLE} p"])]
    lo, hi = table[f"{BIAS_TITLE} lo"], table[f"{BIAS_TITLE} hi"]
    out[BIAS_TITLE] = [_with_interval(v, a, b) for v, a, b in zip(table[BIAS_TITLE], lo, hi)]
    if NOTE_TITLE in table:
        out[NOTE_TITLE] = table[NOTE_TITLE].fillna("")


INTERVAL_METHODS = {"t": "Student t", "bca": "BCa bootstrap", "percentile": "percentile bootstrap"}


def interval_caption(formatted: pd.DataFrame) -> str:
    """One sentence on what the values and intervals of a formatted summary are: the statistic,
    the interval methods used (``interval`` column), the seed counts and the few-seeds note."""
    methods = sorted({m.strip() for cell in formatted.get("interval", pd.Series(dtype=str))
                      for m in str(cell).split(",") if m.strip() not in ("", "–")})
    named = ", ".join(INTERVAL_METHODS.get(m, m) for m in methods) or "none"
    seeds = formatted["seeds"].astype(int) if len(formatted) else pd.Series([0])
    counts = (f"{seeds.min()}" if seeds.min() == seeds.max()
              else f"{seeds.min()}-{seeds.max()}")
    rough = (f"; with fewer than {FEW_SEEDS} seeds an interval is rough"
             if seeds.min() < FEW_SEEDS else "")
    return (f"value [95% interval over seeds]: mean over {counts} seeds per configuration, "
            f"interval by {named}{rough}; a value alone: every seed gave that value; @0 = at the "
            f"initial parameters")


def without_uniform_columns(formatted: pd.DataFrame) -> pd.DataFrame:
    """The formatted summary without the ``interval`` and ``note`` columns where every row has
    the same value (:func:`interval_caption` states it once instead)."""
    drop = [c for c in ("interval", "note") if c in formatted and formatted[c].nunique() <= 1]
    return formatted.drop(columns=drop)
