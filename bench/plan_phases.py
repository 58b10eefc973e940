"""The GPU plan's phases, each run in a child process by ``bench.gpu_plan`` (a crash or a poisoned
CUDA context ends that phase only). Each phase appends its measurements to the log as they are
made and checks its deadline before every case, so a phase that runs out of time leaves every
finished case behind and says which ones it skipped.

With ``selftest`` the same code runs on CPU at tiny sizes (Triton under its interpreter, the
scaled-down e2e model), so that CI exercises every path before a GPU sees it.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import apet_kernels

from . import e2e, microbench, models, plan_checks, timing
from . import providers as providers_mod
from . import shapes as shapes_mod
from .plan_record import Recorder
from .results_io import environment


@dataclass
class Context:
    """What a phase needs: where to write, until when, and at which sizes."""

    out: Path
    rec: Recorder
    deadline: float  # time.time() by which the phase must have finished
    selftest: bool
    device: torch.device
    commit: str | None = None

    def pick(self, items: tuple) -> tuple:
        """All of ``items`` on a GPU; the first one in a selftest (each code path once)."""
        return items[:1] if self.selftest else items

    def left(self) -> float:
        return self.deadline - time.time()

    def has_time(self, case: str, need_s: float) -> bool:
        """Whether ``need_s`` seconds are left for ``case``; records the skip when not."""
        if self.left() >= need_s:
            return True
        self.rec.write("skip", case=case, reason=f"{self.left():.0f} s left, needs ~{need_s:.0f}")
        return False


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _guarded(ctx: Context, case: str, fn: Callable[[], dict]) -> dict | None:
    """Run one case; an exception becomes an ``error`` record and the phase goes on, unless the
    CUDA context is broken (an illegal address is sticky): then the phase ends here, and the
    plan's next phase starts in a fresh process."""
    t0 = time.time()
    try:
        record = fn()
    except Exception as exc:  # a failing case is a finding: record it, go on
        ctx.rec.write("error", case=case, reason=f"{type(exc).__name__}: {exc}"[:500])
        try:
            _free()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as sticky:
            ctx.rec.write("error", case=case, reason=f"CUDA context unusable, phase ends: {sticky}")
            raise
        return None
    _free()
    record = dict(case=case, wall_s=round(time.time() - t0, 2), **record)
    return ctx.rec.write("check", **record)


# --- phase: environment -------------------------------------------------------------------


def _run_text(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return (proc.stdout or proc.stderr).strip()


def phase_env(ctx: Context) -> None:
    """Device, driver, versions, commit, command; the device copy bandwidth (the memory floor's
    denominator for every later figure)."""
    env = environment(ctx.device)
    env["command"] = os.environ.get("APET_PLAN_COMMAND", env["command"])
    if ctx.commit:
        env["git_commit"] = ctx.commit
    env["python_executable"] = sys.executable
    smi = _run_text(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
            "clocks.mem,temperature.gpu,power.draw,pstate",
            "--format=csv,noheader",
        ]
    )
    env["nvidia_smi"] = smi
    env["driver"] = smi.split(",")[1].strip() if smi and smi.count(",") >= 1 else None
    nvcc = _run_text(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            l2_bytes=getattr(props, "L2_cache_size", None),
            memory_bytes=props.total_memory,
        )
    env["backends"] = apet_kernels.backends(ctx.device)
    env["env_vars"] = {
        k: v for k, v in os.environ.items() if k.startswith(("APET_", "TRITON_", "CUDA_VISIBLE"))
    }
    nbytes = 1 << 30 if ctx.device.type == "cuda" else 1 << 24
    try:  # the floor every GB/s figure is read against; the record stands without it
        env["copy_gbs"] = timing.copy_bandwidth_gbs(ctx.device, nbytes)
    except Exception as exc:
        env["copy_gbs"], env["copy_error"] = None, f"{type(exc).__name__}: {exc}"[:300]
    ctx.rec.write("env", **env)


# --- phases: correctness ------------------------------------------------------------------

