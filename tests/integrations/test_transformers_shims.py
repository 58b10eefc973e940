"""The Hugging Face shims on tiny models built from configs (CPU, no downloads).

For each model: prefill logits, loss and every decode step equal a hand-built reference
(``reference.py``: compression by hand, layers run one by one) in both position modes, with left
and right padding; keep-all == unpatched; generate with cache == without; a batch == its rows run
alone; the projector and every decoder layer (and its KV cache) see exactly the budgeted number of
tokens; remove_apet restores the model; unsupported uses raise clear errors.
"""

from __future__ import annotations

import pytest
import reference
import torch
import transformers
from packaging.version import Version
from tiny_vlms import BUDGETS, BUILDERS, NUM_LAYERS, PROMPTS, SUPPRESS, patching

from apet_kernels.integrations import apply_apet, last_selection, remove_apet, supported_model_types
from apet_kernels.integrations.transformers._compat import cache_keyword

MODELS = [name for name in BUILDERS if name in supported_model_types()]
#: unpatched generate gives each beam / returned sequence its row's images from this version on
HF_REPEATS_ITEMS_PER_ROW = Version(transformers.__version__) >= Version("5.23")
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
    yield from patching()


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
    # Every layer's cache holds what that layer saw in the prefill (L1 before the stage-2 layer,
    # L2 < L1 from it, both < L0) plus the g tokens fed back since.
    widths = _layer_widths(model, inputs)
    layer, fed_back = BUDGETS[name]["layer"], GEN["max_new_tokens"] - 1
    assert widths[layer - 1] > widths[layer] and widths[0] < inputs["input_ids"].shape[1]
    cache = cached.past_key_values
    assert [cache.get_seq_length(i) for i in range(NUM_LAYERS)] == [w + fed_back for w in widths]


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
    # The LLaVA family's projector runs after stage 1 (Qwen2.5-VL's merger is inside its vision
    # stack, before stage 1); count the rows it projects.
    projector = getattr(model.model, "multi_modal_projector", None)
    projected = []
    if projector is not None:
        hook = projector.register_forward_pre_hook(lambda m, a: projected.append(len(a[0])))
    widths = _layer_widths(model, inputs)
    if projector is not None:
        hook.remove()
    sel = last_selection(model)
    fillers = placeholders - sum(u.num_tokens for u in sel.units)  # LLaVA-NeXT's newlines
    k1 = [_budget(budget["vision_keep"], u.num_tokens) for u in sel.units]
    k2 = [_budget(budget["layer_keep"], k) for k in k1]
    assert [len(u.kept) for u in sel.units] == k1
    assert [len(u.layer_kept) for u in sel.units] == k2
    layer = budget["layer"]
    assert widths[:layer] == [text + fillers + sum(k1)] * layer
    assert widths[layer:] == [text + fillers + sum(k2)] * (NUM_LAYERS - layer)
    if projector is not None:
        assert projected == [sum(k1)]  # one call, on the kept tokens only


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
    assert "_expand_inputs_for_generation" not in model.__dict__
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


@pytest.mark.parametrize(
    "name, attn",
    [*((name, "sdpa") for name in MODELS), ("llava", "eager"), ("qwen2_5_vl", "eager")],
)
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_matches_hand_built_reference(name, attn, positions, patched):
    """Prefill logits (left and right padding, next to a text-only row), the loss, and the logits
    of every cached decode step equal ``reference.py``, which compresses by hand and runs the
    decoder layers one by one: stage-1 placement, stage-2 re-layout, rotary positions of kept
    tokens in both modes, the labels' shrinking and the per-group masks and positions of decode."""
    model, make = built(name, attn)
    cfg = dict(BUDGETS[name], positions=positions)
    patched(model, **cfg)
    prompts = PROMPTS[name]
    rows = [reference.stage1(name, model, make([p]), cfg["vision_keep"]) for p in prompts]
    refs = [reference.logits(model, s1, cfg) for s1 in rows]
    for pad in ("left", "right"):
        batch = make([*prompts, [6]], pad=pad)
        out = logits(model, batch)
        for b, (ref, _) in enumerate(refs):
            row = out[b, -len(ref) :] if pad == "left" else out[b, : len(ref)]
            torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)
    # The loss: each text label follows its token; placeholders and padding are -100.
    batch = make(prompts, pad="right")
    labels = batch["input_ids"].masked_fill(batch["input_ids"] >= 250, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    kept = [labels[b, col] for b, (_, col) in enumerate(refs)]
    expected = torch.nn.functional.cross_entropy(
        torch.cat([ref[:-1] for ref, _ in refs]),
        torch.cat([k[1:] for k in kept]),
        ignore_index=-100,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, labels=labels).loss, expected)
    # Decode: step t's logits == the reference run on the prompt + the t tokens generated so far.
    batch = make([*prompts, [6]], pad="left")
    gen = model.generate(**batch, output_logits=True, return_dict_in_generate=True, **GEN)
    new = gen.sequences[:, batch["input_ids"].shape[1] :].tolist()
    for b, s1 in enumerate(rows):
        for t, step in enumerate(gen.logits):
            ref, _ = reference.logits(model, s1, cfg, extra_ids=new[b][:t])
            torch.testing.assert_close(step[b], ref[-1], rtol=1e-5, atol=1e-5)


