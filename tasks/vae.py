"""Discrete VAEs on real data: ``bernoulli-vae`` and ``categorical-vae``.

The cost per image is ``f(z) = -log p(x | z) + KL(q(z | x) || p(z))`` with the KL analytic in the
encoder's logits, so ``E_q f = -ELBO``. The estimator supplies the gradient through the discrete
z (to the encoder); the decoder, the prior and the KL get their exact pathwise gradients because
they are parameters inside ``f``. Networks are written as pure functions of a parameter dict, so
the measurement engine can batch replicas of them.

``bernoulli-vae`` (the DisARM setup, Dong et al. 2020, arXiv 2006.10680): ``latents`` Bernoulli
units (200), ``linear`` (784-D encoder, D-784 decoder) or ``nonlinear`` (784-200-200-D, mirrored,
LeakyReLU 0.3), learned prior logits, inputs centred by the training mean, decoder output bias
initialised to logit(clip(mean, 0.001, 0.999)).

``categorical-vae`` (Jang et al. 2017; Liu et al. 2023): ``latents`` L variables with
``categories`` C each, encoder 784-512-256-(L C) and mirrored decoder with ReLU, uniform or learned
prior. 8 categories x 4 latents (4,096 states) can be enumerated: exact gradients on a real model.

Evaluation (``evaluate``): on ``eval_size`` train and test images, the negative ELBO from one
sample and from m = ``eval_samples`` samples, and the importance-weighted bound with the same m
samples, all in one batched pass per chunk of images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from estbench.contracts import Cost, Params, Task
from estbench.hyperparams import hyper
from estbench.latents import Latent
from estbench.registry import register_task
from tasks.data import DATASETS, PREPROCESS, Preprocessor, load_images

__all__ = ["BernoulliVAE", "CategoricalVAE"]

PIXELS = 784


def _linear_init(fan_in: int, fan_out: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    bound = 1.0 / math.sqrt(fan_in)  # PyTorch's nn.Linear default
    weight = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
    return weight, bias


def _mlp(params: Params, prefix: str, x: Tensor, layers: int, activation) -> Tensor:
    """x through ``layers`` linear maps named ``{prefix}{i}.w/.b``, activation between them."""
    for i in range(layers):
        x = F.linear(x, params[f"{prefix}{i}.w"], params[f"{prefix}{i}.b"])
        if i < layers - 1:
            x = activation(x)
    return x


@dataclass(kw_only=True)
class _VAE(Task):
    """Shared data handling, likelihood and evaluation; subclasses define the latent layer."""

    cost_depends_on_params = True
    logits_metrics = True
    version = "1"

    dataset: str = hyper("mnist", choices=DATASETS)
    preprocess: str = hyper("dynamic", choices=PREPROCESS, doc="how grey levels become inputs")
    data_dir: str | None = hyper(None, doc="data directory (default $ESTBENCH_DATA or ./data)")
    train_size: int = hyper(0, ge=0, doc="use only the first N training images (0: all)")
    eval_size: int = hyper(1000, ge=0, doc="images per split for evaluation (0: all)")
    eval_samples: int = hyper(1000, ge=1, doc="m, samples per image for -ELBO_m and IWAE")
    data_seed: int = hyper(0, ge=0, doc="seed of static binarisation and evaluation draws")
    verify_checksums: bool = hyper(True, doc="check data files against published checksums")

    def _sizes(self) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def _activation(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _prior_init(self, generator: torch.Generator) -> dict[str, Tensor]:
        return {}

    # data ---------------------------------------------------------------------------------
    def preflight(self) -> None:
        for split in ("train", "test"):  # verified (and downloaded, if need be) once, up front
            load_images(self.dataset, split, self.data_dir, verify=self.verify_checksums)

    def _split(self, split: str) -> Tensor:
        images = load_images(self.dataset, split, self.data_dir, verify=self.verify_checksums)
        return self._preprocessor.fixed(images)

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu") -> Params:
        self._preprocessor = Preprocessor(self.preprocess, seed=self.data_seed)
        train = self._split("train")
        if self.train_size:
            train = train[: self.train_size]
        self._train = train.to(device)
        mean = train.mean(0)
        self._mean = mean.to(device)
        self._eval_sets = {"train": self._train[: self.eval_size or None]}
        test = self._split("test")
        self._eval_sets["test"] = test[: self.eval_size or None].to(device)
        self._device = torch.device(device)
        encoder, decoder = self._sizes()
        params: dict[str, Tensor] = {}
        for prefix, sizes in (("enc", encoder), ("dec", decoder)):
            for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
                params[f"{prefix}{i}.w"], params[f"{prefix}{i}.b"] = _linear_init(
                    fan_in, fan_out, generator)
        last = len(decoder) - 2
        params[f"dec{last}.b"] = torch.logit(mean.clamp(0.001, 0.999))  # output bias: data mean
        params.update(self._prior_init(generator))
        self._encoder_names = [k for k in params if k.startswith("enc")]
        return {k: v.to(device).requires_grad_(True) for k, v in params.items()}

    def sample_batch(self, generator: torch.Generator) -> Tensor:
        index = torch.randint(len(self._train), (self.batch_size,), generator=generator)
        return self._preprocessor.per_batch(self._train[index.to(self._train.device)], generator)

    def gradient_batch(self, generator: torch.Generator) -> Tensor:
        index = torch.randint(len(self._train), (self.gradient_batch_size,), generator=generator)
        return self._preprocessor.per_batch(self._train[index.to(self._train.device)], generator)

    def parameter_groups(self) -> dict[str, list[str]]:
        return {"encoder": list(self._encoder_names)}

    # model --------------------------------------------------------------------------------
    def _encode(self, params: Params, x: Tensor) -> Tensor:
        encoder, _ = self._sizes()
        return _mlp(params, "enc", x - self._mean, len(encoder) - 1, self._activation)

    def _decode(self, params: Params, z: Tensor) -> Tensor:
        _, decoder = self._sizes()
        flat = z.flatten(start_dim=z.dim() - self.latent.event_ndim)
        return _mlp(params, "dec", flat, len(decoder) - 1, self._activation)

    def _neg_log_likelihood(self, params: Params, x: Tensor, z: Tensor) -> Tensor:
        """-log p(x | z) summed over pixels: ``[*S, B]`` for z ``[*S, B, *event]``."""
        logits_x = self._decode(params, z)
        target = x.expand(logits_x.shape)
        return F.binary_cross_entropy_with_logits(logits_x, target, reduction="none").sum(-1)

    def logits(self, params: Params, batch: Tensor) -> Tensor:
        logits = self._logits(params, batch)
        self._last_logits = (params, batch, logits)
        return logits

    def cost(self, params: Params, batch: Tensor) -> Cost:
        last = getattr(self, "_last_logits", None)
        if last is not None and last[0] is params and last[1] is batch:
            logits = last[2]  # the same step's encoder pass (never a replica's: vmap makes new dicts)
        else:
            logits = self._logits(params, batch)
        kl = self._kl(params, logits)  # [B], analytic, pathwise in params
        return lambda z: self._neg_log_likelihood(params, batch, z) + kl

    def _log_prior(self, params: Params, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _kl(self, params: Params, logits: Tensor) -> Tensor:
        raise NotImplementedError

    # evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def bounds(self, params: Params, images: Tensor, samples: int, generator: torch.Generator,
               chunk: int = 0) -> dict[str, Tensor]:
        """Per image: -ELBO from the first sample, -ELBO averaged over ``samples`` and the
        negative importance-weighted bound -log (1/m) sum_s p(x, z_s) / q(z_s | x); one batched
        pass per chunk of images (no loop over samples)."""
        chunk = chunk or max(1, 2_000_000 // (samples * PIXELS))
        single, average, iwae = [], [], []
        for start in range(0, len(images), chunk):
            x = self._preprocessor.per_batch(images[start: start + chunk], generator)
            logits = self._logits(params, x)
            z = self.latent.sample(logits, (samples,))  # [m, b, *event]
            log_w = (-self._neg_log_likelihood(params, x, z) + self._log_prior(params, z)
                     - self.latent.log_prob(logits, z))  # [m, b]
            single.append(-log_w[0])
            average.append(-log_w.mean(0))
            iwae.append(-(torch.logsumexp(log_w, 0) - math.log(samples)))
        return {"neg_elbo_1": torch.cat(single), "neg_elbo": torch.cat(average),
                "neg_iwae": torch.cat(iwae)}

    def evaluate(self, params: Params, generator: torch.Generator) -> dict[str, float]:
        evaluation = torch.Generator().manual_seed(self.data_seed + 1)  # same draws each time
        out = {}
        for split, images in self._eval_sets.items():
            for name, values in self.bounds(params, images, self.eval_samples, evaluation).items():
                out[f"{split}_{name}"] = float(values.mean())
        return out


@register_task("bernoulli-vae")
@dataclass(kw_only=True)
class BernoulliVAE(_VAE):
    """Bernoulli VAE with a learned prior (linear or nonlinear), the DisARM setup."""

    description = "Bernoulli VAE (linear / nonlinear), learned prior, DisARM setup"

    latents: int = hyper(200, ge=1, doc="Bernoulli latent units")
    architecture: str = hyper("nonlinear", choices=("linear", "nonlinear"))
    batch_size: int = hyper(50, ge=1)
    gradient_batch_size: int = hyper(16, ge=1, doc="fixed batch for gradient quality")

    @property
    def latent(self) -> Latent:
        return Latent("bernoulli", self.latents)

    def _sizes(self) -> tuple[list[int], list[int]]:
        d = self.latents
        if self.architecture == "linear":
            return [PIXELS, d], [d, PIXELS]
        return [PIXELS, 200, 200, d], [d, 200, 200, PIXELS]

    def _activation(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, 0.3)

    def _prior_init(self, generator: torch.Generator) -> dict[str, Tensor]:
        return {"prior": torch.zeros(self.latents)}

    def _logits(self, params: Params, batch: Tensor) -> Tensor:
        return self._encode(params, batch)

    def _log_prior(self, params: Params, z: Tensor) -> Tensor:
        return self.latent.log_prob(params["prior"].expand(z.shape), z)

    def _kl(self, params: Params, logits: Tensor) -> Tensor:
        q, prior = torch.sigmoid(logits), params["prior"]
        return (q * (F.logsigmoid(logits) - F.logsigmoid(prior))
                + (1 - q) * (F.logsigmoid(-logits) - F.logsigmoid(-prior))).sum(-1)


@register_task("categorical-vae")
@dataclass(kw_only=True)
class CategoricalVAE(_VAE):
    """Categorical VAE, 784-512-256 encoder and mirrored decoder, ReLU, analytic KL."""

    description = "categorical VAE (latents x categories), 784-512-256 MLPs, analytic KL"

    latents: int = hyper(20, ge=1, doc="categorical latent variables L")
    categories: int = hyper(10, ge=2, doc="categories C per variable")
    prior: str = hyper("uniform", choices=("uniform", "learned"))
    batch_size: int = hyper(100, ge=1)
    gradient_batch_size: int = hyper(8, ge=1, doc="fixed batch for gradient quality")

    @property
    def latent(self) -> Latent:
        return Latent("categorical", self.latents, self.categories)

    def _sizes(self) -> tuple[list[int], list[int]]:
        width = self.latents * self.categories
        return [PIXELS, 512, 256, width], [width, 256, 512, PIXELS]

    def _activation(self, x: Tensor) -> Tensor:
        return F.relu(x)

    def _prior_init(self, generator: torch.Generator) -> dict[str, Tensor]:
        if self.prior == "learned":
            return {"prior": torch.zeros(self.latents, self.categories)}
        return {}

    def _prior_logits(self, params: Params) -> Tensor:
        if self.prior == "learned":
            return params["prior"]
        return torch.zeros(self.latents, self.categories, device=self._device)

    def _logits(self, params: Params, batch: Tensor) -> Tensor:
        encoded = self._encode(params, batch)
        return encoded.reshape(*encoded.shape[:-1], self.latents, self.categories)

    def _log_prior(self, params: Params, z: Tensor) -> Tensor:
        return self.latent.log_prob(self._prior_logits(params).expand(z.shape), z)

    def _kl(self, params: Params, logits: Tensor) -> Tensor:
        log_q = torch.log_softmax(logits, -1)
        log_p = torch.log_softmax(self._prior_logits(params), -1)
        return (log_q.exp() * (log_q - log_p)).sum((-2, -1))