# (name, S, N, D, K): the real shapes; keep 30% of 2048 is keep_count(2048, 0.3) = 614.
REAL_SHAPES = (
    ("llava15", 1, 576, 1024, 96),
    ("video_llava", 8, 256, 4096, 32),
    ("qwen25vl", 1, 2048, 3584, apet_kernels.keep_count(2048, 0.3)),
    ("long_video", 64, 576, 4096, 96),
)
TINY_SHAPES = (("tiny", 2, 64, 32, 12), ("tiny_wide", 1, 40, 96, 20))
HALF = (torch.float16, torch.bfloat16)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def phase_merge_dot(ctx: Context) -> None:
    """fp16/bf16 input takes the tensor-core ``tl.dot`` merge path (no upcast), which no CPU run
    executes (the interpreter forces the fp32 upcast): checked first, both dtypes at a small
    shape (plain Gaussian data, as tests/ops/test_gpu.py, and spread data), then at LLaVA's
    1x576x1024 (spread data only: plain Gaussian tokens at D = 1024 have approximation errors
    close enough for fp32 rounding to change the kept set, which would read as a failure)."""
    small = ("small", 2, 577, 64, 144)
    cases = [(*small, "gaussian"), (*small, "spread"), (*REAL_SHAPES[0], "spread")]
    if ctx.selftest:
        cases = [(*TINY_SHAPES[0], "gaussian")]
    for name, S, N, D, K, data in cases:
        for dtype in ctx.pick(HALF):
            case = f"triton dense {name} {S}x{N}x{D} k{K} {_name(dtype)} {data}"
            if not ctx.has_time(case, 5):
                return
            run = partial(_merge_case, ctx, S, N, D, K, dtype, data)
            _guarded(ctx, case, run)


def _merge_case(ctx: Context, S, N, D, K, dtype, data: str) -> dict:
    if data == "gaussian":
        gen = torch.Generator(device=ctx.device).manual_seed(2)
        x = torch.randn(S, N, D, generator=gen, device=ctx.device).to(dtype)
    else:
        x = plan_checks.spread_input(S, N, D, dtype, ctx.device, seed=1)
    return plan_checks.dense_vs_oracle(x, K, "triton")[0]


def correctness(ctx: Context, backend: str) -> None:
    """``backend`` against the oracle at the real shapes (fp16 and bf16 first, then fp32), dense
    and varlen (the same segments packed: bitwise equal to dense), a ragged varlen batch,
    batch == single bitwise on near-tie data, CUDA-graph capture of dense and varlen calls."""
    shapes = ctx.pick(TINY_SHAPES if ctx.selftest else REAL_SHAPES)
    cases: list[tuple[str, Callable[[], dict]]] = []
    for dtype in (*ctx.pick(HALF), torch.float32):
        for name, S, N, D, K in shapes if dtype != torch.float32 else shapes[:1]:
            case = f"{backend} {name} {S}x{N}x{D} k{K} {_name(dtype)}"
            cases.append((case, partial(_dense_and_varlen, ctx, backend, S, N, D, K, dtype)))
    seqlens = [40, 0, 64, 17, 1] if ctx.selftest else [576, 0, 2048, 256, 256, 1, 577]
    D = 32 if ctx.selftest else 4096
    for dtype in ctx.pick(HALF):
        case = f"{backend} ragged varlen {seqlens} D{D} {_name(dtype)}"
        cases.append((case, partial(_ragged, ctx, backend, seqlens, D, dtype)))
    ties = ((2, 64, 32, 12),) if ctx.selftest else ((8, 576, 1024, 96), (8, 256, 4096, 32))
    for dtype in ctx.pick(HALF):
        for S, N, D, K in ties:
            case = f"{backend} batch == single, near ties, {S}x{N}x{D} k{K} {_name(dtype)}"
            cases.append((case, partial(_batch_vs_single, ctx, backend, S, N, D, K, dtype)))
    for S, N, D, K, dtype in GRAPH_SHAPES:
        for layout in ("dense", "varlen"):
            case = f"{backend} CUDA graph {layout} {S}x{N}x{D} k{K} {_name(dtype)}"
            if ctx.device.type != "cuda":
                ctx.rec.write("skip", case=case, reason="no CUDA device")
                continue
            cases.append((case, partial(_graph, ctx, backend, layout, S, N, D, K, dtype)))
    for case, run in cases:
        if not ctx.has_time(case, 10):
            return
        _guarded(ctx, case, run)


