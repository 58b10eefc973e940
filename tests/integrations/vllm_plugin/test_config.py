"""The ``apet`` hf_overrides entry -> stage-1 ApetConfig (pure parsing; runs without vLLM)."""

from __future__ import annotations

import types
import warnings

import pytest

from apet_kernels.integrations import ApetConfig, presets
from apet_kernels.integrations.vllm._config import KEYS, parse_apet, stage1_config


def test_no_apet_key_is_stock():
    assert stage1_config(types.SimpleNamespace(model_type="llava")) is None


def test_vision_keep_only():
    cfg = stage1_config(types.SimpleNamespace(model_type="llava", apet={"vision_keep": 0.3}))
    assert cfg == ApetConfig(vision_keep=0.3)
    assert cfg.layer is None and cfg.layer_keep is None


def test_every_stage1_key():
    raw = dict(vision_keep=7, num_basis=4, ridge=1e-3, merge=False, backend="torch")
    assert set(raw) | {"preset"} == set(KEYS)
    assert parse_apet(raw, "qwen2_5_vl") == ApetConfig(**raw)


@pytest.mark.parametrize("model_type", ["llava", "llava_next", "qwen2_5_vl"])
def test_preset_drops_stage2_with_one_warning(model_type):
    name, full = next(iter(presets(model_type).items()))
    assert full.layer is not None  # every default preset has a stage 2 to drop
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cfg = parse_apet({"preset": name}, model_type)
    assert len(seen) == 1 and "stage 2" in str(seen[0].message) and name in str(seen[0].message)
    assert cfg == full.replace(layer=None, positions=None)
    assert cfg.vision_keep == full.vision_keep


def test_preset_fields_are_overridden():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = parse_apet({"preset": "llava-1.5/128", "num_basis": 3}, "llava")
    assert (cfg.vision_keep, cfg.num_basis, cfg.layer) == (192, 3, None)


@pytest.mark.parametrize("key", ["layer", "layer_keep"])
def test_stage2_keys_raise(key):
    with pytest.raises(ValueError, match=rf"\['{key}'\]=2.*stage 1 only"):
        parse_apet({"vision_keep": 8, key: 2}, "llava")


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        ({"vision_keep": 8, "keep": 3}, "unknown key 'keep'"),
        ({"vision_keep": 0}, r"vision_keep=0.*>= 1"),
        ({"vision_keep": 1.5}, r"vision_keep=1.5.*\(0, 1\]"),
        ({"vision_keep": "30%"}, r"vision_keep='30%'"),
        ({"vision_keep": 8, "backend": "tpu"}, r"backend='tpu'"),
        ({"vision_keep": 8, "merge": "yes"}, r"merge='yes'"),
        ({"vision_keep": 8, "num_basis": 0}, r"num_basis=0"),
        ({"vision_keep": 8, "ridge": -1.0}, r"ridge=-1.0"),
        ({"preset": "llava-1.5/7"}, r"\['preset'\]='llava-1.5/7'.*llava-1.5/64"),
        ({}, "needs 'vision_keep'"),
        ({"num_basis": 3}, "needs 'vision_keep'"),
        (0.3, r"must be a dict.*0.3"),
    ],
)
def test_bad_values_raise_naming_key_and_value(raw, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_apet(raw, "llava")


def test_unsupported_model_type_raises():
    with pytest.raises(ValueError, match="no shim for model type 'gpt2'"):
        stage1_config(types.SimpleNamespace(model_type="gpt2", apet={"vision_keep": 4}))
