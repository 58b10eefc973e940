"""The machinery all four shims share: the shim interface, stage 1 on the placeholder tokens,
stage 2 inside the decoder stack, generate's per-row input expansion, and the patched forward
(prefill, decode, pass-through).

How a compressed sequence stays consistent (B rows, L0 prompt columns):

* Stage 1 (prefill) drops placeholder columns of dropped visual tokens from input_ids, the
  attention mask and labels, re-pads the batch to L1 columns (``_layout.relayout``) and runs the
  model's own forward on ``inputs_embeds`` with explicit position ids.
* Stage 2 runs in a forward pre-hook on decoder layer ``layer``: it compresses the visual hidden
  states, re-pads to L2 columns, and every layer from ``layer`` on gets that group's attention
  mask, rotary embeddings and position ids in place of the ones the decoder stack computed.
* The KV cache therefore holds L1 + g entries in layers < ``layer`` and L2 + g after it (g =
  generated tokens). A :class:`SeqState` attached to the cache object remembers both groups'
  masks and next positions; each decode step rebuilds every group's 2D mask as
  ``cat(group mask, generated part of generate's mask)`` and its positions from the group's next
  position, so masks, cache lengths and positions agree per layer. It checks the cache lengths
  and the mask against each other, since callers that size inputs by the (shorter) cache length
  would otherwise feed the wrong tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...api import compress_varlen
from ._config import ApetConfig
from ._layout import is_left_aligned, mask_positions, next_positions, relayout
from ._selection import RawSelection, UnitInfo

_STATE_ATTR = "_apet_state"


@dataclass
class Placeholder:
    """One kind of placeholder token and what each of its occurrences holds.

    Attributes:
        token_id: the placeholder id in input_ids.
        layout: ``(P,)`` int64, one entry per occurrence of ``token_id`` in input_ids (row-major
            order): the packed stage-1 token row it shows, or -1 for a filler embedding.
        filler: ``(D_text,)`` embedding of the -1 entries (LLaVA-NeXT's image_newline), or None.
    """

    token_id: int
    layout: torch.Tensor
    filler: torch.Tensor | None = None


@dataclass
class VisualInput:
    """What a shim's vision stage hands to stage 1.

    Attributes:
        features: ``(T, D_v)`` stage-1 tokens of every unit, packed unit after unit.
        seqlens: N_s of every unit (host ints summing to T).
        infos: one :class:`UnitInfo` per unit.
        project: maps kept tokens ``(T1, D_v)`` to text embeddings ``(T1, D_text)``.
        placeholders: one :class:`Placeholder` per placeholder token id.
    """

    features: torch.Tensor
    seqlens: list[int]
    infos: list[UnitInfo]
    project: Callable[[torch.Tensor], torch.Tensor]
    placeholders: list[Placeholder]


@dataclass
class ItemGroup:
    """One kind of visual item (image, video) in a forward's inputs, so that ``generate`` can
    repeat each batch row's items with the row (beam search, num_return_sequences).

    Attributes:
        token_id: the placeholder id of this kind in input_ids.
        tokens: placeholder tokens of each item, in input order.
        tensors: per-item forward arguments of this kind: name -> rows of dim 0 of each item.
    """

    token_id: int
    tokens: list[int]
    tensors: dict[str, list[int]]


class Shim:
    """Model-specific parts; subclasses live in llava.py, llava_next.py, video_llava.py and
    qwen2_5_vl.py. Positions are handled as ``(P, B, L)`` int64 internally: P = 1 for the LLaVA
    family, 3 (t, h, w) for Qwen2.5-VL's M-RoPE."""

    model_types: tuple[str, ...] = ()
    default_positions = "compact"
    pos_axes = 1
    #: forward arguments whose presence means "this forward has visual inputs".
    pixel_keys: tuple[str, ...] = ("pixel_values",)
    #: forward arguments consumed by the vision stage (not passed on after stage 1).
    visual_keys: tuple[str, ...] = ()
    #: the paper's setting for this model family, and named budget rows.
    default_preset: str = ""
    presets: dict[str, ApetConfig] = {}

    def base(self, model: nn.Module) -> nn.Module:
        """The multimodal base model (``model.model`` of a *ForConditionalGeneration)."""
        return model.model if hasattr(model, "lm_head") else model

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (has ``layers``, ``rotary_emb`` and ``config``)."""
        return self.base(model).language_model

    def has_visual(self, kwargs: dict[str, Any]) -> bool:
        """Whether this forward carries visual inputs to compress."""
        return any(kwargs.get(k) is not None and kwargs[k].numel() > 0 for k in self.pixel_keys)

    def visual_input(self, model: nn.Module, kwargs: dict[str, Any]) -> VisualInput:
        """Run the vision encoder and describe the units and placeholders."""
        raise NotImplementedError

    def items(self, model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> list[ItemGroup]:
        """The visual items of a forward's inputs, one :class:`ItemGroup` per kind present
        (no vision encoder run)."""
        raise NotImplementedError

    def original_positions(
        self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncompressed positions ``(P, B, L0)`` and each row's next position ``(B,)``.

        ``model`` is the base model; ``mask (B, L0)`` is bool. The LLaVA family numbers the valid
        tokens of a row 0, 1, ... (what generate does), so padding never shifts a row.
        """
        return mask_positions(mask)[None], mask.sum(1)

    def position_kwarg(self, pos: torch.Tensor) -> torch.Tensor:
        """``position_ids`` for the model's forward, from ``(P, B, L)`` positions."""
        return pos[0]

    def layer_position_ids(self, pos: torch.Tensor) -> torch.Tensor | None:
        """``position_ids`` the decoder layers receive. Only flash-attention reads them, to detect
        packed sequences when there is no padding mask: it splits where the position equals the
        row's minimum, which "original" positions (increasing, with gaps) never repeat."""
        return pos[0]

    def rotary(self, lm: nn.Module, hidden: torch.Tensor, pos: torch.Tensor):
        """``(cos, sin)`` of the decoder stack's rotary embedding at ``pos (P, B, L)``."""
        return lm.rotary_emb(hidden, self.position_kwarg(pos))


def tower_features(
    tower: nn.Module, pixel_values: torch.Tensor, kwargs: dict, config, strip_cls: bool = True
) -> torch.Tensor:
    """The LLaVA family's vision features: hidden states of ``vision_feature_layer`` (several
    layers are concatenated on features), without the CLS token under the "default" strategy
    (when ``strip_cls``; Video-LLaVA keeps it for videos).

    Args:
        tower: the CLIP-like vision tower.
        pixel_values: ``(num_images, C, H, W)``.
        kwargs: the forward's arguments (may override the two config fields).
        config: the multimodal config (``vision_feature_layer``,
            ``vision_feature_select_strategy``).

    Returns:
        ``(num_images, N, D_v)`` features before the projector.
    """
    layer = kwargs.get("vision_feature_layer")
    layer = config.vision_feature_layer if layer is None else layer
    strategy = kwargs.get("vision_feature_select_strategy")
    strategy = (
        getattr(config, "vision_feature_select_strategy", None) if strategy is None else strategy
    )
    out = tower(pixel_values.to(tower.dtype), output_hidden_states=True, return_dict=True)
    pool = [out.hidden_states[i] for i in ([layer] if isinstance(layer, int) else layer)]
    if strip_cls and strategy == "default":
        pool = [h[:, 1:] for h in pool]
    return torch.cat(pool, dim=-1)


def same_size_items(
    token_id: int, input_ids: torch.Tensor, count: int, names: tuple[str, ...]
) -> ItemGroup:
    """The :class:`ItemGroup` of ``count`` items that take the same number of placeholders each
    (LLaVA-1.5, Video-LLaVA), one dim-0 row per item in each argument of ``names``."""
    tokens = int((input_ids == token_id).sum()) // max(count, 1)
    return ItemGroup(token_id, [tokens] * count, {name: [1] * count for name in names})


def clip_unit_grid(vision_config, n: int) -> tuple[tuple[int, int] | None, torch.Tensor | None]:
    """``(grid, token_index)`` of a CLIP unit of ``n`` tokens (square grid, maybe a CLS first)."""
    side = vision_config.image_size // vision_config.patch_size
    if n == side * side:
        return (side, side), None
    if n == side * side + 1:
        return (side, side), torch.arange(-1, side * side)
    return None, None


@dataclass
class Group:
    """One cache group (layers before or from ``layer``): its prompt mask and next positions."""

    valid: torch.Tensor  # (B, Lg) bool
    next_pos: torch.Tensor  # (B,) int64


@dataclass
class SeqState:
    """Attached to the KV cache after a compressing prefill; read by every decode step."""

    prompt_len: int  # L0, the uncompressed prompt length generate's mask starts with
    group1: Group
    group2: Group | None = None


@dataclass
class CallContext:
    """What the stage-2 hooks need during one forward of a patched model."""

    prefill: bool
    state: SeqState
    extra: torch.Tensor | None = None  # decode: (B, G) mask of the generated part
    q: int = 0
    pos1: torch.Tensor | None = None  # prefill: (P, B, L1)
    tok_row: torch.Tensor | None = None  # prefill: (T1,) row of every stage-1 visual token
    tok_col: torch.Tensor | None = None  # prefill: (T1,) column in the L1 sequence
    visual1: torch.Tensor | None = None  # prefill: (B, L1) bool
    left: bool = True
    raw: RawSelection | None = None
    index2: torch.Tensor | None = None  # (B, L2) source columns of the stage-2 sequence
    group2_kwargs: dict | None = None


@dataclass
class Patch:
    """Everything apply_apet installed on one model instance (removed by remove_apet)."""

    shim: Shim
    config: ApetConfig
    model: nn.Module
    orig_forward: Callable
    had_instance_forward: bool
    hooks: list = field(default_factory=list)
    #: generate's ``_expand_inputs_for_generation`` that the patch wraps (None: not wrapped).
    orig_expand: Callable | None = None
    ctx: CallContext | None = None
    selection: RawSelection | None = None


# --------------------------------------------------------------------------------------------
# stage 1


def _stage1(
    patch: Patch, vis: VisualInput, input_ids: torch.Tensor, mask0: torch.Tensor, left: bool
):
    """Compress every unit, drop the dropped tokens' placeholder columns, re-pad, embed.

    Returns:
        ``(lay, embeds (B, L1, D), tok_row (T1,), tok_col (T1,), raw)``.
    """
    cfg = patch.config
    keep1 = [cfg.stage1_keep(n) for n in vis.seqlens]
    c = compress_varlen(
        vis.features,
        vis.seqlens,
        keep1,
        num_basis=cfg.num_basis,
        ridge=cfg.ridge,
        merge=cfg.merge,
        backend=cfg.backend,
    )
    device = input_ids.device  # the vision tower may sit on another device (device_map)
    kept, assign = c.kept.to(device), c.assign.to(device)
    is_kept = torch.zeros(vis.features.shape[0], dtype=torch.bool, device=device)
    is_kept[kept] = True
    keep = mask0.clone()
    kept_elements = []
    for ph in vis.placeholders:
        where = input_ids == ph.token_id
        keep &= ~where
        pos = where.nonzero()
        layout = ph.layout.to(device)
        if pos.shape[0] != layout.numel():
            raise ValueError(
                f"input_ids hold {pos.shape[0]} placeholder tokens {ph.token_id} but the visual "
                f"inputs need {layout.numel()}"
            )
        el = (layout < 0) | is_kept[layout.clamp(min=0)]
        keep[pos[el, 0], pos[el, 1]] = True
        kept_elements.append((ph, pos[el], layout[el]))
    lay = relayout(keep, left)
    embeds = patch.model.get_input_embeddings()(input_ids.gather(1, lay.index))
    tokens = vis.project(c.tokens).to(embeds.device, embeds.dtype)
    total = tokens.shape[0]
    tok_row = torch.empty(total, dtype=torch.long, device=device)
    tok_col = torch.empty(total, dtype=torch.long, device=device)
    for ph, pos, layout in kept_elements:
        row, col = pos[:, 0], lay.newcol[pos[:, 0], pos[:, 1]]
        is_tok = layout >= 0
        out_row = assign[layout.clamp(min=0)]
        values = tokens[out_row.clamp(min=0)]
        if ph.filler is not None:
            values = torch.where(is_tok[:, None], values, ph.filler.to(values))
        embeds[row, col] = values
        tok_row[out_row[is_tok]] = row[is_tok]
        tok_col[out_row[is_tok]] = col[is_tok]
    starts = torch.tensor([0, *keep1[:-1]], device=device).cumsum(0).clamp(max=max(total - 1, 0))
    unit_rows = torch.where(torch.tensor(keep1, device=device) > 0, tok_row[starts], -1)
    raw = RawSelection(vis.infos, unit_rows, list(vis.seqlens), keep1, kept, assign)
    return lay, embeds, tok_row, tok_col, raw


# --------------------------------------------------------------------------------------------
# stage 2 (forward pre-hooks on decoder layers >= layer)


def _stage2(patch: Patch, ctx: CallContext, hidden: torch.Tensor):
    """Compress the visual hidden states of every unit at the stage-2 layer (prefill).

    Returns:
        ``(hidden2 (B, L2, D), valid2 (B, L2), pos2 (P, B, L2))``.
    """
    cfg, raw = patch.config, ctx.raw
    keep2 = [cfg.stage2_keep(k) for k in raw.keep1]
    x = hidden[ctx.tok_row, ctx.tok_col]
    c = compress_varlen(
        x,
        raw.keep1,
        keep2,
        num_basis=cfg.num_basis,
        ridge=cfg.ridge,
        merge=cfg.merge,
        backend=cfg.backend,
    )
    rows, cols = ctx.tok_row[c.kept], ctx.tok_col[c.kept]
    group1 = ctx.state.group1
    keep = group1.valid & ~ctx.visual1
    keep[rows, cols] = True
    lay = relayout(keep, ctx.left)
    hidden2 = hidden.gather(1, lay.index[..., None].expand(-1, -1, hidden.shape[-1]))
    hidden2[rows, lay.newcol[rows, cols]] = c.tokens.to(hidden2.dtype)
    if patch.config.positions == "original":
        pos2 = ctx.pos1.gather(2, lay.index[None].expand(ctx.pos1.shape[0], -1, -1))
        pos2 = pos2.masked_fill(~lay.valid[None], 0)
        next2 = group1.next_pos
    else:
        pos2 = mask_positions(lay.valid)[None].expand(ctx.pos1.shape[0], -1, -1)
        next2 = lay.valid.sum(1)
    ctx.state.group2 = Group(lay.valid, next2)
    ctx.index2 = lay.index
    raw.layer, raw.keep2, raw.kept2, raw.assign2 = cfg.layer, keep2, c.kept, c.assign
    return hidden2, lay.valid, pos2


def _group_kwargs(patch: Patch, hidden, mask2d, pos, cache) -> dict:
    """Attention mask, rotary embeddings and position ids of the stage-2 layers."""
    from transformers.masking_utils import create_causal_mask

    lm = patch.shim.language_model(patch.model)
    mask = create_causal_mask(
        config=lm.config,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        past_key_values=cache,
        position_ids=None,
        layer_idx=patch.config.layer,  # size against a stage-2 layer's cache, not layer 0's
    )
    return dict(
        attention_mask=mask,
        position_embeddings=patch.shim.rotary(lm, hidden, pos),
        position_ids=patch.shim.layer_position_ids(pos),
    )


def make_layer_hook(patch: Patch, index: int):
    """Forward pre-hook of decoder layer ``index`` (>= layer): swap in the stage-2 group."""

    def hook(module, args, kwargs):
        ctx = patch.ctx
        if ctx is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if ctx.group2_kwargs is None:
            if ctx.prefill:
                hidden, mask2d, pos = _stage2(patch, ctx, hidden)
            else:
                g2 = ctx.state.group2
                mask2d = torch.cat([g2.valid, ctx.extra], dim=1)
                pos = next_positions(g2.next_pos, ctx.extra, ctx.q)
                pos = pos[None].expand(patch.shim.pos_axes, -1, -1)
            cache = kwargs.get("past_key_values")
            ctx.group2_kwargs = _group_kwargs(patch, hidden, mask2d, pos, cache)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        kwargs.update(ctx.group2_kwargs)
        return args, kwargs

    return hook


# --------------------------------------------------------------------------------------------
# generate's input expansion (beam search, num_return_sequences)


def expand_for_generation(
    patch: Patch, expand_size: int, is_encoder_decoder: bool, input_ids, model_kwargs: dict
):
    """``generate``'s ``_expand_inputs_for_generation`` on a patched model.

    generate repeats every input tensor along dim 0 (``repeat_interleave``), which is right for
    per-row tensors but not for per-item ones (a row with images A, B becomes A, A, B, B instead
    of A, B, A, B; Qwen's patch rows are split apart). Unpatched, generate repeats the encoded
    images per row instead, a path apet has to bypass (stage 1 runs before the projector); so the
    per-item inputs are repeated here, row by row, and the rest as generate does.
    """
    orig = patch.orig_expand
    kw = model_kwargs
    if expand_size == 1 or input_ids is None or not patch.shim.has_visual(kw):
        return orig(expand_size, is_encoder_decoder, input_ids, **kw)
    expanded = {}
    for group in patch.shim.items(patch.model, input_ids, kw):
        bounds, item = [], 0  # items [start, end) of every row
        for count in (input_ids == group.token_id).sum(1).tolist():
            start = item
            while count > 0 and item < len(group.tokens):
                count -= group.tokens[item]
                item += 1
            if count != 0:
                raise ValueError(
                    f"apet: input_ids' placeholder tokens {group.token_id} do not split into whole "
                    f"visual items ({group.tokens} tokens each)"
                )
            bounds.append((start, item))
        for name, rows in group.tensors.items():
            first = [0, *torch.tensor(rows).cumsum(0).tolist()]
            index = [
                r
                for start, end in bounds
                for _ in range(expand_size)
                for r in range(first[start], first[end])
            ]
            value = kw.pop(name)
            if isinstance(value, torch.Tensor):
                expanded[name] = value[torch.tensor(index, dtype=torch.long, device=value.device)]
            else:  # e.g. second_per_grid_ts as a list of floats
                expanded[name] = [value[i] for i in index]
    input_ids, kw = orig(expand_size, is_encoder_decoder, input_ids, **kw)
    kw.update(expanded)
    return input_ids, kw


# --------------------------------------------------------------------------------------------
# the patched forward


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
    cache = kw.get("past_key_values")
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
        return _prefill(patch, kw)
    state = getattr(cache, _STATE_ATTR, None) if cache is not None else None
    if state is not None:
        if cache.get_seq_length() > 0:
            return _decode(patch, kw, state)
        delattr(cache, _STATE_ATTR)  # an emptied cache starts a new, uncompressed sequence
    return patch.orig_forward(**kw)


def _call(patch: Patch, ctx: CallContext, kw: dict):
    return_dict = kw.pop("return_dict", None)
    patch.ctx = ctx
    try:
        out = patch.orig_forward(**kw, return_dict=True)
    finally:
        patch.ctx = None
    return out, return_dict


def _finish(out, return_dict):
    return out if return_dict is None or return_dict else out.to_tuple()


def _prefill(patch: Patch, kw: dict):
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
    lay, embeds, tok_row, tok_col, raw = _stage1(patch, vis, input_ids, mask0, left)
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
    visual1[tok_row, tok_col] = True
    ctx = CallContext(
        prefill=True,
        state=state,
        pos1=pos1,
        tok_row=tok_row,
        tok_col=tok_col,
        visual1=visual1,
        left=left,
        raw=raw,
    )
    labels = kw.pop("labels", None)
    for key in shim.visual_keys:
        kw.pop(key, None)
    kw.update(
        input_ids=None,
        inputs_embeds=embeds,
        attention_mask=valid1.long(),
        position_ids=shim.position_kwarg(pos1),
    )
    out, return_dict = _call(patch, ctx, kw)
    patch.selection = raw
    cache = out.past_key_values
    if cache is not None:
        setattr(cache, _STATE_ATTR, state)
    if labels is not None:
        # rebuilt rather than set, so that loss comes first in to_tuple() as it does unpatched
        out = type(out)(**{"loss": _loss(patch, out.logits, labels, lay, ctx), **out})
    return _finish(out, return_dict)


def _loss(patch: Patch, logits, labels, lay, ctx: CallContext):
    """The LM loss on the compressed sequence: labels follow their tokens (padding -> -100)."""
    labels = labels.gather(1, lay.index).masked_fill(~lay.valid, -100)
    if ctx.index2 is not None:
        valid2 = ctx.state.group2.valid
        labels = labels.gather(1, ctx.index2).masked_fill(~valid2, -100)
    vocab = patch.model.config.get_text_config().vocab_size
    return patch.model.loss_function(logits=logits, labels=labels, vocab_size=vocab)


def _tokens_since_prompt(patch: Patch, cache, state: SeqState) -> int:
    """Tokens every layer cached after its compressed prompt, checked to be one number >= 0 (a
    cache cropped into the prompt, as assisted decoding's rollback can do, or edited per layer
    fails). Host ints only: no sync."""
    groups = [state.group1] * len(patch.shim.language_model(patch.model).layers)
    if state.group2 is not None:
        groups[patch.config.layer :] = [state.group2] * (len(groups) - patch.config.layer)
    seen = [cache.get_seq_length(i) - g.valid.shape[1] for i, g in enumerate(groups)]
    if min(seen) < 0 or len(set(seen)) > 1:
        raise ValueError(
            f"apet: the compressed KV cache holds {seen} tokens after the prompt per layer; was "
            "it cropped or edited (assisted decoding is not supported)?"
        )
    return seen[0]


def _decode(patch: Patch, kw: dict, state: SeqState):
    ids = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    q = ids.shape[1]
    cache = kw["past_key_values"]
    mask_in = kw.get("attention_mask")
    g1 = state.group1
    seen = _tokens_since_prompt(patch, cache, state)
    # The cache is shorter than the sequence generate tracks, so anything that sizes new inputs
    # by the cache length (generate continuing from a returned cache, assisted decoding) feeds
    # the wrong tokens: refuse what cannot be checked, check the mask where there is one.
    if mask_in is None:
        if q > 1:
            raise NotImplementedError(
                f"apet: {q} tokens fed at once to a compressed KV cache without an "
                "attention_mask. generate cannot continue from a compressed cache and assisted "
                "decoding is not supported; a manual loop must pass attention_mask covering the "
                f"uncompressed prompt ({state.prompt_len} columns), the {seen} tokens since and "
                f"these {q}"
            )
        # generate drops an all-ones mask; the generated count comes from the cache then.
        extra = torch.ones(g1.valid.shape[0], seen + q, dtype=torch.bool, device=ids.device)
    else:
        expected = state.prompt_len + seen + q
        if mask_in.dim() != 2 or mask_in.shape[1] != expected:
            raise ValueError(
                f"apet: attention_mask of shape {tuple(mask_in.shape)} on a compressed KV cache; "
                f"expected (batch, {expected}): the uncompressed prompt ({state.prompt_len}), the "
                f"{seen} tokens cached since and the {q} new ones (generate cannot continue from "
                "a compressed cache; assisted decoding is not supported)"
            )
        extra = mask_in[:, state.prompt_len :].bool()
    pos1 = next_positions(g1.next_pos, extra, q)[None].expand(patch.shim.pos_axes, -1, -1)
    kw.update(
        attention_mask=torch.cat([g1.valid, extra], dim=1).long(),
        position_ids=patch.shim.position_kwarg(pos1),
    )
    ctx = CallContext(prefill=False, state=state, extra=extra, q=q)
    out, return_dict = _call(patch, ctx, kw)
    return _finish(out, return_dict)
