"""Statistics over seeds: bootstrap intervals, IQM, probability of improvement, ranking."""

import numpy as np
import pandas as pd
import pytest

from analysis.bias import bias_tests, combine_pvalues, holm_rejections
from analysis.stats import (
    FEW_SEEDS,
    Interval,
    aggregate,
    bootstrap_ci,
    curves,
    few_seeds_warning,
    interquartile_mean,
    interval,
    probability_of_improvement,
    profile_fractions,
    rank_estimators,
)
from analysis.summary import (
    format_summary,
    interval_caption,
    summary_table,
    without_uniform_columns,
)


def test_interquartile_mean_trims_a_quarter_from_each_end():
    assert interquartile_mean(np.array([100.0, 1, 2, 3, 4, 5, 6, -50])) == pytest.approx(3.5)
    rows = np.array([[1.0, 2, 3, 4], [10, 20, 30, 40]])
    np.testing.assert_allclose(interquartile_mean(rows, axis=1), [2.5, 25.0])


def test_bca_interval_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        x = rng.normal(1.0, 2.0, size=30)
        iv = interval(x, "mean", 0.9, 1000, random_state=trial)
        covered += iv.ci_low <= 1.0 <= iv.ci_high
        assert iv.method == "bca" and iv.seeds == 30
    assert 0.82 <= covered / 200 <= 0.96  # nominal 90%: 3 binomial SEs (0.021) either side


def test_three_seeds_get_a_t_interval_that_covers_and_a_warning():
    """A percentile bootstrap of 3 values covers ~75% of the time at nominal 95%; the t interval
    has its level (600 trials: 3 binomial SEs of 0.027)."""
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(600):
        iv = interval(rng.normal(0.0, 1.0, size=3), "mean", 0.95)
        covered += iv.ci_low <= 0.0 <= iv.ci_high
    assert iv.method == "t"
    assert 0.95 - 0.027 <= covered / 600 <= 0.95 + 0.027
    assert "3 seeds" in few_seeds_warning(3) and few_seeds_warning(FEW_SEEDS) == ""


def test_interval_methods_for_degenerate_inputs():
    assert interval([2.0, 2.0, 2.0]) == Interval(2.0, 2.0, 2.0, "constant", 3)
    one = interval([5.0, float("nan")])
    assert one.value == 5.0 and np.isnan(one.ci_low) and one.method == "none"
    assert interval([1.0, 2.0, 3.0, 4.0], "median").method == "percentile"


def test_interval_is_intersected_with_the_range_of_the_quantity():
    times = [1e-4, 2e-4, 9e-4]
    free = interval(times)
    assert free.ci_low < 0  # a t interval over three skewed positive values
    bounded = interval(times, bounds=(0.0, np.inf))
    assert bounded.ci_low == 0.0 and bounded[:1] + bounded[2:] == free[:1] + free[2:]


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
    assert ab["p_better"] == 1.0  # 4 seeds each: no interval (every resample would agree)
    assert np.isnan(ab["ci_low"]) and np.isnan(ab["ci_high"]) and ab["interval"] == "none"
    _, flipped = rank_estimators(frame, "loss_exact", phase="train", lower_is_better=False)
    assert flipped[(flipped["estimator"] == "a")]["p_better"].iloc[0] == 0.0


def test_curves_carry_steps_and_intervals():
    frame = pd.concat([_frame({"a": [1.0, 2.0, 3.0]}, step=s) for s in (0, 10)])
    table = curves(frame, "loss_exact", phase="train")
    assert list(table["step"]) == [0, 10] and (table["value"] == 2.0).all()
    assert (table["ci_low"] <= 2.0).all() and table["wall_time_s"].isna().all()


def test_ranks_are_shared_where_intervals_overlap_the_leaders():
    """a and b overlap (rank 1, tied); c is clear of them (rank 3, competition ranking); d and e
    overlap each other but not c (rank 4, tied)."""
    frame = _frame({"a": [1.0, 1.2, 0.8, 1.0], "b": [1.1, 1.3, 0.9, 1.2],
                    "c": [3.0, 3.02, 2.98, 3.0], "d": [5.0, 5.5, 4.5, 5.0],
                    "e": [5.2, 5.6, 4.9, 5.1]})
    ranking, _ = rank_estimators(frame, "loss_exact", phase="train")
    ranks = dict(zip(ranking["estimator_label"], ranking["rank"]))
    assert ranks == {"a": 1, "b": 1, "c": 3, "d": 4, "e": 4}
    assert list(ranking["tied"]) == [True, True, False, True, True]
    assert (ranking["interval"] == "t").all() and (ranking["seeds"] == 4).all()


