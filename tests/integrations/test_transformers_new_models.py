"""The shim property suite on the models beyond the paper's four (issue 14): tiny models from
``tiny_vlms_new`` (CPU, no downloads).

For each model: keep-all == unpatched (logits, padded batch, loss, generate); cached generate ==
uncached and every layer's cache holds its budgeted width; a padded batch == its rows alone; the
decoder layers see exactly the budgeted number of tokens; remove_apet restores bit-identical
outputs; text-only prompts pass through; prefill and every decode step equal the hand-built
reference (``reference.py``) in both position modes, with a negative control; beams and returned
sequences see their own row's items; decoding continues from the uncompressed M-RoPE maximum.
Helpers (logits, layer widths, per-row copies) come from the existing suite,
``test_transformers_shims``.
"""

from __future__ import annotations

import pytest
import reference
import test_transformers_shims as suite
import torch
from tiny_vlms import NUM_LAYERS, patching
from tiny_vlms_new import BUDGETS, BUILDERS, PROMPTS

from apet_kernels.integrations import (
    apply_apet,
    last_selection,
    presets,
    remove_apet,
    supported_model_types,
)

MODELS = list(BUILDERS)
GEN = suite.GEN
#: the model family whose code path ``reference.py`` takes for each model: Qwen2-VL's units
#: (merger output per image / temporal slice) and get_rope_index call are Qwen2.5-VL's
#: (Qwen3-VL-MoE's differ from Qwen3-VL's only in the decoder's MLPs)
REFERENCE_FAMILY = {"qwen2_vl": "qwen2_5_vl", "qwen3_vl_moe": "qwen3_vl"}
_CACHE: dict = {}
ORIGINAL = {"positions": "original"}  # the Qwen shims' default position mode, stage 2 off


def built(name: str, attn: str = "sdpa"):
    """One tiny model per (name, attn) for this module; tests leave it unpatched."""
    if (name, attn) not in _CACHE:
        _CACHE[name, attn] = BUILDERS[name](attn)
    return _CACHE[name, attn]


@pytest.fixture
def patched():
    yield from patching()


@torch.no_grad()
def _onevision_items(model, inputs):
    """LLaVA-OneVision's LLM tokens from the model's own feature methods, one ``(L, D)`` per
    image / video with its newline mask (a newline is a copy of ``image_newline``)."""
    base = model.model
    out = {}
    if "pixel_values" in inputs:
        feats = base.get_image_features(
            inputs["pixel_values"],
            inputs["image_sizes"],
            batch_num_images=inputs["batch_num_images"],
        ).pooler_output
        out[250] = list(feats)
    if "pixel_values_videos" in inputs:
        videos = base.get_video_features(inputs["pixel_values_videos"]).pooler_output
        frames = inputs["pixel_values_videos"].shape[1]
        # transformers < 5.23 appends the newline in the forward, not here
        out[251] = [torch.cat([v[: frames * 4], base.image_newline[None]]) for v in videos]
    return {
        tid: [(x, (x == base.image_newline).all(-1)) for x in items] for tid, items in out.items()
    }


def newlines(name, model, inputs) -> int:
    """Placeholders that show no unit token (OneVision's newlines; none for Qwen)."""
    if name != "llava_onevision":
        return 0
    items = _onevision_items(model, inputs)
    return sum(int(nl.sum()) for group in items.values() for _, nl in group)


