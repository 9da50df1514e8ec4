"""Speed of the simulation at the largest supported size (8192 x 8192).

`pytest -o addopts="" --benchmark-only tests/test_simulation_bench.py` times it (the README
gives the figure); in the default run (--benchmark-disable in addopts) the function runs
once and its result is checked. A benchmark, not a timed test: no assertion on seconds.
"""

from __future__ import annotations

import pytest


@pytest.mark.benchmark(group="simulate", min_rounds=1, warmup=False)
def test_simulate_8192(benchmark):
    from sd_vram.simulation import simulate
    from sd_vram.simulation.resident import meta_pipeline

    meta_pipeline(True)                     # one-time build, not part of a simulation
    result = benchmark.pedantic(simulate, args=(8192, 8192), rounds=1, iterations=1)
    assert result.peak_stage == "vae_decode"
    assert result.peak_allocated > 64 * (1 << 30)
