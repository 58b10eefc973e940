"""The CUDA C++ backend: the kernels of ``csrc/`` behind ``torch.ops.apet._compress_cuda`` and
``torch.ops.apet._compress_varlen_cuda``.

Two ways to get the compiled library:

* prebuilt: ``APET_BUILD_CUDA=1 pip install -e . --no-build-isolation`` builds the extension
  ``apet_kernels._C`` (see setup.py; ``APET_CUDA_ARCHS`` picks the architectures, default
  "8.0;9.0+PTX");
* JIT: with ``APET_CUDA_JIT=1`` the first use compiles ``csrc/`` with
  ``torch.utils.cpp_extension.load`` (a source checkout is needed; the build is cached under
  ``TORCH_EXTENSIONS_DIR``, for the current GPU's architecture unless ``APET_CUDA_ARCHS`` is set),
  instead of loading the prebuilt one.

Importing this module loads nothing and never initializes CUDA: the library is loaded on the first
:func:`unavailable_reason` or compress call, once per process, and any failure becomes the reason
the backend is unavailable (it is never raised from here).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

from .cuda_archs import gencode_flags

JIT_ENV = "APET_CUDA_JIT"
ARCHS_ENV = "APET_CUDA_ARCHS"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CSRC = Path(__file__).resolve().parents[2] / "csrc"
JIT_SOURCES = ("apet_binding.cpp", "apet_kernels.cu")
_BUILD_HINT = (
    "build it with `APET_BUILD_CUDA=1 pip install -e . --no-build-isolation` (nvcc and a CUDA "
    f"build of torch needed), or set {JIT_ENV}=1 to compile csrc/ on first use"
)


def _registered() -> str | None:
    if all(hasattr(torch.ops.apet, op) for op in ("_compress_cuda", "_compress_varlen_cuda")):
        return None
    return "the library loaded but did not register apet::_compress_cuda (stale build?)"


def _load_prebuilt() -> str | None:
    spec = importlib.util.find_spec("apet_kernels._C")
    if spec is None or spec.origin is None:
        return f"the extension apet_kernels._C is not built: {_BUILD_HINT}"
    try:
        torch.ops.load_library(spec.origin)
    # OSError: e.g. built against another torch (undefined symbols); RuntimeError: the
    # dispatcher refusing the registration, e.g. the JIT build already defined these ops.
    except (OSError, RuntimeError) as exc:
        return f"cannot load {spec.origin}: {exc}"
    return _registered()


def _load_jit() -> str | None:
    missing = [name for name in JIT_SOURCES if not (CSRC / name).is_file()]
    if missing:
        return f"{JIT_ENV}=1 needs the csrc/ sources of a source checkout; {CSRC} lacks {missing}"
    from torch.utils import cpp_extension

    archs = os.environ.get(ARCHS_ENV, "")
    try:
        cpp_extension.load(
            name="apet_cuda_jit",
            sources=[str(CSRC / name) for name in JIT_SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", *gencode_flags(archs)],
            is_python_module=False,
            verbose=os.environ.get("APET_CUDA_JIT_VERBOSE", "0") == "1",
        )
    except Exception as exc:  # compiler missing or failing: a reason, not an import-time crash
        detail = str(exc).strip().splitlines()
        return f"JIT build of csrc/ failed ({type(exc).__name__}: {detail[-1] if detail else ''})"
    return _registered()


@functools.cache
def _load() -> str | None:
    """Loads the library once per process; returns why it could not be loaded (None: loaded)."""
    if os.environ.get(JIT_ENV, "0") == "1":
        return _load_jit()
    return _load_prebuilt()


def unavailable_reason(x: torch.Tensor) -> str | None:
    """Why this backend cannot run on ``x`` (None when it can).

    Checks, cheapest first: dtype, device, the torch build, a visible GPU, then the library.
    ``x`` may be any object with ``device`` and ``dtype`` (dispatch passes a probe).
    """
    if x.dtype not in SUPPORTED_DTYPES:
        return (
            f"the cuda backend supports float16, bfloat16 and float32, got {x.dtype} "
            "(backend='torch' runs float64)"
        )
    if x.device.type != "cuda":
        return f"x is on {x.device.type}, but the cuda backend runs on CUDA tensors only"
    if torch.version.hip is not None:
        return "the cuda backend does not support ROCm builds of torch"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _load()


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the cuda backend is unavailable: {reason}")


def compress_dense(
    x: torch.Tensor, keep: int, num_basis: int, ridge: float, merge: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (S, N, D)`` CUDA float16/bfloat16/float32, any strides -> ``out (S, K, D)`` x.dtype,
    ``kept (S, K)`` int64 ascending, ``assign (S, N)`` int64 local slots (-1: dropped, no merge).
    Arguments are validated by the caller (apet_kernels._library)."""
    _require()
    out, kept, assign = torch.ops.apet._compress_cuda(x.detach(), keep, num_basis, ridge, merge)
    return out, kept, assign


def compress_varlen(
    x: torch.Tensor,
    seqlens: list[int],
    keeps: list[int],
    num_basis: int,
    ridge: float,
    merge: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed ``x (T, D)`` with host ``seqlens``/``keeps`` -> ``out (ΣK, D)``, ``kept (ΣK,)``
    global rows of x, ``assign (T,)`` global output rows (-1: dropped, no merge)."""
    _require()
    out, kept, assign = torch.ops.apet._compress_varlen_cuda(
        x.detach(), list(seqlens), list(keeps), num_basis, ridge, merge
    )
    return out, kept, assign
