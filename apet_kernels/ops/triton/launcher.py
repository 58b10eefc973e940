"""Chains the four fused stages for dense and varlen input; the only place that allocates.

Dense ``(S, N, D)`` and packed ``(T, D)`` input run the same kernels: tokens live in one packed
index space (dense token ``(s, i)`` is ``s * N + i``) and every kernel reads x through
``row_offset`` with the caller's strides, so non-contiguous input is never copied. Per-segment
tables (token start, N_s, output start, K_s, m_s), the (segment, token block) tables of the
1-D grids and the CSR row ids are built on the host from host ints, packed into one int64
buffer, copied once per shape (pinned memory, asynchronous on the current stream) and cached.
Nothing here reads device data on the host and a new shape costs no host sync either.

CUDA graphs: capture after one eager call with the same shapes (the usual warm-up), so the
tables are cached; a capture that would have to build them raises instead of failing inside
CUDA. Tables used by a captured graph are kept for the life of the process, because the graph
reads their memory on every replay and the LRU cache alone could free it.

Block sizes are fixed per call by a small heuristic instead of autotuning (multi-config autotune
needs a driver, and the interpreter's cost grows with programs x block ops, so it gets large
blocks). GPU choices are the usual Triton starting points for streaming kernels (4 warps, 16 KB
tiles) and a 64x64x64 fp16 GEMM tile; they are not yet tuned on hardware.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton

from ..upload import upload
from . import MAX_BASIS
from .fps import SEG_COLS, SEG_OUT, fps_mean_kernel, fps_step_kernel
from .merge import merge_assign_kernel, merge_mean_kernel
from .residual import residual_kernel
from .select import select_kernel

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@dataclass(frozen=True)
class _Config:
    """Block sizes and warps per kernel (``fps_*``: centroid and step kernels; ``row_*``: the
    output-row mean/gather)."""

    fps_n: int
    fps_d: int
    fps_warps: int
    fps_chunks: int  # token chunks of the centroid sum, to fill the GPU for one image
    fps_p: int  # partials re-reduced per chunk at the start of each FPS step
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


def _basis_tile(m_max: int) -> int:
    """MP: the residual stage's basis dimension, m_max rounded up to a power of two (>= 2)."""
    return _pow2(m_max, 2, 1 << 30)


