"""Microbenchmarks of the op: every provider on every shape, one row each.

Plain-Python runner (no pytest needed)::

    python -m bench.microbench                  # all shapes and providers this device can run
    python -m bench.microbench --quick          # tiny shapes, seconds
    python -m bench.microbench --shapes llava15_s1 --providers torch eager_released

Each row holds the whole-op timing (median and 20-80% spread), achieved GB/s against the bytes
the op must move and against the device copy bandwidth measured in the same run, per-stage
medians where the provider exposes stages, a CUDA-graph replay for the small shapes (GPU), peak
memory (GPU), and whether the provider's kept indices match the torch backend's.
Providers or shapes that cannot run leave a row with ``status: "skipped"`` and the reason.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import providers as providers_mod
from . import runtime, timing
from . import shapes as shapes_mod
from .results_io import device_name

ROW_FIELDS = (
    "kind",
    "shape",
    "model",
    "S",
    "N",
    "D",
    "K",
    "dtype",
    "device",
    "device_name",
    "provider",
    "status",
    "reason",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "min_ms",
    "max_ms",
    "reps",
    "method",
    "graph_median_ms",
    "graph_reason",
    "bytes_moved",
    "achieved_gbs",
    "copy_gbs",
    "floor_ms",
    "floor_fraction",
    "peak_mem_mb",
    "stages_ms",
    "stages_reason",
    "kept_matches_torch",
)


@dataclass
class MicroConfig:
    """How hard to measure.

    Attributes:
        device: where the inputs live.
        reps: timed calls per row (fewer when ``budget_s`` runs out, never under 3).
        warmup: untimed calls first.
        budget_s: seconds per shape after which timing stops early (at 3 samples each).
        stage_reps: timed runs of the per-stage pipeline (0: no stage timing).
        slow_call_s: on CPU, a first call longer than this is the first sample (no warm-up).
        seed: input generator seed.
    """

    device: torch.device
    reps: int = 5
    warmup: int = 1
    budget_s: float = 8.0
    stage_reps: int = 2
    slow_call_s: float = 1.0
    seed: int = 0
    copy_gbs: float = field(default=0.0)


def _empty_row(shape: shapes_mod.Shape, provider: str, cfg: MicroConfig) -> dict:
    dtype = shape.dtype(cfg.device)
    row = dict.fromkeys(ROW_FIELDS)
    row.update(
        kind="micro",
        shape=shape.name,
        model=shape.model,
        S=shape.segments,
        N=shape.tokens,
        D=shape.dim,
        K=shape.keep,
        dtype=str(dtype).removeprefix("torch."),
        device=cfg.device.type,
        device_name=device_name(cfg.device),
        provider=provider,
        bytes_moved=shape.bytes_moved(dtype),
        copy_gbs=cfg.copy_gbs,
    )
    return row


def make_input(shape: shapes_mod.Shape, cfg: MicroConfig) -> torch.Tensor:
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    x = torch.randn(
        shape.segments,
        shape.tokens,
        shape.dim,
        generator=gen,
        device=cfg.device,
        dtype=torch.float32,
    )
    return x.to(shape.dtype(cfg.device))


def _fill_timing(row: dict, result: timing.Timing) -> None:
    row.update(
        median_ms=result.median_ms,
        p20_ms=result.p20_ms,
        p80_ms=result.p80_ms,
        min_ms=result.min_ms,
        max_ms=result.max_ms,
        reps=result.reps,
        method=result.method,
    )
    seconds = result.median_ms * 1e-3
    row["achieved_gbs"] = row["bytes_moved"] / seconds / 1e9
    if row["copy_gbs"]:
        row["floor_ms"] = row["bytes_moved"] / (row["copy_gbs"] * 1e9) * 1e3
        row["floor_fraction"] = row["floor_ms"] / result.median_ms


def _time_graph(run: Callable[[], object], shape, provider, cfg: MicroConfig, row: dict) -> None:
    if cfg.device.type != "cuda":
        row["graph_reason"] = "CPU: no CUDA graphs"
    elif not shape.small:
        row["graph_reason"] = "large shape: launch overhead is negligible"
    elif provider.graph_note is not None:
        row["graph_reason"] = provider.graph_note
    else:
        try:
            replay = timing.time_cuda_graph(run, cfg.warmup, cfg.reps * 4, cfg.budget_s)
            row["graph_median_ms"] = replay.median_ms
        except Exception as exc:  # capture failures are findings, reported with the row
            row["graph_reason"] = f"capture failed: {type(exc).__name__}: {exc}"[:300]
            torch.cuda.synchronize()


def _time_stages(x, shape, provider, cfg: MicroConfig, row: dict) -> None:
    if provider.stages is None:
        row["stages_reason"] = "the backend exposes no per-stage entry points"
        return
    if cfg.stage_reps <= 0:
        row["stages_reason"] = "stage timing off"
        return
    expected_s = row["median_ms"] * 1e-3 * (cfg.stage_reps + 1)
    if expected_s > cfg.budget_s:
        row["stages_reason"] = f"skipped: ~{expected_s:.0f} s would exceed the row budget"
        return
    stage_list = provider.stages(x, shape.keep)
    medians = timing.time_stages(stage_list, dict, cfg.device, cfg.stage_reps)
    row["stages_ms"] = {name: t.median_ms for name, t in medians.items()}


def _prepare(
    shape: shapes_mod.Shape,
    provider: providers_mod.Provider,
    cfg: MicroConfig,
    x: torch.Tensor,
    reference_kept: torch.Tensor | None,
) -> tuple[dict, torch.Tensor | None, list[float]]:
    """A provider's row before timing: skipped with the reason, failed with the error, or run
    once (the first call doubles as a cross-check of its kept indices against the torch
    backend's) and warmed up.

    On CPU a first call longer than ``cfg.slow_call_s`` (the eager baseline on the big shapes:
    seconds per call) is kept as the first sample instead of being followed by warm-up calls:
    its one-time costs are negligible next to the call, and the run must fit its time budget.

    Returns the row, the kept indices (None unless it ran) and samples already taken (ms).
    """
    row = _empty_row(shape, provider.name, cfg)
    reason = provider.skip_reason
    if reason is None and cfg.device.type == "cpu":
        reason = shape.cpu_skip_reason(provider.name)
    if reason is not None:
        row.update(status="skipped", reason=reason)
        return row, None, []
    result: list = []
    try:
        first_ms = timing.measure_once(
            lambda: result.append(provider.run(x, shape.keep)), cfg.device, None
        )
        seeds = [first_ms] if cfg.device.type == "cpu" and first_ms * 1e-3 > cfg.slow_call_s else []
        for _ in range(0 if seeds else cfg.warmup):
            provider.run(x, shape.keep)
        timing.synchronize(cfg.device)
    except Exception as exc:  # one failing provider must not stop the suite
        _fail(row, exc)
        return row, None, []
    kept = result[0][1]
    if reference_kept is not None:
        row["kept_matches_torch"] = bool(torch.equal(kept, reference_kept))
    return row, kept, seeds


def _fail(row: dict, exc: Exception) -> None:
    """Out of memory is a skip (the device is too small), anything else an error."""
    status = "skipped" if isinstance(exc, torch.OutOfMemoryError) else "error"
    row.update(status=status, reason=f"{type(exc).__name__}: {exc}"[:300])


def _extras(shape, provider: providers_mod.Provider, cfg: MicroConfig, x, row: dict) -> None:
    """Peak memory, CUDA-graph replay and per-stage times of a provider that ran."""

    def run() -> object:
        return provider.run(x, shape.keep)

    try:
        row["peak_mem_mb"] = timing.peak_memory_mb(run, cfg.device)
        _time_graph(run, shape, provider, cfg, row)
        _time_stages(x, shape, provider, cfg, row)
    except Exception as exc:  # the whole-op timing stands; say what failed
        row["stages_reason"] = f"{type(exc).__name__}: {exc}"[:300]


def measure_shape(
    shape: shapes_mod.Shape, provider_list: list[providers_mod.Provider], cfg: MicroConfig
) -> list[dict]:
    """Every provider on one shape: the torch provider first (its kept indices are the
    cross-check), then all runnable providers timed in interleaved rounds."""
    x = make_input(shape, cfg)
    ordered = sorted(provider_list, key=lambda p: p.name != "torch")
    rows, runnable, reference_kept, seeds = [], [], None, {}
    for provider in ordered:
        row, kept, seeds[provider.name] = _prepare(shape, provider, cfg, x, reference_kept)
        if provider.name == "torch":
            reference_kept = kept
        rows.append(row)
        if kept is not None:
            runnable.append((provider, row))
    flush = timing.l2_flush_buffer(cfg.device)
    calls = {
        p.name: (lambda p=p: timing.measure_once(lambda: p.run(x, shape.keep), cfg.device, flush))
        for p, _ in runnable
    }
    budget = cfg.budget_s  # per shape: the slow baseline sets the pace, the others ride along
    timed = timing.interleave(calls, cfg.reps, budget, timing.method_name(cfg.device), seeds)
    for provider, row in runnable:
        _fill_timing(row, timed[provider.name])
        row["status"] = "ok"
        _extras(shape, provider, cfg, x, row)
    return rows


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_microbench(
    shapes: tuple[shapes_mod.Shape, ...],
    provider_list: list[providers_mod.Provider],
    cfg: MicroConfig,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every provider on every shape. Returns the rows."""
    if not cfg.copy_gbs:
        nbytes = 1 << 30 if cfg.device.type == "cuda" else 1 << 26
        cfg.copy_gbs = timing.copy_bandwidth_gbs(cfg.device, nbytes)
        log(f"[micro] {cfg.device.type} copy bandwidth: {cfg.copy_gbs:.1f} GB/s")
    rows = []
    for shape in shapes:
        try:
            shape_rows = measure_shape(shape, provider_list, cfg)
        except Exception as exc:  # a provider failed mid-timing: report it, go on
            shape_rows = [_empty_row(shape, p.name, cfg) for p in provider_list]
            for row in shape_rows:
                _fail(row, exc)
        for row in shape_rows:
            log(_progress_line(row))
        rows += shape_rows
        _free(cfg.device)
    return rows


def _progress_line(row: dict) -> str:
    head = f"[micro] {row['shape']:<14} {row['provider']:<15}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    spread = f"[{row['p20_ms']:.2f}, {row['p80_ms']:.2f}]"
    return f"{head} {row['median_ms']:9.2f} ms {spread} x{row['reps']}"


def config_for(device: torch.device, quick: bool) -> MicroConfig:
    """Default measuring effort: GPUs get many reps; CPU rows a time budget each."""
    if device.type == "cuda":
        return MicroConfig(device, reps=50, warmup=5, budget_s=20.0, stage_reps=10)
    if quick:
        return MicroConfig(device, reps=3, warmup=1, budget_s=2.0, stage_reps=1)
    return MicroConfig(device)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the microbenchmarks and write JSON + markdown under bench/results/<device>/."""
    from .report import write_report  # the report imports matplotlib: only when writing
    from .results_io import RESULTS_ROOT, device_slug, environment

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    runtime.add_common_arguments(parser)
    parser.add_argument("--shapes", nargs="+", default=None, help="shape names (bench/shapes.py)")
    parser.add_argument("--providers", nargs="+", default=None, help="provider names")
    args = parser.parse_args(argv)
    device = runtime.setup(args)
    rows = run_microbench(
        shapes_mod.by_name(args.shapes, args.quick),
        providers_mod.providers(device, args.providers),
        config_for(device, args.quick),
    )
    out = args.out or RESULTS_ROOT / device_slug(device)
    payload = {"environment": environment(device), "microbench": rows, "e2e": []}
    print(write_report(payload, out, stem="microbench"))
    return rows


if __name__ == "__main__":
    main()
