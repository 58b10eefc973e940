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
