"""apply_apet / remove_apet / last_selection, the shim registry and the presets."""

from __future__ import annotations

import functools
import inspect
import warnings

import transformers
from packaging.version import Version
from torch import nn

from ._config import ApetConfig
from ._forward import patched_forward
from ._generate import expand_for_generation
from ._interface import Shim
from ._selection import Selection
from ._stage2 import make_layer_hook, make_planes_hook
from ._state import Patch
from .llava import LlavaShim
from .llava_next import LlavaNextShim
from .llava_onevision import LlavaOnevisionShim
from .qwen2_5_vl import Qwen25VLShim
from .qwen2_vl import Qwen2VLShim
from .qwen3_vl import Qwen3VLMoeShim, Qwen3VLShim
from .video_llava import VideoLlavaShim

#: transformers versions the shims are tested against: CI runs the suite on the lowest (5.17)
#: and the newest release (5.24; 5.19 in the vLLM environment). Older versions lack the cache and
#: mask API the shims use (``create_causal_mask(layer_idx=...)``, no ``cache_position``); newer
#: ones warn until CI has run them (what differs between releases is detected in ``_compat``).
SUPPORTED_TRANSFORMERS = ">=5.17,<5.25"
_MIN, _MAX = Version("5.17"), Version("5.25")

_SHIMS: dict[str, Shim] = {}
for _shim in (
    LlavaShim(),
    LlavaNextShim(),
    VideoLlavaShim(),
    Qwen25VLShim(),
    Qwen2VLShim(),
    LlavaOnevisionShim(),
    Qwen3VLShim(),
    Qwen3VLMoeShim(),
):
    for _type in _shim.model_types:
        _SHIMS[_type] = _shim

_ATTR = "_apet_patch"
#: generate's input expansion, which the patch wraps (see ``expand_for_generation``)
_EXPAND = "_expand_inputs_for_generation"
_CLASS_ATTR = "_apet_class_patch"


def supported_model_types() -> list[str]:
    """``config.model_type`` values that have a shim."""
    return sorted(_SHIMS)


def presets(model_type: str | None = None) -> dict[str, ApetConfig]:
    """Named budgets (the paper's rows), for one model type or all of them."""
    shims = (
        [_shim_for(model_type)] if model_type is not None else list(dict.fromkeys(_SHIMS.values()))
    )
    return {name: cfg for shim in shims for name, cfg in shim.presets.items()}


