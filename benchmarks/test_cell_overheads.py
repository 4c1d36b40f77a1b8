"""Benchmark: what a cell pays beside training, on the categorical VAE (20 x 10, batch 100,
st-gumbel-softmax, Adam): one training step of ``run_cell``'s loop (which records the discrete
loss), the discrete loss alone (a hard sample and one forward of f, untimed in ``wall_time_s``),
and one checkpoint save of the cell's whole state.

Needs the MNIST files (``$ESTBENCH_DATA`` or ../shared/data). Run with `make bench`.
"""

import os
from pathlib import Path

import pytest
import torch

from estbench.cell import _Training, hard_sample
from estbench.checkpoint import save_checkpoint
from estbench.spec import Cell, Measure

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("ESTBENCH_DATA") and SHARED.is_dir():
    os.environ["ESTBENCH_DATA"] = str(SHARED)

GROUP = "categorical VAE 20x10: cell overheads"


@pytest.fixture(scope="module")
def training():
    cell = Cell("categorical-vae", {"latents": 20, "categories": 10, "eval_size": 10},
                "st-gumbel-softmax", {}, 0)
    try:
        state = _Training(cell, Measure(steps=1_000_000, throughput=False), "cpu")
    except Exception as missing:  # no data on this machine
        pytest.skip(str(missing))
    state.measured = True
    for _ in range(5):  # Adam state and the trajectory accumulators exist
        state.train_step()
    return state


def test_training_step_with_discrete_loss(benchmark, training):
    benchmark.group = GROUP
    benchmark.pedantic(training.train_step, rounds=200, warmup_rounds=10)


def test_discrete_loss_alone(benchmark, training):
    batch = training.task.sample_batch(training.generator)
    logits = training.task.logits(training.params, batch)
    f = training.task.cost(training.params, batch)

    @torch.no_grad()
    def discrete_loss():
        return f(hard_sample(training.task.latent, logits, training.loss_generator)).mean()

    benchmark.group = GROUP
    benchmark.pedantic(discrete_loss, rounds=200, warmup_rounds=10)


def test_checkpoint_save(benchmark, training, tmp_path):
    path = tmp_path / "cell.pt"
    benchmark.group = GROUP
    benchmark.pedantic(lambda: save_checkpoint(path, training.state_dict()), rounds=10,
                       warmup_rounds=1)
    benchmark.extra_info["checkpoint_mb"] = path.stat().st_size / 1e6