def test_pairwise_table_has_intervals_and_seed_counts():
    frame = _frame({"a": [1.0, 1.2, 0.8, 1.0, 0.9], "b": [1.1, 1.3, 0.9, 1.2, 1.0]})
    _, pairwise = rank_estimators(frame, "loss_exact", phase="train", n_boot=500)
    ab = pairwise[(pairwise["estimator"] == "a") & (pairwise["other"] == "b")].iloc[0]
    assert ab["p_better"] == pytest.approx(probability_of_improvement([1.0, 1.2, 0.8, 1.0, 0.9],
                                                                      [1.1, 1.3, 0.9, 1.2, 1.0]))
    assert 0 <= ab["ci_low"] < ab["p_better"] < ab["ci_high"] <= 1
    assert ab["interval"] == "percentile" and ab["seeds"] == ab["other_seeds"] == 5


def test_profile_fractions_count_runs_reaching_each_threshold():
    fraction, low, high = profile_fractions([[1.0, 2.0, 3.0, 4.0]], [0.5, 2.5, 4.0], n_boot=500)
    assert list(fraction) == [0.0, 0.5, 1.0]
    assert (low <= fraction).all() and (fraction <= high).all()
    assert low[1] < 0.5 < high[1]
    assert low[0] == high[0] == 0.0 and low[2] == high[2] == 1.0  # every resample agrees


def test_profile_fractions_resample_within_strata():
    # each stratum (task) keeps its size in every resample: a stratum whose runs all reach tau
    # holds the pooled fraction at or above its share, and one run alone is held fixed
    fraction, low, high = profile_fractions([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0]],
                                            [0.5], n_boot=500)
    assert fraction[0] == pytest.approx(5 / 8)
    assert low[0] >= 4 / 8 and high[0] < 1.0
    _, single_low, single_high = profile_fractions([[0.3], [0.7]], [0.5])
    assert np.isnan(single_low).all() and np.isnan(single_high).all()


def test_holm_and_fisher_combinations():
    from scipy import stats

    assert holm_rejections([0.001, 0.01, 0.04, 0.5], 0.05) == 2  # 0.04 > 0.05 / 2
    assert holm_rejections([0.2, 0.3], 0.05) == 0
    assert combine_pvalues([0.01, 0.5, 0.9]) == pytest.approx(0.03)
    expected = stats.combine_pvalues([0.01, 0.5, 0.9], method="fisher").pvalue
    assert combine_pvalues([0.01, 0.5, 0.9], "fisher") == pytest.approx(expected)
    assert combine_pvalues([0.0, 0.5], "fisher") < 1e-300  # p = 0 (float underflow) is finite
    assert np.isnan(combine_pvalues([]))


def _bias_frame(pvalues, squares, se=0.01, steps=(0,)):
    rows = []
    for seed, (p, sq) in enumerate(zip(pvalues, squares)):
        for step in steps:
            base = {"task_label": "toy", "estimator_label": "e", "seed": seed, "cell": f"c{seed}",
                    "phase": "gradient", "step": step}
            rows.append({**base, "metric": "grad_bias_pvalue", "value": p})
            half = 1.959964 * se
            rows.append({**base, "metric": "grad_bias_sq", "value": sq, "ci_low": sq - half,
                         "ci_high": sq + half})
    return pd.DataFrame(rows)


def test_bias_size_averages_unclipped_squares_then_takes_one_root():
    """Per-seed squared norms -0.01, 0.0, 0.01 (all noise): clipped norms would be 0, 0, 0.1
    with an interval away from 0; the combined size is 0 with an interval from 0."""
    table = bias_tests(_bias_frame([0.4, 0.9, 0.2], [-0.01, 0.0, 0.01]))
    row = table.iloc[0]
    assert row["bias_norm"] == 0.0 and row["ci_low"] == 0.0
    half = 1.959964 * np.sqrt(3 * 0.01**2) / 3
    assert row["ci_high"] == pytest.approx(np.sqrt(half), rel=1e-4)
    assert not row["bias_detected"] and row["pvalue"] == pytest.approx(0.6)
    assert row["method"] == "holm" and row["tests"] == 3 and row["seeds"] == 3


def test_bias_is_detected_over_seeds_and_checkpoints():
    frame = _bias_frame([1e-5, 0.5, 0.7], [0.04, 0.05, 0.03], steps=(0, 100))
    everywhere = bias_tests(frame).iloc[0]
    assert everywhere["tests"] == 6 and everywhere["pvalue"] == pytest.approx(6e-5)
    assert everywhere["bias_detected"] and everywhere["rejecting"] == 2
    assert everywhere["bias_norm"] == pytest.approx(0.2)
    assert not bias_tests(frame, alpha=1e-5).iloc[0]["bias_detected"]
    assert bias_tests(frame, step="first").iloc[0]["tests"] == 3


def _cell_rows(estimator, seed, rows):
    base = {"run": "r", "cell": f"{estimator}-{seed}", "task": "toy", "task_params": "{}",
            "estimator": estimator, "estimator_label": estimator, "seed": seed,
            "ci_low": np.nan, "ci_high": np.nan}
    return [{**base, "phase": phase, "step": step, "metric": metric, "value": value}
            for phase, step, metric, value in rows]


