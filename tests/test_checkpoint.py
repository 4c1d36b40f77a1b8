"""Checkpoints inside a cell, estimator state, evaluation rows and the discrete headline loss.

A resumed cell must return the rows of a cell that never stopped, bit for bit on CPU apart from
the wall-clock: after a crash (an exception from ``on_step``), after SIGKILL of a real process,
and after SIGTERM / SIGINT, which also save the checkpoint and raise ``CellInterrupted``.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL_VAE
from torch import nn

import estbench.cell
from estbench import EstbenchError, Estimate, Estimator, SpecError
from estbench.cell import CellInterrupted, run_cell
from estbench.checkpoint import CheckpointWarning, save_checkpoint
from estbench.registry import ESTIMATORS, TASKS
from estbench.spec import Cell, Measure, parse_spec

#: wall-clock metrics: the only rows a resumed cell may change
WALL_CLOCK = {"wall_time_s"}

MEASURE = Measure(gradient_samples=20, checkpoints=(0, 10, 24), steps=24, log_every=3,
                  eval_every=4, checkpoint_every=5, throughput=False)

STATEFUL = {
    "relax": {},
    "rebar-learned": {"learn": True},
    "nvil": {},
    "reinforce-ema": {"baseline": "ema"},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the machine is shared, and oversubscribed threads slow tiny ops 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(estimator: str, params: dict, seed: int = 3) -> Cell:
    name = estimator.split("-")[0] if estimator not in ESTIMATORS else estimator
    return Cell("bernoulli-toy", {"dim": 3, "batch_size": 4, "init_logit": 0.5}, name, params,
                seed)


def _rows(records: list[dict]) -> pd.DataFrame:
    """The rows that must be equal, in order."""
    return pd.DataFrame([r for r in records if r["metric"] not in WALL_CLOCK])


def _assert_same_rows(a: list[dict], b: list[dict]) -> None:
    pd.testing.assert_frame_equal(_rows(a), _rows(b), check_exact=True)


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def on_step(done: int, total: int) -> None:
        if done == step:
            raise _Crash
    return on_step


def _resume(cell: Cell, measure: Measure, path: Path) -> tuple[list[dict], int]:
    """Run ``cell`` from ``path``; return its rows and the first step it trained."""
    done: list[int] = []
    rows = run_cell(cell, measure, checkpoint=path, on_step=lambda d, t: done.append(d))
    return rows, done[0] - 1


@pytest.mark.parametrize("key", sorted(STATEFUL))
def test_a_crashed_cell_resumes_to_the_rows_of_one_that_never_stopped(key, tmp_path):
    cell = _toy(key, STATEFUL[key])
    full = run_cell(cell, MEASURE)
    path = tmp_path / "cell.pt"
    with pytest.raises(_Crash):
        run_cell(cell, MEASURE, checkpoint=path, on_step=_crash_at(13))
    resumed, first = _resume(cell, MEASURE, path)
    assert first == 10  # the last periodic checkpoint before the crash, not a fresh start
    _assert_same_rows(full, resumed)


@pytest.mark.parametrize("name", ["bernoulli-vae", "categorical-vae"])
def test_a_vae_cell_resumes_to_the_same_rows(name, tmp_path):
    estimator, params = ("relax", {}) if name == "bernoulli-vae" else ("gumbel-softmax", {})
    cell = Cell(name, SMALL_VAE[name], estimator, params, 1)
    measure = replace(MEASURE, gradient_samples=4, steps=8, checkpoints=(0, 6), log_every=2,
                      checkpoint_every=3)
    full = run_cell(cell, measure)
    path = tmp_path / "cell.pt"
    with pytest.raises(_Crash):
        run_cell(cell, measure, checkpoint=path, on_step=_crash_at(5))
    resumed, first = _resume(cell, measure, path)
    assert first == 3
    _assert_same_rows(full, resumed)
    assert {"test_neg_elbo", "test_neg_iwae"} <= {r["metric"] for r in full
                                                  if r["phase"] == "eval"}


def test_a_changed_checkpoint_every_still_resumes_and_a_resumed_cell_can_stop_again(tmp_path):
    cell = _toy("relax", {})
    full = run_cell(cell, MEASURE)
    path = tmp_path / "cell.pt"
    with pytest.raises(_Crash):
        run_cell(cell, MEASURE, checkpoint=path, on_step=_crash_at(7))
    again = replace(MEASURE, checkpoint_every=2)
    with pytest.raises(_Crash):
        run_cell(cell, again, checkpoint=path, on_step=_crash_at(19))
    resumed, first = _resume(cell, again, path)
    assert first == 18
    _assert_same_rows(full, resumed)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_checkpoint_and_raises_cell_interrupted(signum, tmp_path):
    cell = _toy("nvil", {})
    measure = replace(MEASURE, checkpoint_every=0)  # saved only because of the signal
    full = run_cell(cell, measure)
    path = tmp_path / "cell.pt"
    before = signal.getsignal(signum)

    def send(done: int, total: int) -> None:
        if done == 8:
            os.kill(os.getpid(), signum)

    with pytest.raises(CellInterrupted, match=f"{signal.Signals(signum).name} at step 8 of 24"):
        run_cell(cell, measure, checkpoint=path, on_step=send)
    assert signal.getsignal(signum) is before
    assert torch.load(path, weights_only=True)["step"] == 8
    resumed, first = _resume(cell, measure, path)
    assert first == 8
    _assert_same_rows(full, resumed)


def test_a_signal_during_a_gradient_phase_keeps_its_rows_and_never_repeats_it(tmp_path,
                                                                             monkeypatch):
    cell = _toy("relax", {})
    full = run_cell(cell, MEASURE)
    path = tmp_path / "cell.pt"
    phase = estbench.cell._gradient_phase
    calls: list[int] = []

    def gradient_phase(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the phase at step 10
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the phase
        return phase(*args, **kwargs)

    monkeypatch.setattr(estbench.cell, "_gradient_phase", gradient_phase)
    with pytest.raises(CellInterrupted, match="at step 10 of 24"):
        run_cell(cell, replace(MEASURE, checkpoint_every=0), checkpoint=path)
    assert torch.load(path, weights_only=True)["measured"]
    resumed, first = _resume(cell, replace(MEASURE, checkpoint_every=0), path)
    assert first == 10 and len(calls) == 3  # steps 0, 10 and 24, each once
    _assert_same_rows(full, resumed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_cell_resumes_to_the_same_rows(tmp_path):
    cell = _toy("relax", {})
    full = pd.DataFrame(run_cell(cell, MEASURE, "cuda"))
    path = tmp_path / "cell.pt"
    with pytest.raises(_Crash):
        run_cell(cell, MEASURE, "cuda", checkpoint=path, on_step=_crash_at(13))
    resumed = pd.DataFrame(run_cell(cell, MEASURE, "cuda", checkpoint=path))
    kept = ~full["metric"].isin(WALL_CLOCK)
    pd.testing.assert_frame_equal(full[kept], resumed[kept], rtol=1e-5)


LONG_CELL_SCRIPT = """
import sys, time
import torch
from estbench.cell import CellInterrupted, run_cell
from estbench.spec import Cell, Measure

