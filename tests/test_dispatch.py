"""Backend choice: argument > APET_BACKEND > auto, with reasons for what cannot run."""

from __future__ import annotations

import pytest
import torch

import apet_kernels
from apet_kernels import dispatch


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("APET_BACKEND", raising=False)
    x = torch.randn(1, 8, 3)
    assert dispatch.resolve("auto", x).__name__ == "apet_kernels.ops.reference"
    assert dispatch.explain("auto", x) == "torch: selected"


def test_environment_variable_is_read(monkeypatch):
    x = torch.randn(1, 8, 3)
    monkeypatch.setenv("APET_BACKEND", "torch")
    assert dispatch.resolve("auto", x).__name__ == "apet_kernels.ops.reference"
    monkeypatch.setenv("APET_BACKEND", "warp-speed")
    with pytest.raises(ValueError, match="APET_BACKEND must be one of .* got 'warp-speed'"):
        apet_kernels.compress(x, 2)
    # The argument wins over the environment.
    assert apet_kernels.compress(x, 2, backend="torch").kept.shape == (1, 2)


def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("APET_BACKEND", raising=False)
    x = torch.randn(1, 8, 3, dtype=torch.float64)
    reason = dispatch.unavailable_reason("cuda", x)
    assert reason
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on this input: .+"):
        apet_kernels.compress(x, 2, backend="cuda")


def test_backends_report():
    report = apet_kernels.backends()
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["torch"] == "available"
    assert all(isinstance(v, str) and v for v in report.values())
    if not torch.cuda.is_available():
        on_gpu = apet_kernels.backends("cuda")
        assert all(reason != "available" for reason in on_gpu.values()), on_gpu
        assert "no CUDA device" in on_gpu["torch"]


def test_auto_skips_a_backend_whose_basis_cap_the_call_exceeds(monkeypatch):
    # The Triton kernels run at most MAX_BASIS basis tokens; auto must fall back (here to the
    # torch backend) rather than fail. CPU tensors reach triton only under the interpreter, so
    # the CPU auto order is widened to put triton first.
    pytest.importorskip("triton")
    if dispatch.unavailable_reason("triton", torch.zeros(1, 2, 3)) is not None:
        pytest.skip("triton cannot run on CPU tensors here (TRITON_INTERPRET unset)")
    from apet_kernels.ops import triton as triton_backend

    monkeypatch.delenv("APET_BACKEND", raising=False)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("triton", "torch"))
    cap = triton_backend.MAX_BASIS
    x = torch.randn(1, cap + 4, 3)
    assert dispatch.resolve("auto", x, basis=cap) is triton_backend
    assert dispatch.resolve("auto", x, basis=cap + 1).__name__ == "apet_kernels.ops.reference"
    assert f"triton: skipped, num_basis: it runs at most {cap}" in dispatch.explain(
        "auto", x, basis=cap + 1
    )
    # Through the op: auto runs the torch backend, an explicit triton request says why not.
    want = apet_kernels.compress(x, cap + 2, num_basis=cap + 1, backend="torch")
    got = apet_kernels.compress(x, cap + 2, num_basis=cap + 1)
    assert torch.equal(got.kept, want.kept) and torch.equal(got.tokens, want.tokens)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run .* num_basis"):
        apet_kernels.compress(x, cap + 2, num_basis=cap + 1, backend="triton")
    varlen = apet_kernels.compress_varlen(x[0], [2, cap + 2], [1, cap + 1], num_basis=cap + 1)
    assert varlen.kept.shape == (cap + 2,)