GRAPH_SHAPES = ((1, 576, 1024, 96, torch.float16), (8, 256, 4096, 32, torch.bfloat16))


def _ragged(ctx: Context, backend: str, seqlens: list[int], D: int, dtype) -> dict:
    keeps = [apet_kernels.keep_count(n, 0.3) for n in seqlens]
    x = plan_checks.spread_input(1, sum(seqlens), D, dtype, ctx.device, seed=3)[0]
    return plan_checks.varlen_vs_oracle(x, seqlens, keeps, backend)[0]


def _batch_vs_single(ctx: Context, backend: str, S, N, D, K, dtype) -> dict:
    x = plan_checks.tie_input(S, N, D, dtype, ctx.device, seed=4)
    return plan_checks.batch_vs_single(x, K, backend)


def _dense_and_varlen(ctx: Context, backend: str, S, N, D, K, dtype) -> dict:
    x = plan_checks.spread_input(S, N, D, dtype, ctx.device, seed=5)
    record, dense = plan_checks.dense_vs_oracle(x, K, backend)
    packed = tuple(
        apet_kernels.compress_varlen(x.reshape(S * N, D), [N] * S, [K] * S, backend=backend)
    )
    record["varlen_equals_dense"] = plan_checks.bitwise(packed, dense)
    if not record["varlen_equals_dense"]:
        record["ok"] = False
        record["problems"] = (record["problems"] or []) + ["varlen of the same segments differs"]
    return record


def _graph(ctx: Context, backend: str, layout: str, S, N, D, K, dtype) -> dict:
    x = plan_checks.spread_input(S, N, D, dtype, ctx.device, seed=6)

    def call() -> plan_checks.Flat:
        if layout == "dense":
            return tuple(apet_kernels.compress(x, K, backend=backend))
        flat = x.view(S * N, D)
        return tuple(apet_kernels.compress_varlen(flat, [N] * S, [K] * S, backend=backend))

    def refill() -> None:
        x.copy_(plan_checks.spread_input(S, N, D, dtype, ctx.device, seed=7))

    return plan_checks.graph_capture(call, refill)


def triton_warmup(ctx: Context) -> None:
    """Compile time of the Triton kernels per (D, dtype) the plan uses, through the backend's
    ``warmup`` where it has one (compiles land here, not inside timed or captured calls)."""
    from apet_kernels.ops import triton as triton_backend

    warmup = getattr(triton_backend, "warmup", None)
    if warmup is None:
        ctx.rec.write("skip", case="triton warmup", reason="the triton backend has no warmup()")
        return
    widths = sorted({D for _, _, _, D, _ in (TINY_SHAPES if ctx.selftest else REAL_SHAPES)})
    for D in ctx.pick(tuple(widths)):
        for dtype in ctx.pick(HALF):
            if not ctx.has_time(f"triton warmup D{D} {_name(dtype)}", 10):
                return
            t0 = time.time()
            try:
                calls = warmup(D, dtype, ctx.device, merge=(True,))
            except Exception as exc:  # a variant that fails to compile is a finding
                reason = f"{type(exc).__name__}: {exc}"[:500]
                ctx.rec.write("error", case=f"triton warmup D{D} {_name(dtype)}", reason=reason)
                continue
            ctx.rec.write(
                "warmup", D=D, dtype=_name(dtype), calls=calls, wall_s=round(time.time() - t0, 2)
            )


