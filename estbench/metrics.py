"""Gradient-quality metrics from M independent estimates ``G [M, P]`` and a reference ``g* [P]``.

Notation: ``mean = (1/M) sum_m g_m``, ``diff = mean - g*``, ``s2_i`` the unbiased sample variance
of coordinate i, ``Sigma`` the sample covariance, ``r_i`` the variance of the reference itself
(0 for an exact reference; ``se^2`` for an estimated one) and ``u_i`` the round-off floor below.
Intervals are normal-theory (delta method) at the requested level (default 95%).

Round-off. The draws are computed in the parameters' precision (float32), and each coordinate of
an estimate combines values of f through scores and Jacobians of size about one, so it carries an
absolute error of a few ulps of |f|, whatever the size of the gradient: ``u_i = ROUNDOFF_ULPS *
eps * (f_scale + |g*_i|)`` with ``eps`` the machine epsilon of the draws' dtype and ``f_scale``
the mean |f| at hard samples (:func:`value_scale`; without it, the largest |draw| or |g*_i|). The
reference is treated as known to within ``u_i`` (a variance ``u_i^2`` added to ``r_i``), so exact
and zero-variance estimators never test as biased from float32 round-off.

- ``grad_var_total``   tr Sigma = sum_i s2_i. CI from the spread of ||g_m - mean||^2.
- ``grad_var_mean``    tr Sigma / P.
- ``grad_bias_sq``     ||diff||^2 - tr Sigma / M - sum_i (r_i + u_i^2): an unbiased estimate of the
  squared bias norm, **not** clipped (it can be negative), with the delta-method interval of
  variance 4 diff^T (Sigma/M + diag v) diff + 2 tr((Sigma/M + diag v)^2), v = r + u^2. This is
  the quantity to average over seeds.
- ``grad_bias_norm``   sqrt(max(0, grad_bias_sq)), interval sqrt-clipped from the one above.
- ``grad_rel_bias``    grad_bias_norm / ||g*||.
- ``grad_bias_z``      max_i |t_i|, t_i = diff_i / sqrt(s2_i / M + r_i + u_i^2).
- ``grad_bias_pvalue`` Bonferroni p-value over coordinates: min(1, P * min_i p_i), p_i =
  2 T_{M-1}(-|t_i|), or max(that, exp(-M |diff_i| / R)) where |t_i| >= 8 (``UNSEEN_T``: far
  beyond any Bonferroni level, reached by an unbiased estimator only through missed outcomes). The first is the Student t test with M - 1
  degrees of freedom (exact for Gaussian coordinates; with an estimated reference of N >= M
  draws, M - 1 is the conservative Welch bound). The second is the chance that M draws missed an
  outcome that closes the gap (:func:`unseen_outcome_pvalue`), with R = f_scale + max |g_mi| +
  max |g*_i| the reach of one draw: near-deterministic latents after training have rare outcomes
  that M draws never see, and without it a t test on the barely varying draws rejects unbiased
  estimators (REINFORCE on ``categorical-toy`` after 150 steps at lr 0.1, M = 300: p = 1e-247).
  Valid for any P, also P >> M; small values reject "unbiased". NaN for M < 2.
- ``grad_mse``         (1/M) sum_m ||g_m - g*||^2.
- ``grad_cosine``      cos(mean, g*).
- ``grad_cosine_mean`` (1/M) sum_m cos(g_m, g*) (cos = 0 for a zero estimate).
- ``grad_snr``         ||mean|| / sqrt(tr Sigma) (inf for a deterministic estimator).
- ``grad_ref_norm``    ||g*||.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from scipy import special
from torch import Tensor

__all__ = [
    "MetricValue",
    "gradient_metrics",
    "StreamingGradientMetrics",
    "GRADIENT_METRICS",
    "ROUNDOFF_ULPS",
    "value_scale",
    "bias_pvalue",
    "bias_test_pvalue",
    "unseen_outcome_pvalue",
]

GRADIENT_METRICS = (
    "grad_var_total",
    "grad_var_mean",
    "grad_bias_sq",
    "grad_bias_norm",
    "grad_rel_bias",
    "grad_bias_z",
    "grad_bias_pvalue",
    "grad_mse",
    "grad_cosine",
    "grad_cosine_mean",
    "grad_snr",
    "grad_ref_norm",
)

#: round-off allowance per coordinate, in ulps of the value scale: exact float32 estimators on the
#: toy tasks were measured at up to 2.4 ulps of |f| (tests/test_metrics.py keeps that in check)
ROUNDOFF_ULPS = 4.0

NAN = float("nan")


class MetricValue(NamedTuple):
    metric: str
    value: float
    ci_low: float = NAN
    ci_high: float = NAN


def value_scale(latent, logits: Tensor, f: Callable[[Tensor], Tensor], samples: int = 8) -> float:
    """Mean |f(z)| over ``samples`` hard draws z ~ p(logits): the size of the values an estimate
    combines, which sets its absolute float round-off (see the module docstring). Drawn on a
    forked random stream, so measuring it changes no other number."""
    devices = [logits.device] if logits.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        return float(f(latent.sample(logits, (samples,))).abs().mean())


def bias_pvalue(t_max: float, coordinates: int, draws: int) -> float:
    """Bonferroni p-value of max_i |t_i| over ``coordinates`` two-sided Student t tests with
    ``draws - 1`` degrees of freedom: min(1, P * 2 T_{M-1}(-|t|max)); NaN for fewer than 2 draws."""
    if draws < 2:
        return NAN
    tail = 2 * float(special.stdtr(draws - 1, -t_max))
    return min(1.0, coordinates * tail)


def unseen_outcome_pvalue(diff: Tensor, draws: int, reach: float) -> Tensor:
    """Per coordinate, how likely M draws of an **unbiased** estimator are to have missed the
    outcomes that would close the gap ``diff``: an unseen outcome of probability q that moves a
    coordinate by at most ``reach`` shifts its mean by at most q * reach, so a gap |diff_i|
    needs q >= |diff_i| / reach, missed by all M draws with probability (1 - q)^M <=
    exp(-M |diff_i| / reach). Near-deterministic latents (a trained model) make such rare
    outcomes; their M draws then barely vary and a t test alone rejects unbiased estimators."""
    return torch.exp(-draws * diff.abs() / max(reach, 1e-300))


#: |t| from which a gap is also checked against outcomes the draws missed: far beyond what any
#: Bonferroni level needs (t = 6.5 for 10^6 coordinates at 1e-3), so the t test alone has already
#: rejected there and only the allowance can still explain the gap
UNSEEN_T = 8.0


def bias_test_pvalue(diff: Tensor, variance_of_diff: Tensor, draws: int, reach: float | None
                     ) -> float:
    """Bonferroni p-value over coordinates of the per-coordinate p-value: the t test with M - 1
    degrees of freedom and, where |t_i| >= :data:`UNSEEN_T` (which an unbiased estimator reaches
    only through outcomes its draws missed), also
    :func:`unseen_outcome_pvalue`, the larger of the two. A coordinate counts as evidence of bias
    only when no outcome the draws could have missed explains the gap; ``reach = None`` for a deterministic estimator, which has no outcomes to
    miss (the t test alone). NaN for fewer than 2 draws."""
    if draws < 2:
        return NAN
    if diff.numel() == 0:
        return 1.0
    t = diff.abs() / variance_of_diff.sqrt()
    t = torch.where(diff == 0, torch.zeros_like(t), t)
    tail = torch.from_numpy(2 * special.stdtr(draws - 1, -t.cpu().double().numpy())).to(diff)
    if reach is None:
        return min(1.0, diff.numel() * float(tail.min()))
    # |t| >= UNSEEN_T arises under "unbiased" (near-Gaussian means: p < 1e-14 a coordinate) only
    # from outcomes the draws missed; below it the t test stands alone
    unseen = torch.where(t >= UNSEEN_T, unseen_outcome_pvalue(diff, draws, reach),
                         torch.zeros_like(tail))
    per_coordinate = torch.maximum(tail, unseen)
    return min(1.0, diff.numel() * float(per_coordinate.min()))


def _z_quantile(level: float) -> float:
    return float(special.ndtri(0.5 + level / 2))


def _mean_ci(samples: Tensor, name: str, z: float) -> MetricValue:
    m = samples.shape[0]
    centre = float(samples.mean())
    half = z * float(samples.std()) / math.sqrt(m) if m > 1 else NAN
    return MetricValue(name, centre, centre - half, centre + half)


def _trace_cov_squared(centred: Tensor) -> Tensor:
    """tr(Sigma^2) = ||Sigma||_F^2 through the smaller of the M x M and P x P Gram matrices."""
    m, p = centred.shape
    gram = centred @ centred.T if m <= p else centred.T @ centred
    return (gram**2).sum() / (m - 1) ** 2


class _Stats(NamedTuple):
    """Sufficient statistics of M draws for the metrics (exact or streamed)."""

    m: int
    mean: Tensor  # [P]
    s2: Tensor  # [P] unbiased per-coordinate variance
    spread: Tensor  # samples whose mean is tr Sigma (for its interval)
    sq_err: Tensor | None  # [M] ||g_m - g*||^2
    cosines: Tensor | None  # [M] cos(g_m, g*)
    diff_cov_diff: Tensor | None  # diff^T Sigma diff
    tr_cov_sq: Tensor  # tr(Sigma^2)
    eps: float  # machine epsilon of the draws' dtype
    largest: float  # max |g_mi|


def _roundoff(st: _Stats, ref: Tensor, scale: float | None) -> Tensor:
    """u_i = ROUNDOFF_ULPS * eps * (scale + |g*_i|), scale = mean |f| or, unknown, the largest
    |draw| or |g*_i| (module docstring)."""
    if scale is None:
        scale = max(st.largest, float(ref.abs().max()) if ref.numel() else 0.0)
    return ROUNDOFF_ULPS * st.eps * (scale + ref.abs())


def _max_t(diff: Tensor, variance_of_diff: Tensor) -> float:
    """max_i |diff_i| / sqrt(var_i), with 0/0 = 0 (a coordinate exactly equal to the reference)."""
    t = diff.abs() / variance_of_diff.sqrt()
    t = torch.where(diff == 0, torch.zeros_like(t), t)
    return float(t.max()) if t.numel() else 0.0


def _variance_metrics(st: _Stats, z: float) -> list[MetricValue]:
    p = st.mean.shape[0]
    total = st.s2.sum()
    spread_ci = _mean_ci(st.spread, "grad_var_total", z)
    half_total = (spread_ci.ci_high - spread_ci.ci_low) / 2  # the SE of tr Sigma, from the spread
    var_total = MetricValue("grad_var_total", float(total), float(total) - half_total,
                            float(total) + half_total)
    return [
        var_total,
        MetricValue("grad_var_mean", var_total.value / p, var_total.ci_low / p,
                    var_total.ci_high / p),
        MetricValue("grad_snr", float(st.mean.norm() / total.sqrt()) if total > 0 else math.inf),
    ]


def _from_stats(st: _Stats, reference: Tensor | None, reference_var: Tensor | None,
                level: float, scale: float | None, deterministic: bool = False
                ) -> list[MetricValue]:
    z = _z_quantile(level)
    out = _variance_metrics(st, z)
    if reference is None:
        return out
    m = st.m
    ref = reference.detach().to(torch.float64).reshape(-1).to(st.mean.device)
    r = torch.zeros_like(ref) if reference_var is None else reference_var.to(ref)
    v = r + _roundoff(st, ref, scale) ** 2  # what the reference is known to within
    diff = st.mean - ref
    ref_norm = float(ref.norm())
    bias_sq = float((diff**2).sum() - st.s2.sum() / m - v.sum())
    cov_diff = st.diff_cov_diff / m + (diff**2 * v).sum()
    tr_sq = st.tr_cov_sq / m**2 + (v**2).sum() + 2 * (st.s2 * v).sum() / m
    half = z * math.sqrt(max(float(4 * cov_diff + 2 * tr_sq), 0.0))
    root = (lambda x: math.sqrt(max(x, 0.0)))
    bias, bias_lo, bias_hi = root(bias_sq), root(bias_sq - half), root(bias_sq + half)
    t_max = _max_t(diff, st.s2 / m + v)
    # how far one draw's coordinate can move: the values an estimate combines (|f|) plus what the
    # draws and the reference show
    reach = None if deterministic else (
        (scale or 0.0) + st.largest + (float(ref.abs().max()) if ref.numel() else 0.0))
    mean_norm = float(st.mean.norm())
    cosine = float(st.mean @ ref) / (mean_norm * ref_norm) if mean_norm * ref_norm > 0 else NAN
    rel = (lambda x: x / ref_norm) if ref_norm > 0 else (lambda x: NAN)
    out += [
        MetricValue("grad_bias_sq", bias_sq, bias_sq - half, bias_sq + half),
        MetricValue("grad_bias_norm", bias, bias_lo, bias_hi),
        MetricValue("grad_rel_bias", rel(bias), rel(bias_lo), rel(bias_hi)),
        MetricValue("grad_bias_z", t_max),
        MetricValue("grad_bias_pvalue", bias_test_pvalue(diff, st.s2 / m + v, m, reach)),
        _mean_ci(st.sq_err, "grad_mse", z),
        MetricValue("grad_cosine", cosine),
        _mean_ci(st.cosines, "grad_cosine_mean", z),
        MetricValue("grad_ref_norm", ref_norm),
    ]
    return out


def _per_sample(g: Tensor, ref: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    if ref is None:
        return None, None
    norms = g.norm(dim=1)
    dots = g @ ref
    ref_norm = ref.norm()
    cosines = torch.where(norms > 0, dots / (norms * ref_norm).clamp_min(1e-300),
                          torch.zeros_like(norms))
    return (g - ref).pow(2).sum(1), cosines


def _epsilon(draws: Tensor) -> float:
    return float(torch.finfo(draws.dtype).eps) if draws.is_floating_point() else 0.0


def gradient_metrics(
    samples: Tensor,
    reference: Tensor | None,
    reference_var: Tensor | None = None,
    level: float = 0.95,
    *,
    scale: float | None = None,
    deterministic: bool = False,
) -> list[MetricValue]:
    """All gradient-quality metrics for stored draws ``samples [M, P]`` against ``reference [P]``
    (exact covariance terms). Without a reference only the variance metrics and the SNR.
    ``scale``: the mean |f| behind the draws (:func:`value_scale`), for the round-off floor;
    ``deterministic``: the draws come from an estimator without randomness (the bias test then
    has no unseen outcomes to allow for)."""
    g = samples.detach().to(torch.float64)
    m = g.shape[0]
    mean = g.mean(0)
    centred = g - mean
    s2 = centred.pow(2).sum(0) / max(m - 1, 1)
    spread = centred.pow(2).sum(1) * (m / max(m - 1, 1))
    ref = None if reference is None else reference.detach().to(g).reshape(-1)
    sq_err, cosines = _per_sample(g, ref)
    diff_cov_diff = None
    if ref is not None:
        diff_cov_diff = (centred @ (mean - ref)).pow(2).sum() / max(m - 1, 1)
    largest = float(g.abs().max()) if g.numel() else 0.0
    stats = _Stats(m, mean, s2, spread, sq_err, cosines, diff_cov_diff, _trace_cov_squared(centred),
                   _epsilon(samples), largest)
    return _from_stats(stats, reference, reference_var, level, scale, deterministic)


class StreamingGradientMetrics:
    """The same metrics from draws that arrive in chunks, in O(P + M) memory, for models whose
    M x P draws do not fit: sums of g and g^2 per coordinate, and per draw ||g_m - g*||^2 and
    cos(g_m, g*) (exact). Within each chunk, disjoint pairs give d = g_a - g_b with covariance
    2 Sigma: ||d||^2 / 2 estimates tr Sigma (its interval), and (d_1 . d_2)^2 / 4 over pairs of
    pairs estimates tr(Sigma^2) without the mean. The delta-method term diff^T Sigma diff of the
    bias interval uses the diagonal of Sigma (the only approximation).

    ``reference`` must be known before the draws (it is needed per draw).
    """

    def __init__(self, reference: Tensor | None) -> None:
        self.reference = None if reference is None else reference.detach().double().reshape(-1)
        # accumulators live on the draws' device (created on the first chunk)
        self.m = 0
        self.sum = self.sum_sq = None
        self.eps, self.largest = 0.0, 0.0
        self.sq_err, self.cosines, self.pair_var, self.pair_tr_sq = [], [], [], []

    def add(self, chunk: Tensor) -> None:
        self.eps = max(self.eps, _epsilon(chunk))
        g = chunk.detach().double()
        if self.sum is None:
            self.sum = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
            self.sum_sq = torch.zeros_like(self.sum)
        self.sum += g.sum(0)
        self.sum_sq += g.pow(2).sum(0)
        self.m += g.shape[0]
        if g.numel():
            self.largest = max(self.largest, float(g.abs().max()))
        sq_err, cosines = _per_sample(g, self.reference)
        if sq_err is not None:
            self.sq_err.append(sq_err)
            self.cosines.append(cosines)
        pairs = g.shape[0] // 2
        if pairs:
            d = g[: 2 * pairs: 2] - g[1: 2 * pairs: 2]  # independent draws: Cov d = 2 Sigma
            self.pair_var.append(d.pow(2).sum(1) / 2)
            quads = pairs // 2
            if quads:
                self.pair_tr_sq.append((d[: 2 * quads: 2] * d[1: 2 * quads: 2]).sum(1).pow(2) / 4)

    def moments(self) -> tuple[Tensor, Tensor]:
        """(mean, variance of the mean) per coordinate: a reference and its squared SE."""
        m = self.m
        mean = self.sum / m
        variance = ((self.sum_sq - m * mean.pow(2)) / max(m - 1, 1)).clamp_min(0)
        return mean, variance / m

    def metrics(self, reference_var: Tensor | None = None, level: float = 0.95, *,
                scale: float | None = None, deterministic: bool = False) -> list[MetricValue]:
        m = self.m
        mean, variance_of_mean = self.moments()
        s2 = variance_of_mean * m
        spread = torch.cat(self.pair_var) if self.pair_var else s2.sum().reshape(1)
        tr_sq = torch.cat(self.pair_tr_sq).mean() if self.pair_tr_sq else s2.sum().pow(2)
        diff_cov_diff = None
        sq_err = cosines = None
        if self.reference is not None:
            diff_cov_diff = ((mean - self.reference).pow(2) * s2).sum()
            sq_err, cosines = torch.cat(self.sq_err), torch.cat(self.cosines)
        stats = _Stats(m, mean, s2, spread, sq_err, cosines, diff_cov_diff, tr_sq, self.eps,
                       self.largest)
        return _from_stats(stats, self.reference, reference_var, level, scale, deterministic)
