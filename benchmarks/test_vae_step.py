"""Benchmark: one training step of the categorical VAE (20 x 10, batch 100) with
st-gumbel-softmax through the harness, against a plain hand-written PyTorch loop of the same
model; and the 1,000-sample IWAE evaluation of 1,000 test images in batched chunks.

Needs the MNIST files (``$ESTBENCH_DATA`` or ../shared/data). Run with `make bench`.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from estbench.registry import ESTIMATORS, TASKS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("ESTBENCH_DATA") and SHARED.is_dir():
    os.environ["ESTBENCH_DATA"] = str(SHARED)


@pytest.fixture(scope="module")
def vae():
    try:
        task = TASKS.get("categorical-vae")(latents=20, categories=10, batch_size=100,
                                            eval_size=1000, eval_samples=1000)
        params = task.init(torch.Generator().manual_seed(0))
    except Exception as missing:  # no data on this machine
        pytest.skip(str(missing))
    return task, params


def test_harness_step(benchmark, vae):
    task, params = vae
    estimator = ESTIMATORS.get("st-gumbel-softmax")()
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    estimator.train(True)

    def step():
        batch = task.sample_batch(generator)
        estimate = estimator.estimate(task.logits(params, batch), task.cost(params, batch),
                                      task.latent)
        optimizer.zero_grad(set_to_none=True)
        estimate.surrogate.mean().backward()
        optimizer.step()
        estimator.update(estimate)

    benchmark.group = "categorical VAE 20x10 step"
    benchmark.pedantic(step, rounds=200, warmup_rounds=10)


class PlainVAE(nn.Module):
    def __init__(self, latents=20, categories=10):
        super().__init__()
        self.latents, self.categories = latents, categories
        width = latents * categories
        self.encoder = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256),
                                     nn.ReLU(), nn.Linear(256, width))
        self.decoder = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 512),
                                     nn.ReLU(), nn.Linear(512, 784))

    def forward(self, x, mean):
        logits = self.encoder(x - mean).view(-1, self.latents, self.categories)
        z = F.gumbel_softmax(logits, tau=1.0, hard=True)
        recon = F.binary_cross_entropy_with_logits(self.decoder(z.flatten(1)), x,
                                                   reduction="none").sum(-1)
        log_q = torch.log_softmax(logits, -1)
        kl = (log_q.exp() * (log_q + torch.log(torch.tensor(float(self.categories))))).sum((-2, -1))
        return (recon + kl).mean()


def test_plain_pytorch_step(benchmark, vae):
    task, _ = vae
    torch.manual_seed(0)
    model = PlainVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train, mean = task._train, task._mean
    generator = torch.Generator().manual_seed(1)

    def step():
        index = torch.randint(len(train), (100,), generator=generator)
        grey = train[index]
        x = (torch.rand(grey.shape, generator=generator) < grey).float()
        loss = model(x, mean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    benchmark.group = "categorical VAE 20x10 step"
    benchmark.pedantic(step, rounds=200, warmup_rounds=10)


def test_iwae_1000_samples_1000_test_images(benchmark, vae):
    task, params = vae
    images = task._eval_sets["test"]
    benchmark.group = "IWAE m=1000"
    result = benchmark.pedantic(task.bounds, args=(params, images, 1000, torch.Generator()),
                                rounds=3, warmup_rounds=1)
    assert result["neg_iwae"].shape == (1000,)
