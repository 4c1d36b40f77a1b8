"""Direct closed-form implementations of estimator formulas, for speed comparison only.

Each takes the shared logits ``theta [D, K]`` (the task's parameters), a batch size and a cost f,
and returns the gradient estimate of the batch-mean objective w.r.t. ``theta``: the estimator's
formula written out by hand (no surrogate, no autograd through the estimator). Like any
implementation of these formulas for a black-box f, they obtain grad_z f by one autograd call on
f alone.
"""

from __future__ import annotations

import torch

from estbench.latents import conditional_gumbel, gumbel, one_hot


class BlackBoxCost:
    """A cost f and its gradient at a point, the latter by autograd on f only."""

    def __init__(self, f) -> None:
        self.f = f

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.f(z)

    def grad(self, z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.f(z).sum(), z)
        return g


def jvp(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q * v - q * (q * v).sum(-1, keepdim=True)


def _batch(theta: torch.Tensor, batch: int) -> torch.Tensor:
    return theta.expand(batch, *theta.shape)


def _reduce(per_example: torch.Tensor) -> torch.Tensor:
    """Gradient of the batch mean w.r.t. the shared logits."""
    return per_example.mean(0)


def _sample(theta: torch.Tensor) -> torch.Tensor:
    return one_hot((theta + gumbel(theta.shape, theta)).argmax(-1), theta.shape[-1], theta.dtype)


def reinforce(shared, batch, f):
    theta = _batch(shared, batch)
    z = _sample(theta)
    return _reduce(f(z)[:, None, None] * (z - torch.softmax(theta, -1)))


def rloo(shared, batch, f, n=2):
    theta = _batch(shared, batch)
    z = one_hot((theta + gumbel((n, *theta.shape), theta)).argmax(-1), theta.shape[-1], theta.dtype)
    costs = f(z)
    centred = (costs - costs.mean(0))[..., None, None]
    return _reduce((centred * (z - torch.softmax(theta, -1))).sum(0) / (n - 1))


def straight_through(shared, batch, f, tau=1.0):
    theta = _batch(shared, batch)
    z = _sample(theta)
    return _reduce(jvp(torch.softmax(theta / tau, -1), f.grad(z)) / tau)


def st_gumbel_softmax(shared, batch, f, tau=1.0):
    theta = _batch(shared, batch)
    s = theta + gumbel(theta.shape, theta)
    z = one_hot(s.argmax(-1), theta.shape[-1], theta.dtype)
    return _reduce(jvp(torch.softmax(s / tau, -1), f.grad(z)) / tau)


def gumbel_softmax(shared, batch, f, tau=1.0):
    theta = _batch(shared, batch)
    y = torch.softmax((theta + gumbel(theta.shape, theta)) / tau, -1)
    return _reduce(jvp(y, f.grad(y)) / tau)


def reinmax(shared, batch, f, tau=1.0):
    theta = _batch(shared, batch)
    z = _sample(theta)
    g = f.grad(z)
    pi_tilde = 0.5 * (z + torch.softmax(theta / tau, -1))
    return _reduce((2 * jvp(pi_tilde, g) - 0.5 * jvp(torch.softmax(theta, -1), g)))


def gst(shared, batch, f, tau=1.0, gap=1.0):
    theta = _batch(shared, batch)
    z = _sample(theta)
    top = theta.max(-1, keepdim=True).values
    gapped = torch.where(z.bool(), top, torch.minimum(theta, top - gap))
    p = torch.softmax((gapped - gapped.mean(-1, keepdim=True)) / tau, -1)
    return _reduce(jvp(p, f.grad(z)) / tau)


def gumbel_rao(shared, batch, f, tau=1.0, samples=10):
    theta = _batch(shared, batch)
    z = _sample(theta)
    y = torch.softmax(conditional_gumbel(theta, z, (samples,)) / tau, -1)
    return _reduce(jvp(y, f.grad(z)).mean(0) / tau)


def indecater(shared, batch, f):
    theta = _batch(shared, batch)
    dim, k = shared.shape
    x = _sample(theta)
    eye_d = torch.eye(dim).reshape(dim, 1, 1, dim, 1)
    value = torch.eye(k).reshape(1, k, 1, 1, k)
    z = x * (1 - eye_d) + eye_d * value  # [D, K, B, D, K]
    f_bar = f(z).permute(2, 0, 1)  # [B, D, K]
    return _reduce(jvp(torch.softmax(theta, -1), f_bar))


DIRECT = {
    "reinforce": reinforce,
    "rloo": rloo,
    "straight-through": straight_through,
    "st-gumbel-softmax": st_gumbel_softmax,
    "gumbel-softmax": gumbel_softmax,
    "reinmax": reinmax,
    "gst": gst,
    "gumbel-rao": gumbel_rao,
    "indecater": indecater,
}
