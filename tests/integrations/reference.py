"""A hand-built ApET reference for the shim tests: one batch row, no shim code involved.

It compresses each image unit with :func:`apet_kernels.compress` (one unit at a time), builds the
stage-1 sequence token by token, runs the decoder layers one by one with an explicit causal mask,
compresses the visual hidden states again before ``layer`` and runs the remaining layers on the
shorter sequence. For Qwen3-VL it also merges every DeepStack plane by the unit's ``assign`` (a
plain mean per output slot, not ``apply_selection``) and adds plane i to the visual tokens after
decoder layer i, as ``Qwen3VLTextModel`` does. Positions follow the two documented modes:
"original" (each token keeps the position it has in the uncompressed prompt; Qwen2.5-VL's and
Qwen3-VL's M-RoPE (t, h, w) from ``get_rope_index``; generated tokens continue from the
uncompressed maximum + 1) and "compact" (0, 1, 2, ... over whatever sequence a layer sees).
The models come from ``tiny_vlms`` (sdpa or eager).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tiny_vlms import IMAGE_ID, VIDEO_ID

from apet_kernels import compress, keep_count


def budget(keep: int | float, n: int) -> int:
    """ApetConfig's budget rule: an int clamped to n, or a ratio read through keep_count."""
    return min(keep, n) if isinstance(keep, int) else keep_count(n, keep)


@dataclass
class Stage1:
    """One row after stage 1.

    Attributes:
        embeds: ``(L1, D)`` input embeddings.
        pos: ``(P, L1)`` int64 positions of these tokens in the uncompressed prompt.
        unit: ``(L1,)`` int64 unit of each visual token, -1 for text (and LLaVA-NeXT newlines).
        col: ``(L1,)`` int64 column of each token in the uncompressed prompt.
        next_pos: first position after the uncompressed prompt.
        projector_rows: rows the projector saw (the stage-1 kept tokens).
        planes: ``(P, L1, D)`` Qwen3-VL's DeepStack planes of these tokens (zero for text), or
            None.
    """

    embeds: torch.Tensor
    pos: torch.Tensor
    unit: torch.Tensor
    col: torch.Tensor
    next_pos: int
    projector_rows: int
    planes: torch.Tensor | None = None


def _clip(tower, pixels, layer: int, strip_cls: bool) -> torch.Tensor:
    hidden = tower(pixels, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:] if strip_cls else hidden


def _units(name: str, model, inputs: dict):
    """``{placeholder id: (unit features list, slots)}``: a slot per placeholder occurrence,
    ``(unit, token)`` or None for a newline; and the projector (None: identity)."""
    base, cfg = model.model, model.model.config
    if name == "llava":
        feats = _clip(base.vision_tower, inputs["pixel_values"], cfg.vision_feature_layer, True)
        slots = [(u, j) for u in range(feats.shape[0]) for j in range(feats.shape[1])]
        return {IMAGE_ID: (list(feats), slots)}, base.multi_modal_projector
    if name == "video_llava":
        out = {}
        for key, tower, tid, strip in (
            ("pixel_values", base.image_tower, IMAGE_ID, True),
            ("pixel_values_videos", base.video_tower, VIDEO_ID, False),
        ):
            pixels = inputs.get(key, inputs.get("pixel_values_images") if strip else None)
            if pixels is not None:
                feats = _clip(tower, pixels.flatten(0, -4), cfg.vision_feature_layer, strip)
                slots = [(u, j) for u in range(feats.shape[0]) for j in range(feats.shape[1])]
                out[tid] = (list(feats), slots)
        return out, base.multi_modal_projector
    if name == "llava_next":
        return _llava_next_units(base, inputs), base.multi_modal_projector
    out = {}  # qwen2_5_vl: the merger output, one unit per image / video temporal slice
    for pk, tk, tid, encode in (
        ("pixel_values", "image_grid_thw", IMAGE_ID, base.get_image_features),
        ("pixel_values_videos", "video_grid_thw", VIDEO_ID, base.get_video_features),
    ):
        if inputs.get(pk) is not None:
            feats = []
            items = encode(inputs[pk], inputs[tk]).pooler_output
            for e, (t, _, _) in zip(items, inputs[tk].tolist(), strict=True):
                feats += [e] if tid == IMAGE_ID else list(e.view(t, -1, e.shape[-1]))
            slots = [(u, j) for u, f in enumerate(feats) for j in range(f.shape[0])]
            out[tid] = (feats, slots)
    return out, None


