"""The Hugging Face shims on tiny models built from configs (CPU, no downloads).

For each model: keep-all == unpatched; generate with cache == without; a batch == its rows run
alone; the decoder layers see exactly the budgeted number of tokens; remove_apet restores the
model; bad configs raise clear errors.
"""

from __future__ import annotations

import pytest
import torch
from tiny_vlms import BUDGETS, BUILDERS, NUM_LAYERS, PROMPTS, SUPPRESS

from apet_kernels.integrations import apply_apet, last_selection, remove_apet, supported_model_types

MODELS = [name for name in BUILDERS if name in supported_model_types()]
GEN = dict(max_new_tokens=5, do_sample=False, suppress_tokens=SUPPRESS)
_CACHE: dict = {}


def built(name: str, attn: str = "sdpa"):
    """One tiny model per (name, attn) for the whole session; tests leave it unpatched."""
    if (name, attn) not in _CACHE:
        _CACHE[name, attn] = BUILDERS[name](attn)
    return _CACHE[name, attn]


@pytest.fixture
def patched():
    """Yields a helper that patches a model, and removes every patch after the test."""
    models = []

    def patch(model, **cfg):
        models.append(model)
        return apply_apet(model, **cfg)

    yield patch
    for model in models:
        remove_apet(model)


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


def _valid_logits(out, mask):
    return out[mask.bool()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS)
def test_keep_all_matches_unpatched(name, attn, patched):
    model, make = built(name, attn)
    single = make(PROMPTS[name][:1])
    batch = make(PROMPTS[name], pad="left")
    ref_single, ref_batch = logits(model, single), logits(model, batch)
    labels = single["input_ids"].masked_fill(single["input_ids"] >= 250, -100)
    with torch.no_grad():
        ref_loss = model(**single, labels=labels).loss
    ref_gen = model.generate(**single, **GEN)
    patched(model, vision_keep=1.0, layer=2, layer_keep=1.0)
    torch.testing.assert_close(logits(model, single), ref_single, rtol=1e-5, atol=1e-5)
    # Padding moves HF's own positions but not ours: equal up to float error (RoPE is relative).
    mask = batch["attention_mask"]
    torch.testing.assert_close(
        _valid_logits(logits(model, batch), mask),
        _valid_logits(ref_batch, mask),
        rtol=1e-4,
        atol=1e-4,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**single, labels=labels).loss, ref_loss)
    assert torch.equal(model.generate(**single, **GEN), ref_gen)
    assert last_selection(model) is not None  # generate went through the shim


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", MODELS)
def test_generate_cache_matches_no_cache(name, attn, patched):
    model, make = built(name, attn)
    patched(model, **BUDGETS[name])
    inputs = make(PROMPTS[name], pad="left")
    cached = model.generate(**inputs, return_dict_in_generate=True, **GEN)
    uncached = model.generate(**inputs, use_cache=False, **GEN)
    assert torch.equal(cached.sequences, uncached)
    # The cache really is compressed: L1 + g entries before the stage-2 layer, fewer after it.
    cache, fed_back = cached.past_key_values, GEN["max_new_tokens"] - 1
    assert cache.get_seq_length(0) - fed_back < inputs["input_ids"].shape[1]
    assert cache.get_seq_length(NUM_LAYERS - 1) < cache.get_seq_length(0)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_llava_positions_modes_decode_consistently(positions, patched):
    model, make = built("llava")
    patched(model, positions=positions, **BUDGETS["llava"])
    inputs = make(PROMPTS["llava"])
    assert torch.equal(
        model.generate(**inputs, **GEN), model.generate(**inputs, use_cache=False, **GEN)
    )


@pytest.mark.parametrize("name", MODELS)
def test_batch_matches_rows_alone(name, patched):
    model, make = built(name)
    patched(model, **BUDGETS[name])
    prompts = [*PROMPTS[name], [6]]  # the text-only row has no unit to compress
    batch_gen = model.generate(**make(prompts, pad="left"), **GEN)
    for b, prompt in enumerate(prompts):
        alone = model.generate(**make([prompt]), **GEN)
        assert torch.equal(
            batch_gen[b, -GEN["max_new_tokens"] :], alone[0, -GEN["max_new_tokens"] :]
        )
    for pad in ("left", "right"):
        out = logits(model, make(prompts, pad=pad))
        for b, prompt in enumerate(prompts):
            alone = logits(model, make([prompt]))[0]
            # The compressed row holds its real tokens contiguously, padding on the `pad` side.
            row = out[b, -len(alone) :] if pad == "left" else out[b, : len(alone)]
            torch.testing.assert_close(row, alone, rtol=1e-4, atol=1e-4)


