"""The patched forward: route one call to a compressing prefill, a decode step on a compressed
KV cache, or the model's own forward, and run it.

A prefill runs the shim's vision stage, stage 1 (``_stage1``), then the model's own forward on
``inputs_embeds`` with explicit positions; stage 2 happens inside it, in the decoder layers'
pre-hooks (``_stage2``), which get this call's :class:`CallContext` through the forward's keyword
arguments. The compressed cache remembers both groups (:class:`SeqState`) for ``_decode``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ._compat import output_cache, pop_cache
from ._decode import decode_inputs
from ._layout import is_left_aligned, mask_positions
from ._stage1 import stage1
from ._state import CALL_KEY, STATE_ATTR, CallContext, Group, Patch, SeqState


def _as_kwargs(fn: Callable, args: tuple, kwargs: dict) -> dict:
    """Bind positional arguments to names (generate passes keywords; users may not)."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(fn)
    out = {}
    for name, value in sig.bind_partial(*args, **kwargs).arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def patched_forward(patch: Patch, args: tuple, kwargs: dict):
    """Route one forward call: compressing prefill, decode on a compressed cache, or untouched."""
    kw = _as_kwargs(patch.orig_forward, args, kwargs)
    if kw.get("mm_encoder_outputs"):
        raise NotImplementedError(
            "apet compresses from pixel values (stage 1 runs before the projector); precomputed "
            "mm_encoder_outputs are not supported"
        )
    cache = pop_cache(kw)  # generate passes `cache=` from transformers 5.24 on
    if patch.shim.has_visual(kw):
        if getattr(cache, "is_compileable", False):
            # static caches index slots by one shared length; the groups' lengths differ
            raise NotImplementedError(
                f"apet supports DynamicCache only, got {type(cache).__name__} "
                "(e.g. cache_implementation='static')"
            )
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                "apet: visual inputs with a non-empty KV cache (continuing a conversation with new "
                "images) are not supported; start from an empty cache"
            )
        return _prefill(patch, kw, cache)
    state = getattr(cache, STATE_ATTR, None) if cache is not None else None
    if state is not None:
        if cache.get_seq_length() > 0:
            ctx = decode_inputs(patch, kw, cache, state)
            out, return_dict = _call(patch, ctx, kw, cache)
            return _finish(out, return_dict)
        delattr(cache, STATE_ATTR)  # an emptied cache starts a new, uncompressed sequence
    if cache is not None:
        kw[patch.cache_kw] = cache
    return patch.orig_forward(**kw)


def _call(patch: Patch, ctx: CallContext, kw: dict, cache):
    """The model's own forward with this call's context for the layer hooks."""
    return_dict = kw.pop("return_dict", None)
    if cache is not None:
        kw[patch.cache_kw] = cache
    if patch.config.layer is not None or ctx.lm_kwargs is not None:
        kw[CALL_KEY] = ctx
    return patch.orig_forward(**kw, return_dict=True), return_dict


def _finish(out, return_dict):
    return out if return_dict is None or return_dict else out.to_tuple()


def _prefill(patch: Patch, kw: dict, cache):
    shim, cfg = patch.shim, patch.config
    input_ids = kw.get("input_ids")
    if input_ids is None:
        raise NotImplementedError("apet needs input_ids (not inputs_embeds) with visual inputs")
    base = shim.base(patch.model)
    mask_in = kw.get("attention_mask")
    if mask_in is not None and mask_in.dim() != 2:
        raise NotImplementedError(
            "apet needs a 2D attention_mask (or None) with visual inputs, got shape "
            f"{tuple(mask_in.shape)}"
        )
    mask0 = torch.ones_like(input_ids, dtype=torch.bool) if mask_in is None else mask_in.bool()
    left = is_left_aligned(mask_in)
    # The op is inference-only (it detaches), so nothing upstream of it can get a gradient: the
    # vision stage runs without autograd. The projector and the text embeddings run in the
    # caller's grad mode, so a loss reaches them (and the decoder) as it does unpatched.
    with torch.no_grad():
        vis = shim.visual_input(patch.model, kw)
    s1 = stage1(cfg, patch.model.get_input_embeddings(), vis, input_ids, mask0, left)
    lay = s1.lay
    valid1 = lay.valid
    if cfg.positions == "original":
        pos0, next1 = shim.original_positions(base, input_ids, mask0, kw)
        pos1 = pos0.gather(2, lay.index[None].expand(pos0.shape[0], -1, -1))
        pos1 = pos1.masked_fill(~valid1[None], 0)
    else:
        pos1 = mask_positions(valid1)[None].expand(patch.shim.pos_axes, -1, -1)
        next1 = valid1.sum(1)
    state = SeqState(input_ids.shape[1], Group(valid1, next1))
    visual1 = torch.zeros_like(valid1)
    visual1[s1.tok_row, s1.tok_col] = True
    ctx = CallContext(
        prefill=True,
        state=state,
        pos1=pos1,
        tok_row=s1.tok_row,
        tok_col=s1.tok_col,
        visual1=visual1,
        counts1=lay.counts,
        unit_rows=s1.unit_rows,
        left=left,
        raw=s1.raw,
    )
    if s1.planes:
        # the decoder reads planes in row-major order of the visual columns (hidden[visual1]);
        # the op's output order is unit after unit, images before videos
        order = (s1.tok_row * visual1.shape[1] + s1.tok_col).argsort()
        planes = [p[order.to(p.device)] for p in s1.planes]
        ctx.lm_kwargs = shim.plane_kwargs(visual1, planes)
    labels = kw.pop("labels", None)
    for key in shim.visual_keys:
        kw.pop(key, None)
    kw.update(
        input_ids=None,
        inputs_embeds=s1.embeds,
        attention_mask=valid1.long(),
        position_ids=shim.position_kwarg(pos1),
    )
    out, return_dict = _call(patch, ctx, kw, cache)
    raw = s1.raw
    # The map from output rows to prompt columns (-1: padding): the L1 sequence's, then the
    # L2 sequence's (stage 2 re-lays the L1 one out).
    raw.columns1 = lay.index.masked_fill(~valid1, -1)
    if ctx.index2 is not None:
        columns = lay.index.to(ctx.index2.device).gather(1, ctx.index2)
        raw.columns = columns.masked_fill(~ctx.state.group2.valid, -1)
    else:
        raw.columns = raw.columns1
    patch.record(raw)
    cache = output_cache(out)
    if cache is not None:
        setattr(cache, STATE_ATTR, state)
    if labels is not None:
        # rebuilt rather than set, so that loss comes first in to_tuple() as it does unpatched
        out = type(out)(**{"loss": _loss(patch, out.logits, labels, raw.columns), **out})
    return _finish(out, return_dict)


def _loss(patch: Patch, logits, labels, columns):
    """The LM loss on the compressed sequence: labels follow their tokens (padding -> -100)."""
    columns = columns.to(labels.device)
    labels = labels.gather(1, columns.clamp(min=0)).masked_fill(columns < 0, -100)
    vocab = patch.model.config.get_text_config().vocab_size
    return patch.model.loss_function(logits=logits, labels=labels, vocab_size=vocab)
