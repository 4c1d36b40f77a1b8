"""Benchmark: M = 1,000 gradient estimates on bernoulli-toy (D = 200), batched vs the loop.

Run with `make bench`. The target (README) is the batched engine at least 100x faster than one
estimate per Python iteration. pytest-benchmark reports the median of many rounds for each.
"""

import pytest
import torch

from estbench.gradients import sample_gradients
from estbench.registry import ESTIMATORS, TASKS

M = 1000


@pytest.fixture(scope="module")
def setup():
    task = TASKS.get("bernoulli-toy")(dim=200)
    return task, task.init(torch.Generator().manual_seed(0))


@pytest.mark.parametrize("estimator", ["reinforce", "rloo", "gumbel-softmax", "st-gumbel-softmax"])
@pytest.mark.parametrize("method", ["flat", "batched", "loop"])
def test_gradient_samples(benchmark, setup, estimator, method):
    task, params = setup
    est = ESTIMATORS.get(estimator)()
    benchmark.group = f"M=1000 D=200 {estimator}"
    rounds = 30 if method == "batched" else 5
    result = benchmark.pedantic(
        sample_gradients, args=(task, est, params, None, M), kwargs={"method": method},
        rounds=rounds, warmup_rounds=2,
    )
    assert result.shape == (M, 200)