@torch.no_grad()
def _onevision_stage1(model, inputs, vision_keep) -> reference.Stage1:
    """Hand-built stage 1 of one unpadded OneVision row: units are the base view (the first
    side**2 tokens) and the rest of a tiled image without its newlines, and each video frame; each
    compressed alone with ``apet_kernels.compress``; kept tokens stay in their slots, newlines
    stay, positions are the uncompressed columns."""
    from apet_kernels import compress

    ids = inputs["input_ids"][0]
    text = model.get_input_embeddings()(ids)
    slots = {250: [], 251: []}  # per placeholder occurrence: (embedding, unit) or None to drop
    unit = 0
    for tid, items in _onevision_items(model, inputs).items():
        for x, newline in items:
            parts = (
                [torch.arange(16), torch.arange(16, len(x))[~newline[16:]]]
                if tid == 250
                else list(torch.arange(len(x) - 1).view(-1, 4))
            )
            parts = [p for p in parts if len(p)]
            row = [(x[j], -1) if newline[j] else None for j in range(len(x))]
            for cols in parts:
                c = compress(x[cols][None], reference.budget(vision_keep, len(cols)))
                for j, tok in zip(c.kept[0].tolist(), c.tokens[0], strict=True):
                    row[int(cols[j])] = (tok, unit)
                unit += 1
            slots[tid] += row
    seq, seen = [], {250: 0, 251: 0}
    for col, tok in enumerate(ids.tolist()):
        if tok not in slots:
            seq.append((text[col], -1, col))
            continue
        slot = slots[tok][seen[tok]]
        seen[tok] += 1
        if slot is not None:
            seq.append((*slot, col))
    embeds, units, cols = zip(*seq, strict=True)
    cols = torch.tensor(cols)
    return reference.Stage1(torch.stack(embeds), cols[None], torch.tensor(units), cols, len(ids), 0)


def stage1(name, model, inputs, vision_keep) -> reference.Stage1:
    if name == "llava_onevision":
        return _onevision_stage1(model, inputs, vision_keep)
    return reference.stage1(REFERENCE_FAMILY.get(name, name), model, inputs, vision_keep)


@pytest.mark.parametrize(
    "name, preset, layer",
    [
        ("qwen2_vl", "qwen2-vl/30%", 14),
        ("llava_onevision", "llava-onevision/30%", 14),
        ("qwen3_vl", "qwen3-vl/30%", 18),
        ("qwen3_vl_moe", "qwen3-vl-moe/30%", 24),
    ],
)
def test_registered_with_a_ratio_preset(name, preset, layer):
    assert name in supported_model_types()
    cfg = presets(name)[preset]
    assert (cfg.vision_keep, cfg.layer, cfg.layer_keep) == (0.30, layer, 1 / 3)
    model, _ = built(name)
    # the default preset resolves (the tiny model's 4 layers reject layer 14: it was applied)
    with pytest.raises(ValueError, match="layer must satisfy 1 <= layer < 4"):
        apply_apet(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS)
def test_keep_all_matches_unpatched(name, attn, patched):
    model, make = built(name, attn)
    single, batch = make(PROMPTS[name][:1]), make(PROMPTS[name], pad="left")
    ref_single, ref_batch = suite.logits(model, single), suite.logits(model, batch)
    labels = single["input_ids"].masked_fill(single["input_ids"] >= 250, -100)
    with torch.no_grad():
        ref_loss = model(**single, labels=labels).loss
    ref_gen = model.generate(**single, **GEN)
    patched(model, vision_keep=1.0, layer=2, layer_keep=1.0)
    torch.testing.assert_close(suite.logits(model, single), ref_single, rtol=1e-5, atol=1e-5)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(
        suite.logits(model, batch)[valid], ref_batch[valid], rtol=1e-4, atol=1e-4
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**single, labels=labels).loss, ref_loss)
    assert torch.equal(model.generate(**single, **GEN), ref_gen)
    assert last_selection(model) is not None  # generate went through the shim


@pytest.mark.parametrize("name", MODELS)
def test_generate_cache_matches_no_cache(name, patched):
    model, make = built(name)
    patched(model, **BUDGETS[name])
    inputs = make(PROMPTS[name], pad="left")
    cached = model.generate(**inputs, return_dict_in_generate=True, **GEN)
    assert torch.equal(cached.sequences, model.generate(**inputs, use_cache=False, **GEN))
    widths = suite._layer_widths(model, inputs)
    layer, fed_back = BUDGETS[name]["layer"], GEN["max_new_tokens"] - 1
    assert widths[layer - 1] > widths[layer] and widths[0] < inputs["input_ids"].shape[1]
    cache = cached.past_key_values
    assert [cache.get_seq_length(i) for i in range(NUM_LAYERS)] == [w + fed_back for w in widths]


