"""Optional CUDA extension ``apet_kernels._C`` (csrc/). Package metadata lives in pyproject.toml.

``APET_BUILD_CUDA`` decides whether to build it:
    auto (default)  build when nvcc is found and the installed torch is a CUDA build, else skip;
    1               build, and fail loudly when that is impossible;
    0               never build.
``APET_CUDA_ARCHS`` lists the target architectures (default "8.0;9.0+PTX": sm_80 and sm_90 code
plus compute_90 PTX that the driver compiles for newer GPUs; e.g. "8.0;8.6;9.0+PTX").

torch is a build-time requirement of the extension but not of the package, so build with
``--no-build-isolation`` (an isolated build environment has no torch: auto then skips, 1 fails).
The auto checks look for files before importing anything, so a CPU install stays instant.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# Loaded by path: the package itself imports torch, which a build environment may lack.
_ARCHS = runpy.run_path(str(ROOT / "apet_kernels" / "ops" / "cuda_archs.py"))
DEFAULT_ARCHS, _gencode = _ARCHS["DEFAULT_ARCHS"], _ARCHS["gencode_flags"]


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _torch_cuda_problem() -> str | None:
    """Why the installed torch cannot build a CUDA extension, without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "torch is not importable here (build with --no-build-isolation)"
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not any(lib.glob("libtorch_cuda*")):
        return "the installed torch is not a CUDA build"
    return None


def cuda_extension() -> dict:
    """``ext_modules``/``cmdclass`` for setup(): empty unless the extension is to be built."""
    mode = os.environ.get("APET_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"APET_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return {}
    problem = None if _nvcc() else "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    problem = problem or _torch_cuda_problem()
    if problem is not None:
        if mode == "1":
            raise SystemExit(f"APET_BUILD_CUDA=1 but the CUDA extension cannot be built: {problem}")
        print(f"apet_kernels: skipping the CUDA extension ({problem})", file=sys.stderr)
        return {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("APET_CUDA_ARCHS", DEFAULT_ARCHS)
    csrc = ROOT / "csrc"
    extension = CUDAExtension(
        name="apet_kernels._C",
        # Relative paths: setuptools rejects absolute ones in sources.
        sources=["csrc/apet_binding.cpp", "csrc/apet_kernels.cu"],
        include_dirs=[str(csrc)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *_gencode(archs)]},
    )
    build_ext = BuildExtension if mode == "1" else _lenient(BuildExtension)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": build_ext}}


def _lenient(build_ext: type) -> type:
    """auto mode: a failed build (compiler error, or torch's check that nvcc matches the CUDA
    torch was built with) leaves the package installed without the extension, and says why;
    apet_kernels.backends("cuda") then reports that the extension is not built."""

    class LenientBuildExtension(build_ext):
        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # any failure: the install itself must go on
                print(
                    f"apet_kernels: the CUDA extension failed to build, installing without it "
                    f"(set APET_BUILD_CUDA=1 to make this an error): {type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )

    return LenientBuildExtension


setup(**cuda_extension())
