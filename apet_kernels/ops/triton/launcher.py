"""Chains the four fused stages for dense and varlen input; the only place that allocates.

Dense ``(S, N, D)`` and packed ``(T, D)`` input run the same kernels: tokens live in one packed
index space (dense token ``(s, i)`` is ``s * N + i``) and every kernel reads x through
``row_offset`` with the caller's strides, so non-contiguous input is never copied. Per-segment
tables (token start, N_s, output start, K_s, m_s), the (segment, token block) tables of the
1-D grids and the CSR row ids are built on the host from host ints, packed into one int64
buffer, copied once per shape (pinned memory, asynchronous on the current stream) and cached.
Nothing here reads device data on the host and a new shape costs no host sync either.

Lifetimes: those tables belong to a ``Plan``, the device state of one call shape. A caller that
holds its own plan (``Plan(...)``, then ``run(..., plan=p)``) owns their lifetime; calls
without one use a module cache of the 64 most recent shapes. Plans are ``record_stream``ed on
every stream that reads them, so dropping one (or evicting it) while kernels are queued is
safe. CUDA graphs: capture after one eager call with the same shapes (the usual warm-up) or
with a plan built before the capture; a capture that would have to build the tables raises
instead of failing inside CUDA. A capture without an explicit plan pins the cached plan until
``release_captured_plans()``, since the graph reads the tables on every replay.

Block sizes are fixed per call instead of autotuned (multi-config autotune needs a driver, and
the interpreter's cost grows with programs x block ops, so it gets large blocks), and they are
functions of the segment's dtype and width, not of the batch (``_Config``). GPU choices are the
usual Triton starting points for streaming kernels and a 64x64x32 GEMM tile; they are not yet
tuned on hardware. Every launch pins ``enable_fp_fusion`` (``FP_FUSION``).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton

from ..upload import upload
from . import MAX_BASIS
from .fps import (
    CHUNK_TOKENS,
    MAX_CHUNKS,
    SEG_COLS,
    SEG_OUT,
    fps_mean_kernel,
    fps_step_kernel,
)
from .merge import merge_assign_kernel, merge_dedup_kernel, merge_mean_kernel
from .residual import residual_kernel
from .select import select_kernel

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Every launch pins it: Triton's default changes across releases (3.10 turns fusion off by
# default, earlier releases fuse), and fused multiply-adds round differently, which moves
# near-tie selections. Off, the compiled kernels round each product and sum like the
# interpreter and the float oracle's operation order.
FP_FUSION = False


# fp16/bf16 merge GEMM on tensor cores (CUDA only). Its reference point is the fp32 IEEE dot
# that CPU runs and fp32 inputs use; tests/ops/test_triton_tensor_cores.py turns this off to
# compare the two on a GPU.
TENSOR_CORE_MERGE = True


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@dataclass(frozen=True)
class _Config:
    """Block sizes and warps per kernel (``fps_*``: centroid and step kernels; ``row_*``: the
    output-row mean/gather; ``dedup_*``: the duplicate-kept-row scan).

    Every field that decides an arithmetic order (tiles, warps, the GEMM variant) is a function
    of x's dtype, D and num_basis only, never of the batch (segment count, total tokens, other
    segments' lengths) or the device's SM count: a segment's result is then bitwise the same
    alone, in a dense batch and in any varlen pack (SPEC.md). ``select_*`` also follows the
    longest segment; the select stage is integer-exact, so its blocking decides no result.
    """

    fps_n: int
    fps_d: int
    fps_warps: int
    fps_p: int  # partials re-reduced per chunk at the start of each FPS step (max: exact)
    residual_n: int
    residual_warps: int
    select_block: int
    select_warps: int
    merge_n: int
    merge_k: int
    merge_d: int
    merge_warps: int
    merge_stages: int
    row_m: int
    row_d: int
    dedup_j: int
    dedup_d: int


def _basis_tile(m_max: int) -> int:
    """MP: the residual stage's basis dimension, m_max rounded up to a power of two (>= 2).

    Whenever the residual runs, some segment keeps more than its basis, so m_max = num_basis:
    MP is a function of num_basis, the same for every segment that runs the solve.
    """
    return _pow2(m_max, 2, 1 << 30)


def _config(device: torch.device, dtype: torch.dtype, D: int, n_max: int, m_max: int) -> _Config:
    """Block sizes for this call: GPU tiles on CUDA, large tiles under the interpreter."""
    if device.type == "cuda":
        return _gpu_config(dtype, D, n_max, m_max)
    return _interpreter_config(dtype, D, n_max, m_max)


def _interpreter_config(dtype: torch.dtype, D: int, n_max: int, m_max: int) -> _Config:
    """The interpreter's cost grows with programs x block ops: few programs, big tiles."""
    del dtype  # the interpreter computes every dtype in the same numpy order
    return _Config(
        fps_n=256, fps_d=_pow2(D, 16, 1024), fps_warps=4, fps_p=64,
        residual_n=256, residual_warps=4, select_block=_select_block(n_max), select_warps=4,
        merge_n=128, merge_k=128, merge_d=_pow2(D, 16, 256), merge_warps=4, merge_stages=1,
        row_m=32, row_d=_pow2(D, 16, 1024), dedup_j=128, dedup_d=_pow2(D, 16, 256),
    )  # fmt: skip


