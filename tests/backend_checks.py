"""Helpers shared by the backend test files: inputs, the per-dtype tolerance, oracle comparison."""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tolerance of an op's output against the float64 oracle run on the same (rounded) input: the
# output is one rounding of an fp32 mean to the input dtype, so about one ulp of that dtype (a
# full bf16 ulp, as the Triton interpreter's fp32->bf16 cast truncates).
VALUE_TOL = {
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal values drawn in float64 from ``seed``, then rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def assert_matches(got, want, dtype: torch.dtype) -> None:
    """Indices identical, values within the dtype's tolerance of the float64 oracle ``want``."""
    out, kept, assign = (t.cpu() for t in got)
    assert out.dtype == dtype and kept.dtype == torch.int64 and assign.dtype == torch.int64
    assert out.is_contiguous() and kept.is_contiguous() and assign.is_contiguous()
    assert torch.equal(kept, want[1]), (kept.tolist(), want[1].tolist())
    assert torch.equal(assign, want[2])
    torch.testing.assert_close(out.double(), want[0].double(), **VALUE_TOL[dtype])
