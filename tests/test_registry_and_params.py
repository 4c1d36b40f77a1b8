from dataclasses import dataclass

import pytest

from estbench import Estimator, EstbenchError, register_estimator
from estbench.registry import ESTIMATORS, TASKS, load_plugin


def test_unknown_name_suggests_the_closest_and_lists_all():
    with pytest.raises(EstbenchError) as err:
        ESTIMATORS.get("gumbel")
    msg = str(err.value)
    assert msg.startswith("Unknown estimator 'gumbel'. Did you mean: ")
    assert "gumbel-softmax" in msg.split("?")[0] and "gumbel-rao" in msg.split("?")[0]
    assert "Available:" in msg and "reinforce" in msg
    with pytest.raises(EstbenchError, match="Unknown task 'bernoulli'"):
        TASKS.get("bernoulli")


def test_duplicate_registration_is_an_error():
    with pytest.raises(EstbenchError, match="duplicate estimator name 'reinforce'"):

        @register_estimator("reinforce")
        @dataclass(kw_only=True)
        class Impostor(Estimator):
            def _estimate(self, logits, f, latent):
                raise NotImplementedError


def test_user_plugin_from_a_path_registers_and_is_unbiased():
    load_plugin("examples/my_estimators.py")
    cls = ESTIMATORS.get("fixed-baseline")
    assert cls.unbiased and cls(b=0.5).b == 0.5
    load_plugin("examples/my_estimators.py")  # idempotent


def test_missing_plugin_is_a_clear_error():
    with pytest.raises(EstbenchError, match="plugin module 'no_such_module' was not found"):
        load_plugin("no_such_module")
    with pytest.raises(EstbenchError, match="does not exist"):
        load_plugin("nowhere/plugin.py")


@pytest.mark.parametrize(
    "name,params,pattern",
    [
        ("gumbel-softmax", {"temperature": 0}, r"temperature must be > 0.0, got 0"),
        ("gumbel-softmax", {"temperature": -1.5}, r"temperature must be > 0.0, got -1.5"),
        ("gumbel-softmax", {"temperature": "hot"}, r"temperature must be a number, got 'hot'"),
        ("reinforce", {"baseline": "loo", "samples": 1}, r"samples must be >= 2 .* got 1"),
        ("rloo", {"samples": 1}, r"samples must be >= 2, got 1"),
        ("reinforce", {"samples": 2.5}, r"samples must be an integer, got 2.5"),
        ("reinforce", {"baseline": "mean"}, r"baseline must be one of 'none', 'ema', 'loo'"),
        ("reinforce", {"smaples": 2}, r"unknown parameter 'smaples'.*Did you mean: samples\?"),
        ("straight-through", {"anneal_rate": 0.1, "min_temperature": 2.0},
         r"min_temperature must be <= temperature"),
    ],
)
def test_bad_hyperparameters_name_the_value(name, params, pattern):
    with pytest.raises(EstbenchError, match=pattern):
        ESTIMATORS.get(name).from_params(params)


def test_temperature_schedule():
    est = ESTIMATORS.get("gumbel-softmax")(
        temperature=2.0, anneal_rate=0.01, min_temperature=0.5, anneal_every=100
    )
    est.begin_step(0)
    assert est.current_temperature() == 2.0
    est.begin_step(150)  # updated at step 100 only
    assert est.current_temperature() == pytest.approx(2.0 * 2.718281828 ** (-1.0))
    est.begin_step(10_000)
    assert est.current_temperature() == 0.5


def test_label_shows_non_defaults():
    assert ESTIMATORS.get("reinforce")(baseline="loo", samples=4).label() == (
        "reinforce(baseline=loo, samples=4)"
    )
    assert ESTIMATORS.get("exact")().label() == "exact"


def test_estimate_rejects_logits_of_the_wrong_shape():
    import torch

    from estbench.latents import Latent

    est = ESTIMATORS.get("reinforce")()
    with pytest.raises(EstbenchError, match=r"logits of shape \(4, 3\)"):
        est.estimate(torch.zeros(4, 3), lambda z: z.sum(-1), Latent("bernoulli", 5))


def test_entry_point_plugins_are_loaded(tmp_path, monkeypatch):
    """An installed distribution declaring the estbench.estimators group is picked up."""
    from estbench.registry import Registry

    (tmp_path / "ep_plugin_mod.py").write_text(
        "from dataclasses import dataclass\n"
        "from estbench import Estimator\n"
        "@dataclass(kw_only=True)\n"
        "class ViaEntryPoint(Estimator):\n"
        "    def _estimate(self, logits, f, latent):\n"
        "        raise NotImplementedError\n"
    )
    info = tmp_path / "ep_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[estbench.estimators]\nvia-entry-point = ep_plugin_mod:ViaEntryPoint\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("estimator", "estimators", "estbench.estimators")
    cls = registry.get("via-entry-point")
    assert cls.__name__ == "ViaEntryPoint" and cls.name == "via-entry-point"
