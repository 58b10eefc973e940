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
import shutil
import struct
import subprocess
import sys
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


@needs_nvcc
def test_kernels_compile_with_nvcc_for_sm80_and_sm90(tmp_path):
    """compile_check.cu instantiates every kernel template for half, bfloat16 and float, for both
    archs in one nvcc call; apet_kernels.cu is the device code the extension links. The two calls
    run in parallel (10-20 s on 2 busy cores)."""

    def compile_one(source: str, archs: list[str]) -> subprocess.CompletedProcess:
        out = tmp_path / (Path(source).stem + ".o")
        cmd = [NVCC, *NVCC_FLAGS, *archs, "-c", str(CSRC / source), "-o", str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    # compile_check.cu already instantiates everything apet_kernels.cu does, for both archs;
    # apet_kernels.cu only adds the dtype switch, so one arch is enough for it, built with the
    # flags torch's extension build uses (C++20, no implicit half conversions).
    # The headers themselves stay C++17.
    sources = {
        "compile_check.cu": ["-std=c++17", *SM80, *SM90],
        "apet_kernels.cu": [*TORCH_NVCC_FLAGS, *SM90],
    }
    with ThreadPoolExecutor(len(sources)) as pool:
        results = list(pool.map(compile_one, sources, sources.values()))
    for source, result in zip(sources, results, strict=True):
        assert result.returncode == 0, f"{source}:\n{result.stdout}\n{result.stderr}"
        assert (tmp_path / (Path(source).stem + ".o")).stat().st_size > 0


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


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """csrc/emu/emu_main.cpp built with the host compiler (about 5 s)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = _cuda_include()
    if cxx is None or include is None:
        pytest.skip("the emulator needs a C++17 compiler and the CUDA headers (cuda_fp16.h)")
    exe = tmp_path_factory.mktemp("emu") / "apet_emu"
    cmd = [cxx, "-std=c++17", "-O1", f"-I{include}", str(CSRC / "emu" / "emu_main.cpp"), "-o"]
    result = subprocess.run([*cmd, str(exe)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return exe


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
