"""Is a configuration biased? The per-cell bias tests combined over seeds and checkpoints.

Each cell records, at each checkpoint, the Bonferroni max-|t| p-value of "the mean estimate equals
the reference" (``grad_bias_pvalue``) and an unclipped estimate of the squared bias norm with its
delta-method interval (``grad_bias_sq``; see :mod:`estbench.metrics`). The draws themselves are
not kept and the parameters differ between seeds (the initialisation depends on the seed on every
built-in task but ``bernoulli-toy``, and training moves them), so draws are never pooled: the
per-seed tests are combined.

- **Detection** over the k tests of a configuration (seeds, or seeds x checkpoints):
  ``holm`` (default): Holm's step-down procedure at family-wise level ``alpha``; the combined
  p-value is its first step, min(1, k min_j p_j), and ``rejecting`` counts the tests Holm rejects.
  Valid whatever the dependence between tests. ``fisher``: -2 sum_j log p_j ~ chi^2_{2k} under
  the null (independent seeds; conservative p-values keep it valid), more powerful against a
  small bias seen at every seed.
- **Size**: the mean over seeds of the unclipped squared-norm estimates, with standard error
  sqrt(sum_s se_s^2) / S from the per-cell delta-method intervals (the bias at these seeds'
  parameters), a normal interval, and only then sqrt(max(0, .)) of the estimate and of both
  limits. Never an interval of clipped per-seed norms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import special, stats

from analysis.tidy import KEYS, select

__all__ = ["BIAS_ALPHA", "CELL_LEVEL", "combine_pvalues", "holm_rejections", "bias_tests",
           "declared_unbiased", "verdict_note", "VERDICT_LEGEND"]

#: default family-wise level per configuration: a 21-configuration, 3-task matrix then expects
#: about 0.06 false alarms in all (and `estbench check` uses the same level)
BIAS_ALPHA = 1e-3
#: the level of the per-cell intervals that the run recorded (``gradient_metrics`` default)
CELL_LEVEL = 0.95

COMBINATIONS = ("holm", "fisher")

#: why a declared-biased estimator may test as unbiased, where the reason is known
UNDETECTED_BIAS = {
    "reinmax": "exact for quadratic f",
    "nvil": "scale-only bias",
}

#: the explanation of :func:`verdict_note`'s short notes, stated once under a table
VERDICT_LEGEND = (
    "bias note: where the verdict disagrees with the estimator's declared contract. "
    "'max-|t| test not significant, but bias norm @0 > 0': the detection test, one coordinate "
    "at a time with a Bonferroni correction over every parameter, lacks the power of the "
    "bias-norm estimate, which pools every coordinate and whose interval excludes 0. "
    "'below resolution': the bias is smaller than the run's M gradient draws per checkpoint can "
    "detect (its 95% upper limit at step 0 given); ReinMax's correction is exact when f is "
    "quadratic in z (bernoulli-toy; polynomial at power 2); NVIL is biased only by the positive "
    "scale of its variance normalisation. 'suspect the t test': late in training, "
    "near-deterministic probabilities give outcomes that M draws never see, and the "
    "per-coordinate t test then rejects an unbiased estimator; rerun with more "
    "gradient_samples, or `estbench check`, before believing it.")


def declared_unbiased(estimator: str) -> bool | None:
    """The registered estimator's ``unbiased`` contract (None for a name not registered here)."""
    from estbench.errors import EstbenchError
    from estbench.registry import ESTIMATORS

    try:
        return bool(ESTIMATORS.get(estimator).unbiased)
    except EstbenchError:
        return None


def verdict_note(estimator: str, detected: bool | None, bias_low: float,
                 bias_high: float) -> str:
    """A short note where the verdict and the estimator's contract disagree (explained by
    :data:`VERDICT_LEGEND`), given the interval of the bias norm at step 0: a declared-biased
    estimator not detected (its size resolved after all, or below resolution with its upper
    limit and the known reason), a declared-unbiased one detected; '' otherwise."""
    unbiased = declared_unbiased(estimator)
    if unbiased is None or detected is None:
        return ""
    if not unbiased and not detected:
        if bias_low > 0:
            return "declared biased; max-|t| test not significant, but bias norm @0 > 0"
        limit = f" (≤ {bias_high:.2g})" if np.isfinite(bias_high) else ""
        reason = UNDETECTED_BIAS.get(estimator)
        return f"declared biased; below resolution{limit}" + (f"; {reason}" if reason else "")
    if unbiased and detected:
        return "declared unbiased: suspect the t test"
    return ""