torch.set_num_threads(1)
cell = Cell("bernoulli-toy", {"dim": 3, "batch_size": 4, "init_logit": 0.5}, "relax", {}, 5)
measure = Measure(gradient_samples=20, checkpoints=(0, 300), steps=600, log_every=10,
                  checkpoint_every=25, throughput=False)
try:
    run_cell(cell, measure, checkpoint=sys.argv[1],
             on_step=lambda done, total: time.sleep(0.005))
except CellInterrupted:
    sys.exit(3)
"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_long_cell_killed_from_outside_resumes_to_the_same_rows(signum, tmp_path):
    """SIGKILL loses at most one checkpoint interval; SIGTERM saves where it stopped."""
    path = tmp_path / "cell.pt"
    script = tmp_path / "long_cell.py"
    script.write_text(textwrap.dedent(LONG_CELL_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(script), str(path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.02)  # a step or two past the first checkpoint
        process.send_signal(signum)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 3)  # stopped, not finished
    saved_step = torch.load(path, weights_only=True)["step"]
    assert 25 <= saved_step < 600
    if signum == signal.SIGKILL:
        assert saved_step % 25 == 0  # the last periodic checkpoint
    measure = Measure(gradient_samples=20, checkpoints=(0, 300), steps=600, log_every=10,
                      checkpoint_every=25, throughput=False)
    cell = Cell("bernoulli-toy", {"dim": 3, "batch_size": 4, "init_logit": 0.5}, "relax", {}, 5)
    resumed, first = _resume(cell, measure, path)
    assert first == saved_step
    _assert_same_rows(run_cell(cell, measure), resumed)


def test_a_save_is_atomic_and_clears_what_a_killed_save_left(tmp_path):
    path = tmp_path / "checkpoints" / "cell.pt"
    save_checkpoint(path, {"step": 1})
    stale = path.parent / ".cell.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["cell.pt"]


def _interrupted_checkpoint(cell: Cell, measure: Measure, path: Path) -> None:
    with pytest.raises(_Crash):
        run_cell(cell, measure, checkpoint=path, on_step=_crash_at(7))


@pytest.mark.parametrize("change", ["seed", "measure", "garbage"])
def test_a_foreign_or_unreadable_checkpoint_is_ignored_with_a_warning(change, tmp_path):
    cell = _toy("reinforce-ema", {"baseline": "ema"})
    path = tmp_path / "cell.pt"
    _interrupted_checkpoint(cell, MEASURE, path)
    measure = MEASURE
    if change == "seed":
        cell = replace(cell, seed=4)
    elif change == "measure":
        measure = replace(MEASURE, lr=0.02)
    else:
        path.write_bytes(b"not a checkpoint")
    expected = "unreadable" if change == "garbage" else "another cell or setting"
    with pytest.warns(CheckpointWarning, match=expected):
        started = run_cell(cell, measure, checkpoint=path)
    _assert_same_rows(run_cell(cell, measure), started)


# estimator state ---------------------------------------------------------------------------
def _train(estimator: Estimator, steps: int, seed: int) -> tuple[dict, torch.Tensor]:
    """``steps`` training calls on a small Bernoulli task; returns the task's parameters and
    the last gradient w.r.t. them."""
    task = TASKS.get("bernoulli-toy")(dim=3, batch_size=4, init_logit=0.3)
    params = task.init(torch.Generator().manual_seed(0))
    torch.manual_seed(seed)
    for step in range(steps):
        estimator.train(True)
        estimator.begin_step(step)
        estimate = estimator.estimate(task.logits(params, None), task.cost(params, None),
                                      task.latent)
        params["logits"].grad = None
        estimate.surrogate.mean().backward()
        estimator.update(estimate)
    return params, params["logits"].grad.clone()


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", [n for n in ESTIMATORS.names()
                                  if "bernoulli" in ESTIMATORS.get(n).supports])
