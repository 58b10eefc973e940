"""The registered ops: opcheck, exact fake kernels, torch.compile, inference-only, light import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import apet_kernels


def sample(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 57, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("merge", [True, False])
def test_opcheck_dense(merge):
    torch.library.opcheck(torch.ops.apet.compress.default, (sample(), 13, 10, 1e-4, merge, "torch"))


@pytest.mark.parametrize("merge", [True, False])
def test_opcheck_varlen(merge):
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    args = (x, [12, 0, 28], [5, 0, 9], 4, 1e-4, merge, "torch")
    torch.library.opcheck(torch.ops.apet.compress_varlen.default, args)


def test_fake_kernels_give_exact_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 100, 32, dtype=torch.bfloat16)
        out, kept, assign = torch.ops.apet.compress(x, 17)
        assert out.shape == (3, 17, 32) and out.dtype == torch.bfloat16
        assert kept.shape == (3, 17) and kept.dtype == torch.long
        assert assign.shape == (3, 100) and assign.dtype == torch.long
        packed = torch.empty(70, 32)
        out, kept, assign = torch.ops.apet.compress_varlen(packed, [30, 0, 40], [3, 0, 4])
        assert out.shape == (7, 32) and kept.shape == (7,) and assign.shape == (70,)


def test_torch_compile_fullgraph_matches_eager():
    x = sample(2)

    def both(t: torch.Tensor):
        dense = apet_kernels.compress(t, 11)
        packed = apet_kernels.compress_varlen(t.reshape(-1, 16), [57, 57], [11, 5])
        return (*dense, *packed)

    compiled = torch.compile(both, fullgraph=True, backend="eager")
    for a, b in zip(compiled(x), both(x), strict=True):
        assert torch.equal(a, b)


def test_inference_only():
    x = sample(3).requires_grad_()
    out = apet_kernels.compress(x, 9)
    assert not out.tokens.requires_grad  # the wrapper detaches
    raw, kept, assign = torch.ops.apet.compress(x, 9)
    assert not kept.requires_grad and not assign.requires_grad
    with pytest.raises(RuntimeError, match="inference-only"):
        raw.sum().backward()


def test_import_touches_no_cuda_triton_or_transformers():
    code = (
        "import sys, torch, apet_kernels\n"
        "assert not torch.cuda.is_initialized(), 'cuda initialized'\n"
        "bad = [m for m in ('transformers', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "x = torch.randn(1, 20, 4)\n"
        "apet_kernels.compress(x, 5)\n"
        "assert not torch.cuda.is_initialized(), 'cuda initialized by a CPU call'\n"
    )
    env_free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert env_free.returncode == 0, env_free.stderr


def test_torch_compile_inductor_around_the_op():
    # Inductor compiles the arithmetic around the opaque op (about 20 s on a 2-core CPU).
    x = sample(4)

    def around(t: torch.Tensor):
        dense = apet_kernels.compress(t * 2.0, 11)
        return dense.tokens + 1.0, dense.kept, dense.assign

    compiled = torch.compile(around, fullgraph=True)
    for a, b in zip(compiled(x), around(x), strict=True):
        assert torch.equal(a, b)
