"""Statistics over seeds: bootstrap intervals, IQM, probability of improvement, ranking."""

import numpy as np
import pandas as pd
import pytest

from analysis.stats import (
    aggregate,
    bootstrap_ci,
    curves,
    interquartile_mean,
    probability_of_improvement,
    rank_estimators,
)


def test_interquartile_mean_trims_a_quarter_from_each_end():
    assert interquartile_mean(np.array([100.0, 1, 2, 3, 4, 5, 6, -50])) == pytest.approx(3.5)
    rows = np.array([[1.0, 2, 3, 4], [10, 20, 30, 40]])
    np.testing.assert_allclose(interquartile_mean(rows, axis=1), [2.5, 25.0])


def test_bootstrap_interval_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        x = rng.normal(1.0, 2.0, size=30)
        _, low, high = bootstrap_ci(x, "mean", 0.9, 1000, random_state=trial)
        covered += low <= 1.0 <= high
    assert 0.82 <= covered / 200 <= 0.96  # nominal 90%, percentile bootstrap at n = 30


def test_bootstrap_is_reproducible_and_handles_single_seeds():
    x = [1.0, 2.0, 4.0, 8.0]
    assert bootstrap_ci(x, random_state=3) == bootstrap_ci(x, random_state=3)
    point, low, high = bootstrap_ci([5.0])
    assert point == 5.0 and np.isnan(low) and np.isnan(high)


def test_probability_of_improvement():
    assert probability_of_improvement([1, 2], [3, 4]) == 1.0
    assert probability_of_improvement([3, 4], [1, 2]) == 0.0
    assert probability_of_improvement([1, 3], [2, 2]) == 0.5
    assert probability_of_improvement([2], [2]) == 0.5


def _frame(values: dict[str, list[float]], metric="loss_exact", phase="train", step=10):
    rows = []
    for est, vals in values.items():
        for seed, v in enumerate(vals):
            rows.append({"task_label": "toy", "estimator_label": est, "seed": seed,
                         "cell": f"{est}-{seed}", "metric": metric, "phase": phase,
                         "step": step, "value": v})
    return pd.DataFrame(rows)


def test_aggregate_and_rank():
    frame = _frame({"a": [1.0, 1.1, 0.9, 1.0], "b": [2.0, 2.2, 1.8, 2.1]})
    table = aggregate(frame, "loss_exact", phase="train", statistics=("mean", "iqm"))
    assert set(table["statistic"]) == {"mean", "iqm"} and (table["seeds"] == 4).all()
    mean_a = table[(table["estimator_label"] == "a") & (table["statistic"] == "mean")].iloc[0]
    assert mean_a["value"] == pytest.approx(1.0) and mean_a["ci_low"] < 1.0 < mean_a["ci_high"]
    ranking, pairwise = rank_estimators(frame, "loss_exact", phase="train")
    assert list(ranking["estimator_label"]) == ["a", "b"] and list(ranking["rank"]) == [1, 2]
    ab = pairwise[(pairwise["estimator"] == "a") & (pairwise["other"] == "b")].iloc[0]
    assert ab["p_better"] == 1.0 and ab["ci_low"] <= 1.0 <= ab["ci_high"]
    _, flipped = rank_estimators(frame, "loss_exact", phase="train", lower_is_better=False)
    assert flipped[(flipped["estimator"] == "a")]["p_better"].iloc[0] == 0.0


def test_curves_carry_steps_and_intervals():
    frame = pd.concat([_frame({"a": [1.0, 2.0, 3.0]}, step=s) for s in (0, 10)])
    table = curves(frame, "loss_exact", phase="train")
    assert list(table["step"]) == [0, 10] and (table["value"] == 2.0).all()
    assert (table["ci_low"] <= 2.0).all() and table["wall_time_s"].isna().all()
