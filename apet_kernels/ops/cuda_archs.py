"""CUDA architecture lists -> nvcc ``-gencode`` flags, shared by setup.py and the JIT loader.

Torch-free and import-free on purpose: setup.py loads this file by path, in a build environment
that may have no torch (and so cannot import the ``apet_kernels`` package).
"""

#: sm_80 and sm_90 machine code plus compute_90 PTX, which the driver compiles for newer GPUs.
DEFAULT_ARCHS = "8.0;9.0+PTX"


def gencode_flags(archs: str) -> list[str]:
    """nvcc flags for ``"8.0;9.0"``-style architecture lists (``"9.0a"`` and ``"+PTX"`` too)."""
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        number = arch.removesuffix("+PTX").replace(".", "")
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
        if arch.endswith("+PTX"):
            flags += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return flags
