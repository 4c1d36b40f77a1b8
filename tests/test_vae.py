"""VAE tasks on real data: loaders, preprocessing, bounds, and gradient quality on a network."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from estbench import EstbenchError, load_results
from estbench.cli import main
from estbench.gradients import reference_gradient, reference_logits_gradient, stream_draws
from estbench.metrics import StreamingGradientMetrics
from estbench.registry import ESTIMATORS, TASKS
from tasks.data import Preprocessor, load_images, read_chardata, read_idx, resolve_data_dir

from conftest import DATA_IS_REAL, SMALL_VAE
from data_fixtures import write_fixture_data


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("fixture-data"))


def test_idx_reader_and_splits_on_fixture_files(fixture_dir):
    images = read_idx(fixture_dir / "mnist" / "train-images-idx3-ubyte.gz")
    assert images.shape == (120, 28, 28) and images.dtype == np.uint8
    train = load_images("mnist", "train", fixture_dir, download=False, verify=False)
    valid = load_images("mnist", "valid", fixture_dir, download=False, verify=False)
    assert train.shape == (100, 784) and valid.shape == (20, 784)
    assert 0.0 <= float(train.min()) and float(train.max()) <= 1.0


def test_omniglot_reader_on_a_file_the_test_writes(fixture_dir):
    arrays = read_chardata(fixture_dir / "omniglot" / "chardata.mat")
    assert arrays["train"].shape == (120, 784) and arrays["test"].shape == (40, 784)
    written = read_idx(fixture_dir / "mnist" / "train-images-idx3-ubyte.gz")  # same generator
    assert arrays["train"].max() <= 1.0 and written.max() > 1


def test_checksum_mismatch_is_a_clear_error(fixture_dir):
    with pytest.raises(EstbenchError, match="does not match its published checksum"):
        load_images("fashion-mnist", "test", fixture_dir, download=False, verify=True)


def test_missing_data_without_network_says_which_file_goes_where(tmp_path):
    with pytest.raises(EstbenchError) as err:
        load_images("fashion-mnist", "train", tmp_path / "empty", download=True)
    message = str(err.value)
    assert "fashion-mnist/train-images-idx3-ubyte.gz is missing" in message
    assert str(tmp_path / "empty") in message and "ESTBENCH_DATA" in message
    assert "\n" not in message


def test_data_dir_option_beats_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ESTBENCH_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "option") == tmp_path / "option"
    monkeypatch.delenv("ESTBENCH_DATA")
    assert str(resolve_data_dir(None)) == "data"


@pytest.mark.skipif(not DATA_IS_REAL, reason="needs ../shared/data (the real files)")
def test_real_files_verify_and_match_their_published_statistics():
    train = load_images("mnist", "train")
    test = load_images("mnist", "test")
    assert train.shape == (50_000, 784) and test.shape == (10_000, 784)
    assert float(test.mean() * 255) == pytest.approx(33.79, abs=0.01)
    binary = load_images("binarized-mnist", "test")
    assert binary.shape == (10_000, 784) and float(binary.mean()) == pytest.approx(0.13251, abs=1e-5)
    fashion = load_images("fashion-mnist", "test")
    assert float(fashion.mean() * 255) == pytest.approx(73.15, abs=0.01)


def test_binarized_amat_text_format(tmp_path):
    rows = (np.random.default_rng(0).random((5, 784)) > 0.8).astype(np.uint8)
    for split in ("train", "valid", "test"):
        np.savetxt(tmp_path / f"binarized_mnist_{split}.amat", rows, fmt="%d")
    images = load_images("binarized-mnist", "valid", tmp_path, download=False, verify=False)
    assert torch.equal(images, torch.from_numpy(rows.astype(np.float32)))


def test_preprocessing_modes():
    grey = torch.tensor([[0.2, 0.6, 0.5, 0.9]])
    assert torch.equal(Preprocessor("threshold").fixed(grey), torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    static = Preprocessor("static", seed=3)
    assert torch.equal(static.fixed(grey), static.fixed(grey))
    dynamic = Preprocessor("dynamic")
    many = grey.expand(20_000, 4)
    draws = dynamic.per_batch(many, torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert (draws.mean(0) - grey[0]).abs().max() < 0.02
    again = dynamic.per_batch(many, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    with pytest.raises(EstbenchError, match="preprocess must be one of"):
        Preprocessor("sharpen")


def _vae(name, **overrides):
    task = TASKS.get(name).from_params({**SMALL_VAE[name], **overrides})
    generator = torch.Generator().manual_seed(0)
    return task, task.init(generator), generator


def test_iwae_bound_is_tighter_and_chunking_does_not_change_it():
    task, params, _ = _vae("categorical-vae", eval_samples=50)
    images = task._eval_sets["test"]
    a = task.bounds(params, images, 50, torch.Generator().manual_seed(1), chunk=3)
    b = task.bounds(params, images, 50, torch.Generator().manual_seed(1), chunk=10)
    assert (a["neg_iwae"] <= a["neg_elbo"] + 1e-4).all()
    if task.preprocess != "dynamic":
        torch.testing.assert_close(a["neg_iwae"], b["neg_iwae"])
    metrics = task.evaluate(params, torch.Generator())
    assert {"test_neg_iwae", "test_neg_elbo", "test_neg_elbo_1", "train_neg_iwae"} <= set(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rloo", "disarm"])
def test_exact_bias_on_a_real_network_by_enumeration(name):
    """An unbiased estimator's mean matches the exact gradient of the VAE objective w.r.t. the
    encoder weights and w.r.t. the logits, enumerating the 2^3 or 3^2 latent states."""
    task_name = "bernoulli-vae" if name == "disarm" else "categorical-vae"
    task, params, generator = _vae(task_name)
    batch = task.gradient_batch(generator)
    reference = reference_gradient(task, params, batch)
    logit_reference = reference_logits_gradient(task, params, batch)

    def streamed(estimator_name):
        params_stats = StreamingGradientMetrics(reference)
        logit_stats = StreamingGradientMetrics(logit_reference)
        draws = 4000 if task_name == "bernoulli-vae" else 1500  # ~1M parameters replicated
        for grads, logit_grads in stream_draws(task, ESTIMATORS.get(estimator_name)(), params,
                                               batch, draws):
            params_stats.add(grads)
            logit_stats.add(logit_grads)
        return ({m.metric: m for m in params_stats.metrics()},
                {m.metric: m for m in logit_stats.metrics()})

    for metrics in streamed(name):
        assert metrics["grad_bias_pvalue"].value > 1e-3, metrics["grad_bias_z"]
    biased, _ = streamed("straight-through")
    assert biased["grad_bias_pvalue"].value < 1e-3  # and the test can fail


SPEC = """
name = "vae-small"
seeds = [0]

