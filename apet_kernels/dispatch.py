"""Backend choice: the ``backend=`` argument > the ``APET_BACKEND`` environment variable > auto.

Auto picks, for CUDA tensors, the first available of triton, cuda, torch; for CPU tensors, torch.
An explicitly requested backend that cannot run raises ``RuntimeError`` with the reason.

A backend is a module with three functions:
    ``unavailable_reason(x) -> str | None``: why it cannot run on this tensor (None: it can);
    ``compress_dense(x (S, N, D), keep, num_basis, ridge, merge)``;
    ``compress_varlen(x (T, D), seqlens, keeps, num_basis, ridge, merge)``;
the last two take validated arguments and return ``(out, kept, assign)`` as SPEC.md defines.
A backend whose kernels cap the basis size exposes ``MAX_BASIS`` (the largest m_s = min(M, K_s)
it runs); auto then skips it for larger bases instead of failing.
Backend modules are imported on first use, so ``import apet_kernels`` touches no CUDA or triton.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKEND_MODULES = {
    "torch": "apet_kernels.ops.reference",
    "triton": "apet_kernels.ops.triton",
    "cuda": "apet_kernels.ops.cuda",
}
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}
ENV_VAR = "APET_BACKEND"


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ImportError as exc:  # e.g. triton not installed
        return None, f"cannot import {BACKEND_MODULES[name]}: {exc}"
    if not all(hasattr(module, fn) for fn in ("compress_dense", "compress_varlen")):
        return None, f"{BACKEND_MODULES[name]} is not implemented yet"
    return module, None


def unavailable_reason(name: str, x: torch.Tensor, basis: int | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``x`` (None when it can); ``basis`` is the call's
    largest m_s = min(num_basis, K_s), when known."""
    module, reason = _load(name)
    if module is None:
        return reason
    check = getattr(module, "unavailable_reason", None)
    reason = check(x) if check is not None else None
    limit = getattr(module, "MAX_BASIS", None)
    if reason is None and basis is not None and limit is not None and basis > limit:
        reason = (
            f"num_basis: it runs at most {limit} basis tokens per segment (min(num_basis, keep)), "
            f"this call needs {basis}"
        )
    return reason


def requested_backend(backend: str) -> str:
    """The backend name in force: the argument unless it is "auto", then the environment."""
    name = backend if backend != "auto" else os.environ.get(ENV_VAR, "auto") or "auto"
    if name != "auto" and name not in BACKEND_MODULES:
        source = "backend" if backend != "auto" else ENV_VAR
        choices = ", ".join(["auto", *BACKEND_MODULES])
        raise ValueError(f"{source} must be one of ({choices}), got {name!r}")
    return name


def resolve(backend: str, x: torch.Tensor, basis: int | None = None) -> ModuleType:
    """The backend module that will run ``x`` (see the module docstring for the order);
    ``basis``: the call's largest min(num_basis, K_s)."""
    name = requested_backend(backend)
    if name != "auto":
        reason = unavailable_reason(name, x, basis)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run on this input: {reason}")
        return _load(name)[0]
    reasons = []
    for candidate in AUTO_ORDER.get(x.device.type, ("torch",)):
        reason = unavailable_reason(candidate, x, basis)
        if reason is None:
            return _load(candidate)[0]
        reasons.append(f"{candidate}: {reason}")
    raise RuntimeError("no backend can run on this input: " + "; ".join(reasons))


def explain(backend: str, x: torch.Tensor, basis: int | None = None) -> str:
    """Which backend auto (or ``backend``) would pick for ``x``, and why the others were skipped."""
    name = requested_backend(backend)
    candidates = (name,) if name != "auto" else AUTO_ORDER.get(x.device.type, ("torch",))
    lines = []
    for candidate in candidates:
        reason = unavailable_reason(candidate, x, basis)
        lines.append(f"{candidate}: {'selected' if reason is None else 'skipped, ' + reason}")
        if reason is None:
            break
    return "\n".join(lines)


def backends(device: str | torch.device = "cpu") -> dict[str, str]:
    """Availability of every backend for a float16 tensor on ``device``: "available" or the
    reason it is not. ``apet_kernels.backends("cuda")`` asks about the GPU path."""
    device = torch.device(device)
    probe = _DeviceProbe(torch.empty(0, device="meta", dtype=torch.float16), device)
    # Backends judge tensors that exist; a probe can name a device this machine lacks.
    missing = None
    if device.type == "cuda" and not torch.cuda.is_available():
        missing = f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)"
    return {
        name: unavailable_reason(name, probe) or missing or "available" for name in BACKEND_MODULES
    }


class _DeviceProbe:
    """A stand-in with the attributes backends inspect (device, dtype, is_cuda), so availability
    can be asked without allocating on (or initializing) the device."""

    def __init__(self, meta: torch.Tensor, device: torch.device) -> None:
        self.device = device
        self.dtype = meta.dtype
        self.is_cuda = device.type == "cuda"
