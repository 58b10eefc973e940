"""Where transformers releases differ in what the shims touch, each detected by feature (what a
function takes, what an output holds), never by version number.

Tested with transformers 5.17, 5.19 and 5.24 (``SUPPORTED_TRANSFORMERS``). What the shims rely on
beyond the models' documented forward arguments, by name:

* the KV cache keyword: ``cache`` from 5.24 on (``past_key_values`` is a deprecated alias there),
  ``past_key_values`` before; the same for the decoder layers' keyword and the output field.
* ``transformers.masking_utils.create_causal_mask(config, inputs_embeds, attention_mask, cache,
  ..., layer_idx=...)``: its first four parameters are positional in every tested release (the
  fourth was renamed), so they are passed by position.
* ``**kwargs`` (``TransformersKwargs``) reach every decoder layer's forward from the multimodal
  forward: the shims pass their per-call state that way (see ``_state.py``).
* ``GenerationMixin._expand_inputs_for_generation`` (wrapped for beam search and
  ``num_return_sequences``, see ``_generate.py``).
* Qwen3-VL's ``get_image_features`` / ``get_video_features``: ``deepstack_features`` is one
  packed tensor per plane in 5.17, a tuple of per-item tensors per plane from 5.19 on
  (:func:`packed_planes`); ``Qwen3VLTextModel.forward`` takes ``visual_pos_masks`` and
  ``deepstack_visual_embeds`` in every tested release.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

#: the cache keyword of 5.24 on, then the one of older releases (still an alias in 5.24)
CACHE_NAMES = ("cache", "past_key_values")


def cache_keyword(fn: Callable) -> str:
    """The keyword under which ``fn`` (a model's forward) takes the KV cache."""
    params = inspect.signature(fn).parameters
    return next((name for name in CACHE_NAMES if name in params), CACHE_NAMES[-1])


def pop_cache(kwargs: dict[str, Any]):
    """Take the KV cache out of a forward's keyword arguments, under whichever name it came.

    Raises:
        ValueError: both names hold a cache.
    """
    found = {name: kwargs.pop(name) for name in CACHE_NAMES if name in kwargs}
    given = {name: c for name, c in found.items() if c is not None}
    if len(given) > 1:
        raise ValueError(f"pass the KV cache once, got both {sorted(given)}")
    return next(iter(given.values()), None)


def layer_cache(kwargs: dict[str, Any]):
    """The KV cache a decoder layer received (None without one)."""
    return next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)


def output_cache(out):
    """The KV cache a model output carries (None without one); ``out`` is a ``ModelOutput``."""
    return next((out[n] for n in CACHE_NAMES if n in out.keys()), None)


def packed_planes(planes) -> list[torch.Tensor]:
    """Qwen3-VL's ``deepstack_features`` as one ``(T, D)`` tensor per plane, items packed in
    order, whether the release split them per item (a tuple per plane) or not (a tensor)."""
    return [p if isinstance(p, torch.Tensor) else torch.cat(list(p)) for p in planes]


def causal_mask(config, embeds: torch.Tensor, mask2d: torch.Tensor, cache, layer_idx: int):
    """``create_causal_mask`` for a 2D mask over the cached and new tokens of ``layer_idx``'s
    cache (the stage-2 layers' cache is shorter than layer 0's)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config, embeds, mask2d, cache, layer_idx=layer_idx)
