"""Memory budgets: measured peaks, chunked enumeration and draws within the budget, deterministic
estimators drawn once, the throughput phase's per-call peak, and the CUDA paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from estbench.cell import _gradient_phase
from estbench.errors import EstbenchError, SpecError
from estbench.gradients import (
    METHODS,
    plan_draws,
    reference_gradient,
    sample_gradients,
    stream_draws,
)
from estbench.latents import Latent, expectation_by_enumeration, states_per_chunk
from estbench.memory import MIB, budget_bytes, memory_budget, peak_bytes
from estbench.metrics import gradient_metrics
from estbench.registry import ESTIMATORS, TASKS
from estbench.spec import Measure, parse_spec
from estbench.throughput import measure_throughput

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FLOAT = 4


def _encoder_task(dim: int = 10, batch_size: int = 4):
    task = TASKS.get("test-encoder")(dim=dim, batch_size=batch_size)
    return task, task.init(torch.Generator().manual_seed(0))


# measured peaks -------------------------------------------------------------------------------
def test_cpu_peak_counts_tensors_alive_at_once_and_not_those_before():
    existing = torch.ones(1_000_000)

    def work():
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(2_000_000)  # 8 MB, both alive: 12 MB
        del a, b
        c = torch.ones(500_000)  # 2 MB after both are gone
        view = existing[:10] * 1  # a tiny new tensor; ``existing`` is not counted
        return c.sum() + view.sum()

    _, peak = peak_bytes(work)
    assert 12_000_000 <= peak <= 12_000_000 + 4096


def test_cpu_peak_sees_the_backward_pass():
    w = torch.randn(500, 500, requires_grad=True)
    x = torch.randn(2000, 500)

    def forward_only():
        with torch.no_grad():
            return (x @ w).relu().sum()

    def forward_backward():
        (grad,) = torch.autograd.grad((x @ w).relu().sum(), w)
        return grad

    _, forward = peak_bytes(forward_only)
    _, both = peak_bytes(forward_backward)
    activation = 2000 * 500 * FLOAT
    assert forward >= activation
    assert both >= 2 * activation  # the saved relu output and its gradient, alive at once


# budgets ---------------------------------------------------------------------------------------
def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="needs /proc/meminfo")
def test_default_budget_is_a_quarter_of_available_memory():
    assert budget_bytes(300) == 300 * MIB
    assert abs(budget_bytes(0) - _mem_available() / 4) < 0.05 * _mem_available()


def test_budget_key_is_validated_in_the_spec():
    base = {"name": "x", "task": [{"name": "bernoulli-toy"}],
            "estimator": [{"name": "reinforce"}]}
    spec = parse_spec({**base, "measure": {"memory_budget_mb": 512}})
    assert spec.measure.memory_budget_mb == 512
    for bad in (-1, "lots", True):
        with pytest.raises(SpecError, match="memory_budget_mb"):
            parse_spec({**base, "measure": {"memory_budget_mb": bad}})
    with pytest.raises(EstbenchError, match="memory_budget_mb must be >= 0"):
        budget_bytes(-5)


# enumeration in chunks -------------------------------------------------------------------------
def test_chunked_enumeration_gives_the_same_value_and_gradient_in_less_memory():
    task, params = _encoder_task(dim=10)  # 1,024 states

    def exact():
        return reference_gradient(task, params, None)

    with memory_budget(1 << 40):
        whole, whole_peak = peak_bytes(exact)
    logits = task.logits(params, None)
    states = task.latent.enumerate_states(logits.dtype, logits.device)
    f = task.cost(params, None)
    with memory_budget(whole_peak // 8):
        assert states_per_chunk(task.latent, logits, f, states) < states.shape[0] // 4
        chunked, chunked_peak = peak_bytes(exact)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)
    assert chunked_peak < whole_peak / 2
    assert chunked_peak <= whole_peak // 8


def test_enumeration_that_cannot_fit_one_state_is_a_clear_error():
    latent = Latent("bernoulli", 12)
    logits = torch.zeros(64, 12, requires_grad=True)
    with memory_budget(1024), pytest.raises(EstbenchError, match="left of the memory budget"):
        expectation_by_enumeration(latent, logits, lambda z: z.sum(-1), 1 << 16)


# draws within the budget -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["flat", "batched", "loop"])
def test_draws_stay_within_the_budget_they_are_given(method):
    task, params = _encoder_task()
    estimator = ESTIMATORS.get("reinforce")()
    # the tracker makes each loop step slow: fewer draws and a smaller budget there
    budget, count = (64 * 1024, 400) if method == "loop" else (256 * 1024, 4000)
    plan = plan_draws(task, estimator, params, None, count, method=method, budget=budget)
    assert plan.chunk < count  # the budget forces several chunks

    def consume():
        for chunk in stream_draws(task, estimator, params, None, count, method=method,
                                  budget=budget):
            del chunk

    _, peak = peak_bytes(consume)
    assert peak <= budget


def test_a_draw_that_cannot_fit_fails_with_one_line_naming_the_budget():
    task, params = _encoder_task()
    measure = Measure(gradient_samples=10, memory_budget_mb=0.001)
    with pytest.raises(EstbenchError) as err:
        _gradient_phase(task, ESTIMATORS.get("reinforce")(), params, measure,
                        torch.Generator().manual_seed(0), 0)
    message = str(err.value)
    assert "\n" not in message and "MB left of the memory budget" in message
    assert "memory_budget_mb" in message


def test_probing_does_not_move_the_ambient_generator():
    task, params = _encoder_task()
    estimator = ESTIMATORS.get("rloo")()
    torch.manual_seed(5)
    plan = plan_draws(task, estimator, params, None, 500)
    chosen = torch.cat([g for g, _ in stream_draws(task, estimator, params, None, 500,
                                                   plan=plan)])
    torch.manual_seed(5)
    explicit = sample_gradients(task, estimator, params, None, 500, method=plan.method,
                                chunk_size=plan.chunk)
    torch.testing.assert_close(chosen, explicit, rtol=0, atol=0)


def test_auto_falls_back_when_flat_cannot_run_and_explicit_flat_says_why():
    task, params = _encoder_task()
    # a fresh NVIL initialises its baseline network in place on its first call: not under vmap
    with pytest.raises(EstbenchError, match="gradient method 'flat' cannot draw 'nvil'"):
        plan_draws(task, ESTIMATORS.get("nvil")(), params, None, 100, method="flat")
    plan = plan_draws(task, ESTIMATORS.get("nvil")(), params, None, 100)
    assert plan.method in METHODS and plan.chunk == 100


# deterministic estimators ----------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in ESTIMATORS if ESTIMATORS.get(n).deterministic])
def test_deterministic_estimators_give_the_same_estimate_whatever_the_seed(name):
    task, params = _encoder_task(dim=3)
    estimator = ESTIMATORS.get(name)()
    torch.manual_seed(1)
    first = sample_gradients(task, estimator, params, None, 1, method="loop")
    torch.manual_seed(2)
    second = sample_gradients(task, estimator, params, None, 1, method="loop")
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_a_deterministic_estimator_is_drawn_once_with_zero_variance(monkeypatch):
    task, params = _encoder_task(dim=3)
    exact = ESTIMATORS.get("exact")()
    calls = []
    original = type(exact)._estimate
    monkeypatch.setattr(type(exact), "_estimate",
                        lambda self, *a: calls.append(1) or original(self, *a))
    rows = _gradient_phase(task, exact, params, Measure(gradient_samples=1000),
                           torch.Generator().manual_seed(0), 0)
    assert len(calls) == 1
    values = {r["metric"]: r["value"] for r in rows}
    assert values["grad_var_total"] == 0.0 and values["grad_snr"] == float("inf")
    reference = reference_gradient(task, params, None)
    assert values["grad_bias_norm"] <= 1e-6 * float(reference.norm())
    draw = sample_gradients(task, exact, params, None, 1)
    repeated = {m.metric: m.value
                for m in gradient_metrics(draw.expand(1000, -1).clone(), reference)}
    for metric in ("grad_var_total", "grad_mse", "grad_cosine", "grad_bias_norm"):
        assert values[metric] == pytest.approx(repeated[metric], rel=1e-9, abs=1e-12)


# throughput ------------------------------------------------------------------------------------
def test_throughput_peak_is_the_estimate_own_memory():
    """The recorded peak grows with the estimate's work (the batch) and is not the process's
    resident set (hundreds of MB for any estimator)."""
    peaks = {}
    for batch in (2000, 8000):
        task = TASKS.get("bernoulli-toy")(dim=50, batch_size=batch)
        params = task.init(torch.Generator().manual_seed(0))
        values = measure_throughput(task, ESTIMATORS.get("reinforce")(), params, None, 0.01)
        peaks[batch] = {v.metric: v.value for v in values}["peak_mem_bytes"]
    assert peaks[2000] >= 2000 * 50 * FLOAT  # at least the samples themselves
    assert peaks[8000] < 50 * MIB
    assert 3.0 < peaks[8000] / peaks[2000] < 5.0


# CUDA ------------------------------------------------------------------------------------------
@CUDA
def test_cuda_budget_is_a_quarter_of_free_gpu_memory_and_peaks_use_the_allocator():
    free, _ = torch.cuda.mem_get_info()
    assert abs(budget_bytes(0, "cuda") - free / 4) < 0.05 * free
    _, peak = peak_bytes(lambda: torch.ones(1_000_000, device="cuda").sum(), "cuda")
    assert 4_000_000 <= peak < 4_000_000 + 2 * MIB


@CUDA
@pytest.mark.parametrize("method", ["flat", "batched", "loop"])
def test_cuda_draws_match_cpu_draws_in_distribution(method):
    task = TASKS.get("categorical-toy")(dim=3, categories=4)
    estimator = ESTIMATORS.get("rloo")()
    draws = {}
    for device in ("cpu", "cuda"):
        params = task.init(torch.Generator().manual_seed(0), device)
        torch.manual_seed(3)
        grads = sample_gradients(task, estimator, params, None, 20_000, method=method)
        assert grads.device.type == device
        draws[device] = grads.double().cpu()
    m = 20_000
    se = ((draws["cpu"].var(0) + draws["cuda"].var(0)) / m).sqrt()
    assert ((draws["cpu"].mean(0) - draws["cuda"].mean(0)).abs() / se).max() < 4.5
    ratio = (draws["cpu"].var(0) / draws["cuda"].var(0)).log().abs()
    assert ratio.max() < 0.15  # log variance ratio, sd ~ sqrt(2 / 10,000)


@CUDA
def test_cuda_gradient_phase_matches_cpu():
    task = TASKS.get("categorical-toy")(dim=3, categories=4, batch_size=2)
    measure = Measure(gradient_samples=4000)
    rows = {}
    for device in ("cpu", "cuda"):
        params = task.init(torch.Generator().manual_seed(0), device)
        assert params["logits"].device.type == device
        records = _gradient_phase(task, ESTIMATORS.get("reinforce")(), params, measure,
                                  torch.Generator().manual_seed(0), 0)
        rows[device] = {r["metric"]: r for r in records}
    for metric in ("grad_var_total", "grad_mse"):
        cpu, gpu = rows["cpu"][metric], rows["cuda"][metric]
        half = (cpu["ci_high"] - cpu["ci_low"]) / 2 + (gpu["ci_high"] - gpu["ci_low"]) / 2
        assert abs(cpu["value"] - gpu["value"]) <= half
    assert rows["cuda"]["grad_ref_norm"]["value"] == pytest.approx(
        rows["cpu"]["grad_ref_norm"]["value"], rel=1e-5)


@CUDA
def test_cuda_enumeration_in_chunks_matches_one_pass():
    latent = Latent("categorical", 5, 4)  # 1,024 states
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, 4, generator=generator).cuda().requires_grad_(True)
    weight = torch.randn(20, 64, generator=generator).cuda().requires_grad_(True)

    def f(z):
        return torch.tanh(z.flatten(-2) @ weight).pow(2).sum(-1)

    results = {}
    for budget in (1 << 40, 256 * 1024):
        with memory_budget(budget):
            value = expectation_by_enumeration(latent, logits, f, 1 << 16).sum()
            results[budget] = (value, *torch.autograd.grad(value, [logits, weight]))
    for whole, chunked in zip(results[1 << 40], results[256 * 1024]):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_auto_reraises_an_estimator_error_that_every_method_meets():
    from dataclasses import dataclass

    from estbench.contracts import Estimator

    @dataclass(kw_only=True)
    class Broken(Estimator):
        def _estimate(self, logits, f, latent):
            raise RuntimeError("broken on purpose")

    task, params = _encoder_task()
    with pytest.raises(RuntimeError, match="broken on purpose"):
        plan_draws(task, Broken(), params, None, 10)
