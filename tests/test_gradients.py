"""The vectorised methods (flat, batched) against the loop, and independence across draws."""

import pytest
import torch

from estbench.gradients import sample_gradients
from estbench.registry import ESTIMATORS, TASKS


@pytest.mark.parametrize(
    "est_name,task_name,task_params",
    [
        ("reinforce", "bernoulli-toy", {"dim": 4, "init_logit": -1.0}),
        ("rloo", "categorical-toy", {"dim": 2, "categories": 4}),
        ("st-gumbel-softmax", "polynomial", {"dim": 3, "batch_size": 2}),
        ("reinforce", "test-encoder", {}),
        ("gumbel-softmax", "test-scaled", {"latent_kind": "categorical"}),
    ],
)
def test_vectorised_methods_and_loop_give_the_same_statistics(est_name, task_name, task_params):
    task = TASKS.get(task_name).from_params(task_params)
    params = task.init(torch.Generator().manual_seed(0))
    estimator = ESTIMATORS.get(est_name)()
    m = 3000
    torch.manual_seed(2)
    looped = sample_gradients(task, estimator, params, None, m, method="loop").double()
    for seed, method in ((1, "batched"), (3, "flat")):
        torch.manual_seed(seed)
        drawn = sample_gradients(task, estimator, params, None, m, method=method).double()
        assert drawn.shape == looped.shape == (m, sum(p.numel() for p in params.values()))
        var_b, var_l = drawn.var(0), looped.var(0)
        se = ((var_b + var_l) / m).sqrt().clamp_min(1e-12)
        z = (drawn.mean(0) - looped.mean(0)).abs() / se
        assert z.max() < 4.5, f"{method}: means differ: max z = {z.max():.2f}"
        informative = (var_b + var_l) > 1e-12
        ratio = (var_b[informative] / var_l[informative]).log().abs()
        # log variance ratio of two samples of 3000 has sd ~ sqrt(2/3000) * kurtosis factor
        assert ratio.max() < 0.35, f"{method}: variances differ: |log ratio| {ratio.max():.3f}"


def test_replicas_are_independent_draws():
    task = TASKS.get("bernoulli-toy")(dim=1)
    params = task.init(torch.Generator().manual_seed(0))
    samples = sample_gradients(task, ESTIMATORS.get("reinforce")(), params, None, 4000)
    values = samples[:, 0]
    lag = torch.corrcoef(torch.stack([values[:-1], values[1:]]))[0, 1]
    assert abs(float(lag)) < 4 / 4000**0.5
    assert values.unique().numel() == 2  # REINFORCE on one Bernoulli: two possible values


def test_chunking_does_not_change_the_distribution():
    task = TASKS.get("categorical-toy")(dim=2, categories=3)
    params = task.init(torch.Generator().manual_seed(0))
    est = ESTIMATORS.get("reinforce")()
    whole = sample_gradients(task, est, params, None, 4000)
    chunked = sample_gradients(task, est, params, None, 4000, chunk_size=333)
    se = ((whole.var(0) + chunked.var(0)) / 4000).sqrt()
    assert ((whole.mean(0) - chunked.mean(0)).abs() / se).max() < 4.5


def test_unknown_method_is_a_clear_error():
    from estbench.errors import EstbenchError

    task = TASKS.get("bernoulli-toy")()
    params = task.init(torch.Generator())
    with pytest.raises(EstbenchError, match="gradient method must be one of"):
        sample_gradients(task, ESTIMATORS.get("reinforce")(), params, None, 10, method="fast")


def test_flat_and_batched_give_the_same_logit_gradients_as_the_loop_on_a_vae():
    """Per-draw gradients w.r.t. the logits hold f fixed (the KL's own path excluded), the
    same way for every method; with one seed, flat and loop draw the very same noise."""
    from conftest import SMALL_VAE

    task = TASKS.get("categorical-vae").from_params(SMALL_VAE["categorical-vae"])
    generator = torch.Generator().manual_seed(0)
    params = task.init(generator)
    batch = task.gradient_batch(generator)
    estimator = ESTIMATORS.get("st-gumbel-softmax")()
    draws = {}
    for method in ("flat", "loop"):
        torch.manual_seed(4)
        draws[method] = sample_gradients(task, estimator, params, batch, 6, method=method,
                                         with_logits=True)
    for flat, looped in zip(draws["flat"], draws["loop"]):
        torch.testing.assert_close(flat, looped, rtol=1e-4, atol=1e-6)
