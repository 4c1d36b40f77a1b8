"""The gradient phase of the categorical VAEs at full size: seconds per checkpoint, peak RSS, and
the draws against the physical limit.

    python benchmarks/gradient_phase.py phase --task 8x4     # every categorical estimator
    python benchmarks/gradient_phase.py phase --task 20x10   # sample-based reference
    python benchmarks/gradient_phase.py limit                # flat, batched, loop / physical limit

``phase`` runs one checkpoint of the gradient phase (reference included) per estimator, each in a
fresh process so that its peak resident set (``ru_maxrss``: the whole process, data and torch
included) is its own, under the default memory budget. ``limit`` times M = 200 draws (chunk by
chunk, as the gradient phase takes them, the probes of ``auto`` included) of
``st-gumbel-softmax`` on the 20x10 VAE with a batch of 100 (one torch thread, medians of
``--rounds``) against one forward and backward pass over all 200 x 100 draws with shared
parameters. Data: ``$ESTBENCH_DATA``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import estbench  # noqa: F401  (registers the built-ins)
from estbench.cell import _gradient_phase
from estbench.gradients import plan_draws, stream_draws
from estbench.memory import MIB, budget_bytes, memory_budget
from estbench.registry import ESTIMATORS, TASKS
from estbench.spec import Measure

TASKS_BY_NAME = {
    "8x4": {"latents": 4, "categories": 8, "eval_size": 10},
    "20x10": {"latents": 20, "categories": 10, "eval_size": 10},
}


def categorical_estimators() -> list[str]:
    return [n for n in ESTIMATORS if "categorical" in ESTIMATORS.get(n).supports]


def _setup(task_key: str, **overrides):
    task = TASKS.get("categorical-vae").from_params({**TASKS_BY_NAME[task_key], **overrides})
    generator = torch.Generator().manual_seed(0)
    params = task.init(generator)
    return task, params, generator


def one_phase(task_key: str, estimator_name: str, samples: int, reference_samples: int) -> dict:
    """One checkpoint of the gradient phase, in this process: seconds, peak RSS, budget."""
    task, params, generator = _setup(task_key)
    estimator = ESTIMATORS.get(estimator_name)()
    estimator.check_latent(task.latent)
    measure = Measure(gradient_samples=samples, reference_samples=reference_samples)
    budget = budget_bytes(measure.memory_budget_mb)
    with memory_budget(budget):
        batch = task.gradient_batch(torch.Generator().manual_seed(1))
        method = ("once" if estimator.deterministic
                  else plan_draws(task, estimator, params, batch, samples).method)
    started = time.perf_counter()
    _gradient_phase(task, estimator, params, measure, generator, 0)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"estimator": estimator_name, "seconds": seconds, "peak_rss_mb": peak / MIB,
            "budget_mb": budget / MIB, "method": method}


def phase_table(task_key: str, samples: int, reference_samples: int, names: list[str]) -> None:
    print("| estimator | method | s / checkpoint | peak RSS (MB) | budget (MB) |")
    print("|---|---|---|---|---|")
    for name in names:
        if task_key != "8x4" and ESTIMATORS.get(name).deterministic:
            continue  # 10^20 states: no enumeration
        done = subprocess.run(
            [sys.executable, __file__, "one", "--task", task_key, "--estimator", name,
             "--samples", str(samples), "--reference-samples", str(reference_samples)],
            capture_output=True, text=True)
        if done.returncode:
            error = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| `{name}` | failed: {error} | | | |", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| `{name}` | {row['method']} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | "
              f"{row['budget_mb']:.0f} |", flush=True)


def physical_limit(task, estimator, params, batch, count: int) -> None:
    """One forward and backward pass over all ``count`` x batch draws, shared parameters."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    inputs = batch.repeat(count, 1)
    logits = task.logits(leaves, inputs)
    estimate = estimator.estimate(logits, task.cost(leaves, inputs), task.latent)
    estimate.surrogate.mean().backward()


def _median_seconds(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def limit_table(samples: int, batch_size: int, rounds: int) -> None:
    torch.set_num_threads(1)
    task, params, generator = _setup("20x10", gradient_batch_size=batch_size)
    batch = task.gradient_batch(generator)
    estimator = ESTIMATORS.get("st-gumbel-softmax")()
    limit = _median_seconds(lambda: physical_limit(task, estimator, params, batch, samples), rounds)
    print(f"physical limit ({samples} x {batch_size} draws, one pass): {limit:.2f} s")
    print("| method | seconds | / physical limit |")
    print("|---|---|---|")
    for method in ("auto", "flat", "batched", "loop"):
        seconds = _median_seconds(
            lambda: consume_draws(task, estimator, params, batch, samples, method), rounds)
        print(f"| {method} | {seconds:.2f} | {seconds / limit:.2f} |", flush=True)
    chosen = plan_draws(task, estimator, params, batch, samples).method
    print(f"auto chooses: {chosen}")


def consume_draws(task, estimator, params, batch, count: int, method: str) -> None:
    """The draws as the gradient phase takes them: planned (probes included), chunk by chunk."""
    for chunk in stream_draws(task, estimator, params, batch, count, method=method):
        del chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("phase", "one", "limit"))
    parser.add_argument("--task", choices=tuple(TASKS_BY_NAME), default="8x4")
    parser.add_argument("--estimator", action="append")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--reference-samples", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.what == "one":
        print(json.dumps(one_phase(args.task, args.estimator[0], args.samples,
                                   args.reference_samples)))
    elif args.what == "phase":
        phase_table(args.task, args.samples, args.reference_samples,
                    args.estimator or categorical_estimators())
    else:
        limit_table(200 if args.samples == 1000 else args.samples, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