def _llava_next_units(base, inputs):
    """LLaVA-NeXT: a unit per crop (the crop's cells that survive unpadding, in cell order); the
    LLM order is what the model's own ``pack_image_features`` makes of (crop, cell) labels."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = base.config
    sizes = inputs["image_sizes"]
    crops = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for s in sizes
    ]
    pixels = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], crops, strict=True)])
    feats = _clip(base.vision_tower, pixels, cfg.vision_feature_layer, True)  # (crops, n, D)
    n = feats.shape[1]
    labels = torch.arange(feats.shape[0] * n, dtype=torch.float64).view(-1, n, 1)
    packed, _ = base.pack_image_features(
        list(labels.split(crops)), sizes, "default", image_newline=torch.full((1,), -1.0)
    )
    order = torch.cat([p[:, 0] for p in packed]).long().tolist()
    present = [sorted(c % n for c in order if c >= 0 and c // n == u) for u in range(len(feats))]
    units = [feats[u, cells] for u, cells in enumerate(present)]
    slots = [None if c < 0 else (c // n, present[c // n].index(c % n)) for c in order]
    return {IMAGE_ID: (units, slots)}


def _qwen3_planes(model, inputs: dict) -> dict:
    """Qwen3-VL's DeepStack planes, ``{placeholder id: [(P, N_u, D) per unit]}`` in the units'
    order (images one unit each, videos one per temporal slice)."""
    base = model.model
    out = {}
    for pk, tk, tid, encode in (
        ("pixel_values", "image_grid_thw", IMAGE_ID, base.get_image_features),
        ("pixel_values_videos", "video_grid_thw", VIDEO_ID, base.get_video_features),
    ):
        if inputs.get(pk) is None:
            continue
        feats = encode(inputs[pk], inputs[tk], return_dict=True).deepstack_features
        # 5.17 returns one packed tensor per plane, later releases a tuple of items
        planes = torch.stack([f if isinstance(f, torch.Tensor) else torch.cat(f) for f in feats])
        thw = inputs[tk].tolist()
        merge = base.config.vision_config.spatial_merge_size**2
        per_item = planes.split([t * h * w // merge for t, h, w in thw], dim=1)
        out[tid] = [
            u for p, (t, _, _) in zip(per_item, thw, strict=True) for u in p.chunk(t, dim=1)
        ]
    return out


def _merge_plane(plane: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """``(P, K, D)``: per output slot j, the mean of the plane rows of the tokens assigned to j."""
    return torch.stack([plane[:, assign == j].mean(1) for j in range(k)], dim=1)


@torch.no_grad()
def stage1(name: str, model, inputs: dict, vision_keep, planes: str = "merged") -> Stage1:
    """The stage-1 sequence of a one-row, unpadded ``inputs``.

    Args:
        planes: Qwen3-VL's DeepStack planes: "merged" (each kept token gets the mean of its
            merge group's plane rows, what ApET does), or the negative controls "kept" (the kept
            token's own rows, no merge) and "none" (dropped).
    """
    base = model.model
    ids = inputs["input_ids"][0]
    kinds, project = _units(name, model, inputs)
    unit_planes = _qwen3_planes(model, inputs) if name == "qwen3_vl" else {}
    kept = {}  # (placeholder id, unit, token) -> the kept (merged) token, projected
    kept_planes = {}  # the same keys -> (P, D) plane rows
    rows = 0
    for tid, (units, _) in kinds.items():
        for u, x in enumerate(units):
            c = compress(x[None], budget(vision_keep, x.shape[0]))
            tokens = c.tokens[0] if project is None else project(c.tokens[0])
            rows += c.tokens.shape[1]
            kept.update({(tid, u, int(j)): t for j, t in zip(c.kept[0], tokens, strict=True)})
            if tid in unit_planes:
                p = unit_planes[tid][u]
                k = c.kept.shape[1]
                p = _merge_plane(p, c.assign[0], k) if planes == "merged" else p[:, c.kept[0]]
                kept_planes.update({(tid, u, int(j)): p[:, i] for i, j in enumerate(c.kept[0])})
    if name in ("qwen2_5_vl", "qwen3_vl"):
        pos, _ = base.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
        )
        pos = pos[:, 0]
    else:
        pos = torch.arange(len(ids))[None]
    text = base.get_input_embeddings()(ids)
    seen = dict.fromkeys(kinds, 0)
    units = [(t, u) for t in kinds for u in range(len(kinds[t][0]))]  # packed order
    unit_ids = {key: i for i, key in enumerate(units)}
    seq = []  # (embedding, unit, column) of every token that stays
    plane_rows = []  # (P, D) DeepStack rows of every token that stays (Qwen3-VL)
    none = (
        torch.zeros(len(next(iter(unit_planes.values()))[0]), text.shape[-1])
        if unit_planes
        else None
    )
    for c, tok in enumerate(ids.tolist()):
        if tok not in kinds:
            seq.append((text[c], -1, c))
            plane_rows.append(none if unit_planes else None)
            continue
        slot = kinds[tok][1][seen[tok]]
        seen[tok] += 1
        if slot is None:  # LLaVA-NeXT's image_newline
            seq.append((base.image_newline, -1, c))
        elif (tok, *slot) in kept:
            seq.append((kept[(tok, *slot)], unit_ids[tok, slot[0]], c))
            plane_rows.append(kept_planes.get((tok, *slot)))
    embeds, unit, col = zip(*seq, strict=True)
    col = torch.tensor(col)
    stacked = torch.stack(plane_rows, dim=1) if unit_planes and planes != "none" else None
    return Stage1(
        torch.stack(embeds), pos[:, col], torch.tensor(unit), col, int(pos.max()) + 1, rows, stacked
    )


def _run_layers(lm, h, pos, layers, planes=None, visual=None):
    """Decoder layers on one row ``h (1, L, D)`` at positions ``pos (P, L)``; after the i-th
    layer, plane i of ``planes (P', L, D)`` is added at the ``visual (L,)`` columns (DeepStack)."""
    # additive, so that sdpa and eager read it alike
    mask = torch.full((h.shape[1], h.shape[1]), float("-inf")).triu(1)[None, None]
    rope = lm.rotary_emb(h, pos[0][None] if pos.shape[0] == 1 else pos[:, None])
    for i, layer in enumerate(layers):
        h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=None)
        h = h[0] if isinstance(h, tuple) else h
        if planes is not None and i < planes.shape[0]:
            h = h.clone()
            h[0, visual] = h[0, visual] + planes[i, visual]
    return h


