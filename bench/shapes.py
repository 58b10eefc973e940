"""Microbenchmark shapes, taken from where the op runs in the real models.

Each shape is one call of the dense op: S segments of N tokens of width D, K kept per segment.
GPU runs use the model's own dtype; CPU runs use float32 (CPU half-precision matmuls are slow
emulations nobody deploys, and the torch backend accumulates in float32 anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apet_kernels import keep_count

# On CPU the eager baseline's broadcast cosine materializes (N-K)*K*D float32 values three times
# (F.cosine_similarity normalizes both expanded operands, then multiplies them): measured peak RSS
# 9.1 GiB at 1024x3584 keep 307 (3.2 GiB broadcast). Above this estimated peak the row is skipped.
CPU_EAGER_PEAK_LIMIT_BYTES = 10 * 2**30
EAGER_PEAK_FACTOR = 3
# On CPU, inputs larger than this are skipped: minutes per call on two shared cores.
CPU_INPUT_LIMIT_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Shape:
    """One microbenchmark case.

    Attributes:
        name: short id used in rows and test ids.
        model: where the op runs (model and stage).
        segments, tokens, dim, keep: S, N, D, K of the dense op.
        gpu_dtype: the model's dtype on GPU.
        small: small enough that launch overhead matters (also timed as a CUDA-graph replay).
        cpu_eager_skip: why the eager baseline does not run on CPU here (None: it does).
    """

    name: str
    model: str
    segments: int
    tokens: int
    dim: int
    keep: int
    gpu_dtype: torch.dtype = torch.float16
    small: bool = False
    cpu_eager_skip: str | None = None

    def dtype(self, device: torch.device) -> torch.dtype:
        return self.gpu_dtype if device.type == "cuda" else torch.float32

    def input_bytes(self, dtype: torch.dtype) -> int:
        return self.segments * self.tokens * self.dim * dtype.itemsize

    def bytes_moved(self, dtype: torch.dtype) -> int:
        """Bytes any implementation must move: read x once, write out, kept and assign."""
        out = self.segments * self.keep * self.dim * dtype.itemsize
        indices = self.segments * (self.keep + self.tokens) * 8
        return self.input_bytes(dtype) + out + indices

    def broadcast_bytes(self, dtype: torch.dtype) -> int:
        """Size of one segment's (N-K)×K×D cosine broadcast in the eager baseline."""
        return (self.tokens - self.keep) * self.keep * self.dim * dtype.itemsize

    def cpu_skip_reason(self, provider: str) -> str | None:
        """Why this shape is not run on CPU for ``provider`` (None: it runs)."""
        size = self.input_bytes(torch.float32)
        if size > CPU_INPUT_LIMIT_BYTES:
            return (
                f"CPU: input is {size / 2**20:.0f} MiB (> {CPU_INPUT_LIMIT_BYTES // 2**20} MiB), "
                "minutes per call on a small CPU; GPU only"
            )
        if provider == "eager_released" and self.cpu_eager_skip is not None:
            return f"CPU: {self.cpu_eager_skip}"
        peak = EAGER_PEAK_FACTOR * self.broadcast_bytes(torch.float32)
        if provider == "eager_released" and peak > CPU_EAGER_PEAK_LIMIT_BYTES:
            return (
                f"CPU: the eager broadcast cosine would peak near {peak / 2**30:.0f} GiB "
                f"(> {CPU_EAGER_PEAK_LIMIT_BYTES // 2**30} GiB on a shared machine); GPU only"
            )
        return None


LLAVA_STAGE1 = Shape(
    "llava15_s1", "LLaVA-1.5 vision stage (64-token setting)", 1, 576, 1024, 96, small=True
)
LLAVA_STAGE2 = Shape("llava15_s2", "LLaVA-1.5 LLM layer 16", 1, 96, 4096, 32, small=True)
LLAVA_NEXT = Shape("llava_next", "LLaVA-NeXT 5 crops", 5, 576, 1024, 192, small=True)
QWEN_HALF = Shape(
    "qwen25vl_1024",
    "Qwen2.5-VL 1024 tokens @30%",
    1,
    1024,
    3584,
    keep_count(1024, 0.3),
    gpu_dtype=torch.bfloat16,
)
QWEN = Shape(
    "qwen25vl_2048",
    "Qwen2.5-VL 2048 tokens @30%",
    1,
    2048,
    3584,
    keep_count(2048, 0.3),
    gpu_dtype=torch.bfloat16,
)
VIDEO = Shape("video_llava", "Video-LLaVA 8 frames, 32/frame", 8, 256, 4096, 32)
LONG_VIDEO = Shape("long_video", "long video 64 frames @10%", 64, 576, 4096, keep_count(576, 0.1))
BATCH32 = Shape(
    "batch32",
    "LLaVA-1.5 batch of 32 images",
    32,
    576,
    1024,
    96,
    cpu_eager_skip="time budget: the eager loop runs the llava15_s1 case 32 times (~10 s per call "
    "on one thread); the GPU run includes it",
)

FULL = (LLAVA_STAGE1, LLAVA_STAGE2, LLAVA_NEXT, QWEN_HALF, QWEN, VIDEO, LONG_VIDEO, BATCH32)
# The two shapes whose torch-vs-eager ratio the project lead asked for.
HEADLINE = (LLAVA_STAGE1.name, QWEN_HALF.name)
# Seconds, not minutes: for --quick and the smoke test.
QUICK = (
    Shape("tiny", "smoke: one tiny segment", 1, 64, 32, 8, small=True),
    Shape("tiny_batch", "smoke: four tiny segments", 4, 49, 64, 12, small=True),
)


def by_name(names: list[str] | None, quick: bool) -> tuple[Shape, ...]:
    """The shapes to run: ``names`` from FULL (or QUICK when ``quick``), all when None."""
    pool = QUICK if quick else FULL
    if names is None:
        return pool
    table = {s.name: s for s in pool}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; choose from {sorted(table)}")
    return tuple(table[n] for n in names)
