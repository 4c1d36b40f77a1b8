"""Figures and their tables on small synthetic frames: styles, log axes, sparse checkpoints,
temperature defaults, performance profiles, run deltas, and no global style change."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import figures, panels
from analysis.styles import FAMILIES, config_styles, family_of
from estbench.registry import ESTIMATORS, load_builtins

QUICK_CONFIGS = [
    ("reinforce", "reinforce"), ("reinforce(baseline=ema)", "reinforce"), ("rloo", "rloo"),
    ("rloo(samples=4)", "rloo"), ("gumbel-softmax", "gumbel-softmax"),
    ("gumbel-softmax(temperature=0.5)", "gumbel-softmax"),
    *((name, name) for name in ("straight-through", "st-gumbel-softmax", "exact", "arm",
                                "disarm", "reinmax", "gst", "gst-p", "gumbel-rao", "relax",
                                "muprop", "nvil", "unordered-set", "indecater")),
    ("rebar(learn=True)", "rebar"),
]


def test_importing_figures_leaves_matplotlib_settings_unchanged():
    code = ("import matplotlib as mpl; before = mpl.rcParams.copy(); "
            "import analysis.figures, analysis.report; after = mpl.rcParams.copy(); "
            "changed = [k for k in before if before[k] != after[k]]; "
            "assert not changed, changed")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_twenty_one_configurations_get_distinct_styles_coloured_by_family():
    load_builtins()
    assert len(QUICK_CONFIGS) == 21
    styles = config_styles(QUICK_CONFIGS)
    looks = {(s.color, s.linestyle, s.marker) for s in styles.values()}
    assert len(looks) == 21
    for label, name in QUICK_CONFIGS:
        assert styles[label].family == family_of(name) != "other"
    within = [s for s in styles.values() if s.family == "straight-through"]
    assert len({(s.linestyle, s.marker) for s in within}) == len(within) == 6
    builtins = [n for n in ESTIMATORS.names()
                if ESTIMATORS.get(n).__module__.rsplit(".", 1)[0].endswith("estimators")]
    assert {family_of(n) for n in builtins} == {name for name, _ in FAMILIES.values()}
    assert family_of("not-registered") == "other"


def _curve(values: dict[str, list[float]], steps=(0, 250), run="r", task="toy") -> pd.DataFrame:
    rows = []
    for est, vals in values.items():
        for step, v in zip(steps, vals):
            rows.append({"run_label": run, "task_label": task, "estimator_label": est,
                         "estimator": est.split("(")[0], "step": step, "wall_time_s": np.nan,
                         "value": v, "ci_low": v * 0.8, "ci_high": v * 1.25, "seeds": 3})
    return pd.DataFrame(rows)


def _data_lines(fig):
    """Lines that join two or more data points (markers joined by a line)."""
    return [line for ax in fig.axes for line in ax.get_lines()
            if line.get_marker() not in (None, "None", "") and len(line.get_xdata()) > 1
            and line.get_linestyle() not in ("None", "", " ")]


def test_log_axes_leave_zeros_off_with_a_note_and_take_limits_from_the_data():
    table = _curve({"rloo": [1e-2, 2e-3], "exact": [0.0, 1e-21], "arm": [3e-3, np.inf]})
    fig = figures.plot_curves(table, ylabel="variance", log_y=True)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 1e-4 < low < 2e-3 * 0.8 and 1.25e-2 <= high < 1e-1
    note = " ".join(t.get_text() for t in fig.texts)
    assert "Not drawn" in note and "exact" in note and "arm" not in note.split("]")[1]
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert len(labels) == len(set(labels)) <= 8


def test_two_checkpoints_are_points_with_intervals_and_many_steps_are_lines():
    sparse = figures.plot_curves(_curve({"rloo": [1.0, 2.0], "arm": [3.0, 4.0]}),
                                 ylabel="variance")
    assert not _data_lines(sparse)
    dense = figures.plot_curves(_curve({"rloo": [1.0, 2.0, 3.0]}, steps=(0, 10, 20)),
                                ylabel="loss")
    assert len(_data_lines(dense)) == 1


def _gradient_rows(configs: dict[str, tuple[str, dict]], metric="grad_var_total") -> pd.DataFrame:
    rows = []
    for label, (name, params) in configs.items():
        for seed in range(2):
            rows.append({"run_label": "r", "run": "r", "task_label": "toy",
                         "cell": f"{label}{seed}",
                         "estimator_label": label, "estimator": name,
                         "estimator_params": json.dumps(params), "seed": seed, "phase": "gradient",
                         "step": 0, "metric": metric, "value": 1.0 + seed,
                         "ci_low": np.nan, "ci_high": np.nan})
    return pd.DataFrame(rows)


def test_the_default_temperature_configuration_gets_the_registered_default():
    load_builtins()
    configs = {"gumbel-softmax": ("gumbel-softmax", {}),
               "gumbel-softmax(temperature=0.5)": ("gumbel-softmax", {"temperature": 0.5}),
               "rebar": ("rebar", {}), "rloo": ("rloo", {})}
    rows = pd.concat([_gradient_rows(configs, m)
                      for m in ("grad_var_total", "grad_bias_sq", "grad_bias_pvalue")])
    table = panels.temperature_table(rows)
    assert set(table["line"]) == {"gumbel-softmax"}  # rebar: one temperature; rloo: none
    assert sorted(set(table["temperature"])) == [0.5, 1.0]
    assert set(table["metric"]) == {"bias", "variance"}


def test_bias_in_figures_is_combined_over_seeds_never_a_mean_of_clipped_norms():
    """Per-seed squared-norm estimates -0.01 and 0.01 (noise around 0): clipped per-seed norms
    0 and 0.1 would draw an unbiased estimator at 0.05; combined, the bias is 0."""
    rows = pd.concat([_gradient_rows({"rloo": ("rloo", {})}, m)
                      for m in ("grad_var_total", "grad_bias_sq", "grad_bias_pvalue")])
    squares = rows["metric"] == "grad_bias_sq"
    rows.loc[squares, "value"] = [-0.01, 0.01]
    rows.loc[squares, "ci_low"] = [-0.03, -0.01]
    rows.loc[squares, "ci_high"] = [0.01, 0.03]
    row = panels.bias_variance_table(rows).iloc[0]
    assert row["bias"] == 0.0 and row["bias_lo"] == 0.0 and 0 < row["bias_hi"] < 0.2


def test_performance_profile_fractions():
    rows = []
    for task, offset in (("t1", 0.0), ("t2", 10.0)):
        for est, vals in {"good": [0.0, 0.0], "mid": [0.0, 1.0], "bad": [1.0, 1.0]}.items():
            for seed, v in enumerate(vals):
                rows.append({"run_label": "r", "task_label": task, "estimator_label": est,
                             "estimator": est, "cell": f"{task}{est}{seed}", "seed": seed,
                             "phase": "eval", "step": 5, "metric": "loss_exact",
                             "value": offset + v})
    profile = panels.performance_profile(pd.DataFrame(rows), taus=3).set_index(
        ["estimator_label", "tau"])
    assert profile.loc[("good", 0.0), "fraction"] == 1.0
    assert profile.loc[("mid", 0.0), "fraction"] == 0.5
    assert profile.loc[("bad", 0.5), "fraction"] == 0.0
    assert profile.loc[("bad", 1.0), "fraction"] == 1.0
    assert (profile["lo"] <= profile["fraction"]).all()
    assert (profile["fraction"] <= profile["hi"]).all()


def test_run_deltas_pair_seeds_and_skip_configurations_missing_from_a_run():
    frames = []
    for run, shift in (("a", 0.0), ("b", 1.0)):
        for seed, base in enumerate([1.0, 5.0, 9.0]):
            for est in ("x", "y") if run == "a" else ("x",):
                frames.append({"run_label": run, "task_label": "toy", "estimator_label": est,
                               "cell": f"{est}{seed}", "seed": seed, "phase": "train",
                               "step": 5, "metric": "loss_exact", "value": base + shift})
    deltas = panels.run_deltas(pd.DataFrame(frames), "a",
                               (("final loss", "train", "loss_exact", "last"),))
    several_phases = panels.run_deltas(pd.DataFrame(frames), "a",
                                       (("final loss", ("eval", "train"), "loss_exact", "last",
                                         None),))
    pd.testing.assert_frame_equal(deltas, several_phases)
    assert len(deltas) == 1
    row = deltas.iloc[0]
    assert (row["run_label"], row["estimator_label"], row["seeds"]) == ("b", "x", 3)
    assert row["delta"] == pytest.approx(1.0) and row["ci_low"] == pytest.approx(1.0)
    assert row["ci_high"] == pytest.approx(1.0)


@pytest.mark.parametrize("span", [1.05, 3.0, 30.0, 1e3, 1e8])
def test_log_ticks_are_few_distinct_and_inside_the_data_range(span):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.subplots()
    ax.set_yscale("log")
    ax.plot([0, 1], [2e-4, 2e-4 * span])
    figures._readable_log(ax.yaxis, [2e-4, 2e-4 * span])
    fig.draw_without_rendering()
    low, high = ax.get_ylim()
    assert low < 2e-4 and 2e-4 * span < high < 2e-4 * span * 10
    shown = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels()
             if t.get_text() and low <= t.get_position()[1] <= high]
    texts = [text for _, text in shown]
    assert 2 <= len(shown) <= 8 and len(set(texts)) == len(texts), texts