def _shim_for(model_type: object) -> Shim:
    shim = _SHIMS.get(model_type) if isinstance(model_type, str) else None
    if shim is None:
        raise ValueError(
            f"apet has no shim for model type {model_type!r}; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    return shim


def _check_version() -> None:
    found = Version(transformers.__version__)
    if found < _MIN:
        raise RuntimeError(
            f"apet's transformers shims need transformers{SUPPORTED_TRANSFORMERS}, found {found}"
        )
    if found.release[:2] >= _MAX.release[:2]:
        warnings.warn(
            f"apet's transformers shims are tested with transformers{SUPPORTED_TRANSFORMERS}, "
            f"found {found}",
            stacklevel=3,
        )


def _resolve(shim: Shim, config, overrides: dict) -> ApetConfig:
    if config is None:
        config = shim.default_preset
    if isinstance(config, str):
        if config not in shim.presets:
            raise ValueError(
                f"unknown preset {config!r} for {shim.model_types[0]}; presets: "
                f"{', '.join(shim.presets)}"
            )
        config = shim.presets[config]
    if not isinstance(config, ApetConfig):
        raise TypeError(f"config must be an ApetConfig, a preset name or None, got {config!r}")
    config = config.replace(**overrides) if overrides else config
    if config.positions is None:
        config = config.replace(positions=shim.default_positions)
    return config


def _check_model(shim: Shim, model: nn.Module, config: ApetConfig) -> None:
    lm = shim.language_model(model)
    layers = len(lm.layers)
    if config.layer is not None and not 1 <= config.layer < layers:
        raise ValueError(
            f"layer must satisfy 1 <= layer < {layers} (this model's decoder layers), "
            f"got {config.layer}"
        )
    types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise NotImplementedError(
            f"apet supports full-attention decoders only, got {sorted(types)}"
        )
    shim.check(model, config)


def apply_apet(model, config: ApetConfig | str | None = None, **overrides):
    """Patch a VLM so that its forward (and generate) compresses visual tokens with ApET.

    Args:
        model: a model instance of a supported type (supported_model_types(): LLaVA-1.5, LLaVA-NeXT,
            LLaVA-OneVision, Video-LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
            (``*ForConditionalGeneration`` or the base ``*Model``), patched in place; or one of
            those classes, whose instances are then patched as they are built.
        config: an :class:`ApetConfig`, a preset name (see :func:`presets`), or None for the
            paper's setting for this model.
        **overrides: ApetConfig fields replacing the config's (e.g. ``layer=2``).

    Returns:
        The same model (or class).

    Raises:
        ValueError: unsupported model type, unknown preset, or a budget/layer out of range
            (Qwen3-VL: ``layer`` at or before its last DeepStack layer).
        TypeError: a field of the wrong type or an unknown field name.
    """
    _check_version()
    if isinstance(model, type):
        return _apply_class(model, config, overrides)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model instance or class, got {model!r}")
    shim = _shim_for(model.config.model_type)
    config = _resolve(shim, config, overrides)
    _check_model(shim, model, config)
    if hasattr(model, _ATTR):
        remove_apet(model)
    had = "forward" in model.__dict__
    patch = Patch(shim, config, model, model.forward, had)

    @functools.wraps(patch.orig_forward)
    def forward(*args, **kwargs):
        return patched_forward(patch, args, kwargs)

    # generate (transformers >= 5.23) runs the vision encoder *and projector* ahead of the
    # forward when the forward takes `mm_encoder_outputs`; stage 1 must see the features before
    # the projector, so the patched forward does not advertise it and gets pixel values instead.
    sig = inspect.signature(patch.orig_forward)
    forward.__signature__ = sig.replace(
        parameters=[p for name, p in sig.parameters.items() if name != "mm_encoder_outputs"]
    )
    if config.layer is not None:
        layers = shim.language_model(model).layers
        # every layer takes the call's context out of its keyword arguments (see _stage2)
        for i in range(len(layers)):
            patch.hooks.append(
                layers[i].register_forward_pre_hook(make_layer_hook(patch, i), with_kwargs=True)
            )
    if shim.has_planes:
        lm = shim.language_model(model)
        patch.hooks.append(lm.register_forward_pre_hook(make_planes_hook(patch), with_kwargs=True))
    model.forward = forward
    if hasattr(model, _EXPAND) and _EXPAND not in model.__dict__:
        patch.orig_expand = getattr(model, _EXPAND)

        def expand(expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
            return expand_for_generation(
                patch, expand_size, is_encoder_decoder, input_ids, model_kwargs
            )

        setattr(model, _EXPAND, expand)
    object.__setattr__(model, _ATTR, patch)
    return model


def remove_apet(model):
    """Undo :func:`apply_apet` exactly (hooks, forward, generate's input expansion; for a class,
    its constructor)."""
    if isinstance(model, type):
        saved = model.__dict__.get(_CLASS_ATTR)
        if saved is not None:
            orig_init, owned = saved[0], saved[2]
            if owned:
                model.__init__ = orig_init
            else:  # the constructor was inherited: leave no __init__ of the class's own behind
                del model.__init__
            delattr(model, _CLASS_ATTR)
        return model
    patch = model.__dict__.get(_ATTR)
    if patch is None:
        return model
    for handle in patch.hooks:
        handle.remove()
    if patch.had_instance_forward:
        model.forward = patch.orig_forward
    else:
        del model.__dict__["forward"]
    if patch.orig_expand is not None:
        del model.__dict__[_EXPAND]
    del model.__dict__[_ATTR]
    return model


def _apply_class(cls: type, config, overrides: dict) -> type:
    model_type = getattr(getattr(cls, "config_class", None), "model_type", None)
    shim = _shim_for(model_type)
    resolved = _resolve(shim, config, overrides)
    remove_apet(cls)
    owned = "__init__" in cls.__dict__
    orig_init = cls.__dict__["__init__"] if owned else cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        if type(self) is cls:
            apply_apet(self, resolved)

    cls.__init__ = __init__
    setattr(cls, _CLASS_ATTR, (orig_init, resolved, owned))
    return cls


def last_selection(model) -> Selection | None:
    """The selections of the last compressing forward of a patched model (None before any).

    Returns:
        A :class:`Selection`: per image unit the batch row, kind/item/index, the token grid
        ``(h, w)`` when known, the stage-1 ``kept`` indices and ``assign``, and the stage-2
        ``layer_kept`` indices into the stage-1 tokens (with ``layer_assign``). CPU tensors.
    """
    patch = model.__dict__.get(_ATTR) if isinstance(model, nn.Module) else None
    if patch is None:
        raise ValueError("model is not patched with apply_apet")
    raw = patch.last()
    return None if raw is None else raw.unpack()


def is_patched(model) -> bool:
    """Whether apply_apet is active on this instance."""
    return isinstance(model, nn.Module) and _ATTR in model.__dict__


__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "apply_apet",
    "is_patched",
    "last_selection",
    "presets",
    "remove_apet",
    "supported_model_types",
]
