"""Timers shared by the microbenchmarks and the end-to-end study.

CPU: wall-clock (``time.perf_counter``) per call, several calls in one process, median reported;
contenders are timed in interleaved rounds so that a shared machine's load hits them alike.
GPU: CUDA events around each call after a warm-up, the L2 cache flushed between calls (the way
``triton.testing.do_bench`` does it, so inputs that fit in L2 do not report more than HBM can
deliver), optional CUDA-graph replay to take launch overhead out for the small shapes.
Timings are reported, never asserted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H100: 50 MB)


@dataclass
class Timing:
    """Summary of repeated timings in milliseconds: median and spread (20th-80th percentile)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    max_ms: float
    reps: int
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(samples_ms: Sequence[float], method: str) -> Timing:
    """Median, 20th/80th percentiles, min and max of ``samples_ms`` (at least one sample)."""
    ordered = sorted(samples_ms)
    n = len(ordered)

    def quantile(q: float) -> float:
        return ordered[min(n - 1, max(0, round(q * (n - 1))))]

    return Timing(
        median_ms=statistics.median(ordered),
        p20_ms=quantile(0.2),
        p80_ms=quantile(0.8),
        min_ms=ordered[0],
        max_ms=ordered[-1],
        reps=n,
        method=method,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_once(
    fn: Callable[[], object], device: torch.device, flush: torch.Tensor | None
) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on GPU (after zeroing ``flush`` to evict
    the L2 cache), wall clock on CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    if flush is not None:
        flush.zero_()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def l2_flush_buffer(device: torch.device) -> torch.Tensor | None:
    return (
        torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        if device.type == "cuda"
        else None
    )


def interleave(
    calls: dict[str, Callable[[], float]],
    reps: int,
    budget_s: float,
    method: str,
    seeds: dict[str, list[float]] | None = None,
) -> dict[str, Timing]:
    """Time several measured calls in rounds (A, B, C, A, B, C, ...), each ``call()`` returning
    its own milliseconds, so that load from other processes hits every contender alike and
    their ratio is steadier than back-to-back runs give. A contender stops at ``reps`` samples,
    or at 3 once ``budget_s`` seconds are spent.
    ``seeds`` are samples taken before (they count towards ``reps``)."""
    samples: dict[str, list[float]] = {name: list((seeds or {}).get(name, ())) for name in calls}
    start = time.perf_counter()
    while True:
        target = 3 if time.perf_counter() - start > budget_s else reps
        active = [name for name in calls if len(samples[name]) < target]
        if not active:
            break
        for name in active:
            samples[name].append(calls[name]())
    return {name: summarize(values, method) for name, values in samples.items()}


def method_name(device: torch.device) -> str:
    return "cuda-events" if device.type == "cuda" else "cpu-wallclock"


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    reps: int,
    budget_s: float,
    method: str | None = None,
) -> Timing:
    """``warmup`` untimed calls, then up to ``reps`` timed ones (see :func:`interleave`)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    flush = l2_flush_buffer(device)
    timed = interleave(
        {"fn": lambda: measure_once(fn, device, flush)},
        reps,
        budget_s,
        method or method_name(device),
    )
    return timed["fn"]


def time_cuda_graph(fn: Callable[[], object], warmup: int, reps: int, budget_s: float) -> Timing:
    """Capture ``fn`` in a CUDA graph and time its replays (launch overhead removed).

    Raises whatever capture raises (e.g. an op that syncs): callers report it as the reason."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires
        for _ in range(max(warmup, 2)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    device = torch.device("cuda")
    return time_fn(graph.replay, device, warmup, reps, budget_s, method="cuda-graph-replay")


def time_stages(
    stages: Sequence[tuple[str, Callable[[dict], None]]],
    make_state: Callable[[], dict],
    device: torch.device,
    reps: int,
) -> dict[str, Timing]:
    """Median time of each stage of a pipeline; each stage reads and writes a shared state dict.

    The pipeline runs once as warm-up, then ``reps`` times with a synchronization around every
    stage (on GPU: CUDA events), so the stage times add up to slightly more than the whole op.
    """
    samples: dict[str, list[float]] = {name: [] for name, _ in stages}
    for rep in range(reps + 1):
        state = make_state()
        for name, stage in stages:
            synchronize(device)
            if device.type == "cuda":
                begin, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                begin.record()
                stage(state)
                end.record()
                torch.cuda.synchronize()
                elapsed = begin.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                stage(state)
                elapsed = (time.perf_counter() - t0) * 1e3
            if rep > 0:
                samples[name].append(elapsed)
    return {name: summarize(values, method_name(device)) for name, values in samples.items()}


def copy_bandwidth_gbs(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Device copy bandwidth measured now: bytes read + written by ``dst.copy_(src)`` per second.

    The memory floor of an op is the bytes it must move divided by this."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=reps, budget_s=5.0)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory allocated during one call of ``fn`` above what was allocated before,
    in MiB. None on CPU, where torch keeps no allocator statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
