"""Compile the Triton kernels for sm_90 exactly as real launches specialize them (no GPU needed).

Run without ``TRITON_INTERPRET`` (``test_triton.py::test_kernels_compile_for_sm90`` starts it in
a subprocess; ``tools/triton_version_check.sh`` runs it under another triton release):

1. A stand-in driver reports an sm_90 target and ``knobs.runtime.jit_cache_hook`` intercepts
   every launch just before Triton would compile it. The launcher then runs for real on CPU
   tensors with the GPU block configuration, so Triton's own JIT binder builds each signature
   from the real arguments: i32/i64 scalars by value, ``== 1`` folded to constants, ``% 16``
   divisibility and pointer alignment as attributes, the launcher's options
   (``enable_fp_fusion`` included). Nothing is launched: the hook returns before compiling,
   so the outputs stay garbage and nothing downstream reads them on the host.
2. Every distinct variant is compiled to an sm_90 cubin (frontend, layouts, ptxas) with those
   signatures and options; the report gives registers, local and stack bytes per thread
   (ptxas spills land in the stack frame) and shared memory per variant, from
   ``cuobjdump -res-usage`` on the cubin, and shared memory is checked against an H100 block's
   limit.
3. ``warmup(D, dtype)`` is checked to compile every variant that calls of other batch
   compositions (segment counts, lengths, totals, packs) request: no recompiles mid-serving.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90


class _Sm90Driver:
    """What ``JITFunction.run`` asks the driver before it compiles, answered for sm_90."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class Recorder:
    """``jit_cache_hook``: records each launch's compile request and skips the launch."""

    def __init__(self):
        self.requests: dict[tuple, dict] = {}  # (kernel, key) -> compile request
        self.keys: set[tuple] = set()

    def __call__(self, *, key, fn, compile, **_):
        name = fn.jit_function.fn.__name__
        entry = (name, str(key))
        self.keys.add(entry)
        self.requests.setdefault(entry, dict(compile, fn=fn.jit_function, name=name))
        return True  # handled: Triton returns without compiling or launching


@contextlib.contextmanager
def _recording(recorder):
    """Launches inside go to ``recorder`` and use the GPU block configuration."""
    from triton import knobs

    from apet_kernels.ops.triton import launcher

    original = launcher._config

    def gpu(device, dtype, D, n_max, m_max):
        return launcher._gpu_config(dtype, D, n_max, m_max)

    launcher._config = gpu
    knobs.runtime.jit_cache_hook = recorder
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = None
        launcher._config = original


def _launch_all(calls, recorder):
    """Run ``calls`` (launcher.run argument tuples), recording their launches."""
    from apet_kernels.ops.triton import launcher

    with _recording(recorder):
        for args in calls:
            launcher.run(*args)