def _select_block(n_max: int) -> int:
    """Keys held in registers by the select stage: two variants (<= 1024 tokens, longer), so
    a new segment length never compiles a new one."""
    return 1024 if n_max <= 1024 else 4096


def _gpu_config(dtype: torch.dtype, D: int, n_max: int, m_max: int) -> _Config:
    """GPU block sizes: a pure function of (dtype, D, n_max, m_max), so tests can run them
    interpreted; only ``select_*`` reads n_max (see ``_Config``). Not yet tuned on hardware;
    register and spill counts come from tests/ops/triton_compile_check.py (sm_90, ptxas)."""
    del D  # the tiles below fit every width; D only sets loop trip counts
    # FPS: 16-token x 64-feature tiles on 4 warps (8 values per thread): one image (576 tokens)
    # spreads over 36 programs per step, and a 65536-token segment has 4096 blocks whose
    # (max, argmax) partials each program re-reads, 32 KB from L2 per program per step.
    # Residual: (BLOCK_N, MP) tiles with at most 32 fp32 values per thread. No variant spills
    # except MP = 128 (255 registers and a 440-byte stack frame, sm_90, triton 3.9).
    mp = _basis_tile(m_max)
    residual_n, residual_warps = (128, 4) if mp <= 32 else (64, 8) if mp <= 64 else (32, 8)
    select_block = _select_block(n_max)
    # Merge GEMM: 64x64 tiles, 32-wide feature steps: fp16/bf16 on tensor cores (4 warps, 3
    # stages), fp32 as an IEEE FMA dot (8 warps, 2 stages). The gathered kept rows rule out TMA.
    fp32 = dtype == torch.float32
    return _Config(
        fps_n=16, fps_d=64, fps_warps=4, fps_p=256,
        residual_n=residual_n, residual_warps=residual_warps,
        select_block=select_block, select_warps=select_block // 256,
        merge_n=64, merge_k=64, merge_d=32, merge_warps=8 if fp32 else 4,
        merge_stages=2 if fp32 else 3, row_m=8, row_d=256, dedup_j=64, dedup_d=64,
    )  # fmt: skip


@dataclass(frozen=True)
class _Tables:
    """Device views of one packed int64 buffer (see ``_build_tables``)."""

    seg: torch.Tensor  # (S, SEG_COLS): token start, N_s, output start, K_s, m_s (fps.SEG_*)
    fps_blk: torch.Tensor  # (NBT, 2): segment, local start of each FPS token block
    fps_seg_blk: torch.Tensor  # (S, 2): first FPS block, block count
    residual_blk: torch.Tensor  # (residual blocks, 2)
    merge_blk: torch.Tensor  # (merge blocks, 2)
    row_ids: torch.Tensor  # (R + 1,): 0..R, the CSR row boundaries searched for


