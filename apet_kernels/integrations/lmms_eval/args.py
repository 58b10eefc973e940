"""The ApET part of lmms-eval's ``--model_args``, parsed without torch, transformers or lmms-eval.

``--model_args pretrained=...,preset=llava-1.5/64,device=cpu`` reaches a wrapper as keyword
arguments, values already converted by lmms-eval (``"true"`` -> True, ``"96"`` -> 96,
``"0.25"`` -> 0.25, anything else stays a string). :func:`split_model_args` takes out the ApET
keys, checks each one (an error names the key and the value) and returns the rest untouched for
lmms-eval's stock wrapper. Raw strings (a dict passed from Python) are accepted as well.

ApET keys:

* ``apet``: ``true`` (default) or ``false``; ``false`` runs the unmodified model through the same
  wrapper (the baseline that accuracy retention is measured against) and allows no other key.
* ``preset``: a preset name (``apet_kernels.integrations.presets()``); default: the model's.
* ``vision_keep``, ``layer`` (``none`` turns stage 2 off), ``layer_keep``, ``num_basis``,
  ``ridge``, ``merge``, ``apet_backend``: :class:`ApetConfig` fields replacing the preset's
  (``apet_backend`` is the op's ``backend``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: --model_args key -> ApetConfig field
OVERRIDE_FIELDS = {
    "vision_keep": "vision_keep",
    "layer": "layer",
    "layer_keep": "layer_keep",
    "num_basis": "num_basis",
    "ridge": "ridge",
    "merge": "merge",
    "apet_backend": "backend",
}
APET_KEYS = ("apet", "preset", *OVERRIDE_FIELDS)
_BACKENDS = ("auto", "torch", "triton", "cuda")


@dataclass(frozen=True)
class ApetArgs:
    """The ApET settings of one wrapper.

    Attributes:
        enabled: False for ``apet=false`` (the unmodified baseline).
        preset: preset name, or None for the model's default preset.
        overrides: ApetConfig field -> value, applied on top of the preset.
    """

    enabled: bool = True
    preset: str | None = None
    overrides: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line for logs: ``apet=false`` or ``preset=... field=value ...``."""
        if not self.enabled:
            return "apet=false"
        parts = [f"preset={self.preset or '<model default>'}"]
        parts += [f"{k}={v}" for k, v in self.overrides.items()]
        return " ".join(parts)


def _bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{key} must be true or false, got {value!r}")


def _number(key: str, value: object) -> int | float:
    """An int or float, from a number or its string."""
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            pass
    raise ValueError(f"{key} must be a number, got {value!r}")


def _keep(key: str, value: object) -> int | float:
    """A budget: an int >= 1 (tokens) or a float ratio in (0, 1]."""
    number = _number(key, value)
    if isinstance(number, int) and number >= 1:
        return number
    if isinstance(number, float) and math.isfinite(number) and 0.0 < number <= 1.0:
        return number
    raise ValueError(
        f"{key} must be an int >= 1 (tokens) or a float in (0, 1] (a ratio), got {value!r}"
    )


def _layer(key: str, value: object) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    number = _number(key, value)
    if isinstance(number, int) and number >= 1:
        return number
    raise ValueError(f"{key} must be an int >= 1 or none (stage 2 off), got {value!r}")


def _num_basis(key: str, value: object) -> int:
    number = _number(key, value)
    if isinstance(number, int) and number >= 1:
        return number
    raise ValueError(f"{key} must be an int >= 1, got {value!r}")


def _ridge(key: str, value: object) -> float:
    number = float(_number(key, value))
    if math.isfinite(number) and number >= 0:
        return number
    raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")


def _backend(key: str, value: object) -> str:
    if isinstance(value, str) and value in _BACKENDS:
        return value
    raise ValueError(f"{key} must be one of {', '.join(_BACKENDS)}, got {value!r}")


_PARSERS = {
    "vision_keep": _keep,
    "layer": _layer,
    "layer_keep": _keep,
    "num_basis": _num_basis,
    "ridge": _ridge,
    "merge": _bool,
    "apet_backend": _backend,
}


def split_model_args(kwargs: dict) -> tuple[ApetArgs, dict]:
    """Split a wrapper's keyword arguments into ApET settings and the stock wrapper's arguments.

    Args:
        kwargs: the keyword arguments lmms-eval built from ``--model_args`` (and its
            ``batch_size``/``device`` additions).

    Returns:
        ``(ApetArgs, rest)``: ``rest`` is ``kwargs`` without the ApET keys, values untouched.

    Raises:
        ValueError: an ApET value of the wrong type or out of range (the message names the key
            and the value), or ``apet=false`` together with another ApET key.
    """
    rest = {k: v for k, v in kwargs.items() if k not in APET_KEYS}
    enabled = _bool("apet", kwargs["apet"]) if "apet" in kwargs else True
    given = [k for k in APET_KEYS if k in kwargs and k != "apet"]
    if not enabled:
        if given:
            shown = ", ".join(f"{k}={kwargs[k]!r}" for k in given)
            raise ValueError(
                f"apet=false runs the unmodified model and takes no ApET settings, got {shown}"
            )
        return ApetArgs(enabled=False), rest
    preset = kwargs.get("preset")
    if preset is not None and (not isinstance(preset, str) or not preset.strip()):
        raise ValueError(f"preset must be a preset name, got {preset!r}")
    overrides = {
        OVERRIDE_FIELDS[k]: _PARSERS[k](k, kwargs[k]) for k in OVERRIDE_FIELDS if k in kwargs
    }
    if overrides.get("layer", 0) is None and "layer_keep" in overrides:
        raise ValueError(
            f"layer=none turns stage 2 off and takes no layer_keep, got "
            f"layer_keep={kwargs['layer_keep']!r}"
        )
    return ApetArgs(enabled=True, preset=preset, overrides=overrides), rest
