"""Shared fixtures, and test-only tasks that put parameters inside ``f`` and inside a network.

The test tasks are registered, so the contract suite (parametrised over the registries) runs
every estimator on them too; they have no closed form, so their exact answers come from
enumeration.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from estbench import Latent, Task, hyper, register_task

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import write_fixture_data  # noqa: E402

#: the real datasets (../shared/data beside the checkout) when present, else tiny fixtures
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_IS_REAL = (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file()
if DATA_IS_REAL:
    DATA_DIR = SHARED_DATA
else:
    DATA_DIR = write_fixture_data(Path(tempfile.mkdtemp(prefix="estbench-data-")))
os.environ["ESTBENCH_DATA"] = str(DATA_DIR)

#: small VAE configurations for the contract suite and the runner tests
SMALL_VAE = {
    "bernoulli-vae": {"latents": 3, "architecture": "linear", "batch_size": 4, "train_size": 100,
                      "eval_size": 10, "eval_samples": 5, "gradient_batch_size": 2,
                      "verify_checksums": DATA_IS_REAL},
    "categorical-vae": {"latents": 2, "categories": 3, "batch_size": 4, "train_size": 100,
                        "eval_size": 10, "eval_samples": 5, "gradient_batch_size": 2,
                        "verify_checksums": DATA_IS_REAL},
}


@register_task("test-scaled")
@dataclass(kw_only=True)
class ScaledToy(Task):
    """D latents, f(z) = scale * mean_i (v(z)_i - target_i)^2 with ``scale`` and ``target``
    trainable parameters inside f (so estimators must pass their pathwise gradient)."""

    description = "test only: parameters inside f"
    latent_kind: str = hyper("bernoulli", choices=("bernoulli", "categorical"))
    dim: int = hyper(3, ge=1)
    categories: int = hyper(3, ge=2)
    batch_size: int = hyper(2, ge=1)

    @property
    def latent(self) -> Latent:
        if self.latent_kind == "bernoulli":
            return Latent("bernoulli", self.dim)
        return Latent("categorical", self.dim, self.categories)

    def init(self, generator: torch.Generator, device: Any = "cpu") -> dict[str, Tensor]:
        shape = self.latent.event_shape
        return {
            "logits": torch.randn(shape, generator=generator).requires_grad_(True),
            "scale": torch.tensor(1.5).requires_grad_(True),
            "target": (0.3 * torch.randn(self.dim, generator=generator)).requires_grad_(True),
        }

    def logits(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        return params["logits"].expand(self.batch_size, *self.latent.event_shape)

    def cost(self, params: dict[str, Tensor], batch: Any):
        values = torch.arange(self.categories, dtype=torch.float32)

        def f(z: Tensor) -> Tensor:
            v = z if self.latent_kind == "bernoulli" else (z * values).sum(-1)
            return params["scale"] * ((v - params["target"]) ** 2).mean(-1)

        return f


@register_task("test-encoder")
@dataclass(kw_only=True)
class EncoderToy(Task):
    """A tiny amortised model: logits = W2 tanh(W1 x + b1) for a fixed input batch x [B, 4],
    Bernoulli latents, f(z) = mean_i (z_i - sigmoid(u_i))^2 with u trainable."""

    description = "test only: a small network upstream of the logits"
    dim: int = hyper(3, ge=1)
    batch_size: int = hyper(4, ge=1)

    @property
    def latent(self) -> Latent:
        return Latent("bernoulli", self.dim)

    def init(self, generator: torch.Generator, device: Any = "cpu") -> dict[str, Tensor]:
        self._x = torch.randn(self.batch_size, 4, generator=generator)
        params = {
            "w1": 0.8 * torch.randn(5, 4, generator=generator),
            "b1": 0.1 * torch.randn(5, generator=generator),
            "w2": 0.8 * torch.randn(self.dim, 5, generator=generator),
            "u": torch.randn(self.dim, generator=generator),
        }
        return {k: v.requires_grad_(True) for k, v in params.items()}

    def logits(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        hidden = torch.tanh(self._x @ params["w1"].T + params["b1"])
        return hidden @ params["w2"].T

    def cost(self, params: dict[str, Tensor], batch: Any):
        return lambda z: ((z - torch.sigmoid(params["u"])) ** 2).mean(-1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the driver, its fork server and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry.name))
    return found
