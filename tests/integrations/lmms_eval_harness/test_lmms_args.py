"""The ApET part of --model_args, parsed without lmms-eval (runs in the core suite too)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from apet_kernels.integrations.lmms_eval import (
    APET_KEYS,
    MODELS,
    ApetArgs,
    ApetEvalError,
    split_model_args,
)
from apet_kernels.integrations.transformers import ApetConfig, presets


def test_stock_keys_pass_through_untouched():
    kwargs = {"pretrained": "x", "device": "cpu", "dtype": "float16", "max_frames_num": 8}
    apet, rest = split_model_args({**kwargs, "preset": "llava-1.5/64"})
    assert rest == kwargs
    assert apet == ApetArgs(enabled=True, preset="llava-1.5/64", overrides={})


def test_defaults_mean_the_models_default_preset():
    apet, rest = split_model_args({"pretrained": "x"})
    assert apet.enabled and apet.preset is None and apet.overrides == {}
    assert rest == {"pretrained": "x"}


@pytest.mark.parametrize(
    "given, field, want",
    [
        # values as lmms-eval's handle_arg_string already converted them ...
        ({"vision_keep": 96}, "vision_keep", 96),
        ({"vision_keep": 0.25}, "vision_keep", 0.25),
        ({"layer": 16}, "layer", 16),
        ({"layer_keep": 0.5}, "layer_keep", 0.5),
        ({"num_basis": 12}, "num_basis", 12),
        ({"ridge": 0.001}, "ridge", 0.001),
        ({"ridge": 0}, "ridge", 0.0),
        ({"merge": False}, "merge", False),
        ({"apet_backend": "torch"}, "backend", "torch"),
        # ... and raw strings (a dict of model_args passed from Python)
        ({"vision_keep": "96"}, "vision_keep", 96),
        ({"vision_keep": "0.25"}, "vision_keep", 0.25),
        ({"layer": "none"}, "layer", None),
        ({"layer": "None"}, "layer", None),
        ({"merge": "false"}, "merge", False),
        ({"ridge": "1e-4"}, "ridge", 1e-4),
    ],
)
def test_overrides_are_converted(given, field, want):
    apet, _ = split_model_args(given)
    assert apet.overrides == {field: want}
    assert type(apet.overrides[field]) is type(want)


def test_overrides_build_the_config_apply_apet_uses():
    """The parsed overrides are valid ApetConfig fields: replacing a preset's gives the config
    an ApetConfig built by hand gives."""
    apet, _ = split_model_args(
        {"preset": "llava-1.5/128", "layer_keep": 0.5, "num_basis": 8, "apet_backend": "torch"}
    )
    got = presets("llava")[apet.preset].replace(**apet.overrides)
    assert got == ApetConfig(192, layer=16, layer_keep=0.5, num_basis=8, backend="torch")
    off, _ = split_model_args({"layer": "none"})
    assert presets("llava")["llava-1.5/64"].replace(**off.overrides) == ApetConfig(96)


@pytest.mark.parametrize(
    "given, needle",
    [
        ({"vision_keep": 0}, "vision_keep"),
        ({"vision_keep": 1.5}, "vision_keep"),
        ({"vision_keep": "lots"}, "'lots'"),
        ({"vision_keep": True}, "vision_keep"),
        ({"layer": 0}, "layer must be"),
        ({"layer": 2.5}, "2.5"),
        ({"layer_keep": -3}, "layer_keep"),
        ({"num_basis": 0}, "num_basis"),
        ({"num_basis": 2.0}, "num_basis"),
        ({"ridge": -1.0}, "ridge"),
        ({"ridge": "nan"}, "ridge"),
        ({"merge": 1}, "merge must be true or false, got 1"),
        ({"apet_backend": "gpu"}, "'gpu'"),
        ({"apet": "maybe"}, "apet must be true or false, got 'maybe'"),
        ({"preset": 64}, "preset must be a preset name, got 64"),
        ({"layer": "none", "layer_keep": 32}, "layer_keep=32"),
    ],
)
def test_bad_values_name_key_and_value(given, needle):
    with pytest.raises(ValueError) as info:
        split_model_args(given)
    assert needle in str(info.value)


def test_apet_false_is_the_baseline_and_takes_no_apet_keys():
    apet, rest = split_model_args({"apet": False, "pretrained": "x"})
    assert apet == ApetArgs(enabled=False) and rest == {"pretrained": "x"}
    assert split_model_args({"apet": "false"})[0].enabled is False
    assert split_model_args({"apet": True})[0].enabled is True
    with pytest.raises(ValueError, match=r"apet=false .* preset='llava-1.5/64'"):
        split_model_args({"apet": False, "preset": "llava-1.5/64"})
    with pytest.raises(ValueError, match="vision_keep=96"):
        split_model_args({"apet": "false", "vision_keep": 96})


def test_describe():
    assert ApetArgs(enabled=False).describe() == "apet=false"
    apet, _ = split_model_args({"preset": "llava-1.5/64", "layer": "none"})
    assert apet.describe() == "preset=llava-1.5/64 layer=None"


def test_keys_and_models():
    assert set(APET_KEYS) == {
        "apet", "preset", "vision_keep", "layer", "layer_keep", "num_basis", "ridge", "merge",
        "apet_backend",
    }  # fmt: skip
    assert set(MODELS) == {"apet_llava", "apet_qwen2_5_vl", "apet_video_llava"}
    assert issubclass(ApetEvalError, BaseException) and not issubclass(ApetEvalError, Exception)


def test_import_loads_no_transformers_or_lmms_eval():
    """The package adds no heavy import: transformers and lmms-eval load when a wrapper is
    resolved. (torch is imported by the parent package ``apet_kernels`` itself, which registers
    the op; this package imports nothing of torch beyond it.)"""
    code = (
        "import sys; import apet_kernels; before = set(sys.modules); "
        "import apet_kernels.integrations.lmms_eval as m; "
        "m.split_model_args({'preset': 'x', 'vision_keep': '0.5'}); "
        "new = set(sys.modules) - before; "
        "print(sorted(k for k in new if k.split('.')[0] in ('torch', 'transformers', 'lmms_eval')"
        " or k in ('transformers', 'lmms_eval'))); "
        "print(sorted(k for k in ('transformers', 'lmms_eval') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "[]"], out.stdout + out.stderr