@pytest.mark.parametrize("name", MODELS)
def test_batch_matches_rows_alone(name, patched):
    model, make = built(name)
    patched(model, **BUDGETS[name])
    prompts = [*PROMPTS[name], [6]]
    n = GEN["max_new_tokens"]
    batch_gen = model.generate(**make(prompts, pad="left"), **GEN)
    for b, prompt in enumerate(prompts):
        assert torch.equal(batch_gen[b, -n:], model.generate(**make([prompt]), **GEN)[0, -n:])
    for pad in ("left", "right"):
        out = suite.logits(model, make(prompts, pad=pad))
        for b, prompt in enumerate(prompts):
            alone = suite.logits(model, make([prompt]))[0]
            row = out[b, -len(alone) :] if pad == "left" else out[b, : len(alone)]
            torch.testing.assert_close(row, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_layers_see_budgeted_tokens(name, patched):
    model, make = built(name)
    budget = BUDGETS[name]
    patched(model, **budget)
    inputs = make(PROMPTS[name][1:])
    ids = inputs["input_ids"][0]
    placeholders = int(((ids == 250) | (ids == 251)).sum())
    text = ids.numel() - placeholders
    widths = suite._layer_widths(model, inputs)
    sel = last_selection(model)
    fillers = placeholders - sum(u.num_tokens for u in sel.units)  # OneVision's newlines
    assert fillers == newlines(name, model, inputs)
    k1 = [suite._budget(budget["vision_keep"], u.num_tokens) for u in sel.units]
    k2 = [suite._budget(budget["layer_keep"], k) for k in k1]
    assert [len(u.kept) for u in sel.units] == k1
    assert [len(u.layer_kept) for u in sel.units] == k2
    layer = budget["layer"]
    assert widths[:layer] == [text + fillers + sum(k1)] * layer
    assert widths[layer:] == [text + fillers + sum(k2)] * (NUM_LAYERS - layer)


@pytest.mark.parametrize("name", MODELS)
def test_remove_restores_outputs(name):
    model, make = built(name)
    inputs = make(PROMPTS[name])
    ref = suite.logits(model, inputs)
    forward = model.forward
    apply_apet(model, **BUDGETS[name])
    assert suite.logits(model, inputs).shape != ref.shape
    remove_apet(model)
    assert torch.equal(suite.logits(model, inputs), ref)
    assert "forward" not in model.__dict__ and model.forward == forward
    assert "_expand_inputs_for_generation" not in model.__dict__
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


@pytest.mark.parametrize("name", MODELS)
def test_text_only_prompts_pass_through(name, patched):
    model, make = built(name)
    inputs = make([[7], [4]])
    ref = suite.logits(model, inputs)
    patched(model, **BUDGETS[name])
    assert torch.equal(suite.logits(model, inputs), ref)
    assert last_selection(model) is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_hand_built_reference(name, positions, attn, patched):
    """Prefill logits (left and right padding, next to a text-only row) and every cached decode
    step equal ``reference.py``; the reference in the other position mode differs (negative
    control: the comparison sees positions)."""
    model, make = built(name, attn)
    cfg = dict(BUDGETS[name], positions=positions)
    other = dict(cfg, positions="compact" if positions == "original" else "original")
    patched(model, **cfg)
    prompts = PROMPTS[name]
    rows = [stage1(name, model, make([p]), cfg["vision_keep"]) for p in prompts]
    refs = [reference.logits(model, s1, cfg)[0] for s1 in rows]
    for pad in ("left", "right"):
        out = suite.logits(model, make([*prompts, [6]], pad=pad))
        for b, ref in enumerate(refs):
            row = out[b, -len(ref) :] if pad == "left" else out[b, : len(ref)]
            torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)
    wrong = reference.logits(model, rows[1], other)[0]
    assert not torch.allclose(suite.logits(model, make(prompts[1:]))[0], wrong, atol=1e-3)
    batch = make([*prompts, [6]], pad="left")
    gen = model.generate(**batch, output_logits=True, return_dict_in_generate=True, **GEN)
    new = gen.sequences[:, batch["input_ids"].shape[1] :].tolist()
    for b, s1 in enumerate(rows):
        for t, step in enumerate(gen.logits):
            ref, _ = reference.logits(model, s1, cfg, extra_ids=new[b][:t])
            torch.testing.assert_close(step[b], ref[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_expanded_generation_gives_each_row_its_items(name, patched):
    model, make = built(name)
    inputs = make([*PROMPTS[name], [1, ("image", 3), 2, ("image", 4), 1]], pad="left")
    kw = dict(GEN, max_new_tokens=2, num_beams=2)
    ref = model.generate(**inputs, **kw) if suite.HF_REPEATS_ITEMS_PER_ROW else None
    patched(model, vision_keep=1.0, layer=2, layer_keep=1.0)
    beams = suite._check_copies_see_their_row(model, inputs)
    if ref is not None:
        assert torch.equal(beams.sequences, ref)
    patched(model, **BUDGETS[name])
    suite._check_copies_see_their_row(model, inputs)


@pytest.mark.parametrize("name", [name for name in MODELS if name.startswith("qwen")])
def test_decode_positions_continue_after_uncompressed_maximum(name, patched):
    model, make = built(name)
    patched(model, positions="original", **BUDGETS[name])
    inputs = make(PROMPTS[name][1:])
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True
    )
    try:
        model.generate(**inputs, **dict(GEN, max_new_tokens=3))
    finally:
        hook.remove()
    grids = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], **grids)
    start = int(full.max()) + 1
    assert seen[0].shape[-1] < inputs["input_ids"].shape[1]  # the prefill was compressed
    assert int(seen[0].max()) < start
    for t, pos in enumerate(seen[1:]):
        assert pos.shape[-1] == 1 and torch.all(pos == start + t), (t, pos)