[measure]
gradient_samples = 200
reference_samples = 2000
checkpoints = [0, 6]
steps = 6
log_every = 3
eval_every = 6
throughput_min_time = 0.01
"""


def test_runner_on_vaes_records_groups_references_bounds_and_trajectory(tmp_path):
    tables = []
    for name, overrides in (("categorical-vae", {}), ("bernoulli-vae", {"latents": 20})):
        params = {**SMALL_VAE[name], **overrides, "data_dir": str(resolve_data_dir(None))}
        tables.append(f'[[task]]\nname = "{name}"\n' + "\n".join(
            f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}".replace("'", '"')
            for k, v in params.items()))
    spec = tmp_path / "vae.toml"
    spec.write_text(textwrap.dedent(SPEC) + "\n".join(tables)
                    + '\n[[estimator]]\nname = "st-gumbel-softmax"\n')
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    results = load_results(out)
    grad = results[results["phase"] == "gradient"]
    metrics = set(grad["metric"])
    for prefix in ("", "encoder/", "logits/"):
        assert {prefix + "grad_var_total", prefix + "grad_bias_norm", prefix + "grad_cosine"} <= metrics
    small = grad[grad["task"] == "categorical-vae"]
    assert "grad_ref_se_norm" not in set(small["metric"])  # 9 states: exact by enumeration
    large = grad[grad["task"] == "bernoulli-vae"]
    assert (large[large["metric"] == "grad_ref_se_norm"]["value"] > 0).all()  # 2^20: sampled
    train = results[results["phase"] == "train"]
    assert {"grad_var_ema", "encoder/grad_var_ema", "loss", "loss_estimator",
            "wall_time_s"} <= set(train["metric"])
    evaluation = results[results["phase"] == "eval"]
    assert {"test_neg_iwae", "test_neg_elbo", "train_neg_elbo_1"} <= set(evaluation["metric"])
    assert set(evaluation[evaluation["metric"] == "test_neg_iwae"]["step"]) == {0, 6}
    bounds = evaluation.pivot_table(index=["task", "step"], columns="metric", values="value")
    bounds = bounds[["test_neg_iwae", "test_neg_elbo"]].dropna()
    assert len(bounds) == 4 and (bounds["test_neg_iwae"] <= bounds["test_neg_elbo"] + 1e-4).all()
    values = train.pivot_table(index=["task", "step"], columns="metric", values="value")
    assert (values["grad_var_ema"].dropna() >= 0).all()


def test_a_vae_spec_without_data_stops_before_running(tmp_path, capsys):
    spec = tmp_path / "nodata.toml"
    spec.write_text(textwrap.dedent(f"""
        name = "nodata"
        [[task]]
        name = "categorical-vae"
        dataset = "fashion-mnist"
        data_dir = "{tmp_path / 'nowhere'}"
        [[estimator]]
        name = "reinforce"
    """))
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fashion-mnist/train-images-idx3-ubyte.gz is missing" in err
    assert not out.exists()
