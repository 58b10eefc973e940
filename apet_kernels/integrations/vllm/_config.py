"""Reading the ``apet`` entry that vLLM's ``hf_overrides`` puts on a model's Hugging Face config.

``LLM(model=..., hf_overrides={"apet": {"vision_keep": 0.3}})`` (or ``--hf-overrides`` on the
server) sets ``hf_config.apet`` to that dict. Only ApET's stage 1 (after the vision encoder) runs
in vLLM: its paged KV cache holds one sequence length for every layer, so stage 2 (compressing
again at a decoder layer, which shortens the later layers' caches) cannot be expressed there.

This module imports neither vLLM nor torch-heavy code paths beyond the shared ApetConfig, so it is
unit-tested in the core suite.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from ..transformers import ApetConfig, presets

#: the attribute hf_overrides sets on the top-level HF config
ATTR = "apet"
#: keys an ``apet`` dict may hold (ApetConfig's stage-1 fields, plus a preset name)
KEYS = ("preset", "vision_keep", "num_basis", "ridge", "merge", "backend")
#: stage-2 keys, refused: vLLM's paged KV cache cannot hold per-layer sequence lengths
STAGE2_KEYS = ("layer", "layer_keep")

_PREFIX = "hf_overrides['apet']"


def parse_apet(raw: object, model_type: str) -> ApetConfig:
    """The stage-1 :class:`ApetConfig` an ``apet`` override asks for.

    Args:
        raw: the ``apet`` value: a mapping with keys from :data:`KEYS`. ``preset`` names one of
            ``apet_kernels.integrations.presets(model_type)``; the other keys override its
            fields; one of ``preset`` and ``vision_keep`` is required. A preset's stage 2
            (``layer``/``layer_keep``) is dropped with a warning.
        model_type: ``hf_config.model_type`` (selects the presets).

    Returns:
        An ApetConfig with ``layer=None``, ``layer_keep=None`` and ``positions=None``.

    Raises:
        ValueError: ``raw`` is not a mapping, holds an unknown or stage-2 key, has neither
            ``preset`` nor ``vision_keep``, names an unknown preset, or a value fails
            ApetConfig's checks (its TypeErrors too: these values come from user configuration;
            the message names key and value).
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{_PREFIX} must be a dict of {list(KEYS)}, got {raw!r}")
    for key in raw:
        if key in STAGE2_KEYS:
            raise ValueError(
                f"{_PREFIX}[{key!r}]={raw[key]!r}: vLLM runs ApET's stage 1 only (its paged KV "
                "cache holds one sequence length for every layer, so a decoder-layer stage 2 "
                f"cannot be expressed); remove {list(STAGE2_KEYS)}"
            )
        if key not in KEYS:
            raise ValueError(f"{_PREFIX}: unknown key {key!r} (value {raw[key]!r}); keys: {KEYS}")
    fields = {k: v for k, v in raw.items() if k != "preset"}
    name = raw.get("preset")
    try:
        table = presets(model_type)
    except ValueError as e:
        raise ValueError(f"{_PREFIX}: {e}") from None
    if name is None and "vision_keep" not in fields:
        raise ValueError(
            f"{_PREFIX}={dict(raw)!r} needs 'vision_keep' (tokens or ratio kept per image unit) "
            f"or 'preset' (one of {', '.join(table)})"
        )
    if name is not None:
        if not isinstance(name, str) or name not in table:
            raise ValueError(
                f"{_PREFIX}['preset']={name!r} is not a preset of {model_type}; presets: "
                f"{', '.join(table)}"
            )
        base = table[name]
        if base.layer is not None:
            warnings.warn(
                f"apet preset {name!r}: vLLM runs stage 1 only ({base.vision_keep} tokens per "
                f"unit); its stage 2 (layer={base.layer}, layer_keep={base.layer_keep}) is dropped",
                stacklevel=2,
            )
        base = base.replace(layer=None, positions=None)
    else:
        base = None
    try:
        if base is None:
            return ApetConfig(**fields)
        return base.replace(**fields) if fields else base
    except (TypeError, ValueError) as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        raise ValueError(f"{_PREFIX} ({shown}): {e}") from None


def stage1_config(hf_config) -> ApetConfig | None:
    """The stage-1 ApetConfig of a model's HF config, or None when it has no ``apet`` entry
    (the model then runs exactly as stock vLLM). See :func:`parse_apet` for what raises."""
    raw = getattr(hf_config, ATTR, None)
    if raw is None:
        return None
    return parse_apet(raw, hf_config.model_type)