def _representative_calls():
    """Dense and varlen, merge on and off, every dtype, every residual basis tile, both select
    blocks and (by a patched size test) the int64-offset variants."""
    calls = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.zeros(1, 576, 1024, dtype=dtype)
        xv = torch.zeros(576 + 300, 1024, dtype=dtype)
        for merge in (True, False):
            calls.append((x, [576], [96], 10, 1e-4, merge, True))
            calls.append((xv, [576, 0, 300], [96, 0, 50], 10, 1e-4, merge, False))
    long = torch.zeros(2048, 512, dtype=torch.bfloat16)
    calls.append((long, [2048], [614], 10, 1e-4, True, False))
    for num_basis in (16, 32, 40, 128):  # MP = 16, 32, 64, 128
        xb = torch.zeros(1, 300, 256, dtype=torch.float16)
        calls.append((xb, [300], [200], num_basis, 1e-4, True, True))
    return calls


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / LOCAL (spill and stack bytes per thread) / SHARED from ``cuobjdump -res-usage``."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def _compile(request, target):
    import triton
    from triton.compiler import ASTSource

    source = ASTSource(
        fn=request["fn"],
        signature=request["signature"],
        constexprs=request["constants"],
        attrs=request["configs"][0],
    )
    options = {k: request[k] for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")}
    return triton.compile(source, target=target, options=options)


def _describe(request) -> str:
    consts = {
        k[0] if isinstance(k, tuple) else k: v
        for k, v in request["constants"].items()
        if str(k[0] if isinstance(k, tuple) else k).isupper()
    }
    scalars = {
        k: v for k, v in request["signature"].items() if not v.startswith("*") and v != "constexpr"
    }
    return (
        f"{request['name']} warps={request['num_warps']} stages={request['num_stages']} "
        f"fusion={request['enable_fp_fusion']} {consts} scalars={scalars}"
    )


def check_warmup_covers_serving() -> None:
    """Keys from ``warmup`` include every key that calls of other batch compositions use."""
    from apet_kernels.ops.triton import warmup

    for dtype in (torch.bfloat16, torch.float32):
        warm, later = Recorder(), Recorder()
        with _recording(warm):
            warmup(1024, dtype, "cpu", long_segments=True)
        x64 = torch.zeros(64, 576, 1024, dtype=dtype)
        x3 = torch.zeros(3, 577, 1024, dtype=dtype)
        pack = torch.zeros(1 + 700 + 33 + 2000, 1024, dtype=dtype)
        serving = [
            (x64, [576] * 64, [96] * 64, 10, 1e-4, True, True),
            (x3, [577] * 3, [200] * 3, 10, 1e-4, False, True),
            (x3[:1], [577], [1], 10, 1e-4, True, True),
            (pack, [1, 700, 33, 2000], [1, 210, 10, 600], 10, 1e-4, True, False),
            (pack[:734], [1, 700, 33], [1, 11, 33], 10, 1e-4, False, False),
        ]
        _launch_all(serving, later)
        missing = later.keys - warm.keys
        assert not missing, f"warmup({dtype}) misses variants: {sorted(missing)[:3]}"
        print(f"warmup(1024, {dtype}) compiles all {len(later.keys)} variants serving used")


def main() -> None:
    import triton
    from triton.runtime import driver

    assert os.environ.get("TRITON_INTERPRET") != "1", "run without the interpreter"
    print(f"triton {triton.__version__} from {triton.__file__}", flush=True)
    sm90 = _Sm90Driver()
    driver.set_active(sm90)
    recorder = Recorder()
    start = time.perf_counter()
    _launch_all(_representative_calls(), recorder)
    from apet_kernels.ops.triton import launcher

    fits = launcher._offsets_fit_int32
    launcher._offsets_fit_int32 = lambda *args: False  # the int64-offset variants
    try:
        x = torch.zeros(2, 40, 64, dtype=torch.float16)
        _launch_all([(x, [40, 40], [15, 15], 10, 1e-4, True, True)], recorder)
        _launch_all([(x.view(80, 64), [40, 40], [15, 15], 10, 1e-4, True, False)], recorder)
    finally:
        launcher._offsets_fit_int32 = fits
    print(f"{len(recorder.requests)} kernel variants requested by real launches", flush=True)
    worst_regs = 0
    for request in recorder.requests.values():
        assert request["enable_fp_fusion"] is launcher.FP_FUSION, _describe(request)
        compiled = _compile(request, sm90.target)
        usage = _resource_usage(compiled.asm["cubin"])
        shared = compiled.metadata.shared
        worst_regs = max(worst_regs, usage.get("REG", 0))
        print(
            f"REG {usage.get('REG', '?'):>3} LOCAL {usage.get('LOCAL', '?'):>4} "
            f"STACK {usage.get('STACK', '?'):>4} "
            f"SHARED {shared:>6}  {_describe(request)}",
            flush=True,
        )
        assert shared <= H100_SHARED_BYTES, (_describe(request), shared)
    print(f"every variant compiled for sm_90 in {time.perf_counter() - start:.0f} s")
    check_warmup_covers_serving()


if __name__ == "__main__":
    sys.exit(main())