def _check_copies_see_their_row(model, inputs):
    """Beam search and num_return_sequences repeat every row; each copy's first-step logits must
    equal its row's (generate's plain repeat_interleave would give a two-image row A, A, B, B
    and split Qwen's patch rows)."""
    kw = dict(GEN, max_new_tokens=2, output_logits=True, return_dict_in_generate=True)
    rows = model.generate(**inputs, **kw).logits[0].repeat_interleave(2, 0)
    beams = model.generate(**inputs, num_beams=2, **kw)
    torch.testing.assert_close(beams.logits[0], rows)
    sampled = model.generate(**inputs, **dict(kw, num_return_sequences=2, do_sample=True, top_k=4))
    torch.testing.assert_close(sampled.logits[0], rows)
    return beams


@pytest.mark.parametrize("name", MODELS)
def test_expanded_generation_gives_each_row_its_items(name, patched):
    model, make = built(name)
    inputs = make([*PROMPTS[name], [1, ("image", 3), 2, ("image", 4), 1]], pad="left")
    kw = dict(GEN, max_new_tokens=2, num_beams=2)
    # transformers >= 5.23 repeats the encoded items per row right itself (through
    # mm_encoder_outputs, which the shim bypasses; 5.18-5.22 gave A, A, B, B there too): from
    # that version on, keep-all beams must equal the unpatched ones exactly.
    parity = HF_REPEATS_ITEMS_PER_ROW
    ref = model.generate(**inputs, **kw) if parity else None
    patched(model, vision_keep=1.0, layer=2, layer_keep=1.0)
    beams = _check_copies_see_their_row(model, inputs)
    if parity:
        assert torch.equal(beams.sequences, ref)
    patched(model, **BUDGETS[name])
    _check_copies_see_their_row(model, inputs)


def test_expanded_generation_qwen_video_timing(patched):
    """Qwen2.5-VL's per-video second_per_grid_ts repeats per row too (a tensor; a list of
    floats where the model takes one)."""
    model, make = built("qwen2_5_vl")
    inputs = make([[2, "video", 3, ("video", 1), 1], [4, "image", 2]], pad="left")
    patched(model, **BUDGETS["qwen2_5_vl"])
    _check_copies_see_their_row(model, dict(inputs, second_per_grid_ts=torch.tensor([2.0, 0.5])))
    if HF_REPEATS_ITEMS_PER_ROW:  # older Qwen2.5-VL code takes no list here
        _check_copies_see_their_row(model, dict(inputs, second_per_grid_ts=[2.0, 0.5]))


def test_multi_token_decode_with_full_mask(patched):
    """A manual loop may feed several tokens at once to a compressed cache, given the full
    (uncompressed) attention mask: equal to the prompt + those tokens run without a cache."""
    model, make = built("llava")
    patched(model, **BUDGETS["llava"])
    inputs = make(PROMPTS["llava"], pad="left")
    new = torch.tensor([[5, 6, 7], [8, 9, 10]])
    longer = dict(
        inputs,
        input_ids=torch.cat([inputs["input_ids"], new], 1),
        attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1),
    )
    with torch.no_grad():
        cache = model(**inputs).past_key_values
        step = model(
            input_ids=new, attention_mask=longer["attention_mask"], past_key_values=cache
        ).logits
    torch.testing.assert_close(step, logits(model, longer)[:, -3:], rtol=1e-5, atol=1e-5)


