"""``estbench check``: the contract suite for any registered estimator, as a verdict table.

For each toy task configuration the estimator supports: right shapes, finite values and
gradients, the same numbers for the same seed, a gradient reaching the logits' parameters, and,
for an estimator that claims ``unbiased = True``, a bias test against the exact gradient: the
Bonferroni p-value of the largest per-coordinate z-score of (mean of M estimates - g*) must exceed
``alpha``. Estimators that do not claim unbiasedness get their bias reported, not judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from estbench.contracts import Estimator
from estbench.errors import EstbenchError
from estbench.gradients import reference_gradient, sample_gradients
from estbench.metrics import gradient_metrics
from estbench.registry import ESTIMATORS, TASKS

__all__ = ["CHECK_TASKS", "check_estimator"]

#: (label, task, parameters, logits to set or None to keep the task's initialisation)
CHECK_TASKS: tuple[tuple[str, str, dict[str, Any], Any], ...] = (
    ("bernoulli D=1", "bernoulli-toy", {"dim": 1, "init_logit": 0.3}, None),
    ("bernoulli D=4 mixed", "bernoulli-toy", {"dim": 4, "batch_size": 3},
     lambda: torch.tensor([-3.0, -0.5, 0.5, 2.0])),
    ("bernoulli D=3 negative", "bernoulli-toy", {"dim": 3, "init_logit": -4.0}, None),
    ("categorical D=3 K=3", "categorical-toy", {"dim": 3, "categories": 3, "batch_size": 2}, None),
    ("categorical D=2 K=4 negative", "categorical-toy",
     {"dim": 2, "categories": 4, "init_mean": -3.0, "init_std": 2.0}, None),
    ("polynomial D=4", "polynomial", {"dim": 4, "batch_size": 4}, None),
)


@dataclass
class _Row:
    task: str
    shapes: str = "-"
    finite: str = "-"
    deterministic: str = "-"
    gradient_flow: str = "-"
    bias_z: float = float("nan")
    rel_bias: float = float("nan")
    unbiased: str = "-"
    note: str = ""


def _one_estimate(estimator: Estimator, task, params, seed: int):
    torch.manual_seed(seed)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    logits = task.logits(leaves, None)
    estimate = estimator.estimate(logits, task.cost(leaves, None), task.latent)
    estimate.surrogate.mean().backward()
    return logits, estimate, leaves


def _check_task(estimator: Estimator, label: str, task_name: str, task_params: dict,
                logits_fn, samples: int, alpha: float) -> _Row:
    row = _Row(label)
    task = TASKS.get(task_name).from_params(task_params)
    params = task.init(torch.Generator().manual_seed(11))
    if logits_fn is not None:
        params["logits"] = logits_fn().requires_grad_(True)
    try:
        estimator.check_latent(task.latent)
    except EstbenchError as err:
        row.note = f"skipped: {err}"
        return row
    logits, estimate, leaves = _one_estimate(estimator, task, params, seed=5)
    batch = task.latent.batch_shape(logits)
    ok_shapes = (estimate.surrogate.shape == batch and estimate.value.shape == batch
                 and isinstance(estimate.f_evals, int) and estimate.f_evals >= 1)
    row.shapes = "pass" if ok_shapes else "FAIL"
    grads = [p.grad for p in leaves.values()]
    finite = (torch.isfinite(estimate.surrogate).all() and torch.isfinite(estimate.value).all()
              and all(g is None or torch.isfinite(g).all() for g in grads))
    row.finite = "pass" if finite else "FAIL"
    row.gradient_flow = "pass" if leaves["logits"].grad is not None else "FAIL"
    _, again, leaves_again = _one_estimate(estimator, task, params, seed=5)
    same = torch.equal(estimate.value, again.value) and all(
        (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(grads, [p.grad for p in leaves_again.values()]))
    row.deterministic = "pass" if same else "FAIL"
    if not finite:
        return row
    torch.manual_seed(7)
    draws = sample_gradients(task, estimator, params, None, samples)
    metrics = {m.metric: m.value for m in gradient_metrics(draws, reference_gradient(task, params, None))}
    row.bias_z, row.rel_bias = metrics["grad_bias_z"], metrics["grad_rel_bias"]
    if estimator.unbiased:
        row.unbiased = "pass" if metrics["grad_bias_pvalue"] > alpha else "FAIL"
    return row


def check_estimator(name: str, params: dict[str, Any] | None = None, samples: int = 20_000,
                    alpha: float = 1e-3) -> tuple[pd.DataFrame, bool]:
    """Run the contract suite on estimator ``name``; returns (verdict table, all passed)."""
    cls = ESTIMATORS.get(name)
    estimator = cls.from_params(params or {})
    rows = []
    for label, task_name, task_params, logits_fn in CHECK_TASKS:
        latent = TASKS.get(task_name).from_params(task_params).latent
        if latent.kind not in cls.supports:
            continue
        rows.append(_check_task(estimator, label, task_name, task_params, logits_fn, samples,
                                alpha))
    table = pd.DataFrame([r.__dict__ for r in rows])
    verdicts = table[["shapes", "finite", "deterministic", "gradient_flow", "unbiased"]]
    return table, not (verdicts == "FAIL").any().any()