def phase_correct(ctx: Context) -> None:
    # The selftest checks the plan's own code, on the torch backend: the Triton interpreter takes
    # seconds per call, and tests/ops/test_triton.py checks the kernels themselves.
    if not ctx.selftest:
        triton_warmup(ctx)
    correctness(ctx, "torch" if ctx.selftest else "triton")


# --- phases: timings ----------------------------------------------------------------------

# Most informative first: one image (launch-bound), the large Qwen image, video, a long video
# (HBM-bound), then the rest of bench/shapes.py.
MICRO_ORDER = (
    "llava15_s1",
    "qwen25vl_2048",
    "video_llava",
    "long_video",
    "batch32",
    "llava_next",
    "llava15_s2",
    "qwen25vl_1024",
)


def kernel_profile(fn: Callable[[], object], device: torch.device) -> dict:
    """Device kernels launched by one call of ``fn`` (after a warm-up call), from
    ``torch.profiler``: count, total device time, memcpy/memset count, the costliest names."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()
    timing.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        timing.synchronize(device)
    per_kernel: dict[str, list[float]] = {}
    copies = 0
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        if event.name.startswith(("Memcpy", "Memset")):
            copies += 1
            continue
        entry = per_kernel.setdefault(event.name[:80], [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us()
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
    return dict(
        kernels=sum(c for c, _ in per_kernel.values()),
        copies=copies,
        kernel_us=round(sum(t for _, t in per_kernel.values()), 1),
        per_kernel={name: dict(count=c, us=round(t, 1)) for name, (c, t) in ranked},
        top="; ".join(f"{name} x{c}: {t:.0f}" for name, (c, t) in ranked[:4]) or None,
    )


def microbenchmarks(ctx: Context, provider_names: list[str], extra_for: tuple[str, ...]) -> None:
    """bench/microbench.py's rows (interleaved medians, GB/s against the copy bandwidth, stage
    times, kept = torch) for ``provider_names``, then for the providers in ``extra_for`` a
    CUDA-graph replay at every shape and a profiler kernel table."""
    cfg = microbench.MicroConfig(ctx.device, reps=20, warmup=3, budget_s=4.0, stage_reps=3)
    if ctx.selftest:
        cfg = microbench.MicroConfig(ctx.device, reps=3, warmup=1, budget_s=1.0, stage_reps=1)
    cfg.copy_gbs = timing.copy_bandwidth_gbs(
        ctx.device, 1 << 30 if ctx.device.type == "cuda" else 1 << 24
    )
    ctx.rec.write("copy_bandwidth", gbs=cfg.copy_gbs)
    provider_list = providers_mod.providers(ctx.device, provider_names)
    table = {s.name: s for s in shapes_mod.FULL}
    shapes = shapes_mod.QUICK[:1] if ctx.selftest else tuple(table[n] for n in MICRO_ORDER)
    for shape in shapes:
        if not ctx.has_time(f"micro {shape.name}", 15):
            return
        try:
            rows = microbench.measure_shape(shape, provider_list, cfg)
        except Exception as exc:  # report it, go on with the next shape
            reason = f"{type(exc).__name__}: {exc}"[:500]
            ctx.rec.write("error", case=f"micro {shape.name}", reason=reason)
            _free()
            continue
        for row in rows:
            ctx.rec.write("micro", **row)
        ran = {r["provider"] for r in rows if r["status"] == "ok"}
        x = microbench.make_input(shape, cfg)
        for p in sorted(provider_list, key=lambda p: p.name == "torch"):  # kernels first
            if p.name in extra_for and p.name in ran:
                _graph_and_profile(ctx, shape, p, x)
        del x
        _free()


def _graph_and_profile(ctx: Context, shape, provider, x: torch.Tensor) -> None:
    def run() -> object:
        return provider.run(x, shape.keep)

    where = dict(shape=shape.name, provider=provider.name, dtype=_name(x.dtype))
    if provider.name == "torch" and shape.segments > 1:
        # torch's batched cholesky_solve may run MAGMA, whose host pointer arrays a graph cannot
        # own (tests/ops/test_gpu.py checks torch's capture): no attempt here, so a failed
        # capture cannot spoil the kernel providers' rows that follow.
        ctx.rec.write("graph", **where, reason="not tried: torch backend with several segments")
    elif ctx.device.type == "cuda":
        try:
            replay = timing.time_cuda_graph(run, warmup=2, reps=20, budget_s=2.0)
            ctx.rec.write("graph", **where, **replay.as_dict())
        except Exception as exc:  # capture failure is a finding
            torch.cuda.synchronize()
            ctx.rec.write("graph", **where, reason=f"{type(exc).__name__}: {exc}"[:300])
    try:
        ctx.rec.write("profile", **where, **kernel_profile(run, ctx.device))
    except Exception as exc:
        ctx.rec.write(
            "error",
            case=f"profile {shape.name} {provider.name}",
            reason=f"{type(exc).__name__}: {exc}"[:300],
        )


def phase_micro(ctx: Context) -> None:
    microbenchmarks(ctx, ["torch", "triton", "eager_released"], extra_for=("torch", "triton"))


# --- phase: CUDA extension ----------------------------------------------------------------


def phase_cuda_build(ctx: Context) -> None:
    """Build (JIT) the CUDA extension for the architectures in APET_CUDA_ARCHS; started in the
    background by the plan at its beginning, so the compile overlaps the GPU phases."""
    from apet_kernels.ops import cuda

    t0 = time.time()
    probe = torch.empty(0, device=ctx.device, dtype=torch.float16)
    reason = cuda.unavailable_reason(probe)
    ctx.rec.write(
        "build",
        archs=os.environ.get(cuda.ARCHS_ENV),
        status="ok" if reason is None else "failed",
        wall_s=round(time.time() - t0, 1),
        reason=reason,
        extensions_dir=os.environ.get("TORCH_EXTENSIONS_DIR"),
    )


def phase_cuda(ctx: Context) -> None:
    """The CUDA backend, once built: correctness as for Triton, then timings beside Triton's."""
    reason = apet_kernels.backends(ctx.device).get("cuda")
    if reason != "available":
        ctx.rec.write("skip", case="cuda backend", reason=reason)
        return
    correctness(ctx, "cuda")
    microbenchmarks(ctx, ["triton", "cuda"], extra_for=("cuda",))