def test_onevision_tiled_grid_is_resampled_after_the_projector(patched):
    """The tiny OneVision's tiled image takes the path the issue warns about: its unpadded grid
    is bilinearly resampled after the projector (the grid unit is smaller than the unpadded grid,
    which ``anyres_max_9`` would keep), and keep-all still equals the unpatched model there."""
    model, make = built("llava_onevision")
    inputs = make(PROMPTS["llava_onevision"][:1])
    ref = suite.logits(model, inputs)
    patched(model, vision_keep=1.0, layer=2, layer_keep=1.0)
    torch.testing.assert_close(suite.logits(model, inputs), ref, rtol=1e-5, atol=1e-5)
    units = last_selection(model).units
    assert [u.info.kind for u in units] == ["base", "crop"]
    h, w = units[1].info.grid
    assert units[1].num_tokens == h * w
    crops = inputs["pixel_values"].shape[1]
    packed, _ = model.model.pack_image_features(
        [torch.zeros(crops, 16, 1)],
        inputs["image_sizes"],
        image_newline=torch.ones(1),
        vision_aspect_ratio="anyres_max_9",
    )
    unpadded = int((packed[0][16:, 0] == 0).sum())
    assert h * w < unpadded


def _deepstack_inputs(model):
    """What the decoder stack receives as ``visual_pos_masks`` / ``deepstack_visual_embeds`` in
    every forward of ``model`` while the context is open (a list, one entry per call)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_qwen3_deepstack_planes_follow_their_tokens(patched):
    """The compressed prefill hands the decoder one DeepStack row per kept visual token (the mask
    covers exactly the stage-1 visual columns); negative controls: planes dropped, or kept
    without merging them by the unit's groups, give other logits than the shim's, which equal the
    reference that merges them."""
    model, make = built("qwen3_vl")
    cfg = dict(BUDGETS["qwen3_vl"], positions="original")
    patched(model, **cfg)
    inputs = make(PROMPTS["qwen3_vl"][1:])
    seen, hook = _deepstack_inputs(model)
    try:
        out = suite.logits(model, inputs)[0]
    finally:
        hook.remove()
    ((mask, planes),) = seen
    ids = inputs["input_ids"][0]
    k1 = sum(len(u.kept) for u in last_selection(model).units)
    columns = last_selection(model).stage1_columns[0]  # the stage-1 sequence, before stage 2
    assert mask.shape == (1, len(columns)) and int(mask.sum()) == k1
    assert torch.equal(mask[0], (ids[columns] == 250) | (ids[columns] == 251))
    n = len(model.config.vision_config.deepstack_visual_indexes)
    assert len(planes) == n >= 2 and all(p.shape == (k1, 64) for p in planes)
    rows = {"merged": stage1("qwen3_vl", model, inputs, cfg["vision_keep"])}
    for mode in ("kept", "none"):
        rows[mode] = reference.stage1("qwen3_vl", model, inputs, cfg["vision_keep"], planes=mode)
    refs = {m: reference.logits(model, s1, cfg)[0] for m, s1 in rows.items()}
    torch.testing.assert_close(out, refs["merged"], rtol=1e-5, atol=1e-5)
    for mode in ("kept", "none"):
        assert not torch.allclose(out, refs[mode], atol=1e-3), mode


def test_qwen3_decode_steps_get_no_planes(patched):
    """DeepStack rows belong to the prompt's visual tokens: decode steps pass none."""
    model, make = built("qwen3_vl")
    patched(model, **BUDGETS["qwen3_vl"])
    seen, hook = _deepstack_inputs(model)
    try:
        model.generate(**make(PROMPTS["qwen3_vl"], pad="left"), **dict(GEN, max_new_tokens=3))
    finally:
        hook.remove()
    assert [m is not None for m, _ in seen] == [True, False, False]
    assert all(p is None for _, p in seen[1:])


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("layer", [1, None])
def test_qwen3_stage2_refused_at_or_before_the_last_deepstack_layer(layer, name, patched):
    """Stage 2 at layer 1 would shorten the sequence before plane 1 is added after layer 1: it is
    refused, naming ``layer`` and the DeepStack layers; layer 2 is accepted (the budget the other
    tests use); without stage 2 (layer None) keep-all equals the unpatched model (logits and
    generate), so the call context leaves the decoder when no layer hook takes it out."""
    model, make = built(name)
    if layer is not None:
        with pytest.raises(ValueError, match=r"layer must be >= 2 .* got 1.*DeepStack layer \(1\)"):
            apply_apet(model, vision_keep=0.5, layer=layer, layer_keep=0.5)
        assert "forward" not in model.__dict__  # nothing was patched
        return
    single, batch = make(PROMPTS[name][1:]), make(PROMPTS[name], pad="left")
    ref, ref_gen = suite.logits(model, single), model.generate(**batch, **GEN)
    patched(model, vision_keep=1.0, layer=None)
    torch.testing.assert_close(suite.logits(model, single), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(**batch, **GEN), ref_gen)
    patched(model, vision_keep=0.5, layer=None)
    s1 = stage1(name, model, single, 0.5)
    torch.testing.assert_close(
        suite.logits(model, single)[0],
        reference.logits(model, s1, ORIGINAL)[0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_qwen3_remove_leaves_no_decoder_hook():
    model, make = built("qwen3_vl")
    lm = model.model.language_model
    before = dict(lm._forward_pre_hooks)
    apply_apet(model, **BUDGETS["qwen3_vl"])
    assert len(lm._forward_pre_hooks) == len(before) + 1
    remove_apet(model)
    assert dict(lm._forward_pre_hooks) == before
