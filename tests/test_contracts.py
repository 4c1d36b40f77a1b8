"""The contract suite: every registered estimator on every registered task it supports.

Generic checks (shapes, finiteness, determinism for a seed, gradients reaching parameters inside
f and upstream networks), and, for estimators that declare ``unbiased = True``, a statistical test
that the mean of many estimates matches the exact gradient. The tolerance is the standard error
of the mean: the Bonferroni-corrected p-value of the largest per-coordinate z-score must exceed
ALPHA (a wrong estimator fails it; see test_unbiasedness_test_has_power).
"""

from __future__ import annotations

import pytest
import torch

from estbench.errors import EstbenchError
from estbench.gradients import reference_gradient, sample_gradients
from estbench.metrics import gradient_metrics
from estbench.registry import ESTIMATORS, TASKS

from conftest import SMALL_VAE

ALPHA = 1e-3
SMALL = {  # small configurations of every task, so that the suite stays fast
    "bernoulli-toy": {"dim": 3, "batch_size": 2},
    "categorical-toy": {"dim": 3, "categories": 3, "batch_size": 2},
    "polynomial": {"dim": 4, "batch_size": 3},
    "test-scaled": {},
    "test-encoder": {},
    **SMALL_VAE,
}


def _pairs():
    for est_name in ESTIMATORS.names():
        for task_name in TASKS.names():
            task = TASKS.get(task_name).from_params(SMALL.get(task_name, {}))
            if task.latent.kind in ESTIMATORS.get(est_name).supports:
                yield pytest.param(est_name, task_name, id=f"{est_name}-{task_name}")


def _setup_checked(est_name, task_name):
    task, estimator, params = _setup(est_name, task_name)
    try:
        estimator.check_latent(task.latent)
    except EstbenchError as impossible:
        pytest.skip(f"impossible combination: {impossible}")
    return task, estimator, params


def _setup(est_name, task_name, seed=0, **task_overrides):
    task = TASKS.get(task_name).from_params({**SMALL.get(task_name, {}), **task_overrides})
    generator = torch.Generator().manual_seed(seed)
    params = task.init(generator)
    task.test_batch = task.sample_batch(generator)
    estimator = ESTIMATORS.get(est_name)()
    return task, estimator, params