# --- phase: end to end --------------------------------------------------------------------

E2E_ORDER = ("llava15", "video_llava", "qwen25vl")


def phase_e2e(ctx: Context) -> None:
    """Prefill and a short greedy generate at 7B sizes (bench/e2e.py): vanilla, ApET at its
    tightest preset, FastV-style; models built on the GPU with random weights."""
    if ctx.selftest:
        cfg = e2e.config_for(ctx.device, quick=True)
    else:
        batches = {"llava15": (1, 8), "video_llava": (1, 4), "qwen25vl": (1, 4)}
        cfg = e2e.E2EConfig(
            ctx.device,
            torch.float16,
            True,
            batches,
            prefill_reps=5,
            generate_reps=1,
            warmup=1,
            new_tokens=16,
            max_budgets=1,
            budget_s=8.0,
        )
    for name in E2E_ORDER:
        if name not in cfg.batches or not ctx.has_time(f"e2e {name}", 20):
            continue

        def record_rows(rows: list[dict]) -> None:
            for row in rows:
                ctx.rec.write("e2e", **row)

        try:
            e2e.run_arch(models.get(name, cfg.full), cfg, log=lambda m: None, on_rows=record_rows)
        except Exception as exc:  # e.g. out of memory while building: go on with the next
            ctx.rec.write("error", case=f"e2e {name}", reason=f"{type(exc).__name__}: {exc}"[:500])
        _free()


PHASE_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "env": phase_env,
    "merge_dot": phase_merge_dot,
    "correct": phase_correct,
    "micro": phase_micro,
    "cuda_build": phase_cuda_build,
    "cuda": phase_cuda,
    "e2e": phase_e2e,
}
