"""Closed-form objectives and gradients of the toy tasks against enumeration and autograd."""

import pytest
import torch

from estbench.latents import expectation_by_enumeration
from estbench.registry import TASKS

CONFIGS = [
    ("bernoulli-toy", {"dim": 4, "target": 0.45, "init_logit": -1.0}),
    ("bernoulli-toy", {"dim": 3, "target": 0.499, "batch_size": 3}),
    ("categorical-toy", {"dim": 3, "categories": 4}),
    ("categorical-toy", {"dim": 2, "categories": 5, "init_mean": -2.0, "init_std": 3.0}),
    ("polynomial", {"dim": 5, "power": 1.5, "batch_size": 2}),
    ("polynomial", {"dim": 4, "power": 3.0}),
]


@pytest.mark.parametrize("name,params", CONFIGS)
def test_closed_form_matches_enumeration(name, params, generator):
    task = TASKS.get(name).from_params(params)
    theta = task.init(generator)
    batch = task.sample_batch(generator)
    enumerated = expectation_by_enumeration(
        task.latent, task.logits(theta, batch), task.cost(theta, batch), 10_000
    ).mean()
    closed = task.exact_objective(theta, batch)
    torch.testing.assert_close(closed, enumerated, rtol=1e-5, atol=1e-7)
    (grad_enum,) = torch.autograd.grad(enumerated, theta["logits"])
    torch.testing.assert_close(task.exact_gradient(theta, batch)["logits"], grad_enum,
                               rtol=1e-4, atol=1e-8)


def test_bernoulli_toy_gradient_formula():
    task = TASKS.get("bernoulli-toy")(dim=2, target=0.45)
    theta = {"logits": torch.tensor([0.0, 1.0])}
    p = torch.sigmoid(theta["logits"])
    expected = p * (1 - p) * (1 - 2 * 0.45) / 2
    torch.testing.assert_close(task.exact_gradient(theta)["logits"], expected)


def test_categorical_toy_point_is_drawn_from_the_seed():
    task = TASKS.get("categorical-toy")(dim=3, categories=4)
    a = task.init(torch.Generator().manual_seed(5))
    point_a = task._point.clone()
    b = task.init(torch.Generator().manual_seed(5))
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(point_a, task._point)
    assert ((task._point >= 0) & (task._point <= 3)).all()


def test_polynomial_initialisation_is_small_uniform(generator):
    theta = TASKS.get("polynomial")().init(generator)["logits"]
    assert theta.shape == (128, 2) and theta.abs().max() <= 0.01


@pytest.mark.parametrize("name", ["test-scaled", "test-encoder"])
def test_default_exact_gradient_differentiates_enumeration(name, generator):
    task = TASKS.get(name)()
    theta = task.init(generator)
    grads = task.exact_gradient(theta)
    assert set(grads) == set(theta)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
