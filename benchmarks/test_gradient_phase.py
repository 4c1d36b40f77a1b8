"""Benchmark: M = 200 gradient estimates on the 20x10 categorical VAE (batch 100,
st-gumbel-softmax, one torch thread) by each method, beside the physical limit: one forward and
backward pass over all 200 x 100 draws with shared parameters. The README gives the ratios; the
full-size table of every estimator is ``python benchmarks/gradient_phase.py phase``.

Needs the MNIST files (``$ESTBENCH_DATA`` or ../shared/data). Run with `make bench`.
"""

import os
from pathlib import Path

import pytest
import torch

from estbench.registry import ESTIMATORS, TASKS
from gradient_phase import consume_draws, physical_limit

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("ESTBENCH_DATA") and SHARED.is_dir():
    os.environ["ESTBENCH_DATA"] = str(SHARED)

M = 200


@pytest.fixture(scope="module")
def vae():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = TASKS.get("categorical-vae")(latents=20, categories=10, gradient_batch_size=100,
                                            eval_size=10)
        generator = torch.Generator().manual_seed(0)
        params = task.init(generator)
    except Exception as missing:  # no data on this machine
        torch.set_num_threads(threads)
        pytest.skip(str(missing))
    yield task, params, task.gradient_batch(generator), ESTIMATORS.get("st-gumbel-softmax")()
    torch.set_num_threads(threads)


def test_physical_limit(benchmark, vae):
    task, params, batch, estimator = vae
    benchmark.group = "20x10 VAE, M=200 x batch 100"
    benchmark.pedantic(physical_limit, args=(task, estimator, params, batch, M), rounds=3,
                       warmup_rounds=1)


@pytest.mark.parametrize("method", ["auto", "flat", "batched", "loop"])
def test_draws(benchmark, vae, method):
    task, params, batch, estimator = vae
    benchmark.group = "20x10 VAE, M=200 x batch 100"
    benchmark.pedantic(consume_draws, args=(task, estimator, params, batch, M, method),
                       rounds=3, warmup_rounds=1)
