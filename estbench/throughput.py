"""Cost of one estimate (forward + backward), timed with ``torch.utils.benchmark``.

The timer warms up, synchronises CUDA, and runs many blocks; we report the median time per
estimate with its interquartile range, the f evaluations per estimate, and the estimate's own peak
memory: the most bytes it held allocated at once beyond what was allocated before it, measured on
an untimed call (the CUDA allocator's peak, reset before the call; on CPU the high-water mark of
the tensors it creates, see :func:`estbench.memory.peak_bytes`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.benchmark import Timer

from estbench.contracts import Estimator, Params, Task
from estbench.memory import peak_bytes
from estbench.metrics import MetricValue

__all__ = ["measure_throughput"]


def measure_throughput(
    task: Task, estimator: Estimator, params: Params, batch: Any, min_run_time: float = 0.2
) -> list[MetricValue]:
    """Time ``estimator`` on ``task`` at ``params``: ``time_per_estimate_s`` (median; the
    interval holds the 25th and 75th percentiles), ``f_evals``, ``peak_mem_bytes``."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    device = next(iter(leaves.values())).device

    def one_estimate():
        estimate = estimator.estimate(
            task.logits(leaves, batch), task.cost(leaves, batch), task.latent
        )
        estimate.surrogate.mean().backward()
        for leaf in leaves.values():
            leaf.grad = None
        return estimate

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        one_estimate()  # warm-up
        estimate, peak = peak_bytes(one_estimate, device)  # untimed: the tracker costs time
        timer = Timer(
            stmt="one_estimate()",
            globals={"one_estimate": one_estimate},
            num_threads=torch.get_num_threads(),
        )
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times = np.asarray(measurement.times, dtype=float)
    q25, median, q75 = np.percentile(times, [25, 50, 75])
    return [
        MetricValue("time_per_estimate_s", float(median), float(q25), float(q75)),
        MetricValue("f_evals", float(estimate.f_evals)),
        MetricValue("peak_mem_bytes", float(peak)),
    ]