@torch.no_grad()
def logits(model, s1: Stage1, cfg: dict, extra_ids=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the compressed row with ``extra_ids`` (generated tokens) appended.

    Args:
        cfg: ApetConfig fields: vision_keep (already applied in ``s1``), layer, layer_keep,
            positions ("original" or "compact").

    Returns:
        ``(logits (L, V), col (L,))``: ``col`` is each output token's column in the
        uncompressed prompt (-1 for appended tokens).
    """
    lm = model.model.language_model
    g = len(extra_ids)
    h = torch.cat([s1.embeds, lm.embed_tokens(torch.tensor(extra_ids, dtype=torch.long))])[None]
    pos = torch.cat([s1.pos, (s1.next_pos + torch.arange(g)).expand(s1.pos.shape[0], -1)], 1)
    unit = torch.cat([s1.unit, torch.full((g,), -1)])
    col = torch.cat([s1.col, torch.full((g,), -1)])
    original = cfg.get("positions") == "original"

    def at(p):
        return p if original else torch.arange(p.shape[1]).expand(p.shape[0], -1)

    layer = cfg.get("layer") or len(lm.layers)
    planes = s1.planes
    if planes is not None:  # generated tokens get no DeepStack rows
        planes = torch.cat([planes, planes.new_zeros(planes.shape[0], g, planes.shape[2])], 1)
        assert layer >= planes.shape[0], "stage 2 before a DeepStack layer"
    h = _run_layers(lm, h, at(pos), lm.layers[:layer], planes, unit >= 0)
    if layer < len(lm.layers):
        keep = unit < 0
        for u in unit[unit >= 0].unique().tolist():
            cols = (unit == u).nonzero()[:, 0]
            c = compress(h[:, cols], budget(cfg["layer_keep"], len(cols)))
            h[0, cols[c.kept[0]]] = c.tokens[0]
            keep[cols[c.kept[0]]] = True
        h, pos, col = h[:, keep], pos[:, keep], col[keep]
        h = _run_layers(lm, h, at(pos), lm.layers[layer:])
    return model.lm_head(lm.norm(h))[0], col