def test_summary_reads_eval_phase_and_old_train_phase_and_reports_bias():
    rows = []
    for seed in range(3):
        rows += _cell_rows("new", seed, [("eval", 10, "loss_exact", 0.2 + 0.01 * seed),
                                         ("train", 10, "loss", 0.3),
                                         ("train", 10, "loss_estimator", 0.01),
                                         ("gradient", 0, "grad_bias_pvalue", 0.5),
                                         ("gradient", 0, "grad_bias_sq", -1e-4)])
        rows += _cell_rows("old", seed, [("train", 10, "loss_exact", 0.4),
                                         ("train", 10, "loss", 0.4),
                                         ("gradient", 0, "grad_bias_pvalue", 1e-9),
                                         ("gradient", 0, "grad_bias_sq", 0.25)])
    table = summary_table(pd.DataFrame(rows)).set_index("estimator_label")
    assert table.loc["new", "final exact loss"] == pytest.approx(0.21)
    assert table.loc["old", "final exact loss"] == pytest.approx(0.4)
    assert table.loc["new", "final loss at hard z"] == pytest.approx(0.3)  # never loss_estimator
    assert not table.loc["new", "bias detected"] and table.loc["old", "bias detected"]
    assert table.loc["old", "bias norm @0"] == pytest.approx(0.5)
    assert table.loc["new", "interval"] == "t" and "3 seeds" in table.loc["new", "note"]
    shown = format_summary(table.reset_index())
    assert list(shown["bias detected (Holm, 0.001)"]) == ["no (p=1)", "yes (p=3e-09)"]
    assert "test -ELBO" not in shown  # no VAE in this run: no empty columns


def test_vae_summary_leads_with_test_bounds_and_their_sample_count():
    rows = []
    for seed in range(2):
        rows += _cell_rows("rloo", seed, [("eval", 5, "test_neg_elbo", 100.0 + seed),
                                          ("eval", 5, "test_neg_iwae", 95.0 + seed),
                                          ("train", 5, "loss", 101.0)])
    frame = pd.DataFrame(rows).assign(task="bernoulli-vae", task_params='{"eval_samples": 100}')
    shown = format_summary(summary_table(frame))
    assert list(shown.columns[:6]) == ["task_label", "estimator_label", "seeds", "m",
                                       "test -ELBO", "test -IWAE"]
    assert shown["m"].iloc[0] == "100" and shown["test -ELBO"].iloc[0].startswith("100")


def test_verdict_note_only_where_the_verdict_and_the_contract_disagree():
    from analysis.bias import verdict_note

    assert verdict_note("reinmax", False, 0.0, 0.0042) == (
        "declared biased; below resolution (≤ 0.0042); exact for quadratic f")
    assert verdict_note("gst", False, 0.0, np.nan) == "declared biased; below resolution"
    assert "bias norm @0 > 0" in verdict_note("gumbel-softmax", False, 0.9, 1.2)
    assert verdict_note("rloo", True, 0.0, 0.1) == "declared unbiased: suspect the t test"
    assert verdict_note("rloo", False, 0.0, 0.1) == verdict_note("gst", True, 0.0, 0.1) == ""
    assert verdict_note("not-registered", True, 0.0, 0.1) == ""


def test_summary_states_methods_once_and_notes_undetected_declared_bias():
    rows = []
    for seed in range(3):
        for name, p in (("reinmax", 0.5), ("rloo", 0.4)):
            rows += _cell_rows(name, seed, [("train", 10, "loss", 0.3 + 0.01 * seed),
                                            ("gradient", 0, "grad_bias_pvalue", p),
                                            ("gradient", 0, "grad_bias_sq", -1e-4)])
    shown = format_summary(summary_table(pd.DataFrame(rows)))
    notes = dict(zip(shown["estimator_label"], shown["bias note"]))
    assert notes["reinmax"].startswith("declared biased; below resolution") and not notes["rloo"]
    caption = interval_caption(shown)
    assert "3 seeds" in caption and "Student t" in caption and "rough" in caption
    assert {"interval", "note"}.isdisjoint(without_uniform_columns(shown).columns)
    assert "interval" in without_uniform_columns(shown.assign(interval=["t", "bca"]))


def test_a_narrow_interval_gets_digits_and_only_a_point_prints_alone():
    from analysis.summary import _with_interval

    assert _with_interval(198.1, 197.9, 198.3) == "198.1 [197.9, 198.3]"
    assert _with_interval(0.25, 0.25, 0.25) == "0.25"
    assert _with_interval(0.25, np.nan, np.nan) == "0.25"
    assert _with_interval(0.2, 0.1, 0.3) == "0.2 [0.1, 0.3]"
