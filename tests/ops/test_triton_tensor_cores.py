"""The fp16/bf16 tensor-core merge GEMM (``tl.dot`` on fp16/bf16 tiles in merge.py), on a GPU.

CPU runs never execute it: under the interpreter the launcher upcasts to fp32 with an IEEE dot
(the interpreter's bf16 ``tl.dot`` is wrong), and fp32 inputs always take that path. These tests
are the first thing to run on a GPU for it: the tensor-core path against the float64 oracle at
the real model shapes, and against the fp32 path of the same kernels (``TENSOR_CORE_MERGE``
off), both up to cosine near-ties (backend_checks.assert_consistent). Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from backend_checks import assert_consistent, oracle_dense, oracle_varlen, spread

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(1, 576, 1024, 96), (8, 256, 4096, 32), (1, 2048, 3584, 614)]  # LLaVA, Video, Qwen


def triton_dense(x, keep):
    from apet_kernels.ops import triton as backend

    return backend.compress_dense(x, keep, 10, 1e-4, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("S,N,D,K", SHAPES)
def test_tensor_core_merge_matches_oracle(dtype, S, N, D, K):
    x = spread(S, N, D, seed=N, dtype=dtype)
    got = triton_dense(x.cuda(), K)
    assert_consistent(got, x, oracle_dense(x, K), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_merge_matches_fp32_dot(dtype, monkeypatch):
    from apet_kernels.ops.triton import launcher

    x = spread(1, 576, 1024, seed=3, dtype=dtype)
    tensor_cores = triton_dense(x.cuda(), 96)
    monkeypatch.setattr(launcher, "TENSOR_CORE_MERGE", False)
    fp32 = triton_dense(x.cuda(), 96)
    assert torch.equal(tensor_cores[1], fp32[1])
    as_oracle = (fp32[0].cpu(), fp32[1].cpu(), fp32[2].cpu())
    assert_consistent(tensor_cores, x, as_oracle, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_merge_varlen(dtype):
    from apet_kernels.ops import triton as backend

    seqlens, keeps = [576, 0, 300, 1], [96, 0, 90, 1]
    x = spread(1, sum(seqlens), 1024, seed=5, dtype=dtype)[0]
    got = backend.compress_varlen(x.cuda(), seqlens, keeps, 10, 1e-4, True)
    want = oracle_varlen(x, seqlens, keeps)
    assert torch.equal(got[1].cpu(), want[1])
    differ = got[2].cpu() != want[2]
    assert int(differ.sum()) <= 2, f"{int(differ.sum())} of {len(x)} assignments differ"