def _host_blocks(lengths: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token blocks of ``block`` tokens for a 1-D grid, segments in order, blocks ascending.

    Returns ``blk (NBT, 2)`` (segment, local start) and ``seg_blk (S, 2)`` (first block, block
    count), int64 on the host. Empty segments own no block.
    """
    counts = (lengths + block - 1) // block
    first = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    seg = torch.repeat_interleave(torch.arange(len(lengths)), counts, output_size=total)
    local = (torch.arange(total) - first[seg]) * block
    return torch.stack([seg, local], dim=1), torch.stack([first, counts], dim=1)


def _build_tables(
    seqlens: tuple[int, ...], keeps: tuple[int, ...], num_basis: int, cfg: _Config,
    device: torch.device,
) -> _Tables:  # fmt: skip
    """All host-built tables of one call shape, copied to ``device`` in one transfer
    (``upload``: pinned and asynchronous on the current stream on CUDA, no host sync)."""
    lengths = torch.tensor(seqlens, dtype=torch.int64)
    k = torch.tensor(keeps, dtype=torch.int64)
    seg = torch.stack(
        [torch.cumsum(lengths, 0) - lengths, lengths, torch.cumsum(k, 0) - k, k,
         k.clamp(max=num_basis)], dim=1,
    )  # fmt: skip
    assert seg.shape[1] == SEG_COLS.value
    fps_blk, fps_seg_blk = _host_blocks(lengths, cfg.fps_n)
    residual_blk, _ = _host_blocks(lengths, cfg.residual_n)
    merge_blk, _ = _host_blocks(lengths, cfg.merge_n)
    parts = [seg, fps_blk, fps_seg_blk, residual_blk, merge_blk, torch.arange(int(k.sum()) + 1)]
    # Each table starts 16-byte aligned (odd-sized ones are followed by one unused int64):
    # Triton specializes on pointer alignment, so offsets that follow the segment count would
    # compile a new variant of several kernels for every other batch size.
    padded = []
    for part in parts:
        padded += [part, torch.zeros(1, dtype=torch.int64)] if part.numel() % 2 else [part]
    views = upload(padded, device)
    return _Tables(*(v for v, p in zip(views, padded, strict=True) if any(p is q for q in parts)))


class Plan:
    """The device state of one call shape, owned by whoever holds it (FlashInfer's plan/run).

    A plan holds the host-built index tables of ``(seqlens, keeps, num_basis)`` for x's dtype,
    width D and device, already on the device. ``run(..., plan=p)`` reads them and allocates
    nothing else that outlives the call, so the plan's owner decides the lifetime: keep it
    alive as long as work that reads it is queued or a CUDA graph that captured it can replay,
    and drop it afterwards. Use from any stream: a stream other than the one that built the
    plan first waits for the upload (an event, no host sync), and the tables are
    ``record_stream``ed on every stream that reads them, so dropping the plan while kernels
    are still queued never hands their memory to new work.

    Args:
        seqlens, keeps: host ints N_s and K_s (dense: ``[N] * S`` and ``[K] * S``).
        num_basis: M. dtype, D, device: those of the x it will run on.
    """

    def __init__(
        self,
        seqlens: list[int],
        keeps: list[int],
        num_basis: int,
        dtype: torch.dtype,
        D: int,
        device: torch.device | str,
    ) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if len(seqlens) != len(keeps):
            raise ValueError(f"keeps: one per segment ({len(seqlens)}), got {len(keeps)}")
        self.seqlens, self.keeps = tuple(int(n) for n in seqlens), tuple(int(k) for k in keeps)
        self.num_basis = int(num_basis)
        m_max = max((min(self.num_basis, k) for k in self.keeps), default=1)
        self.cfg = _config(device, dtype, D, max(self.seqlens, default=1), m_max)
        self.key = (self.seqlens, self.keeps, self.num_basis, self.cfg, dtype, int(D), device)
        self.device = device
        if _capturing(device):
            raise RuntimeError(
                "apet triton backend: CUDA-graph capture of a call shape that has not run "
                f"eagerly (seqlens {list(self.seqlens)[:8]}..., keep {list(self.keeps)[:8]}...): "
                "run it once before capturing (the usual warm-up), or build its Plan before "
                "the capture, so that its host-built tables are on the device"
            )
        self.tables = _build_tables(self.seqlens, self.keeps, self.num_basis, self.cfg, device)
        self._ready: torch.cuda.Event | None = None
        self._streams: set[int] = set()
        if device.type == "cuda":  # the upload went to the current stream
            self._ready = torch.cuda.Event()
            self._ready.record()
            self._streams.add(torch.cuda.current_stream(device).stream_id)

    def _use(self) -> _Tables:
        """The tables, made safe to read on the current stream."""
        if self.device.type == "cuda" and not _capturing(self.device):
            stream = torch.cuda.current_stream(self.device)
            if stream.stream_id not in self._streams:
                stream.wait_event(self._ready)
                self._streams.add(stream.stream_id)
            # The caching allocator frees on the host; without this, memory still read by
            # kernels queued on `stream` could go to new work once the plan is dropped.
            self.tables.seg.record_stream(stream)
        return self.tables


# Plans of calls made without one: the most recent call shapes, dropped least recently used
# (safe: every stream that read a plan was recorded on it). CUDA-graph captures without an
# explicit plan pin theirs in _CAPTURED, since the graph reads the tables on every replay;
# `release_captured_plans()` drops them once those graphs are gone.
_PLANS: OrderedDict[tuple, Plan] = OrderedDict()
_PLAN_CACHE_SIZE = 64
_CAPTURED: dict[tuple, Plan] = {}


def release_captured_plans() -> int:
    """Drop the plans that CUDA-graph captures without an explicit plan pinned; returns how
    many. Call it only after every graph captured through the op is destroyed (or will never
    replay again): a replay after it reads freed memory."""
    count = len(_CAPTURED)
    _CAPTURED.clear()
    return count


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached_plan(seqlens: list[int], keeps: list[int], num_basis: int, x: torch.Tensor) -> Plan:
    device = x.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    m_max = max(min(num_basis, k) for k in keeps)
    cfg = _config(device, x.dtype, x.shape[-1], max(seqlens), m_max)
    key = (tuple(seqlens), tuple(keeps), num_basis, cfg, x.dtype, x.shape[-1], device)
    plan = _PLANS.get(key) or _CAPTURED.get(key)
    if plan is None:
        plan = Plan(seqlens, keeps, num_basis, x.dtype, x.shape[-1], device)
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    elif key in _PLANS:
        _PLANS.move_to_end(key)
    if _capturing(device):
        _CAPTURED.setdefault(key, plan)
    return plan


def _offsets_fit_int32(n_max: int, stride_n: int, D: int, stride_d: int) -> bool:
    """Whether every element offset inside one segment fits int32 (the kernels' ``OFF32``)."""
    return n_max * abs(stride_n) + D * abs(stride_d) < 2**31


def run(
    x: torch.Tensor,
    seqlens: list[int],
    keeps: list[int],
    num_basis: int,
    ridge: float,
    merge: bool,
    dense: bool,
    plan: Plan | None = None,
) -> Outputs:
    """ApET on the Triton kernels (SPEC.md), flat outputs.

    Args:
        x: dense ``(S, N, D)`` (``dense=True``, all seqlens N) or packed ``(T, D)``;
            float16/bfloat16/float32, any strides.
        seqlens: host ints N_s; keeps: host ints K_s (validated by the caller).
        num_basis: M; ridge: relative ridge; merge: SPEC.md step 4.
        plan: a ``Plan`` of this call shape that the caller owns; None uses (and fills) the
            module's cache of recent call shapes.

    Returns:
        out ``(ΣK, D)`` x.dtype; kept ``(ΣK,)`` int64 (dense: local token indices, varlen:
        global rows); assign ``(T,)`` int64 (dense: local slots, varlen: global rows; -1 for
        dropped tokens when not merging).
    """
    # Triton launches on the current CUDA device: make it x's device.
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return _run(x, seqlens, keeps, num_basis, ridge, merge, dense, plan)


def _checked_plan(plan: Plan, x: torch.Tensor, seqlens, keeps, num_basis: int) -> Plan:
    device = x.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    got = (tuple(seqlens), tuple(keeps), num_basis, x.dtype, x.shape[-1], device)
    want = (plan.seqlens, plan.keeps, plan.num_basis, plan.key[4], plan.key[5], plan.device)
    if got != want:
        raise ValueError(
            "plan: made for (seqlens, keeps, num_basis, dtype, D, device) = "
            f"{_brief(want)}, called with {_brief(got)}"
        )
    return plan


def _brief(key: tuple) -> str:
    return str(tuple(list(v)[:6] if isinstance(v, tuple) else v for v in key))


def _run(
    x: torch.Tensor,
    seqlens: list[int],
    keeps: list[int],
    num_basis: int,
    ridge: float,
    merge: bool,
    dense: bool,
    plan: Plan | None,
) -> Outputs:
    D = x.shape[-1]
    dev = x.device
    S, T, R = len(seqlens), sum(seqlens), sum(keeps)
    if dense:
        stride_s, stride_n, stride_d = x.stride()
        n_div = x.shape[1]
    else:
        stride_s, (stride_n, stride_d), n_div = 0, x.stride(), max(T, 1)
    out = torch.empty(R, D, dtype=x.dtype, device=dev)
    kept = torch.empty(R, dtype=torch.int64, device=dev)
    assign = torch.empty(T, dtype=torch.int64, device=dev)
    if T == 0:
        return out, kept, assign
    n_max, k_max = max(seqlens), max(keeps)
    m_host = [min(num_basis, k) for k in keeps]
    m_max = max(m_host)
    if m_max > MAX_BASIS:
        raise ValueError(
            f"num_basis: the triton backend supports at most {MAX_BASIS} basis tokens per "
            f"segment (min(num_basis, keep)), got num_basis={num_basis} with keep up to {k_max}; "
            "use backend='cuda' or backend='torch'"
        )
    if plan is None:
        plan = _cached_plan(seqlens, keeps, num_basis, x)
    else:
        plan = _checked_plan(plan, x, seqlens, keeps, num_basis)
    cfg, tables = plan.cfg, plan._use()
    seg = tables.seg
    strides = (n_div, stride_s, stride_n, stride_d)
    off32 = _offsets_fit_int32(n_max, stride_n, D, stride_d)
    fusion = dict(enable_fp_fusion=FP_FUSION)

    # fps: means, then m_max + 1 step launches (the last one only finishes dot products).
    blk, seg_blk = tables.fps_blk, tables.fps_seg_blk
    nbt = blk.shape[0]
    nc = min(MAX_CHUNKS.value, triton.cdiv(n_max, CHUNK_TOKENS.value))  # fps.mean_chunks
    f32 = dict(dtype=torch.float32, device=dev)
    means = torch.empty(S, nc, D, **f32)
    dist, sqnorm = torch.empty(T, **f32), torch.empty(T, **f32)
    dots = torch.empty(m_max, T, **f32)
    basis = torch.empty(S, m_max, dtype=torch.int64, device=dev)
    pval = torch.empty(2, nbt, **f32)
    pidx = torch.empty(2, nbt, dtype=torch.int32, device=dev)
    fps_mean_kernel[(S, triton.cdiv(D, cfg.fps_d), nc)](
        x, seg, means, *strides, D, nc,
        OFF32=off32, BLOCK_N=cfg.fps_n, BLOCK_D=cfg.fps_d, num_warps=cfg.fps_warps, **fusion,
    )  # fmt: skip
    for step in range(m_max + 1):
        fps_step_kernel[(nbt,)](
            x, seg, blk, seg_blk, means, dist, sqnorm, dots, basis, pval, pidx,
            step, T, nbt, m_max, *strides, D, nc,
            FIRST=step == 0, OFF32=off32, BLOCK_N=cfg.fps_n, BLOCK_D=cfg.fps_d,
            BLOCK_P=cfg.fps_p, num_warps=cfg.fps_warps, **fusion,
        )  # fmt: skip

    # residual: only segments that keep more than their basis need errors.
    key = torch.empty(T, dtype=torch.int32, device=dev)
    if any(k > m for k, m in zip(keeps, m_host, strict=True)):
        rblk = tables.residual_blk
        residual_kernel[(rblk.shape[0],)](
            seg, rblk, sqnorm, dots, basis, key, float(ridge), T, m_max,
            MP=_basis_tile(m_max), BLOCK_N=cfg.residual_n, num_warps=cfg.residual_warps,
            **fusion,
        )  # fmt: skip

    # select: kept (ascending) and each kept token's own slot; dropped tokens get -1.
    select_kernel[(S,)](
        seg, key, basis, kept, assign, m_max,
        LOCAL=dense, BLOCK=cfg.select_block, num_warps=cfg.select_warps, **fusion,
    )  # fmt: skip

    # merge: duplicate kept rows, assignment GEMM + argmax, then the CSR mean (or a gather).
    # The fp16/bf16 tensor-core dot runs only on CUDA; the interpreter upcasts to fp32 (its
    # bf16 tl.dot is wrong), so CPU runs never execute the tensor-core path.
    upcast = not TENSOR_CORE_MERGE or x.device.type != "cuda" or x.dtype == torch.float32
    perm = row_start = kept  # unused placeholders when not merging
    if merge:
        dup = torch.empty(R, dtype=torch.int32, device=dev)
        merge_dedup_kernel[(S, triton.cdiv(k_max, cfg.dedup_j))](
            x, seg, sqnorm, dots, kept, dup, T, *strides, D,
            LOCAL=dense, OFF32=off32, BLOCK_J=cfg.dedup_j, BLOCK_D=cfg.dedup_d, num_warps=4,
            **fusion,
        )  # fmt: skip
        mblk = tables.merge_blk
        merge_assign_kernel[(mblk.shape[0],)](
            x, seg, mblk, sqnorm, kept, dup, assign, *strides, D,
            LOCAL=dense, UPCAST=upcast, OFF32=off32, BLOCK_N=cfg.merge_n, BLOCK_K=cfg.merge_k,
            BLOCK_D=cfg.merge_d, num_warps=cfg.merge_warps, num_stages=cfg.merge_stages,
            **fusion,
        )  # fmt: skip
        slots = assign
        if dense:  # local slots -> global output rows, to sort all segments at once
            slots = (assign.view(S, -1) + seg[:, SEG_OUT.value, None]).view(-1)
        # Stable: members of a row stay in token order, so the fp32 sum order is fixed.
        sorted_slots, perm = torch.sort(slots, stable=True)
        row_start = torch.searchsorted(sorted_slots, tables.row_ids)
    merge_mean_kernel[(R, triton.cdiv(D, cfg.row_d))](
        x, out, perm, row_start, kept, *strides, D, k_max,
        MERGE=merge, LOCAL=dense, BLOCK_M=cfg.row_m, BLOCK_D=cfg.row_d, num_warps=4, **fusion,
    )  # fmt: skip
    return out, kept, assign
