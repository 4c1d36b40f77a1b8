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
