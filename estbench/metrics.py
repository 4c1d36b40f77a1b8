"""Gradient-quality metrics from M independent estimates ``G [M, P]`` and a reference ``g* [P]``.

Notation: ``mean = (1/M) sum_m g_m``, ``diff = mean - g*``, ``s2_i`` the unbiased sample variance
of coordinate i, ``Sigma`` the sample covariance, ``r_i`` the variance of the reference itself
(0 for an exact reference; ``se^2`` for an estimated one). Intervals are normal-theory at the
requested level (default 95%).

- ``grad_var_total``   tr Sigma = sum_i s2_i. CI from the spread of ||g_m - mean||^2.
- ``grad_var_mean``    tr Sigma / P.
- ``grad_bias_norm``   sqrt(max(0, ||diff||^2 - tr Sigma / M - sum_i r_i)): the norm of the bias
  with the Monte Carlo part removed (E||diff||^2 = ||bias||^2 + tr Sigma / M + sum r). CI from the
  delta-method variance 4 diff^T (Sigma/M + diag r) diff + 2 tr((Sigma/M + diag r)^2), clipped at 0.
- ``grad_rel_bias``    grad_bias_norm / ||g*||.
- ``grad_bias_z``      max_i |diff_i| / sqrt(s2_i / M + r_i + eps_i^2), eps_i = 1e-5 max|g*| + 1e-12
  guarding float round-off of zero-variance estimators.
- ``grad_bias_pvalue`` Bonferroni p-value of grad_bias_z over P coordinates (two-sided normal):
  small values reject "unbiased".
- ``grad_mse``         (1/M) sum_m ||g_m - g*||^2.
- ``grad_cosine``      cos(mean, g*).
- ``grad_cosine_mean`` (1/M) sum_m cos(g_m, g*) (cos = 0 for a zero estimate).
- ``grad_snr``         ||mean|| / sqrt(tr Sigma) (inf for a deterministic estimator).
- ``grad_ref_norm``    ||g*||.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["MetricValue", "gradient_metrics", "StreamingGradientMetrics", "GRADIENT_METRICS"]

GRADIENT_METRICS = (
    "grad_var_total",
    "grad_var_mean",
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

NAN = float("nan")


class MetricValue(NamedTuple):
    metric: str
    value: float
    ci_low: float = NAN
    ci_high: float = NAN


def _z_quantile(level: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2)))


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


def _from_stats(st: _Stats, reference: Tensor | None, reference_var: Tensor | None,
                level: float) -> list[MetricValue]:
    z = _z_quantile(level)
    m, p = st.m, st.mean.shape[0]
    total = st.s2.sum()
    spread_ci = _mean_ci(st.spread, "grad_var_total", z)
    half_total = (spread_ci.ci_high - spread_ci.ci_low) / 2  # the SE of tr Sigma, from the spread
    var_total = MetricValue("grad_var_total", float(total), float(total) - half_total,
                            float(total) + half_total)
    out = [
        var_total,
        MetricValue("grad_var_mean", var_total.value / p, var_total.ci_low / p, var_total.ci_high / p),
        MetricValue("grad_snr", float(st.mean.norm() / total.sqrt()) if total > 0 else math.inf),
    ]
    if reference is None:
        return out
    ref = reference.detach().to(torch.float64).reshape(-1)
    r = torch.zeros_like(ref) if reference_var is None else reference_var.to(torch.float64)
    diff = st.mean - ref
    ref_norm = float(ref.norm())
    noise_sq = float((diff**2).sum() - total / m - r.sum())
    cov_diff = st.diff_cov_diff / m + (diff**2 * r).sum()
    tr_sq = st.tr_cov_sq / m**2 + (r**2).sum() + 2 * (st.s2 * r).sum() / m
    half = z * math.sqrt(max(float(4 * cov_diff + 2 * tr_sq), 0.0))
    bias = math.sqrt(max(noise_sq, 0.0))
    bias_lo = math.sqrt(max(noise_sq - half, 0.0))
    bias_hi = math.sqrt(max(noise_sq + half, 0.0))
    eps = 1e-5 * float(ref.abs().max()) + 1e-12
    z_max = float((diff.abs() / (st.s2 / m + r + eps**2).sqrt()).max())
    tail = float(torch.special.erfc(torch.tensor(z_max / math.sqrt(2), dtype=torch.float64)))
    mean_norm = float(st.mean.norm())
    cosine = float(st.mean @ ref) / (mean_norm * ref_norm) if mean_norm * ref_norm > 0 else NAN
    rel = (lambda x: x / ref_norm) if ref_norm > 0 else (lambda x: NAN)
    out += [
        MetricValue("grad_bias_norm", bias, bias_lo, bias_hi),
        MetricValue("grad_rel_bias", rel(bias), rel(bias_lo), rel(bias_hi)),
        MetricValue("grad_bias_z", z_max),
        MetricValue("grad_bias_pvalue", min(1.0, p * tail)),
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


def gradient_metrics(
    samples: Tensor,
    reference: Tensor | None,
    reference_var: Tensor | None = None,
    level: float = 0.95,
) -> list[MetricValue]:
    """All gradient-quality metrics for stored draws ``samples [M, P]`` against ``reference [P]``
    (exact covariance terms). Without a reference only the variance metrics and the SNR."""
    g = samples.detach().to(torch.float64)
    m = g.shape[0]
    mean = g.mean(0)
    centred = g - mean
    s2 = centred.pow(2).sum(0) / max(m - 1, 1)
    spread = centred.pow(2).sum(1) * (m / max(m - 1, 1))
    ref = None if reference is None else reference.detach().to(torch.float64).reshape(-1)
    sq_err, cosines = _per_sample(g, ref)
    diff_cov_diff = None
    if ref is not None:
        diff_cov_diff = (centred @ (mean - ref)).pow(2).sum() / max(m - 1, 1)
    stats = _Stats(m, mean, s2, spread, sq_err, cosines, diff_cov_diff, _trace_cov_squared(centred))
    return _from_stats(stats, reference, reference_var, level)


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
        self.sq_err, self.cosines, self.pair_var, self.pair_tr_sq = [], [], [], []

    def add(self, chunk: Tensor) -> None:
        g = chunk.detach().double()
        if self.sum is None:
            self.sum = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
            self.sum_sq = torch.zeros_like(self.sum)
        self.sum += g.sum(0)
        self.sum_sq += g.pow(2).sum(0)
        self.m += g.shape[0]
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

    def metrics(self, reference_var: Tensor | None = None, level: float = 0.95
                ) -> list[MetricValue]:
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
        stats = _Stats(m, mean, s2, spread, sq_err, cosines, diff_cov_diff, tr_sq)
        return _from_stats(stats, self.reference, reference_var, level)
