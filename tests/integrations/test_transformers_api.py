"""The shims' public surface: lazy import, config validation, presets, class patching."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from tiny_vlms import BUDGETS, BUILDERS, NUM_LAYERS, PROMPTS

from apet_kernels.integrations import (
    SUPPORTED_TRANSFORMERS,
    ApetConfig,
    apply_apet,
    is_patched,
    last_selection,
    presets,
    remove_apet,
    supported_model_types,
)


def test_import_apet_kernels_does_not_import_transformers():
    code = (
        "import sys, apet_kernels, apet_kernels.integrations; "
        "assert 'transformers' not in sys.modules; "
        "apet_kernels.integrations.apply_apet; assert 'transformers' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_declared_transformers_range(monkeypatch):
    """Inside SUPPORTED_TRANSFORMERS apply_apet is silent; above it warns; below 5.17 (whose
    cache/mask API the shims do not use) it raises."""
    from packaging.specifiers import SpecifierSet

    model, _ = BUILDERS["llava"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_apet(model, **BUDGETS["llava"])
    warned = any("tested with transformers" in str(w.message) for w in caught)
    assert warned != (transformers.__version__ in SpecifierSet(SUPPORTED_TRANSFORMERS))
    monkeypatch.setattr(transformers, "__version__", "5.30.0")
    with pytest.warns(UserWarning, match="tested with transformers"):
        apply_apet(model, **BUDGETS["llava"])
    monkeypatch.setattr(transformers, "__version__", "5.16.2")
    with pytest.raises(RuntimeError, match="5.16.2"):
        apply_apet(model, **BUDGETS["llava"])
    remove_apet(model)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(vision_keep=0), ValueError, ["vision_keep", "0"]),
        (dict(vision_keep=-3), ValueError, ["vision_keep", "-3"]),
        (dict(vision_keep=1.5), ValueError, ["vision_keep", "1.5"]),
        (dict(vision_keep=0.0), ValueError, ["vision_keep", "0.0"]),
        (dict(vision_keep="96"), TypeError, ["vision_keep", "'96'"]),
        (dict(vision_keep=8, layer=2, layer_keep=0), ValueError, ["layer_keep", "0"]),
        (dict(vision_keep=8, layer=2), ValueError, ["layer_keep", "layer=2"]),
        (dict(vision_keep=8, layer_keep=0.5), ValueError, ["layer_keep=0.5", "needs layer"]),
        (dict(vision_keep=8, layer=0, layer_keep=2), ValueError, ["layer", "0"]),
        (dict(vision_keep=8, layer=2.0, layer_keep=2), TypeError, ["layer", "2.0"]),
        (dict(vision_keep=8, positions="absolute"), ValueError, ["positions", "absolute"]),
        (dict(vision_keep=8, backend="gpu"), ValueError, ["backend", "gpu"]),
        (dict(vision_keep=8, num_basis=0), ValueError, ["num_basis", "0"]),
        (dict(vision_keep=8, ridge=-1.0), ValueError, ["ridge", "-1.0"]),
    ],
)
def test_bad_config_values(kwargs, exc, words):
    with pytest.raises(exc) as info:
        ApetConfig(**kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("name", [n for n in BUILDERS if n in supported_model_types()])
def test_layer_checked_against_model(name):
    model, _ = BUILDERS[name]()
    for layer in (NUM_LAYERS, 99):
        with pytest.raises(ValueError, match=f"layer .*< {NUM_LAYERS}.*got {layer}"):
            apply_apet(model, vision_keep=4, layer=layer, layer_keep=2)
    # The paper's default (layer 14 or 16) does not fit a 4-layer model, except Video-LLaVA's
    # vision-only default.
    if name != "video_llava":
        with pytest.raises(ValueError, match="layer"):
            apply_apet(model)
    assert not is_patched(model)


def test_unknown_model_type_lists_supported():
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=32,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="'llama'.*llava") as info:
        apply_apet(model, vision_keep=4)
    for t in supported_model_types():
        assert t in str(info.value)
    with pytest.raises(TypeError, match="model"):
        apply_apet(object())


def test_overrides_and_presets():
    model, _ = BUILDERS["llava"]()
    with pytest.raises(TypeError, match="'vision_kept'"):
        apply_apet(model, vision_kept=3)
    with pytest.raises(ValueError, match="'llava-1.5/7'"):
        apply_apet(model, "llava-1.5/7")
    rows = presets("llava")
    assert rows["llava-1.5/64"] == ApetConfig(96, layer=16, layer_keep=32)
    assert {"llava-1.5/128", "llava-1.5/192"} <= set(rows)
    assert set(presets()) >= set(rows)
    apply_apet(model, "llava-1.5/128", layer=2)
    assert model._apet_patch.config == ApetConfig(192, 2, 64, positions="compact")
    remove_apet(model)


def test_replace_layer_none_turns_stage_2_off():
    cfg = ApetConfig(96, layer=16, layer_keep=32)
    assert cfg.replace(layer=None) == ApetConfig(96)
    with pytest.raises(ValueError, match="layer_keep=8 needs layer"):
        cfg.replace(layer=None, layer_keep=8)


def test_default_positions_per_family():
    for name, expected in [("llava", "compact"), ("qwen2_5_vl", "original")]:
        if name not in supported_model_types():
            continue
        model, _ = BUILDERS[name]()
        apply_apet(model, vision_keep=4, layer=2)
        assert model._apet_patch.config.positions == expected
        remove_apet(model)


def test_patch_a_class():
    cls = transformers.LlavaForConditionalGeneration
    model, make = BUILDERS["llava"]()
    inputs = make(PROMPTS["llava"][:1])
    apply_apet(cls, **BUDGETS["llava"])
    try:
        fresh = cls(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        assert is_patched(fresh)
        with torch.no_grad():
            out = fresh(**inputs)
        assert (
            last_selection(fresh) is not None and out.logits.shape[1] < inputs["input_ids"].shape[1]
        )
    finally:
        remove_apet(cls)
    assert "__init__" not in cls.__dict__ or not is_patched(cls(model.config))


def test_patch_a_class_that_inherits_its_constructor():
    """remove_apet leaves no ``__init__`` on a class that had none of its own."""

    class Sub(transformers.LlavaForConditionalGeneration):
        pass

    model, _ = BUILDERS["llava"]()
    apply_apet(Sub, **BUDGETS["llava"])
    assert "__init__" in Sub.__dict__ and is_patched(Sub(model.config))
    remove_apet(Sub)
    assert "__init__" not in Sub.__dict__ and not is_patched(Sub(model.config))
    assert Sub.__init__ is transformers.LlavaForConditionalGeneration.__init__


def test_attention_mask_must_be_2d():
    model, make = BUILDERS["llava"]()
    inputs = make(PROMPTS["llava"][:1])
    apply_apet(model, **BUDGETS["llava"])
    mask = inputs["attention_mask"][:, None, None].bool()
    with pytest.raises(NotImplementedError, match=r"2D attention_mask.*\(1, 1, 1, 43\)"):
        model(**dict(inputs, attention_mask=mask))
    remove_apet(model)


def test_apply_twice_replaces_and_last_selection_needs_patch():
    model, _ = BUILDERS["llava"]()
    apply_apet(model, vision_keep=4, layer=None)
    apply_apet(model, vision_keep=5, layer=None)
    assert model._apet_patch.config.vision_keep == 5
    remove_apet(model)
    remove_apet(model)  # a no-op on an unpatched model
    with pytest.raises(ValueError, match="not patched"):
        last_selection(model)
