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

__all__ = ["MetricValue", "gradient_metrics", "GRADIENT_METRICS"]

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


def gradient_metrics(
    samples: Tensor,
    reference: Tensor | None,
    reference_var: Tensor | None = None,
    level: float = 0.95,
) -> list[MetricValue]:
    """All gradient-quality metrics for ``samples [M, P]`` against ``reference [P]``.

    Without a reference only the variance metrics and the SNR are returned.
    """
    g = samples.detach().to(torch.float64)
    m, p = g.shape
    z = _z_quantile(level)
    mean = g.mean(0)
    centred = g - mean
    s2 = centred.pow(2).sum(0) / max(m - 1, 1)
    total = s2.sum()
    spread = centred.pow(2).sum(1) * (m / max(m - 1, 1))
    var_total = _mean_ci(spread, "grad_var_total", z)._replace(value=float(total))
    out = [
        var_total,
        MetricValue("grad_var_mean", var_total.value / p, var_total.ci_low / p, var_total.ci_high / p),
        MetricValue("grad_snr", float(mean.norm() / total.sqrt()) if total > 0 else math.inf),
    ]
    if reference is None:
        return out

    ref = reference.detach().to(torch.float64).reshape(-1)
    r = torch.zeros_like(ref) if reference_var is None else reference_var.to(torch.float64)
    diff = mean - ref
    ref_norm = float(ref.norm())

    noise_sq = float((diff**2).sum() - total / m - r.sum())
    cov_diff = (centred @ diff).pow(2).sum() / max(m - 1, 1) / m + (diff**2 * r).sum()
    tr_sq = _trace_cov_squared(centred) / m**2 + (r**2).sum() + 2 * (s2 * r).sum() / m
    half = z * math.sqrt(max(float(4 * cov_diff + 2 * tr_sq), 0.0))
    bias = math.sqrt(max(noise_sq, 0.0))
    bias_lo = math.sqrt(max(noise_sq - half, 0.0))
    bias_hi = math.sqrt(max(noise_sq + half, 0.0))

    eps = 1e-5 * float(ref.abs().max()) + 1e-12
    zscores = diff.abs() / (s2 / m + r + eps**2).sqrt()
    z_max = float(zscores.max())
    tail = float(torch.special.erfc(torch.tensor(z_max / math.sqrt(2), dtype=torch.float64)))
    pvalue = min(1.0, p * tail)

    sq_err = (g - ref).pow(2).sum(1)
    norms = g.norm(dim=1)
    cosines = torch.where(
        norms > 0, (g @ ref) / (norms * ref_norm).clamp_min(1e-300), torch.zeros_like(norms)
    )
    mean_norm = float(mean.norm())
    cosine = float(mean @ ref) / (mean_norm * ref_norm) if mean_norm * ref_norm > 0 else NAN
    rel = (lambda x: x / ref_norm) if ref_norm > 0 else (lambda x: NAN)
    out += [
        MetricValue("grad_bias_norm", bias, bias_lo, bias_hi),
        MetricValue("grad_rel_bias", rel(bias), rel(bias_lo), rel(bias_hi)),
        MetricValue("grad_bias_z", z_max),
        MetricValue("grad_bias_pvalue", pvalue),
        _mean_ci(sq_err, "grad_mse", z),
        MetricValue("grad_cosine", cosine),
        _mean_ci(cosines, "grad_cosine_mean", z),
        MetricValue("grad_ref_norm", ref_norm),
    ]
    return out
