"""The implementations the microbenchmarks compare: the package's backends and the eager baseline.

A provider that cannot run on the device carries the reason instead of a function, so every
skip shows up in the results with its cause. Backends are probed with
``apet_kernels.backends(device)``, which imports them lazily: a backend still being written (or
one whose toolchain is missing) is skipped, never an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import apet_kernels
from apet_kernels.ops import reference

from . import eager_released

NUM_BASIS = 10
RIDGE = 1e-4

Stage = tuple[str, Callable[[dict], None]]


@dataclass
class Provider:
    """One implementation of the op.

    Attributes:
        name: "torch", "triton", "cuda" or "eager_released".
        skip_reason: why it cannot run on this device (None: it can).
        run: ``run(x (S, N, D), keep)`` computes the whole op (merge on, SPEC defaults).
        stages: ``stages(x, keep)`` -> [(stage name, fn(state))] run in order on a fresh state
            dict, or None when the provider exposes no per-stage entry points.
        graph_note: why the op is not timed as a CUDA-graph replay (None: it is tried).
    """

    name: str
    skip_reason: str | None
    run: Callable[[torch.Tensor, int], object] | None = None
    stages: Callable[[torch.Tensor, int], list[Stage]] | None = None
    graph_note: str | None = None


def _backend_runner(name: str) -> Callable[[torch.Tensor, int], object]:
    def run(x: torch.Tensor, keep: int) -> object:
        return apet_kernels.compress(x, keep, num_basis=NUM_BASIS, ridge=RIDGE, backend=name)

    return run


def _reference_stages(x: torch.Tensor, keep: int) -> list[Stage]:
    """The torch backend's stages on a dense batch, called as ``compress_padded`` calls them."""
    S, N, _ = x.shape
    m = min(NUM_BASIS, keep)
    dev = x.device
    valid = torch.ones(S, N, dtype=torch.bool, device=dev)
    m_t = torch.full((S,), m, dtype=torch.long, device=dev)
    keeps_t = torch.full((S,), keep, dtype=torch.long, device=dev)

    def fps(st: dict) -> None:
        st["v"] = x.to(reference.accumulation_dtype(x.dtype))
        st["basis"], st["sqnorm"], st["dots"] = reference.fps(st["v"], valid, m)

    def residual(st: dict) -> None:
        st["err2"] = (
            reference.residual(st["sqnorm"], st["dots"], st["basis"], m_t, RIDGE)
            if keep > NUM_BASIS
            else None
        )

    def select(st: dict) -> None:
        st["kept"], st["mask"] = reference.select(
            st["err2"], st["basis"], m_t, valid, keeps_t, keep
        )

    def merge(st: dict) -> None:
        out, _ = reference.merge(st["v"], valid, st["kept"], st["mask"], keeps_t, True)
        st["out"] = out.to(x.dtype)

    return [("fps", fps), ("residual", residual), ("select", select), ("merge", merge)]


def _eager_stages(x: torch.Tensor, keep: int) -> list[Stage]:
    """The eager baseline's stages, each a Python loop over the S segments."""
    segments = range(x.shape[0])
    m = min(NUM_BASIS, keep)

    def fps(st: dict) -> None:
        st["basis"] = [eager_released.fps(x[s], m) for s in segments]

    def residual(st: dict) -> None:
        st["err"] = [
            eager_released.residual(x[s], st["basis"][s], RIDGE) if keep > m else None
            for s in segments
        ]

    def select(st: dict) -> None:
        st["kept"] = [eager_released.select(st["err"][s], st["basis"][s], keep) for s in segments]

    def merge(st: dict) -> None:
        st["out"] = [eager_released.merge(x[s], st["kept"][s]) for s in segments]

    return [("fps", fps), ("residual", residual), ("select", select), ("merge", merge)]


def _eager_run(x: torch.Tensor, keep: int) -> object:
    return eager_released.compress(x, keep, num_basis=NUM_BASIS, ridge=RIDGE)


def _backend_skip_reason(name: str, device: torch.device) -> str | None:
    if device.type != "cuda":
        if name == "triton":
            # The interpreter (TRITON_INTERPRET=1) runs the kernels on CPU for the tests; its
            # speed says nothing about the kernels, so it is not timed.
            return "needs a CUDA device (the Triton CPU interpreter is for tests, not timing)"
        if name == "cuda":
            return "needs a CUDA device"
    status = apet_kernels.backends(device).get(name, "unknown backend")
    return None if status == "available" else status


def providers(device: torch.device, names: list[str] | None = None) -> list[Provider]:
    """Every provider (or those in ``names``), each runnable on ``device`` or with its reason."""
    found = []
    for name in ("torch", "triton", "cuda"):
        reason = _backend_skip_reason(name, device)
        if reason is not None:
            found.append(Provider(name, reason))
            continue
        stages = _reference_stages if name == "torch" else None
        found.append(Provider(name, None, _backend_runner(name), stages))
    found.append(
        Provider(
            "eager_released",
            None,
            _eager_run,
            _eager_stages,
            graph_note="not captured: it syncs (boolean indexing, linalg.solve's error check), "
            "as the released code does",
        )
    )
    if names is not None:
        unknown = set(names) - {p.name for p in found}
        if unknown:
            raise ValueError(f"unknown providers {sorted(unknown)}")
        found = [p for p in found if p.name in names]
    return found