def test_unsupported_decoding_is_refused(patched):
    """The cache is shorter than the sequence generate tracks: continuing generate from a
    returned cache or assisted decoding would feed the wrong tokens, so they raise."""
    model, make = built("llava")
    patched(model, **BUDGETS["llava"])
    inputs = make(PROMPTS["llava"][1:])  # no padding: generate drops the all-ones mask
    cache_kw = cache_keyword(type(model).forward)  # `cache` from 5.24 on (no FutureWarning)
    first = model.generate(**inputs, return_dict_in_generate=True, **GEN)
    more = torch.cat([first.sequences, torch.tensor([[5, 6]])], 1)
    # (transformers >= 5.23 drops the all-ones mask: NotImplementedError; older keep it and the
    # mask's length gives the mismatch away: ValueError.)
    with pytest.raises((NotImplementedError, ValueError), match="cannot continue from a compre"):
        model.generate(input_ids=more, **{cache_kw: first.past_key_values}, **GEN)
    # Assisted (prompt lookup) decoding: refused, or (where the mask and cache lengths still
    # agree, which the checks make sure of) the same tokens as plain greedy decoding.
    long = dict(GEN, max_new_tokens=12)
    for prompt in [*PROMPTS["llava"], [5, "image", 9, ("image", 3), 3]]:
        one = make([prompt])
        try:
            assisted = model.generate(**one, prompt_lookup_num_tokens=2, **long)
        except (NotImplementedError, ValueError) as err:
            assert "assisted decoding is not supported" in str(err)
        else:
            assert torch.equal(assisted, model.generate(**one, **long))
    # With padding generate keeps the mask, whose length then gives the mismatch away.
    batch = make(PROMPTS["llava"], pad="left")
    first = model.generate(**batch, return_dict_in_generate=True, **GEN)
    more = torch.cat([first.sequences, torch.full((2, 2), 5)], 1)
    mask = torch.cat(
        [batch["attention_mask"], torch.ones(2, more.shape[1] - batch["input_ids"].shape[1])], 1
    )
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, \d+\)"):
        model.generate(
            input_ids=more, attention_mask=mask, **{cache_kw: first.past_key_values}, **GEN
        )
    # A cache cropped into the prompt (assisted decoding's rollback of candidates it fed with
    # the prompt) or edited in one group only.
    with torch.no_grad():
        for crop in (lambda c: c.crop(-1), lambda c: c.layers[-1].crop(-1)):
            cache = model(**inputs).past_key_values
            crop(cache)
            with pytest.raises(ValueError, match="cropped or edited"):
                model(input_ids=torch.tensor([[5]]), past_key_values=cache)


def test_reset_cache_starts_over(patched):
    """A compressed cache that is reset and reused for a text-only prompt decodes like a fresh
    one (the compressed prompt's bookkeeping goes with the reset)."""
    model, make = built("llava")
    text = make([[7]])
    step = torch.tensor([[5]])
    longer = torch.cat([text["input_ids"], step], 1)
    with torch.no_grad():
        ref = model(input_ids=longer).logits[:, -1]
        patched(model, **BUDGETS["llava"])
        cache = model(**make(PROMPTS["llava"][:1])).past_key_values
        cache.reset()
        if cache.get_seq_length():
            pytest.skip("this transformers' reset() zeroes the cache but keeps its length")
        model(input_ids=text["input_ids"], past_key_values=cache)
        out = model(input_ids=step, past_key_values=cache).logits[:, -1]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_labels_loss_tuple_and_gradients(name, patched):
    """With labels: loss first in the tuple output (as unpatched), and the loss reaches the text
    embeddings and the LLaVA projector (the op itself is inference-only and detaches)."""
    model, make = built(name)
    patched(model, **BUDGETS[name])
    inputs = make(PROMPTS[name][:1])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= 250, -100)
    out = model(**inputs, labels=labels)
    as_tuple = model(**inputs, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)
    params = [model.get_input_embeddings().weight]
    if name == "llava":
        params.append(model.model.multi_modal_projector.linear_1.weight)
    grads = torch.autograd.grad(out.loss, params)
    assert all(g.abs().sum() > 0 for g in grads)
