"""Stage 2 (forward pre-hooks on the decoder layers): at layer ``layer`` compress the visual
hidden states of every unit again and re-pad to L2 columns; every layer from ``layer`` on gets
that group's attention mask, rotary embeddings and position ids in place of the ones the decoder
stack computed (in prefill and at every decode step).

Everything is built on the device of the hidden states entering the layer (with ``device_map``
that layer may sit on another device than ``input_ids``), and the L2 widths follow from stage
1's host counts and the host budgets: no sync.
"""

from __future__ import annotations

import torch

from ._compat import causal_mask, layer_cache
from ._layout import mask_positions, next_positions
from ._squeeze import place, squeeze
from ._state import CALL_KEY, CallContext, Group, Patch


def stage2(patch: Patch, ctx: CallContext, hidden: torch.Tensor):
    """Compress the visual hidden states of every unit at the stage-2 layer (prefill).

    Args:
        hidden: ``(B, L1, D)`` hidden states entering layer ``layer``.

    Returns:
        ``(hidden2 (B, L2, D), valid2 (B, L2) bool, pos2 (P, B, L2))``; records the stage-2
        selection and the group-2 cache state on ``ctx``.
    """
    cfg, raw, dev = patch.config, ctx.raw, hidden.device
    tok_row, tok_col = ctx.tok_row.to(dev), ctx.tok_col.to(dev)
    valid1, visual1 = ctx.state.group1.valid.to(dev), ctx.visual1.to(dev)
    keep2 = [cfg.stage2_keep(k) for k in raw.keep1]
    counts2 = list(ctx.counts1)
    for row, k1, k2 in zip(ctx.unit_rows, raw.keep1, keep2, strict=True):
        if row >= 0:
            counts2[row] -= k1 - k2
    x = hidden[tok_row, tok_col]
    sq = squeeze(cfg, x, raw.keep1, keep2, tok_row, tok_col, valid1 & ~visual1, ctx.left, counts2)
    lay = sq.lay
    hidden2 = place(hidden.gather(1, lay.index[..., None].expand(-1, -1, hidden.shape[-1])), sq)
    pos1 = ctx.pos1.to(dev)
    if cfg.positions == "original":
        pos2 = pos1.gather(2, lay.index[None].expand(pos1.shape[0], -1, -1))
        pos2 = pos2.masked_fill(~lay.valid[None], 0)
        next2 = ctx.state.group1.next_pos.to(dev)
    else:
        pos2 = mask_positions(lay.valid)[None].expand(pos1.shape[0], -1, -1)
        next2 = lay.valid.sum(1)
    ctx.state.group2 = Group(lay.valid, next2)
    ctx.index2 = lay.index
    raw.layer, raw.keep2, raw.kept2, raw.assign2 = cfg.layer, keep2, sq.kept, sq.assign
    return hidden2, lay.valid, pos2


def _group_kwargs(patch: Patch, hidden, mask2d, pos, cache) -> dict:
    """Attention mask, rotary embeddings and position ids of the stage-2 layers."""
    lm = patch.shim.language_model(patch.model)
    # sized against a stage-2 layer's cache, not layer 0's
    mask = causal_mask(lm.config, hidden, mask2d, cache, patch.config.layer)
    return dict(
        attention_mask=mask,
        position_embeddings=patch.shim.rotary(lm, hidden, pos),
        position_ids=patch.shim.layer_position_ids(pos),
    )


def make_layer_hook(patch: Patch, index: int):
    """Forward pre-hook of decoder layer ``index`` (every layer: each takes the call's
    :class:`CallContext` out of its keyword arguments; from ``layer`` on it swaps in the stage-2
    group). At ``layer`` in prefill, stage 2 runs on whatever hidden states arrive, so a replay
    by gradient checkpointing recomputes it (the op is deterministic)."""
    stage2_layer = patch.config.layer

    def hook(module, args, kwargs):
        ctx = kwargs.pop(CALL_KEY, None)
        if ctx is None or index < stage2_layer:
            return args, kwargs
        hidden = args[0] if args else kwargs["hidden_states"]
        replace = ctx.prefill and index == stage2_layer
        if replace:
            hidden, mask2d, pos = stage2(patch, ctx, hidden)
        if ctx.group2_kwargs is None:
            if not ctx.prefill:
                g2 = ctx.state.group2
                extra = ctx.extra.to(hidden.device)
                mask2d = torch.cat([g2.valid.to(hidden.device), extra], dim=1)
                pos = next_positions(g2.next_pos.to(hidden.device), extra, ctx.q)
                pos = pos[None].expand(patch.shim.pos_axes, -1, -1)
            ctx.group2_kwargs = _group_kwargs(patch, hidden, mask2d, pos, layer_cache(kwargs))
        if replace:
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        kwargs.update(ctx.group2_kwargs)
        return args, kwargs

    return hook


def make_planes_hook(patch: Patch):
    """Forward pre-hook of the decoder stack (shims with planes, ``Shim.has_planes``): passes a
    compressing prefill's planes as the stack's keyword arguments (``CallContext.lm_kwargs``,
    e.g. Qwen3-VL's ``visual_pos_masks`` and ``deepstack_visual_embeds``, which its multimodal
    forward only builds from pixel values), and takes the call's context out of the arguments
    when no layer hooks will (stage 2 off)."""

    def hook(module, args, kwargs):
        ctx = kwargs.get(CALL_KEY)
        if ctx is None:
            return args, kwargs
        if ctx.lm_kwargs is not None:
            kwargs.update(ctx.lm_kwargs)
        if patch.config.layer is None:
            del kwargs[CALL_KEY]
        return args, kwargs

    return hook