def _config(
    x: torch.Tensor, n_max: int, k_max: int, m_max: int, num_segments: int, total: int
) -> _Config:
    """Block sizes for this call: GPU tiles on CUDA, large tiles under the interpreter."""
    D = x.shape[-1]
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return _gpu_config(x.dtype, D, n_max, k_max, m_max, num_segments, total, sms)
    # Interpreter: its cost grows with programs x block ops, so few programs and big tiles.
    fps_n = _pow2(n_max, 16, 1024)
    return _Config(
        fps_n=fps_n, fps_d=_pow2(D, 16, max(16, 2**18 // fps_n)), fps_warps=4, fps_chunks=1,
        fps_p=_pow2(triton.cdiv(n_max, fps_n), 16, 1024),
        residual_n=_pow2(n_max, 16, 1024), residual_warps=4, select_block=_pow2(n_max, 16, 8192),
        select_warps=4, merge_n=_pow2(n_max, 16, 256), merge_k=_pow2(k_max, 16, 256),
        merge_d=_pow2(D, 16, 256), merge_warps=4, merge_stages=1,
        row_m=32, row_d=_pow2(D, 16, 1024),
    )  # fmt: skip


def _gpu_config(
    dtype: torch.dtype,
    D: int,
    n_max: int,
    k_max: int,
    m_max: int,
    num_segments: int,
    total: int,
    sms: int,
) -> _Config:
    """GPU block sizes (a pure function of the shapes, so tests can run them interpreted)."""
    # FPS tiles of fps_n x 64 with at most 16 elements per thread: 128 registers (ptxas, sm_90;
    # 32x128 on 4 warps needs ~250). Small problems take 16-token blocks so one image still
    # spreads over the SMs; long segments take up to 128-token blocks so that no segment has
    # more than 256 blocks, whose partials every program of the next step re-reads (2048
    # partials x 2048 programs would be 32 MB of L2 reads per step at N = 65536).
    fps_n, fps_d = (32 if total >= 2 * sms * 32 else 16), 64
    while fps_n < 128 and triton.cdiv(n_max, fps_n) > 256:
        fps_n *= 2
    d_blocks = triton.cdiv(D, fps_d)
    chunks = max(1, min(16, (2 * sms) // max(1, num_segments * d_blocks), triton.cdiv(n_max, 64)))
    select_block = _pow2(n_max, 256, 4096)
    # GEMM tiles without spills (ptxas, sm_90): fp16/bf16 64x64x32 on 4 warps, 3 stages (176
    # registers), or 32x64x32 (112) when 64-token blocks would leave SMs idle (one image); fp32
    # (IEEE dot) 64x64x32 on 8 warps, 2 stages (189). The gathered kept rows rule out TMA.
    fp32 = dtype == torch.float32
    merge_n = 64 if fp32 or triton.cdiv(total, 64) >= sms else 32
    # Residual tiles (BLOCK_N, MP) x 3 and (MP, MP) x 2 without spills (ptxas, sm_90): 128 tokens
    # on 4 warps up to MP = 32 (166 registers), 64 on 8 warps at MP = 64 (167); MP = 128 takes
    # 32 on 8 warps (255 registers, a few hundred bytes of spills).
    mp = _basis_tile(m_max)
    residual_n, residual_warps = (128, 4) if mp <= 32 else (64, 8) if mp <= 64 else (32, 8)
    return _Config(
        fps_n=fps_n, fps_d=fps_d, fps_warps=max(4, fps_n // 8), fps_chunks=chunks,
        fps_p=_pow2(triton.cdiv(n_max, fps_n), 16, 1024), residual_n=residual_n,
        residual_warps=residual_warps,
        select_block=select_block, select_warps=max(4, select_block // 256),
        merge_n=merge_n, merge_k=_pow2(k_max, 16, 64), merge_d=32, merge_warps=8 if fp32 else 4,
        merge_stages=2 if fp32 else 3, row_m=8, row_d=_pow2(D, 32, 256),
    )  # fmt: skip


@dataclass(frozen=True)
class _Tables:
    """Device views of one packed int64 buffer (see ``_tables``)."""

    seg: torch.Tensor  # (S, SEG_COLS): token start, N_s, output start, K_s, m_s (fps.SEG_*)
    fps_blk: torch.Tensor  # (NBT, 2): segment, local start of each FPS token block
    fps_seg_blk: torch.Tensor  # (S, 2): first FPS block, block count
    residual_blk: torch.Tensor  # (residual blocks, 2)
    merge_blk: torch.Tensor  # (merge blocks, 2)
    row_ids: torch.Tensor  # (R + 1,): 0..R, the CSR row boundaries searched for
    ready: torch.cuda.Event | None  # recorded after the copy (CUDA only)


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


@functools.lru_cache(maxsize=64)
def _tables(
    seqlens: tuple[int, ...],
    keeps: tuple[int, ...],
    num_basis: int,
    blocks: tuple[int, int, int],
    device: torch.device,
) -> _Tables:
    """All host-built tables of one call shape, copied to ``device`` in one transfer.

    ``blocks`` = (fps_n, residual_n, merge_n). On CUDA the buffer is staged in pinned memory and
    copied with ``non_blocking=True``: no host sync (a pageable copy would wait for all queued
    work on the stream); the caching host allocator keeps the staging block until the copy is
    done. Every later eager caller makes its own stream wait for ``ready`` (the copy went to the
    stream current at the first call), which costs no host sync either.
    """
    if _capturing(device):
        raise RuntimeError(
            "apet triton backend: CUDA-graph capture of a call shape that has not run eagerly "
            f"(seqlens {list(seqlens)[:8]}..., keep {list(keeps)[:8]}...): run it once before "
            "capturing (the usual warm-up), so that its host-built tables are cached"
        )
    lengths = torch.tensor(seqlens, dtype=torch.int64)
    k = torch.tensor(keeps, dtype=torch.int64)
    seg = torch.stack(
        [torch.cumsum(lengths, 0) - lengths, lengths, torch.cumsum(k, 0) - k, k,
         k.clamp(max=num_basis)], dim=1,
    )  # fmt: skip
    assert seg.shape[1] == SEG_COLS.value
    fps_blk, fps_seg_blk = _host_blocks(lengths, blocks[0])
    residual_blk, _ = _host_blocks(lengths, blocks[1])
    merge_blk, _ = _host_blocks(lengths, blocks[2])
    parts = [seg, fps_blk, fps_seg_blk, residual_blk, merge_blk, torch.arange(int(k.sum()) + 1)]
    views = upload(parts, device)
    ready = None
    if device.type == "cuda":  # the copy went to the current stream: later callers wait on it
        ready = torch.cuda.Event()
        ready.record()
    return _Tables(*views, ready=ready)


# Tables that a captured CUDA graph reads on replay: never freed (see the module docstring).
_CAPTURED: dict[tuple, _Tables] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached_tables(
    seqlens: list[int], keeps: list[int], num_basis: int, cfg: _Config, device: torch.device
) -> _Tables:
    key = (tuple(seqlens), tuple(keeps), num_basis, (cfg.fps_n, cfg.residual_n, cfg.merge_n),
           device)  # fmt: skip
    tables = _tables(*key)
    if _capturing(device):
        _CAPTURED.setdefault(key, tables)
    elif tables.ready is not None:
        torch.cuda.current_stream(device).wait_event(tables.ready)
    return tables


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
) -> Outputs:
    """ApET on the Triton kernels (SPEC.md), flat outputs.

    Args:
        x: dense ``(S, N, D)`` (``dense=True``, all seqlens N) or packed ``(T, D)``;
            float16/bfloat16/float32, any strides.
        seqlens: host ints N_s; keeps: host ints K_s (validated by the caller).
        num_basis: M; ridge: relative ridge; merge: SPEC.md step 4.

    Returns:
        out ``(ΣK, D)`` x.dtype; kept ``(ΣK,)`` int64 (dense: local token indices, varlen:
        global rows); assign ``(T,)`` int64 (dense: local slots, varlen: global rows; -1 for
        dropped tokens when not merging).
    """
    # Triton launches on the current CUDA device: make it x's device.
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return _run(x, seqlens, keeps, num_basis, ridge, merge, dense)


def _run(
    x: torch.Tensor,
    seqlens: list[int],
    keeps: list[int],
    num_basis: int,
    ridge: float,
    merge: bool,
    dense: bool,
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
    cfg = _config(x, n_max, k_max, m_max, S, T)
    tables = _cached_tables(seqlens, keeps, num_basis, cfg, dev)
    seg = tables.seg
    strides = (n_div, stride_s, stride_n, stride_d)
    off32 = _offsets_fit_int32(n_max, stride_n, D, stride_d)

    # fps: means, then m_max + 1 step launches (the last one only finishes dot products).
    blk, seg_blk = tables.fps_blk, tables.fps_seg_blk
    nbt = blk.shape[0]
    nc = cfg.fps_chunks
    f32 = dict(dtype=torch.float32, device=dev)
    means = torch.empty(S, nc, D, **f32)
    dist, sqnorm = torch.empty(T, **f32), torch.empty(T, **f32)
    dots = torch.empty(m_max, T, **f32)
    basis = torch.empty(S, m_max, dtype=torch.int64, device=dev)
    pval = torch.empty(2, nbt, **f32)
    pidx = torch.empty(2, nbt, dtype=torch.int32, device=dev)
    fps_mean_kernel[(S, triton.cdiv(D, cfg.fps_d), nc)](
        x, seg, means, *strides, D, nc,
        OFF32=off32, BLOCK_N=cfg.fps_n, BLOCK_D=cfg.fps_d, num_warps=cfg.fps_warps,
    )  # fmt: skip
    ncp = triton.next_power_of_2(nc)
    for step in range(m_max + 1):
        fps_step_kernel[(nbt,)](
            x, seg, blk, seg_blk, means, dist, sqnorm, dots, basis, pval, pidx,
            step, T, nbt, m_max, *strides, D, nc,
            FIRST=step == 0, OFF32=off32, NCP=ncp,
            BLOCK_N=cfg.fps_n, BLOCK_D=cfg.fps_d, BLOCK_P=cfg.fps_p, num_warps=cfg.fps_warps,
        )  # fmt: skip

    # residual: only segments that keep more than their basis need errors.
    key = torch.empty(T, dtype=torch.int32, device=dev)
    if any(k > m for k, m in zip(keeps, m_host, strict=True)):
        rblk = tables.residual_blk
        residual_kernel[(rblk.shape[0],)](
            seg, rblk, sqnorm, dots, basis, key, float(ridge), T, m_max,
            MP=_basis_tile(m_max), BLOCK_N=cfg.residual_n, num_warps=cfg.residual_warps,
        )  # fmt: skip

    # select: kept (ascending) and each kept token's own slot; dropped tokens get -1.
    select_kernel[(S,)](
        seg, key, basis, kept, assign, m_max,
        LOCAL=dense, BLOCK=cfg.select_block, num_warps=cfg.select_warps,
    )  # fmt: skip

    # merge: assignment GEMM + argmax, then the CSR mean (or a gather without merging).
    upcast = x.device.type != "cuda" or x.dtype == torch.float32
    perm = row_start = kept  # unused placeholders when not merging
    if merge:
        mblk = tables.merge_blk
        merge_assign_kernel[(mblk.shape[0],)](
            x, seg, mblk, sqnorm, kept, assign, *strides, D,
            LOCAL=dense, UPCAST=upcast, OFF32=off32, BLOCK_N=cfg.merge_n, BLOCK_K=cfg.merge_k,
            BLOCK_D=cfg.merge_d, num_warps=cfg.merge_warps, num_stages=cfg.merge_stages,
        )  # fmt: skip
        slots = assign
        if dense:  # local slots -> global output rows, to sort all segments at once
            slots = (assign.view(S, -1) + seg[:, SEG_OUT.value, None]).view(-1)
        # Stable: members of a row stay in token order, so the fp32 sum order is fixed.
        sorted_slots, perm = torch.sort(slots, stable=True)
        row_start = torch.searchsorted(sorted_slots, tables.row_ids)
    merge_mean_kernel[(R, triton.cdiv(D, cfg.row_d))](
        x, out, perm, row_start, kept, *strides, D, k_max,
        MERGE=merge, LOCAL=dense, BLOCK_M=cfg.row_m, BLOCK_D=cfg.row_d, num_warps=4,
    )  # fmt: skip
    return out, kept, assign
