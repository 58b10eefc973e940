"""The Triton backend against the float64 oracle, on CPU tensors under the Triton interpreter.

conftest sets ``TRITON_INTERPRET=1`` before triton is imported, so these run without a GPU. They
check semantics (SPEC.md), not GPU-only behaviour: the interpreter neither catches out-of-bounds
accesses nor lowers the kernels, so one more test compiles every kernel for sm_90 (ptxas only,
no device) in a subprocess without the interpreter.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from backend_checks import DTYPES, assert_matches, gaussian

import apet_kernels
from apet_kernels.ops import reference

triton = pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")


def triton_dense(x, keep, num_basis=10, ridge=1e-4, merge=True):
    from apet_kernels.ops import triton as backend

    return backend.compress_dense(x, keep, num_basis, ridge, merge)


def triton_varlen(x, seqlens, keeps, num_basis=10, ridge=1e-4, merge=True):
    from apet_kernels.ops import triton as backend

    return backend.compress_varlen(x, seqlens, keeps, num_basis, ridge, merge)


def assert_indices_valid(kept, assign, n, k):
    """SPEC.md NaN/Inf contract: kept unique, ascending, in [0, N); assign in [-1, K)."""
    assert kept.shape[-1] == k
    assert bool((kept >= 0).all()) and bool((kept < n).all())
    assert bool((kept[..., 1:] > kept[..., :-1]).all())
    assert bool((assign >= -1).all()) and bool((assign < k).all())


@pytest.fixture
def small_blocks(monkeypatch):
    """GPU-like small tiles (16 tokens, 16 features): exercises every multi-block loop (feature
    chunks, several token blocks per segment, partials re-reduced in several chunks, several K
    tiles and duplicate-scan blocks, several select tiles) on small shapes."""
    from apet_kernels.ops.triton import launcher

    original = launcher._config

    def small(*args, **kwargs):
        cfg = original(*args, **kwargs)
        return dataclasses.replace(
            cfg, fps_n=16, fps_d=16, fps_p=2, residual_n=16, select_block=16,
            merge_n=16, merge_k=16, merge_d=16, row_m=2, row_d=16, dedup_j=16, dedup_d=16,
        )  # fmt: skip

    monkeypatch.setattr(launcher, "_config", small)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merge", [True, False])
def test_dense_matches_oracle(dtype, merge):
    x = gaussian(2, 97, 40, seed=1, dtype=dtype)
    want = reference.compress_dense(x.double(), 30, 10, 1e-4, merge)
    assert_matches(triton_dense(x, 30, merge=merge), want, dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_matches_oracle(dtype):
    # Zero-length segments, N = 1, K = N, K <= M and K > M segments in one call.
    seqlens, keeps = [50, 0, 77, 1, 0, 33, 12], [12, 0, 30, 1, 0, 33, 4]
    x = gaussian(sum(seqlens), 24, seed=2, dtype=dtype)
    want = reference.compress_varlen(x.double(), seqlens, keeps, 10, 1e-4, True)
    assert_matches(triton_varlen(x, seqlens, keeps), want, dtype)


@pytest.fixture
def gpu_blocks(monkeypatch):
    """The block sizes the launcher picks on a GPU, run by the interpreter."""
    from apet_kernels.ops.triton import launcher

    def gpu(device, dtype, D, n_max, m_max):
        return launcher._gpu_config(dtype, D, n_max, m_max)

    monkeypatch.setattr(launcher, "_config", gpu)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_blocks_match_oracle(gpu_blocks, dtype):
    x = gaussian(2, 97, 70, seed=17, dtype=dtype)
    want = reference.compress_dense(x.double(), 30, 10, 1e-4, True)
    assert_matches(triton_dense(x, 30), want, dtype)


@pytest.mark.parametrize("n_max,m_max", [(1, 1), (576, 10), (65536, 10), (729, 16), (300, 40),
                                         (300, 128)])  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_config_is_valid(n_max, m_max, dtype):
    from apet_kernels.ops.triton import launcher

    cfg = launcher._gpu_config(dtype, 8192, n_max, m_max)
    blocks = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.endswith("s")}
    assert all(v >= 1 and v & (v - 1) == 0 for v in blocks.values()), blocks  # powers of two
    assert min(cfg.merge_n, cfg.merge_k, cfg.merge_d) >= 16  # tl.dot's minimum block
    assert cfg.fps_n * cfg.fps_d // (32 * cfg.fps_warps) <= 16
    # Residual (BLOCK_N, MP) tiles: at most 32 fp32 values per thread each.
    mp = launcher._basis_tile(m_max)
    assert cfg.residual_n * mp // (32 * cfg.residual_warps) <= 32


def test_gpu_config_depends_on_the_segment_only():
    # Issue 10 item 3: every field that decides an arithmetic order is the same for any batch
    # and any longest segment, for a given dtype, D and basis size (only select's blocking,
    # which is integer-exact, follows the longest segment).
    from apet_kernels.ops.triton import launcher

    exact = ("select_block", "select_warps")
    for dtype in DTYPES:
        for m_max in (4, 10, 40):
            cfgs = {
                tuple(v for k, v in dataclasses.asdict(
                    launcher._gpu_config(dtype, 1024, n_max, m_max)).items() if k not in exact)
                for n_max in (1, 17, 576, 1025, 4096, 65536)
            }  # fmt: skip
            assert len(cfgs) == 1, (dtype, m_max, cfgs)
    params = list(inspect.signature(launcher._gpu_config).parameters)
    assert params == ["dtype", "D", "n_max", "m_max"]  # no segment count, total or SM count


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_small_blocks_match_oracle(small_blocks, dtype):
    # D = 37 spans three 16-wide feature chunks with a ragged tail; N = 50 spans four token
    # blocks; K = 20 spans two K tiles.
    x = gaussian(1, 50, 37, seed=3, dtype=dtype)
    want = reference.compress_dense(x.double(), 20, 10, 1e-4, True)
    assert_matches(triton_dense(x, 20), want, dtype)
    seqlens, keeps = [40, 0, 21, 1], [18, 0, 5, 1]
    xv = gaussian(sum(seqlens), 37, seed=4, dtype=dtype)
    want = reference.compress_varlen(xv.double(), seqlens, keeps, 10, 1e-4, True)
    assert_matches(triton_varlen(xv, seqlens, keeps), want, dtype)


@needs_interpreter
def test_many_segments():
    generator = torch.Generator().manual_seed(5)
    seqlens = torch.randint(0, 40, (24,), generator=generator).tolist()
    keeps = [0 if n == 0 else 1 + (n * 3) // 10 for n in seqlens]
    x = gaussian(sum(seqlens), 16, seed=5)
    want = reference.compress_varlen(x.double(), seqlens, keeps, 6, 1e-4, True)
    assert_matches(triton_varlen(x, seqlens, keeps, num_basis=6), want, torch.float32)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merge", [True, False])
def test_keep_all_is_identity(dtype, merge):
    x = gaussian(2, 33, 20, seed=6, dtype=dtype)
    out, kept, assign = triton_dense(x, 33, merge=merge)
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       x.view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip
    assert torch.equal(kept, torch.arange(33).expand(2, 33))
    assert torch.equal(assign, torch.arange(33).expand(2, 33))
    xv = gaussian(40, 20, seed=7, dtype=dtype)
    out, kept, assign = triton_varlen(xv, [25, 0, 15], [25, 0, 15], merge=merge)
    assert torch.equal(out, xv) and torch.equal(kept, torch.arange(40))
    assert torch.equal(assign, torch.arange(40))


@needs_interpreter
@pytest.mark.parametrize("keep", [1, 4, 10])
def test_keep_at_most_basis_is_fps(keep):
    x = gaussian(3, 29, 12, seed=8)
    want = reference.compress_dense(x.double(), keep, 10, 1e-4, True)
    assert_matches(triton_dense(x, keep), want, torch.float32)


@needs_interpreter
def test_single_token_segments():
    x = gaussian(3, 1, 9, seed=9, dtype=torch.float16)
    out, kept, assign = triton_dense(x, 1)
    assert torch.equal(out, x) and not kept.any() and not assign.any()


@needs_interpreter
@pytest.mark.parametrize("ridge", [1e-4, 0.0])
def test_duplicates_and_zero_tokens(ridge):
    base = gaussian(1, 6, 16, seed=10)
    # Six points three times each plus two all-zero tokens: exact-zero FPS distances, exactly
    # tied errors and cosines between copies, all broken by the lowest index. With M = 4 the
    # basis takes 4 of the 7 distinct points; K = 5 and 6 then take 1 and 2 of the 3 copies of
    # the worst-approximated point. (Larger K would rank tokens whose errors are only ridge
    # residue, a near-tie that fp32 and the float64 oracle may order differently.)
    x = torch.cat([base, base, torch.zeros(1, 2, 16), base], dim=1)
    for keep in (3, 5, 6):
        got = triton_dense(x, keep, num_basis=4, ridge=ridge)
        assert torch.isfinite(got[0]).all()
        want = reference.compress_dense(x.double(), keep, 4, ridge, True)
        assert_matches(got, want, x.dtype)
    got = triton_dense(torch.zeros(2, 30, 8), 12, ridge=ridge)
    assert torch.equal(got[0], torch.zeros(2, 12, 8))
    assert torch.equal(got[1], torch.arange(12).expand(2, 12))


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_keep_indices_valid(dtype):
    x = gaussian(2, 40, 16, seed=11, dtype=dtype)
    x[0, 3, 2] = float("nan")
    x[0, 7] = float("inf")
    x[0, 9, 0] = float("-inf")
    x[1] = float("nan")
    for keep in (1, 5, 25):
        out, kept, assign = triton_dense(x, keep)
        assert_indices_valid(kept, assign, 40, keep)
        assert bool((assign >= 0).all())  # merging assigns every token
    seqlens = [20, 0, 60]
    xv = gaussian(80, 16, seed=12, dtype=dtype)
    xv[5:9] = float("nan")
    xv[30, 1] = float("inf")
    for merge in (True, False):
        out, kept, assign = triton_varlen(xv, seqlens, [7, 0, 30], merge=merge)
        # Global rows: segment 0 owns rows [0, 20) and slots [0, 7), segment 2 the rest.
        assert_indices_valid(kept, assign, 80, 37)
        assert bool((kept[:7] < 20).all()) and bool((kept[7:] >= 20).all())
        assert bool((assign[:20] < 7).all()) and bool((assign[20:] != -1).all() or not merge)
        assert bool((assign[20:] == -1).logical_or(assign[20:] >= 7).all())


@needs_interpreter
def test_non_contiguous_input():
    base = gaussian(40, 3, 50, seed=13)
    x = base.transpose(0, 1)[:, :, ::2]  # (3, 40, 25), no unit stride anywhere
    assert not x.is_contiguous()
    got = triton_dense(x, 11)
    assert_matches(got, reference.compress_dense(x.double(), 11, 10, 1e-4, True), x.dtype)
    contiguous = triton_dense(x.contiguous(), 11)
    assert all(torch.equal(a, b) for a, b in zip(got, contiguous, strict=True))
    xv = gaussian(30, 40, seed=14)[:, ::3]  # (30, 14), row stride 40
    got = triton_varlen(xv, [10, 20], [4, 6])
    want = reference.compress_varlen(xv.double(), [10, 20], [4, 6], 10, 1e-4, True)
    assert_matches(got, want, xv.dtype)


@needs_interpreter
def test_int64_offsets_path(monkeypatch):
    # Segments whose offsets pass 2**31 elements take int64 in-segment offsets; run that path
    # on a small input by pretending it is needed.
    from apet_kernels.ops.triton import launcher

    monkeypatch.setattr(launcher, "_offsets_fit_int32", lambda *args: False)
    x = gaussian(2, 40, 12, seed=18)
    assert_matches(triton_dense(x, 15), reference.compress_dense(x.double(), 15, 10, 1e-4, True),
                   x.dtype)  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("merge", [True, False])
def test_feature_offsets_past_int32(merge):
    # A feature stride whose (D - 1) * stride_d passes 2**31 while stride_d itself fits int32:
    # each kernel's `d * stride_d` must be formed in int64 (it wrapped, and the interpreter
    # segfaulted, before). The view spans a 4 GiB fp16 storage of which only the few pages that
    # hold the 3 x 40 values are ever touched.
    T, D, stride_d = 40, 3, 2**30 + 64
    try:
        storage = torch.empty((D - 1) * stride_d + T, dtype=torch.float16)
    except RuntimeError:  # no overcommit on this machine
        pytest.skip("cannot reserve a 4 GiB virtual buffer")
    values = gaussian(T, D, seed=19, dtype=torch.float16)
    x = storage.as_strided((T, D), (1, stride_d))
    x.copy_(values)
    # num_basis 2 < D, so the errors are not ridge residue (no near-ties against the oracle).
    got = triton_varlen(x, [15, 25], [6, 9], num_basis=2, merge=merge)
    assert_matches(got, reference.compress_varlen(values.double(), [15, 25], [6, 9], 2, 1e-4,
                                                  merge), torch.float16)  # fmt: skip
    xd = storage.as_strided((2, 20, D), (20, 1, stride_d))
    got = triton_dense(xd, 7, num_basis=2, merge=merge)
    want = reference.compress_dense(values.view(2, 20, D).double(), 7, 2, 1e-4, merge)
    assert_matches(got, want, torch.float16)


@needs_interpreter
def test_large_basis_gpu_blocks(gpu_blocks):
    # M = 40: MP = 64, the residual's 64-token, 8-warp GPU tiles and its run-time factor and
    # substitution loops (unrolled over MP, this kernel took 611 s to compile for sm_90 on a
    # 2-core CPU).
    x = gaussian(1, 150, 48, seed=20)
    want = reference.compress_dense(x.double(), 60, 40, 1e-4, True)
    assert_matches(triton_dense(x, 60, num_basis=40), want, x.dtype)


def test_basis_limit_is_an_argument_error():
    from apet_kernels.ops.triton import launcher

    x = torch.zeros(1, 130, 4)
    with pytest.raises(ValueError, match="num_basis"):
        launcher.run(x, [130], [129], 129, 1e-4, True, dense=True)


@needs_interpreter
def test_plans_and_cuda_graph_capture(monkeypatch):
    # Capture logic, run on CPU by pretending the stream is capturing: a shape whose tables are
    # not on the device raises a clear error (it cannot upload them inside a capture), a
    # warmed-up shape runs and its plan is pinned until released, even when the cache drops it.
    from apet_kernels.ops.triton import launcher

    monkeypatch.setattr(launcher, "_CAPTURED", {})
    monkeypatch.setattr(launcher, "_PLANS", launcher.OrderedDict())
    x = gaussian(2, 30, 8, seed=21)
    monkeypatch.setattr(launcher, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="warm-up"):
        triton_dense(x, 9)
    monkeypatch.setattr(launcher, "_capturing", lambda device: False)
    eager = triton_dense(x, 9)
    assert not launcher._CAPTURED and len(launcher._PLANS) == 1
    monkeypatch.setattr(launcher, "_capturing", lambda device: True)
    captured = triton_dense(x, 9)
    assert all(torch.equal(a, b) for a, b in zip(eager, captured, strict=True))
    (plan,) = launcher._CAPTURED.values()
    launcher._PLANS.clear()
    captured = triton_dense(x, 9)  # served from the pinned plan, not rebuilt inside a capture
    assert all(torch.equal(a, b) for a, b in zip(eager, captured, strict=True))
    assert launcher.release_captured_plans() == 1 and not launcher._CAPTURED
    # The packed tables hold what the kernels expect.
    assert plan.tables.seg.tolist() == [[0, 30, 0, 9, 9], [30, 30, 9, 9, 9]]
    assert torch.equal(plan.tables.row_ids, torch.arange(19))


@needs_interpreter
def test_explicit_plan(monkeypatch):
    # A plan the caller owns: same results as the cache, nothing cached, a plan of another call
    # shape (or dtype) is refused by name, and the cache stays bounded.
    from apet_kernels.ops.triton import launcher

    monkeypatch.setattr(launcher, "_PLANS", launcher.OrderedDict())
    monkeypatch.setattr(launcher, "_PLAN_CACHE_SIZE", 3)
    x = gaussian(2, 30, 8, seed=22)
    plan = launcher.Plan([30, 30], [9, 9], 10, x.dtype, 8, x.device)
    planned = launcher.run(x, [30, 30], [9, 9], 10, 1e-4, True, dense=True, plan=plan)
    assert not launcher._PLANS
    cached = triton_dense(x, 9)
    assert all(torch.equal(a.view(-1), b.view(-1)) for a, b in zip(planned, cached, strict=True))
    with pytest.raises(ValueError, match="plan"):
        launcher.run(x, [30, 30], [8, 8], 10, 1e-4, True, dense=True, plan=plan)
    with pytest.raises(ValueError, match="plan"):
        launcher.run(x.half(), [30, 30], [9, 9], 10, 1e-4, True, dense=True, plan=plan)
    for keep in (3, 4, 5, 6, 7):
        triton_dense(x, keep)
    assert len(launcher._PLANS) == 3


@needs_interpreter
def test_deterministic():
    x = gaussian(2, 65, 24, seed=15, dtype=torch.bfloat16)
    first, second = triton_dense(x, 20), triton_dense(x, 20)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@needs_interpreter
def test_through_the_op():
    x = gaussian(2, 50, 16, seed=16, dtype=torch.float16)
    got = apet_kernels.compress(x, 12, backend="triton")
    want = reference.compress_dense(x.double(), 12, 10, 1e-4, True)
    assert_matches(tuple(got), want, x.dtype)
    got = apet_kernels.compress_varlen(x.view(100, 16), [60, 40], 9, backend="triton")
    want = reference.compress_varlen(x.view(100, 16).double(), [60, 40], [9, 9], 10, 1e-4, True)
    assert_matches(tuple(got), want, x.dtype)


def test_unavailable_without_interpreter(monkeypatch):
    from apet_kernels.ops import triton as backend

    x = torch.zeros(1, 4, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in backend.unavailable_reason(x)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        apet_kernels.compress(x, 2, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unavailable_reason(x) is None
    assert "float64" in backend.unavailable_reason(x.double())
    assert backend.unavailable_reason(torch.empty(0, device="meta")) is not None


def test_kernels_compile_for_sm90():
    """Every kernel variant real launches request, compiled to an sm_90 cubin with the
    signatures Triton's JIT builds from the launcher's arguments (triton_compile_check.py),
    in a subprocess without the interpreter; no GPU is needed. Also checks that ``warmup``
    compiles every variant calls of other batch compositions use. The timeout also guards
    compile time (the residual kernel once took 611 s at MP = 64 on a 2-core CPU)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    paths = [str(root), str(root / "tests"), env.get("PYTHONPATH")]  # package + test helpers
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    script = Path(__file__).with_name("triton_compile_check.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every variant compiled for sm_90" in result.stdout
