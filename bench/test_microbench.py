"""pytest-benchmark front end of the microbenchmarks (the plain runner is ``python -m
bench.microbench``). Not collected by the test suite (testpaths = tests); run it explicitly::

    pytest bench/test_microbench.py --benchmark-json=bench/results/pytest-benchmark.json
    APET_BENCH_QUICK=1 pytest bench/test_microbench.py        # tiny shapes, seconds

pytest-benchmark times the host side of each call (with a device synchronize inside the timed
function on GPU). The device timings (CUDA events, median and spread, CUDA-graph replay), GB/s,
the memory floor, peak memory, per-stage times and the GPU name go into ``extra_info`` and so
into the JSON. Providers or shapes that cannot run are skipped with the reason; a provider that
crashes fails its test. Timings are never asserted.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import microbench, runtime, shapes, timing
from bench import providers as providers_mod

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("APET_BENCH_QUICK") == "1"
SHAPES = shapes.by_name(None, QUICK)
PROVIDERS = {p.name: p for p in providers_mod.providers(DEVICE)}


@pytest.fixture(scope="module")
def cfg() -> microbench.MicroConfig:
    if DEVICE.type == "cpu":
        torch.set_num_threads(runtime.DEFAULT_CPU_THREADS)  # see bench/runtime.py
    config = microbench.config_for(DEVICE, QUICK)
    nbytes = 1 << 30 if DEVICE.type == "cuda" else 1 << 26
    config.copy_gbs = timing.copy_bandwidth_gbs(DEVICE, nbytes)
    return config


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_compress(benchmark, shape: shapes.Shape, provider: str, cfg) -> None:
    chosen = PROVIDERS[provider]
    with torch.no_grad():
        (row,) = microbench.measure_shape(shape, [chosen], cfg)
        if row["status"] == "skipped":
            pytest.skip(row["reason"])
        if row["status"] == "error":
            pytest.fail(f"{provider} failed on {shape.name}: {row['reason']}")
        benchmark.extra_info.update(row)
        x = microbench.make_input(shape, cfg)

        def run() -> None:
            chosen.run(x, shape.keep)
            timing.synchronize(DEVICE)

        benchmark.pedantic(run, rounds=max(3, row["reps"]), warmup_rounds=1, iterations=1)
