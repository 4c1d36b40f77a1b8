"""Benchmark: the whole quick matrix (runs/quick.toml, 189 cells) with 1 and with 2 local workers.

Run with `make bench`. Target (README): under 5 minutes on 2 cores; the ratio of the two medians
is the parallel speed-up of the local executor.
"""

import pytest

from estbench.run import run_spec
from estbench.spec import load_spec


@pytest.mark.parametrize("workers", [1, 2])
def test_quick_matrix(benchmark, tmp_path_factory, workers):
    spec = load_spec("runs/quick.toml")
    benchmark.group = "quick matrix wall time"

    def run():
        out = tmp_path_factory.mktemp(f"quick-w{workers}")
        return run_spec(spec, out, workers=workers)

    summary = benchmark.pedantic(run, rounds=2, iterations=1)
    assert summary.ok and len(summary.done) + len(summary.skipped) == len(spec.cells())
