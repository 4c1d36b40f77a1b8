"""Benchmark: time per estimate (forward + backward) of every registered estimator on
categorical-toy with D = 10, K = 10, batch 1024, beside a direct closed-form implementation of
the same formula where one exists (benchmarks/closed_form.py). Run with `make bench`.

Bernoulli-only estimators (arm, disarm) run on bernoulli-toy with D = 100 (as many logits) and
batch 1024; `exact` cannot enumerate 10^10 states and is skipped.
"""

import pytest
import torch

from estbench.registry import ESTIMATORS, TASKS

from closed_form import DIRECT, BlackBoxCost

BATCH, DIM, K = 1024, 10, 10


def _harness_case(name):
    est = ESTIMATORS.get(name)()
    if "categorical" in est.supports:
        task = TASKS.get("categorical-toy")(dim=DIM, categories=K, batch_size=BATCH)
    else:
        task = TASKS.get("bernoulli-toy")(dim=DIM * K, batch_size=BATCH)
    return est, task


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_harness(benchmark, name):
    est, task = _harness_case(name)
    try:
        est.check_latent(task.latent)
    except Exception as impossible:
        pytest.skip(str(impossible))
    params = task.init(torch.Generator().manual_seed(0))
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    est.train(True)

    def step():
        estimate = est.estimate(task.logits(leaves, None), task.cost(leaves, None), task.latent)
        estimate.surrogate.mean().backward()
        leaves["logits"].grad = None

    benchmark.group = name
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_direct(benchmark, name):
    torch.manual_seed(0)
    task = TASKS.get("categorical-toy")(dim=DIM, categories=K, batch_size=BATCH)
    params = task.init(torch.Generator().manual_seed(0))
    f = BlackBoxCost(task.cost(params, None))
    shared = params["logits"].detach()
    benchmark.group = name
    result = benchmark.pedantic(DIRECT[name], args=(shared, BATCH, f), rounds=30, warmup_rounds=3)
    assert result.shape == shared.shape and torch.isfinite(result).all()
