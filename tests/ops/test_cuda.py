"""The CUDA C++ backend (csrc/, apet_kernels/ops/cuda.py).

Three layers, so that a machine without a GPU still checks most of it:

* compile: the torch-free kernel sources build with ``nvcc -c`` for sm_80 and sm_90 (needs nvcc,
  no GPU);
* emulated: the same kernel code, compiled by the host compiler against csrc/emu/cuda_emu.h (a
  fiber emulator of blocks, barriers and warp collectives), runs on CPU against the float64
  oracle. This checks the algorithm, indexing and barrier discipline, not real hardware;
* device: the built extension on a GPU, against the oracle (skipped, with the reason, when the
  backend is unavailable).
Plus CPU checks of availability reporting and of setup.py's build switch.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from backend_checks import (
    DTYPES,
    assert_matches,
    assert_valid_indices,
    gaussian,
    oracle_dense,
    oracle_varlen,
    rank_deficient,
)

import apet_kernels
from apet_kernels.ops import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


# --------------------------------------------------------------------------------------------
# compile: nvcc -c for sm_80 and sm_90
# --------------------------------------------------------------------------------------------

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
NVCC_FLAGS = [
    "-O3",
    "--Werror",
    "all-warnings",
    f"-I{CSRC}",
]
SM80 = ["-gencode", "arch=compute_80,code=sm_80"]
SM90 = ["-gencode", "arch=compute_90,code=sm_90"]
# What torch.utils.cpp_extension adds when it builds the extension's .cu files.
TORCH_NVCC_FLAGS = [
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


# Threads per block of every kernel, as csrc/apet/pipeline.cuh launches them (the k*Threads
# constants): a kernel whose registers times this exceed the 64K-register file of an SM cannot
# launch at all ("too many resources requested"), which only a GPU would show.
KERNEL_THREADS = {
    "fill_zero_kernel": 256,
    "upload_kernel": 256,
    "fps_mean_kernel": 256,
    "fps_init_kernel": 256,
    "fps_step_kernel": 256,
    "residual_factor_kernel": 128,
    "residual_error_kernel": 256,
    "select_kernel": 512,
    "merge_assign_kernel": 256,
    "merge_bucket_kernel": 256,
    "merge_mean_kernel": 128,
}
PTXAS_FUNCTION = re.compile(r"entry function '_ZN4apet\d+(\w+?_kernel)\w*' for '(sm_\d+)'")
PTXAS_USAGE = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def check_ptxas_resources(log: str) -> None:
    """Every kernel fits its launch on an SM: registers x threads <= 64K, static shared memory
    <= 48 KB (the limit without a dynamic opt-in). ``log`` is ``nvcc -Xptxas -v`` output."""
    seen = set()
    function = None
    for line in log.splitlines():
        if match := PTXAS_FUNCTION.search(line):
            function = match.groups()
        elif function is not None and (match := PTXAS_USAGE.search(line)):
            name, arch = function
            registers, smem = int(match[1]), int(match[2] or 0)
            assert name in KERNEL_THREADS, f"add {name} to KERNEL_THREADS"
            assert registers * KERNEL_THREADS[name] <= 65536, (name, arch, registers)
            assert smem <= 48 * 1024, (name, arch, smem)
            seen.add((name, arch))
            function = None
    assert {name for name, _ in seen} == set(KERNEL_THREADS), seen
    assert {arch for _, arch in seen} == {"sm_80", "sm_90"}, seen


@needs_nvcc
def test_kernels_compile_with_nvcc_for_sm80_and_sm90(tmp_path):
    """compile_check.cu instantiates every kernel template for half, bfloat16 and float, for both
    archs in one nvcc call, and ptxas reports each kernel's registers and shared memory;
    apet_kernels.cu is the device code the extension links. The two calls run in parallel (10-20 s
    on 2 busy cores)."""

    def compile_one(source: str, archs: list[str]) -> subprocess.CompletedProcess:
        out = tmp_path / (Path(source).stem + ".o")
        cmd = [NVCC, *NVCC_FLAGS, *archs, "-c", str(CSRC / source), "-o", str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    # compile_check.cu already instantiates everything apet_kernels.cu does, for both archs;
    # apet_kernels.cu only adds the dtype switch, so one arch is enough for it, built with the
    # flags torch's extension build uses (C++20, no implicit half conversions).
    # The headers themselves stay C++17.
    sources = {
        "compile_check.cu": ["-std=c++17", "-Xptxas", "-v", *SM80, *SM90],
        "apet_kernels.cu": [*TORCH_NVCC_FLAGS, *SM90],
    }
    with ThreadPoolExecutor(len(sources)) as pool:
        results = list(pool.map(compile_one, sources, sources.values()))
    for source, result in zip(sources, results, strict=True):
        assert result.returncode == 0, f"{source}:\n{result.stdout}\n{result.stderr}"
        assert (tmp_path / (Path(source).stem + ".o")).stat().st_size > 0
    check_ptxas_resources(results[0].stdout + results[0].stderr)


def test_binding_compiles_against_torch_headers(tmp_path):
    """csrc/apet_binding.cpp is plain C++ against torch's headers: a syntax-only compile with the
    host compiler checks it (types, ATen calls, the upload call) on a CPU machine. The CPU wheel
    ships the c10/cuda headers but not their generated config header, which this skips."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = _cuda_include()
    python_include = Path(sysconfig.get_paths()["include"])
    if cxx is None or include is None or not (python_include / "Python.h").is_file():
        pytest.skip("needs a C++17 compiler, the CUDA headers and Python.h")
    from torch.utils.cpp_extension import include_paths

    torch_includes = [flag for path in include_paths() for flag in ("-isystem", path)]
    cmd = [
        cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C",
        *torch_includes, "-isystem", str(python_include), "-isystem", str(include),
        f"-I{CSRC}", str(CSRC / "apet_binding.cpp"),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


# --------------------------------------------------------------------------------------------
# emulated: the kernels on CPU fibers (csrc/emu)
# --------------------------------------------------------------------------------------------

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC is not None:
        roots.append(str(Path(NVCC).resolve().parent.parent))
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def _build_emulator(tmp_path_factory, name: str, flags: list[str]) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = _cuda_include()
    if cxx is None or include is None:
        pytest.skip("the emulator needs a C++17 compiler and the CUDA headers (cuda_fp16.h)")
    exe = tmp_path_factory.mktemp(name) / "apet_emu"
    cmd = [cxx, "-std=c++17", *flags, f"-I{include}", str(CSRC / "emu" / "emu_main.cpp"), "-o"]
    result = subprocess.run([*cmd, str(exe)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "-fsanitize=address" in flags and "asan" in result.stderr:
        pytest.skip(f"no AddressSanitizer runtime: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """csrc/emu/emu_main.cpp built with the host compiler (about 5 s)."""
    return _build_emulator(tmp_path_factory, "emu", ["-O1"])


# What a GPU run under compute-sanitizer would report as an invalid global access: the emulator
# built with AddressSanitizer (every buffer its exact size, a poisoned gap after each workspace
# piece) and UBSan, aborting on the first report. Fiber stack switching needs ASan's fake stacks
# off; the emulator's fiber stacks live for the process, so leak checking is off too.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_stack_use_after_return=0:detect_leaks=0:abort_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1",
}


@pytest.fixture(scope="module")
def sanitized_emulator(tmp_path_factory) -> Path:
    """The emulator under AddressSanitizer + UBSan (about 10 s to build)."""
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"]
    return _build_emulator(tmp_path_factory, "emu_asan", [*flags, "-fno-sanitize-recover=all"])


def emulate(exe, x, seqlens, keeps, num_basis=10, ridge=1e-4, merge=True, global_ids=True):
    """Runs the pipeline on x (T, D) under the emulator; returns (out, kept, assign) like the
    varlen op (global_ids) or flattened dense outputs (local ids)."""
    T, D = x.shape
    S = len(seqlens)
    header = struct.pack(
        "<7qd", DTYPE_CODES[x.dtype], S, T, D, num_basis, int(merge), int(global_ids), ridge
    )
    path_in, path_out = Path(exe).with_suffix(".in"), Path(exe).with_suffix(".out")
    path_in.write_bytes(
        header
        + struct.pack(f"<{2 * S}q", *seqlens, *keeps)
        + x.contiguous().view(torch.uint8).numpy().tobytes()
    )
    result = subprocess.run([str(exe), str(path_in), str(path_out)], capture_output=True, text=True)
    assert result.returncode == 0, f"emulator exit {result.returncode}: {result.stderr}"
    raw = bytearray(path_out.read_bytes())
    K, size = sum(keeps), x.element_size()
    out = torch.frombuffer(raw, dtype=x.dtype, count=K * D).view(K, D)
    kept = torch.frombuffer(raw, dtype=torch.int64, count=K, offset=K * D * size)
    assign = torch.frombuffer(raw, dtype=torch.int64, count=T, offset=K * D * size + 8 * K)
    return out.clone(), kept.clone(), assign.clone()


def test_emulated_varlen_with_empty_segments(emulator):
    seqlens, keeps = [40, 0, 7, 70, 0, 1], [12, 0, 7, 5, 0, 1]
    x = gaussian(sum(seqlens), 24, seed=1)
    got = emulate(emulator, x, seqlens, keeps, num_basis=4)
    assert_matches(got, oracle_varlen(x, seqlens, keeps, num_basis=4), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_dense_layout(emulator, dtype):
    # 130 tokens keep 70: two kept-column tiles and a partial dropped-row tile in merge;
    # D = 17 is not a multiple of the 16-wide depth tile.
    S, N, D, K = 2, 130, 17, 70
    x = gaussian(S, N, D, seed=2, dtype=dtype)
    out, kept, assign = emulate(emulator, x.view(S * N, D), [N] * S, [K] * S, global_ids=False)
    got = (out.view(S, K, D), kept.view(S, K), assign.view(S, N))
    assert_matches(got, oracle_dense(x, K), dtype)


@pytest.mark.parametrize(
    ("name", "n", "k", "num_basis", "merge", "ridge"),
    [
        ("keep_all", 33, 33, 10, True, 1e-4),
        ("keep_le_basis", 50, 7, 10, True, 1e-4),
        ("keep_one", 50, 1, 10, True, 1e-4),
        ("single_token", 1, 1, 10, True, 1e-4),
        ("no_merge", 90, 20, 10, False, 1e-4),
        ("ridge_zero", 90, 30, 10, True, 0.0),
        ("one_basis", 90, 30, 1, True, 1e-4),
    ],
)
def test_emulated_edge_cases(emulator, name, n, k, num_basis, merge, ridge):
    x = gaussian(2 * n, 20, seed=3, dtype=torch.float16)
    args = ([n, n], [k, k], num_basis, ridge, merge)
    got = emulate(emulator, x, *args)
    assert_matches(got, oracle_varlen(x, *args), torch.float16)
    if k == n:  # SPEC.md: out equals x bitwise
        assert torch.equal(got[0], x)


def test_emulated_nan_inf_and_degenerate_inputs(emulator):
    nan = gaussian(60, 16, seed=4)
    nan[3, 2], nan[40] = float("nan"), float("inf")
    seqlens, keeps = [60, 40, 50, 30], [15, 10, 12, 6]
    x = torch.cat(
        [
            nan,
            torch.full((40, 16), float("nan")),
            torch.zeros(50, 16),  # all-zero tokens
            gaussian(5, 16, seed=5).repeat(6, 1),  # duplicates: rank-deficient basis
        ]
    )
    out, kept, assign = emulate(emulator, x, seqlens, keeps)
    assert_valid_indices(kept, assign, seqlens, keeps)
    assert torch.isfinite(out[25:]).all()  # the all-zero and duplicate segments stay finite


def test_emulated_ridge_zero_rank_deficient_basis_keeps_what_torch_keeps(emulator):
    # SPEC ridge rule (docs/SPEC.md): pivots below τ = max(λ, 2^-16·trace(G)/m) become τ. The
    # kernel before the rule (unclamped pivots, commit 7c23dd1) kept other tokens on all six
    # seeds here (measured once with an emulator built from that commit's csrc/).
    for seed in range(6):
        x = rank_deficient(seed=seed).float()
        got = emulate(emulator, x, [56], [15], ridge=0.0)
        torch_kept = apet_kernels.compress(x[None], 15, ridge=0.0, backend="torch").kept[0]
        assert torch.isfinite(got[0]).all()
        assert torch.equal(got[1], torch_kept), (seed, got[1].tolist(), torch_kept.tolist())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_keep_all_returns_negative_zero(emulator, dtype):
    x = gaussian(60, 8, seed=20, dtype=dtype)
    x[x.abs() < 0.6] = -0.0
    assert bool(torch.signbit(x[x == 0]).all())
    for merge in (True, False):
        # A K = N segment beside one that compresses (so the merge kernels run) and alone.
        mixed = emulate(emulator, x, [30, 30], [30, 9], merge=merge)
        assert torch.equal(_bits(mixed[0][:30]), _bits(x[:30]))
        alone = emulate(emulator, x, [60], [60], merge=merge)
        assert torch.equal(_bits(alone[0]), _bits(x))
    assert not torch.equal(_bits(x + 0.0), _bits(x))  # the check sees a lost sign


def test_emulated_segment_alone_equals_it_in_a_pack(emulator):
    # SPEC.md: a segment's outputs are bitwise the same alone and in any pack. Near-tie data
    # (cyclic shifts of one vector: every distance to the mean ties up to rounding).
    u = gaussian(3, 48, seed=21)
    x = torch.cat(
        [torch.stack([torch.roll(u[s], i) for i in range(n)]) for s, n in enumerate([48, 30, 48])]
    )
    seqlens, keeps = [48, 0, 30, 48], [12, 0, 30, 5]
    packed = emulate(emulator, x, seqlens, keeps)
    start = out_start = 0
    for n, k in zip(seqlens, keeps, strict=True):
        if n:
            out, kept, assign = emulate(emulator, x[start : start + n], [n], [k])
            assert torch.equal(_bits(packed[0][out_start : out_start + k]), _bits(out))
            assert torch.equal(packed[1][out_start : out_start + k], kept + start)
            assert torch.equal(packed[2][start : start + n], assign + out_start)
        start, out_start = start + n, out_start + k


def many_segments() -> tuple[list[int], list[int]]:
    """260 segments (mostly empty, lengths 3-9 otherwise): 2 (S + 1) = 522 offsets need two
    upload launches of 496 kernel-parameter values, the second at an offset into the array."""
    seqlens = [0 if s % 8 else 3 + s % 7 for s in range(260)]
    seqlens[-1] = 6
    return seqlens, [min(n, 1 + s % 5) for s, n in enumerate(seqlens)]


def test_emulated_many_segments_upload_offsets(emulator):
    # emu_main passes the offsets through apet::upload_int64 as the binding does, then overwrites
    # its host copy: right results mean the uploaded values (all 522, across both launches) are.
    seqlens, keeps = many_segments()
    x = gaussian(sum(seqlens), 8, seed=12)
    got = emulate(emulator, x, seqlens, keeps, num_basis=2)
    assert_matches(got, oracle_varlen(x, seqlens, keeps, num_basis=2), torch.float32)


def test_emulated_under_address_sanitizer(sanitized_emulator, monkeypatch):
    """The layouts that stress indexing, run with every out-of-bounds access (inputs, outputs,
    offsets and each scratch piece) and undefined behaviour fatal: empty and keep-all segments,
    partial row/column/depth tiles, K <= M, no merge, NaN/Inf/degenerate tokens, many segments,
    a segment longer than one select block and one FPS chunk."""
    for name, value in SANITIZER_ENV.items():
        monkeypatch.setenv(name, value)
    cases = [
        ([40, 0, 7, 70, 0, 1], [12, 0, 7, 5, 0, 1], 4, True, torch.float32),
        ([130, 130], [70, 70], 10, True, torch.float16),
        ([33, 50, 50, 1, 90], [33, 7, 1, 1, 30], 10, False, torch.bfloat16),
        ([520, 3], [100, 2], 10, True, torch.float32),
        ([120], [80], 20, True, torch.float32),
        (*many_segments(), 2, True, torch.float32),
    ]
    for seqlens, keeps, num_basis, merge, dtype in cases:
        x = gaussian(sum(seqlens), 17 if num_basis < 17 else 40, seed=13, dtype=dtype)
        got = emulate(sanitized_emulator, x, seqlens, keeps, num_basis=num_basis, merge=merge)
        want = oracle_varlen(x, seqlens, keeps, num_basis=num_basis, merge=merge)
        assert_matches(got, want, dtype)
    x = torch.cat([gaussian(60, 16, seed=4), torch.full((40, 16), float("nan"))])
    x[3, 2], x[30] = float("nan"), float("inf")
    _, kept, assign = emulate(sanitized_emulator, x, [60, 40], [15, 10])
    assert_valid_indices(kept, assign, [60, 40], [15, 10])


@pytest.mark.slow
def test_emulated_long_segment_and_many_basis(emulator):
    # 700 tokens: several FPS chunks, select scans past one 512-thread block, 9 dropped-row tiles.
    seqlens, keeps = [700, 120], [140, 80]
    x = gaussian(sum(seqlens), 48, seed=6, dtype=torch.bfloat16)
    assert_matches(
        emulate(emulator, x, seqlens, keeps), oracle_varlen(x, seqlens, keeps), torch.bfloat16
    )
    got = emulate(emulator, x[700:], [120], [80], num_basis=40)
    assert_matches(got, oracle_varlen(x[700:], [120], [80], num_basis=40), torch.bfloat16)


# --------------------------------------------------------------------------------------------
# device: the built extension on a GPU runs in tests/ops/test_gpu.py (every GPU backend)
# --------------------------------------------------------------------------------------------


def _device_reason() -> str | None:
    probe = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16)
    return cuda_backend.unavailable_reason(probe)


# --------------------------------------------------------------------------------------------
# CPU: availability reporting and the build switch
# --------------------------------------------------------------------------------------------


def test_unavailable_on_cpu_tensor_says_why():
    reason = cuda_backend.unavailable_reason(torch.zeros(2, 3, 4))
    assert reason is not None and "cpu" in reason and "CUDA tensors" in reason


def test_float64_is_unavailable_with_a_pointer_to_torch():
    reason = cuda_backend.unavailable_reason(torch.zeros(2, 3, 4, dtype=torch.float64))
    assert reason is not None and "float64" in reason and "torch" in reason


def test_explicit_cuda_backend_on_cpu_raises_naming_it():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on this input: .*cpu"):
        apet_kernels.compress(torch.zeros(1, 8, 4), 2, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given without a GPU")
def test_cuda_probe_without_gpu_gives_a_reason():
    assert _device_reason() in (
        f"torch {torch.__version__} is built without CUDA",
        "no CUDA device is available",
        "the cuda backend does not support ROCm builds of torch",
    )


@pytest.mark.parametrize("error", [OSError("undefined symbol"), RuntimeError("registered twice")])
def test_prebuilt_load_failure_is_a_reason(monkeypatch, error):
    # A library that fails to load, or whose ops the dispatcher refuses (e.g. a JIT build of the
    # same ops already loaded), makes the backend unavailable with a reason; it never raises.
    spec = types.SimpleNamespace(origin="/nowhere/_C.so")
    monkeypatch.setattr(cuda_backend.importlib.util, "find_spec", lambda name: spec)

    def fail(path):
        raise error

    monkeypatch.setattr(torch.ops, "load_library", fail)
    reason = cuda_backend._load_prebuilt()
    assert reason is not None and "/nowhere/_C.so" in reason and str(error) in reason


def test_gencode_flags():
    assert cuda_backend.gencode_flags("8.0;9.0a, 9.0+PTX") == [
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90a,code=sm_90a",
        "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90",
    ]  # fmt: skip


def _setup_py(mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "APET_BUILD_CUDA": mode}
    cmd = [sys.executable, str(ROOT / "setup.py"), "--version"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_setup_py_build_switch():
    assert _setup_py("0").stdout.strip().endswith("0.1.0")
    bad = _setup_py("maybe")
    assert bad.returncode != 0 and "APET_BUILD_CUDA must be auto, 0 or 1" in bad.stderr
    if torch.version.cuda is None:  # a CPU torch: auto skips quietly, 1 fails loudly
        auto = _setup_py("auto")
        assert auto.returncode == 0 and "skipping the CUDA extension" in auto.stderr
        forced = _setup_py("1")
        assert forced.returncode != 0 and "cannot be built" in forced.stderr
