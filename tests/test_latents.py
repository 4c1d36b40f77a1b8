import math

import pytest
import torch

from estbench.errors import EstbenchError
from estbench.latents import Latent, expectation_by_enumeration


def test_bernoulli_sample_frequencies_match_probabilities():
    latent = Latent("bernoulli", 4)
    logits = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    n = 200_000
    z = latent.sample(logits, (n,))
    p = torch.sigmoid(logits)
    se = (p * (1 - p) / n).sqrt()
    assert ((z.mean(0) - p).abs() / se).max() < 4.5
    assert set(z.unique().tolist()) <= {0.0, 1.0}


def test_categorical_sample_frequencies_match_softmax():
    latent = Latent("categorical", 2, 4)
    logits = torch.tensor([[0.0, 1.0, -2.0, 0.5], [3.0, -1.0, 0.0, 0.0]])
    n = 200_000
    z = latent.sample(logits, (n,))
    assert torch.equal(z.sum(-1), torch.ones(n, 2))
    p = torch.softmax(logits, -1)
    se = (p * (1 - p) / n).sqrt()
    assert ((z.mean(0) - p).abs() / se).max() < 4.5


@pytest.mark.parametrize("kind", ["bernoulli", "categorical"])
def test_log_prob_matches_torch_distributions(kind):
    latent = Latent(kind, 3, 2 if kind == "bernoulli" else 4)
    logits = torch.randn(5, *latent.event_shape) * 3
    z = latent.sample(logits, (7,))
    if kind == "bernoulli":
        expected = torch.distributions.Bernoulli(logits=logits).log_prob(z).sum(-1)
    else:
        expected = torch.distributions.OneHotCategorical(logits=logits).log_prob(z).sum(-1)
    torch.testing.assert_close(latent.log_prob(logits, z), expected)


def test_enumeration_covers_every_state_once():
    latent = Latent("categorical", 3, 3)
    states = latent.enumerate_states(torch.float32, "cpu")
    assert states.shape == (27, 3, 3)
    assert len({tuple(s.argmax(-1).tolist()) for s in states}) == 27
    logits = torch.randn(3, 3)
    total = latent.log_prob(logits, states).exp().sum()
    assert math.isclose(float(total), 1.0, rel_tol=1e-5)


def test_enumeration_refuses_large_spaces_with_a_clear_message():
    latent = Latent("categorical", 128, 2)
    with pytest.raises(EstbenchError, match=r"2\^128 .*max_states=65536"):
        expectation_by_enumeration(latent, torch.zeros(128, 2), lambda z: z.sum((-1, -2)), 65536)


def test_bad_logits_shape_names_the_shapes():
    latent = Latent("categorical", 3, 4)
    with pytest.raises(EstbenchError, match=r"\(2, 3, 5\).*\(3, 4\)"):
        latent.check_logits(torch.zeros(2, 3, 5))


def test_conditional_gumbel_reproduces_the_joint_of_argmax_and_perturbation():
    from estbench.latents import conditional_gumbel, gumbel

    theta = torch.tensor([0.5, -1.0, 1.2, 0.0])
    n = 200_000
    free = theta + gumbel((n, 4), theta)
    sample = torch.nn.functional.one_hot(free.argmax(-1), 4).float()
    conditioned = conditional_gumbel(theta, sample)
    assert torch.equal(conditioned.argmax(-1), free.argmax(-1))
    se = (free.var(0) / n + conditioned.var(0) / n).sqrt()
    assert ((free.mean(0) - conditioned.mean(0)).abs() / se).max() < 4.5
    assert ((free.std(0) / conditioned.std(0)).log().abs() < 0.02).all()


def test_as_categorical_views_bernoulli_as_two_classes():
    from estbench.latents import as_categorical

    latent = Latent("bernoulli", 3)
    logits = torch.tensor([-1.0, 0.0, 2.0])
    cat, pair, f = as_categorical(latent, logits, lambda z: z.sum(-1))
    assert cat.kind == "categorical" and cat.categories == 2
    torch.testing.assert_close(torch.softmax(pair, -1)[..., 1], torch.sigmoid(logits))
    assert f(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])) == 2.0


def test_hard_forward_matches_autograd_through_the_straight_through_construction():
    from estbench.pathwise import hard_forward, softmax_jacobian_product, straight_through

    logits = torch.randn(4, 3, 5).requires_grad_(True)
    hard = Latent("categorical", 3, 5).sample(logits)
    weights = torch.randn(3, 5)
    p = torch.softmax(logits, -1)
    (expected,) = torch.autograd.grad((weights * straight_through(hard, p)).sum(), logits)
    out = hard_forward(hard, logits, lambda g: softmax_jacobian_product(p.detach(), g))
    assert torch.equal(out, hard)
    (got,) = torch.autograd.grad((weights * out).sum(), logits)
    torch.testing.assert_close(got, expected)