def holm_rejections(pvalues: Sequence[float], alpha: float) -> int:
    """How many hypotheses Holm's step-down procedure rejects at family-wise level ``alpha``:
    the sorted p_(j) are rejected while p_(j) <= alpha / (k - j + 1)."""
    p = np.sort(np.asarray(pvalues, dtype=float))
    k = p.size
    passed = p <= alpha / (k - np.arange(k))
    return int(k if passed.all() else np.argmin(passed))


def combine_pvalues(pvalues: Sequence[float], method: str = "holm") -> float:
    """One p-value for "no test in the family is biased" (module docstring); NaN if empty."""
    if method not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {method!r}")
    p = np.asarray(pvalues, dtype=float)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return np.nan
    if method == "holm":
        return float(min(1.0, p.size * p.min()))
    clamped = np.maximum(p, np.finfo(float).tiny)  # log(0) would warn
    return float(stats.combine_pvalues(clamped, method="fisher").pvalue)


def _bias_size(squares: pd.DataFrame, level: float) -> tuple[float, float, float]:
    """(norm, low, high) from per-seed unclipped squared norms with their cell intervals."""
    squares = squares[np.isfinite(squares["value"].to_numpy(float))]
    if squares.empty:
        return np.nan, np.nan, np.nan
    cell_z = special.ndtri(0.5 + CELL_LEVEL / 2)
    se = (squares["ci_high"] - squares["ci_low"]).to_numpy(float) / (2 * cell_z)
    mean = float(squares["value"].mean())
    half = special.ndtri(0.5 + level / 2) * float(np.sqrt(np.nansum(se**2))) / len(squares)
    root = (lambda x: float(np.sqrt(max(x, 0.0))))
    return root(mean), root(mean - half), root(mean + half)


def bias_tests(results: pd.DataFrame, *, step: str | int | None = None, prefix: str = "",
               alpha: float = BIAS_ALPHA, method: str = "holm", level: float = 0.95,
               by: Sequence[str] = tuple(KEYS)) -> pd.DataFrame:
    """Per configuration: is bias detected over its seeds and the chosen checkpoints, and how
    large is it. ``step``: None combines every checkpoint (detection over the whole run);
    'first' / 'last' / an int picks one checkpoint per cell. ``prefix``: a view such as
    ``'logits/'`` or ``'encoder/'``.

    Returns ``*by, tests, seeds, pvalue, method, alpha, rejecting, bias_detected, bias_norm,
    ci_low, ci_high`` (bias size at the first selected checkpoint of each cell).
    """
    columns = [*by, "tests", "seeds", "pvalue", "method", "alpha", "rejecting", "bias_detected",
               "bias_norm", "ci_low", "ci_high"]
    pvalues = select(results, f"{prefix}grad_bias_pvalue", "gradient", step)
    if pvalues.empty:
        return pd.DataFrame(columns=columns)
    squares = select(results, f"{prefix}grad_bias_sq", "gradient", step)
    squares = squares.sort_values("step", kind="stable").groupby("cell", sort=False).head(1)
    sizes = dict(iter(squares.groupby(list(by), sort=False))) if not squares.empty else {}
    out = []
    for key, group in pvalues.groupby(list(by), sort=True):
        p = group["value"].to_numpy(float)
        p = p[np.isfinite(p)]
        combined = combine_pvalues(p, method)
        rejecting = holm_rejections(p, alpha) if method == "holm" else int(combined <= alpha)
        key = key if isinstance(key, tuple) else (key,)
        size = _bias_size(sizes[key], level) if key in sizes else (np.nan,) * 3
        out.append({**dict(zip(by, key)), "tests": int(p.size),
                    "seeds": int(group["seed"].nunique()), "pvalue": combined, "method": method,
                    "alpha": alpha, "rejecting": rejecting,
                    "bias_detected": bool(combined <= alpha) if p.size else pd.NA,
                    "bias_norm": size[0], "ci_low": size[1], "ci_high": size[2]})
    return pd.DataFrame(out, columns=columns)
