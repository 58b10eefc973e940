"""``_runner``: the pruning flags set after a runner's ``load_model`` (no engine started)."""

from __future__ import annotations

import types

import pytest

from apet_kernels.integrations.vllm import _runner, register


def _runner_class():
    class Runner:
        def __init__(self, model, evs: bool):
            self._model = model
            mm = types.SimpleNamespace(is_multimodal_pruning_enabled=lambda: evs)
            self.model_config = types.SimpleNamespace(multimodal_config=mm)
            self.is_multimodal_pruning_enabled = False
            self.requires_sequential_video_encoding = False

        def load_model(self, load_dummy_weights: bool = False):
            self.loaded = True
            return "loaded"

        def get_model(self):
            return self._model

    return Runner


class Plain:
    pass


class Pruning:
    supports_multimodal_pruning = True


@pytest.mark.parametrize(
    ("model", "evs", "want"),
    [
        (Plain(), True, False),  # a model without pruning support never gets the plumbing
        (Pruning(), True, True),  # vLLM's own EVS: as GPUModelRunner computes it
        (Pruning(), False, False),  # neither EVS nor the model asks
        (
            types.SimpleNamespace(
                supports_multimodal_pruning=True, is_multimodal_pruning_enabled=True
            ),
            False,
            True,
        ),
        (
            types.SimpleNamespace(
                supports_multimodal_pruning=True, is_multimodal_pruning_enabled="yes"
            ),
            False,
            False,
        ),
    ],
)
def test_flags_after_load_model(model, evs, want):
    cls = _runner_class()
    assert _runner.patch_runner(cls)
    assert not _runner.patch_runner(cls)  # wrapped once only
    runner = cls(model, evs)
    assert runner.load_model() == "loaded" and runner.loaded
    assert runner.is_multimodal_pruning_enabled is want
    assert runner.requires_sequential_video_encoding is False


def test_sequential_video_flag():
    cls = _runner_class()
    _runner.patch_runner(cls)
    model = Pruning()
    model.requires_sequential_video_encoding = True
    runner = cls(model, False)
    runner.load_model()
    assert runner.requires_sequential_video_encoding is True


def test_register_wraps_the_cpu_runner():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    register()
    register()  # idempotent
    assert getattr(CPUModelRunner.__dict__["load_model"], _runner._MARK, False)
    assert not _runner.patch_runner(CPUModelRunner)


# --------------------------------------------------------------------------------------------
# Model Runner V2: the pruner factory (stubs; the real MultiModalPruner class)


def _factory_module():
    """A stand-in for ``vllm.v1.worker.gpu.model_states.default``: its factory as vLLM's own
    (None unless vLLM's EVS is on)."""

    def maybe_create_mm_pruner(model_config, model, rope_state, encoder_cache):
        return (
            "evs-pruner" if model_config.multimodal_config.is_multimodal_pruning_enabled() else None
        )

    return types.SimpleNamespace(maybe_create_mm_pruner=maybe_create_mm_pruner)


def _model_config(evs: bool):
    mm = types.SimpleNamespace(is_multimodal_pruning_enabled=lambda: evs)
    return types.SimpleNamespace(multimodal_config=mm, get_inputs_embeds_size=lambda: 64)


APET_MODEL = types.SimpleNamespace(
    supports_multimodal_pruning=True, is_multimodal_pruning_enabled=True
)


def test_pruner_factory_for_a_model_that_prunes_itself():
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    module = _factory_module()
    assert _runner.patch_pruner_factory(module)
    assert not _runner.patch_pruner_factory(module)  # wrapped once only
    pruner = module.maybe_create_mm_pruner(_model_config(False), APET_MODEL, "rope", "cache")
    assert isinstance(pruner, MultiModalPruner)
    assert (pruner.model, pruner.rope_state, pruner.encoder_cache) == (APET_MODEL, "rope", "cache")
    assert pruner.inputs_embeds_size == 64


@pytest.mark.parametrize(
    ("model", "evs", "rope", "want"),
    [
        (APET_MODEL, True, "rope", "evs-pruner"),  # vLLM's own result is kept
        (Pruning(), False, "rope", None),  # neither EVS nor the model asks: stock
        (Plain(), False, "rope", None),
        (  # the attribute must be exactly True
            types.SimpleNamespace(
                supports_multimodal_pruning=True, is_multimodal_pruning_enabled="yes"
            ),
            False,
            "rope",
            None,
        ),
        (APET_MODEL, False, None, None),  # no M-RoPE state: vLLM's own condition
    ],
)
def test_pruner_factory_otherwise_stock(model, evs, rope, want):
    module = _factory_module()
    _runner.patch_pruner_factory(module)
    assert module.maybe_create_mm_pruner(_model_config(evs), model, rope, "cache") == want


def test_real_factory_module_is_wrappable():
    """The name the wrapper replaces exists where Model Runner V2 looks it up (vllm 0.32)."""
    import inspect

    from vllm.v1.worker.gpu.model_states import default

    params = list(inspect.signature(default.maybe_create_mm_pruner).parameters)
    assert params == ["model_config", "model", "rope_state", "encoder_cache"]


def _qwen_stub(apet, model_rate=None, config_rate=None):
    config = types.SimpleNamespace(model_type="qwen2_5_vl")
    if apet is not None:
        config.apet = apet
    model = types.SimpleNamespace(
        config=config, multimodal_config=types.SimpleNamespace(video_pruning_rate=config_rate)
    )
    if model_rate is not None:
        model.video_pruning_rate = model_rate
    return model


def test_enable_stage1_sets_the_flags_only_with_apet():
    pytest.importorskip("vllm")
    from apet_kernels.integrations.vllm.qwen2_5_vl import enable_stage1

    stock = _qwen_stub(None, model_rate=0.5)  # no apet: vLLM's own pruning is left alone
    enable_stage1(stock)
    assert stock.apet_config is None and not hasattr(stock, "is_multimodal_pruning_enabled")
    on = _qwen_stub({"vision_keep": 0.3}, model_rate=0.0)
    enable_stage1(on)
    assert on.apet_config.vision_keep == 0.3
    assert on.is_multimodal_pruning_enabled and on.supports_multimodal_pruning


@pytest.mark.parametrize(("model_rate", "config_rate"), [(0.5, None), (None, 0.25)])
def test_enable_stage1_refuses_vllm_video_pruning(model_rate, config_rate):
    pytest.importorskip("vllm")
    from apet_kernels.integrations.vllm.qwen2_5_vl import enable_stage1

    model = _qwen_stub({"vision_keep": 0.3}, model_rate, config_rate)
    with pytest.raises(ValueError, match=r"video_pruning_rate=0\.(5|25).*hf_overrides\['apet'\]"):
        enable_stage1(model)
