"""The vectorised engine against the loop fallback, and its independence across replicas."""

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
def test_batched_and_loop_give_the_same_statistics(est_name, task_name, task_params):
    task = TASKS.get(task_name).from_params(task_params)
    params = task.init(torch.Generator().manual_seed(0))
    estimator = ESTIMATORS.get(est_name)()
    m = 3000
    torch.manual_seed(1)
    batched = sample_gradients(task, estimator, params, None, m, method="batched").double()
    torch.manual_seed(2)
    looped = sample_gradients(task, estimator, params, None, m, method="loop").double()
    assert batched.shape == looped.shape == (m, sum(p.numel() for p in params.values()))
    var_b, var_l = batched.var(0), looped.var(0)
    se = ((var_b + var_l) / m).sqrt().clamp_min(1e-12)
    z = (batched.mean(0) - looped.mean(0)).abs() / se
    assert z.max() < 4.5, f"means differ: max z = {z.max():.2f}"
    informative = (var_b + var_l) > 1e-12
    ratio = (var_b[informative] / var_l[informative]).log().abs()
    # log variance ratio of two samples of 3000 has sd ~ sqrt(2/3000) * kurtosis factor
    assert ratio.max() < 0.35, f"variances differ: max |log ratio| = {ratio.max():.3f}"


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