def test_every_estimator_continues_identically_from_its_saved_state(name):
    cls = ESTIMATORS.get(name)
    original = cls()
    _train(original, 4, seed=1)
    restored = cls()
    restored.load_state_dict(_round_trip(original.state_dict()))
    _, expected = _train(original, 3, seed=2)
    _, got = _train(restored, 3, seed=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert restored.step == original.step == 2


def test_relax_state_holds_its_network_optimiser_and_learned_scalars():
    relax = ESTIMATORS.get("relax")()
    _train(relax, 3, seed=0)
    state = relax.state_dict()["attributes"]["_state"][1]
    assert set(state["modules"]) == {"net"} and state["optimizer"]["state"]
    assert state["learned"] == {"eta": True, "log_temperature": True}
    fresh = ESTIMATORS.get("relax")()
    assert "net" not in fresh._state.modules  # created lazily; loading rebuilds it
    fresh.load_state_dict(_round_trip(relax.state_dict()))
    assert fresh.current_temperature == relax.current_temperature != 0.5


@dataclass(kw_only=True)
class _PluginWithTorchState(Estimator):
    """A plugin whose state is a tensor, a module, an optimiser and plain numbers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scale = torch.zeros(3)
        self.net = nn.Linear(3, 1)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
        self.calls = 0
        self.history: list[float] = []

    def _estimate(self, logits, f, latent):
        z = latent.sample(logits)
        cost = f(z)
        return Estimate(cost.detach() * latent.log_prob(logits, z) + cost, cost.detach(), 1)

    def update(self, estimate: Estimate) -> None:
        self.calls += 1
        self.history.append(float(estimate.value.mean()))
        self.scale += 1
        self.optimizer.zero_grad()
        self.net(self.scale).sum().backward()
        self.optimizer.step()


def test_the_default_state_covers_tensors_modules_optimisers_and_numbers():
    plugin = _PluginWithTorchState()
    _train(plugin, 3, seed=0)
    fresh = _PluginWithTorchState()
    fresh.load_state_dict(_round_trip(plugin.state_dict()))
    assert fresh.calls == 3 and fresh.history == plugin.history
    torch.testing.assert_close(fresh.scale, plugin.scale, rtol=0, atol=0)
    for a, b in zip(fresh.net.parameters(), plugin.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    plugin.update(Estimate(torch.zeros(1), torch.zeros(1), 1))
    fresh.update(Estimate(torch.zeros(1), torch.zeros(1), 1))  # momentum buffers restored too
    for a, b in zip(fresh.net.parameters(), plugin.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ESTIMATORS.get("gumbel-softmax")().state_dict() == {"step": 0, "attributes": {}}


def test_state_the_default_cannot_save_is_refused_by_name():
    plugin = _PluginWithTorchState()
    plugin.callback = lambda: None
    with pytest.raises(EstbenchError, match="cannot checkpoint attribute 'callback' of type "
                                            "function; .*override"):
        plugin.state_dict()


# the discrete headline loss and the evaluation rows -----------------------------------------
def _window_losses(estimator: str, params: dict) -> dict[str, np.ndarray]:
    """Per-step losses of 200 steps on categorical-toy at (essentially) fixed parameters."""
    measure = Measure(gradient_samples=2, checkpoints=(), steps=200, log_every=1,
                      optimizer="sgd", lr=1e-12, throughput=False)
    cell = Cell("categorical-toy", {"dim": 3, "categories": 4, "batch_size": 50},
                estimator, params, 0)
    rows = pd.DataFrame(run_cell(cell, measure))
    return {f"{phase}/{metric}": group["value"].to_numpy()
            for (phase, metric), group in rows.groupby(["phase", "metric"])}


def test_gumbel_softmax_loss_is_the_discrete_objective_and_loss_estimator_is_not():
    values = _window_losses("gumbel-softmax", {"temperature": 1.0})
    exact = values["eval/loss_exact"]
    assert np.ptp(exact) < 1e-6  # the parameters did not move
    for metric, within in (("train/loss", True), ("train/loss_estimator", False)):
        x = values[metric]
        z = (x.mean() - exact[0]) / (x.std(ddof=1) / np.sqrt(len(x)))
        assert (abs(z) < 4) == within, (metric, z)


def test_the_discrete_loss_draws_leave_the_training_trajectory_unchanged(monkeypatch):
    cell = _toy("relax", {})
    before = pd.DataFrame(run_cell(cell, MEASURE))
    monkeypatch.setattr(estbench.cell, "DISCRETE_LOSS_SEED_OFFSET", 12345)
    after = pd.DataFrame(run_cell(cell, MEASURE))
    loss = before["metric"] == "loss"
    assert (before.loc[loss, "value"] != after.loc[loss, "value"]).any()
    kept = ~before["metric"].isin(WALL_CLOCK | {"loss"})
    pd.testing.assert_frame_equal(before[kept], after[kept], check_exact=True)


def test_evaluation_rows_are_phase_eval_with_the_wall_clock_beside_them():
    measure = replace(MEASURE, log_every=5, eval_every=4)
    rows = pd.DataFrame(run_cell(_toy("reinforce-ema", {"baseline": "ema"}), measure))
    evaluation = rows[rows["phase"] == "eval"]
    assert set(evaluation["metric"]) == {"loss_exact"}
    assert set(evaluation["step"]) == {0, 4, 8, 12, 16, 20, 24}
    wall = rows[(rows["phase"] == "train") & (rows["metric"] == "wall_time_s")]
    assert set(evaluation["step"]) <= set(wall["step"])
    train_metrics = set(rows.loc[rows["phase"] == "train", "metric"])
    assert train_metrics == {"loss", "loss_estimator", "grad_var_ema", "wall_time_s"}


def test_checkpoint_every_must_be_a_non_negative_integer():
    spec = {"name": "x", "task": [{"name": "bernoulli-toy"}],
            "estimator": [{"name": "reinforce"}]}
    assert parse_spec(spec).measure.checkpoint_every == 1000
    for bad in (-1, 2.5, True):
        with pytest.raises(SpecError, match="checkpoint_every"):
            parse_spec({**spec, "measure": {"checkpoint_every": bad}})