@pytest.mark.parametrize("est_name,task_name", list(_pairs()))
def test_shapes_finiteness_and_gradient_flow(est_name, task_name):
    task, estimator, params = _setup_checked(est_name, task_name)
    logits = task.logits(params, task.test_batch)
    batch_shape = task.latent.batch_shape(logits)
    estimate = estimator.estimate(logits, task.cost(params, task.test_batch), task.latent)
    assert estimate.surrogate.shape == batch_shape
    assert estimate.value.shape == batch_shape and not estimate.value.requires_grad
    assert isinstance(estimate.f_evals, int) and estimate.f_evals >= 1
    assert torch.isfinite(estimate.surrogate).all() and torch.isfinite(estimate.value).all()
    estimate.surrogate.mean().backward()
    for name, p in params.items():
        assert p.grad is not None, f"no gradient reached parameter '{name}'"
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("est_name,task_name", list(_pairs()))
def test_same_seed_same_numbers(est_name, task_name):
    def run():
        torch.manual_seed(7)
        task, estimator, params = _setup_checked(est_name, task_name)
        batch = task.test_batch
        est = estimator.estimate(task.logits(params, batch), task.cost(params, batch), task.latent)
        est.surrogate.mean().backward()
        return est.value, [p.grad.clone() for p in params.values()]

    (v1, g1), (v2, g2) = run(), run()
    assert torch.equal(v1, v2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def _supported(est_name: str, task_name: str, overrides: dict) -> bool:
    task = TASKS.get(task_name).from_params({**SMALL.get(task_name, {}), **overrides})
    return task.latent.kind in ESTIMATORS.get(est_name).supports


def _unbiased_cases():
    settings = {
        "near-zero": {"bernoulli-toy": {"init_logit": 0.1}, "categorical-toy": {"init_std": 0.1}},
        "negative": {"bernoulli-toy": {"init_logit": -4.0},
                     "categorical-toy": {"init_mean": -4.0, "init_std": 2.0}},
        "mixed": {"bernoulli-toy": {}, "categorical-toy": {"init_std": 2.5}},
    }
    for est_name in ESTIMATORS.names():
        if not ESTIMATORS.get(est_name).unbiased:
            continue
        for label, per_task in settings.items():
            for task_name, overrides in per_task.items():
                for dim in (1, 3):
                    if _supported(est_name, task_name, overrides):
                        yield pytest.param(est_name, task_name, {**overrides, "dim": dim},
                                           id=f"{est_name}-{task_name}-{label}-D{dim}")
        for task_name, overrides in (("polynomial", {}), ("test-scaled", {}),
                                     ("test-scaled", {"latent_kind": "categorical"}),
                                     ("test-encoder", {})):
            if _supported(est_name, task_name, overrides):
                suffix = "-categorical" if overrides else ""
                yield pytest.param(est_name, task_name, overrides,
                                   id=f"{est_name}-{task_name}{suffix}")


def _mixed_logits(task, params):
    """Spread logits (some strongly negative, some positive) for the 'mixed' Bernoulli case."""
    if task.name == "bernoulli-toy" and task.init_logit == 0.0:
        d = task.dim
        params["logits"] = torch.linspace(-3.0, 2.0, d).requires_grad_(True)
    return params


@pytest.mark.slow
@pytest.mark.parametrize("est_name,task_name,overrides", list(_unbiased_cases()))
def test_unbiased_estimators_match_the_exact_gradient(est_name, task_name, overrides):
    task, estimator, params = _setup(est_name, task_name, seed=3, **overrides)
    try:
        estimator.check_latent(task.latent)
    except EstbenchError as impossible:
        pytest.skip(f"impossible combination: {impossible}")
    params = _mixed_logits(task, params)
    samples = sample_gradients(task, estimator, params, None, 20_000)
    metrics = {m.metric: m for m in gradient_metrics(samples, reference_gradient(task, params, None))}
    assert metrics["grad_bias_pvalue"].value > ALPHA, (
        f"{est_name} on {task_name}: max z = {metrics['grad_bias_z'].value:.2f}"
    )
    assert metrics["grad_bias_norm"].ci_low <= 1e-12 or metrics["grad_rel_bias"].value < 0.02


@pytest.mark.parametrize(
    "est_name,params",
    [("gumbel-softmax", {"temperature": 1.0}), ("straight-through", {}),
     ("st-gumbel-softmax", {"temperature": 1.0})],
)
def test_unbiasedness_test_has_power(est_name, params):
    """The same test rejects the biased estimators on categorical-toy: it can fail."""
    task = TASKS.get("categorical-toy")(dim=3, categories=4)
    theta = task.init(torch.Generator().manual_seed(3))
    estimator = ESTIMATORS.get(est_name).from_params(params)
    samples = sample_gradients(task, estimator, theta, None, 20_000)
    metrics = {m.metric: m for m in gradient_metrics(samples, reference_gradient(task, theta, None))}
    assert metrics["grad_bias_pvalue"].value < ALPHA
    assert metrics["grad_bias_norm"].ci_low > 0


def test_ema_baseline_with_state_stays_unbiased():
    """A burnt-in (non-zero, even badly wrong) EMA baseline must not bias REINFORCE."""
    task = TASKS.get("bernoulli-toy")(dim=3, init_logit=-1.0)
    theta = task.init(torch.Generator().manual_seed(0))
    estimator = ESTIMATORS.get("reinforce")(baseline="ema")
    estimator._baseline.value = 0.7
    samples = sample_gradients(task, estimator, theta, None, 20_000)
    metrics = {m.metric: m for m in gradient_metrics(samples, reference_gradient(task, theta, None))}
    assert metrics["grad_bias_pvalue"].value > ALPHA