def _layer_widths(model, inputs):
    """Sequence length every decoder layer sees during one forward."""
    widths, hooks = {}, []
    for i, layer in enumerate(model.model.language_model.layers):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, i=i: widths.__setitem__(
                    i, (a[0] if a else k["hidden_states"]).shape[1]
                ),
                with_kwargs=True,
            )
        )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return [widths[i] for i in range(len(widths))]


@pytest.mark.parametrize("name", MODELS)
def test_layers_see_budgeted_tokens(name, patched):
    model, make = built(name)
    budget = BUDGETS[name]
    patched(model, **budget)
    inputs = make(PROMPTS[name][1:])
    ids = inputs["input_ids"][0]
    placeholders = int((ids >= 250).sum() - (ids >= 252).sum())
    text = ids.numel() - placeholders
    widths = _layer_widths(model, inputs)
    sel = last_selection(model)
    fillers = placeholders - sum(u.num_tokens for u in sel.units)  # LLaVA-NeXT's newlines
    k1 = [_budget(budget["vision_keep"], u.num_tokens) for u in sel.units]
    k2 = [_budget(budget["layer_keep"], k) for k in k1]
    assert [len(u.kept) for u in sel.units] == k1
    assert [len(u.layer_kept) for u in sel.units] == k2
    layer = budget["layer"]
    assert widths[:layer] == [text + fillers + sum(k1)] * layer
    assert widths[layer:] == [text + fillers + sum(k2)] * (NUM_LAYERS - layer)


def _budget(keep, n):
    from apet_kernels import keep_count

    return min(keep, n) if isinstance(keep, int) else keep_count(n, keep)


@pytest.mark.parametrize("name", MODELS)
def test_remove_restores_outputs(name):
    model, make = built(name)
    inputs = make(PROMPTS[name])
    ref = logits(model, inputs)
    forward = model.forward
    apply_apet(model, **BUDGETS[name])
    assert logits(model, inputs).shape != ref.shape
    remove_apet(model)
    assert torch.equal(logits(model, inputs), ref)
    assert "forward" not in model.__dict__ and model.forward == forward
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


@pytest.mark.parametrize("name", MODELS)
def test_text_only_prompts_pass_through(name, patched):
    model, make = built(name)
    inputs = make([[7], [4]])
    ref = logits(model, inputs)
    patched(model, **BUDGETS[name])
    assert torch.equal(logits(model, inputs), ref)
    assert last_selection(model) is None


@pytest.mark.parametrize("name", MODELS)
def test_selection_record(name, patched):
    model, make = built(name)
    patched(model, **BUDGETS[name])
    model(**make(PROMPTS[name]))
    sel = last_selection(model)
    assert sel.layer == BUDGETS[name]["layer"]
    assert {u.row for u in sel.units} == {0, 1}
    for u in sel.units:
        assert u.kept.dtype == torch.long and torch.all(u.kept[1:] > u.kept[:-1])
        assert u.assign.shape == (u.num_tokens,)
        assert torch.equal(u.assign[u.kept], torch.arange(len(u.kept)))
        assert torch.all(u.layer_kept < len(u.kept))
        if u.info.grid is not None:
            h, w = u.info.grid
            cells = (
                u.info.token_index if u.info.token_index is not None else torch.arange(u.num_tokens)
            )
            assert len(cells) == u.num_tokens and int(cells.max()) < h * w


@pytest.mark.parametrize(
    "name, positions", [("llava", "original"), ("llava", "compact"), ("qwen2_5_vl", "original")]
)
def test_decode_positions_continue(name, positions, patched):
    """Decode positions continue from the prompt's next position: the uncompressed maximum + 1
    ("original"; M-RoPE's on Qwen2.5-VL) or the compressed length ("compact")."""
    model, make = built(name)
    patched(model, positions=positions, **BUDGETS[name])
    inputs = make(PROMPTS[name][1:])
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True
    )
    try:
        model.generate(**inputs, **dict(GEN, max_new_tokens=3))
    finally:
        hook.remove()
    prompt_pos, steps = seen[0], seen[1:]
    assert prompt_pos.shape[-1] < inputs["input_ids"].shape[1]  # generate's prefill compressed
    if positions == "original":
        ids = inputs["input_ids"]
        if name == "qwen2_5_vl":
            kw = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
            full, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], **kw)
            start = int(full.max()) + 1
        else:
            start = ids.shape[1]
    else:
        start = prompt_pos.shape[-1]
    assert int(prompt_pos.max()) < start
    for t, pos in enumerate(steps):
        assert pos.shape[-1] == 1 and torch.all(pos == start + t), (t, pos)


def test_static_cache_is_refused(patched):
    model, make = built("llava")
    patched(model, **BUDGETS["llava"])
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        model.generate(**make(PROMPTS["llava"][:1]), cache_implementation="static", **GEN)
