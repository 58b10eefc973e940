"""LLaVA-1.5 and LLaVA-NeXT in vLLM with ApET's stage 1, against the Hugging Face shim.

One engine per configuration (module-scoped), every prompt of a check in one ``generate`` call
(continuous batching, a text-only prompt included); the oracle runs each prompt alone in
transformers on the same checkpoint. Greedy tokens must be equal and logprobs within
``LOGPROB_TOL``; the prompt token count vLLM reports must equal the uncompressed HF prompt less
what the shim dropped; a negative control (the shim with shifted positions) must fail the same
comparison.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from checkpoints import IMAGE_ID, llava, llava_next
from engines import (
    LOGPROB_TOL,
    assert_same,
    engine,
    hf_greedy,
    image,
    max_logprob_diff,
    prompt,
    stock_greedy,
    vllm_greedy,
)

from apet_kernels.integrations import apply_apet, last_selection, remove_apet

MAX_TOKENS = 6

#: (text, images as (width, height, seed)): one image, two images, text only
LLAVA_PROMPTS = [
    ("w1 w2 <image> w3", [(50, 60, 0)]),
    ("w5 <image> w6 w7 <image> w8 w9", [(48, 48, 1), (70, 40, 2)]),
    ("w10 w11 w12 w13", []),
]
#: LLaVA-NeXT: wide (64x32 grid), tall (32x64), unpadded (40x24 in a 64x32 grid), and two images
NEXT_PROMPTS = [
    ("w1 w2 <image> w3", [(64, 32, 0)]),
    ("w4 <image> w5 w6", [(32, 64, 1)]),
    ("w7 w8 <image> w9", [(40, 24, 2)]),
    ("w10 <image> w11 <image> w12", [(24, 40, 3), (32, 32, 4)]),
    ("w13 w14 w15", []),
]


@pytest.fixture(scope="module")
def llava_path(checkpoint_root) -> str:
    return str(llava(checkpoint_root))


@pytest.fixture(scope="module")
def next_path(checkpoint_root) -> str:
    return str(llava_next(checkpoint_root))


def _hf(path: str, cls):
    model = cls.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), transformers.AutoProcessor.from_pretrained(path)


def _hf_inputs(processor, text: str, images: list) -> dict:
    pil = [image(*spec) for spec in images]
    return dict(processor(text=text, images=pil or None, return_tensors="pt"))


def _hf_run(model, processor, specs, **apet):
    """Per prompt: (greedy, tokens the shim dropped); the unpatched model when ``apet`` is empty."""
    out = []
    if apet:
        apply_apet(model, layer=None, **apet)
    try:
        for text, images in specs:
            inputs = _hf_inputs(processor, text, images)
            greedy = hf_greedy(model, inputs, MAX_TOKENS)
            dropped = 0
            if apet and images:
                sel = last_selection(model)
                dropped = sum(u.num_tokens - len(u.kept) for u in sel.units)
            out.append((greedy, dropped))
    finally:
        remove_apet(model)
    return out


def _check_against_shim(llm, path, cls, specs, keep):
    got = vllm_greedy(llm, [prompt(t, i) for t, i in specs], MAX_TOKENS)
    model, processor = _hf(path, cls)
    want = _hf_run(model, processor, specs, vision_keep=keep)
    print(
        "max |logprob diff| vs shim:",
        [max_logprob_diff(g, w) for g, (w, _) in zip(got, want, strict=True)],
    )
    for g, (w, dropped) in zip(got, want, strict=True):
        # vLLM's prompt: the uncompressed HF prompt less the tokens ApET dropped
        assert g.prompt_tokens == w.prompt_tokens - dropped
        assert_same(g, w)
    # negative control: kept tokens at their original (uncompressed) positions instead of
    # vLLM's consecutive ones must fail the comparison, on logprobs if not on tokens
    shifted = _hf_run(model, processor, specs, vision_keep=keep, positions="original")
    diffs = [max_logprob_diff(g, w) for g, (w, _) in zip(got, shifted, strict=True)]
    print("negative control, max |logprob diff|:", diffs)
    for (_, images), diff in zip(specs, diffs, strict=True):
        if images:
            assert diff > 100 * LOGPROB_TOL, diffs
    return got


# --------------------------------------------------------------------------------------------
# LLaVA-1.5


@pytest.fixture(scope="module")
def llava_apet(llava_path):
    with engine(
        llava_path, hf_overrides={"apet": {"vision_keep": 8}}, limit_mm_per_prompt={"image": 2}
    ) as llm:
        yield llm


def test_llava_equals_hf_shim(llava_apet, llava_path):
    got = _check_against_shim(
        llava_apet, llava_path, transformers.LlavaForConditionalGeneration, LLAVA_PROMPTS, 8
    )
    # text words (one token each) + keep per image
    want = [len(t.replace("<image>", "").split()) + 8 * len(i) for t, i in LLAVA_PROMPTS]
    assert [g.prompt_tokens for g in got] == want


def test_llava_prefix_cache_hit_equals_first_run(llava_apet):
    """The same compressed prompt twice: the second run reads its first KV block (32 tokens)
    from the prefix cache and gives the same tokens and logprobs."""
    from vllm import SamplingParams

    long = ("w20 " * 30 + "<image> w21 <image> w22", [(50, 60, 5), (60, 50, 6)])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    first, second = (
        llava_apet.generate([prompt(*long)], params, use_tqdm=False)[0] for _ in range(2)
    )
    assert len(first.prompt_token_ids) == 32 + 2 * 8  # 32 words + keep per image
    assert second.num_cached_tokens >= 32  # a prefix-cache hit over compressed media
    assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    lp = [
        [
            step[t].logprob
            for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
        ]
        for o in (first, second)
    ]
    assert lp[0] == lp[1]


def test_llava_chunked_prefill_equals_hf_shim(llava_path):
    """Prefill in 32-token steps, one request per step, the first step ending between two
    placeholders of the first image: the same tokens and logprobs as the HF shim."""
    from vllm import SamplingParams

    specs = [
        ("w20 " * 28 + "<image> w21 <image> w22", [(50, 60, 5), (60, 50, 6)]),
        LLAVA_PROMPTS[0],
    ]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    with engine(
        llava_path,
        hf_overrides={"apet": {"vision_keep": 8}},
        limit_mm_per_prompt={"image": 2},
        enable_chunked_prefill=True,
        max_num_batched_tokens=32,
        max_num_seqs=1,  # one request per step: a prompt is cut at 32, 64, ...
        enable_prefix_caching=False,
    ) as llm:
        ids = llm.generate([prompt(*specs[0])], params, use_tqdm=False)[0].prompt_token_ids
        got = vllm_greedy(llm, [prompt(t, i) for t, i in specs], MAX_TOKENS)
    assert len(ids) == 28 + 2 + 2 * 8 and ids[31] == ids[32] == IMAGE_ID  # the cut: inside an image
    model, processor = _hf(llava_path, transformers.LlavaForConditionalGeneration)
    for g, (w, dropped) in zip(got, _hf_run(model, processor, specs, vision_keep=8), strict=True):
        assert g.prompt_tokens == w.prompt_tokens - dropped
        assert_same(g, w)


def test_llava_without_apet_is_stock(llava_path):
    """No ``apet`` key: apet's subclass (plugin loaded) == stock vLLM (plugin not loaded), and both
    equal the unpatched HF model."""
    specs = LLAVA_PROMPTS[:2]
    with engine(llava_path, limit_mm_per_prompt={"image": 2}) as llm:
        plugin = vllm_greedy(llm, [prompt(t, i) for t, i in specs], MAX_TOKENS)
    stock = stock_greedy(llava_path, specs, MAX_TOKENS, limit_mm_per_prompt={"image": 2})
    assert [(g.prompt_tokens, g.tokens, g.logprobs) for g in plugin] == [
        (g.prompt_tokens, g.tokens, g.logprobs) for g in stock
    ]
    model, processor = _hf(llava_path, transformers.LlavaForConditionalGeneration)
    for g, (w, _) in zip(plugin, _hf_run(model, processor, specs), strict=True):
        assert g.prompt_tokens == w.prompt_tokens
        assert_same(g, w)


@pytest.mark.parametrize(
    ("apet", "pattern"),
    [
        ({"vision_keep": 8, "layer": 2, "layer_keep": 4}, r"\['layer'\]=2.*stage 1 only"),
        ({"vision_keep": 8, "budget": 3}, "unknown key 'budget'"),
        ({"vision_keep": -1}, r"vision_keep=-1"),
    ],
)
def test_bad_config_raises_at_start(llava_path, apet, pattern):
    with pytest.raises(ValueError, match=pattern):
        with engine(llava_path, hf_overrides={"apet": apet}):
            pass


# --------------------------------------------------------------------------------------------
# LLaVA-NeXT


@pytest.fixture(scope="module")
def next_apet(next_path):
    with engine(
        next_path, hf_overrides={"apet": {"vision_keep": 0.5}}, limit_mm_per_prompt={"image": 2}
    ) as llm:
        yield llm


def test_llava_next_equals_hf_shim(next_apet, next_path):
    _check_against_shim(
        next_apet, next_path, transformers.LlavaNextForConditionalGeneration, NEXT_PROMPTS, 0.5
    )
