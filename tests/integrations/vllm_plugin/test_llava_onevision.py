"""LLaVA-OneVision in vLLM with ApET's stage 1, against the Hugging Face shim.

One apet engine (module-scoped) runs every prompt of a check in one ``generate`` call (continuous
batching, a text-only prompt included); the oracle runs each prompt alone in transformers on the
same checkpoint, with the images passed as a flat list, as vLLM hands them to the HF processor
(``batch_num_images`` all ones: every image tiled, in both). Greedy tokens must be equal and
logprobs within ``LOGPROB_TOL``; the prompt token count vLLM reports must equal the uncompressed
HF prompt less what the shim dropped, and the closed-form budget; a negative control (the shim
with shifted positions, same token count) must fail the same comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("vllm")

from engines import (  # noqa: E402  (tests/integrations/vllm_plugin on sys.path)
    LOGPROB_TOL,
    assert_same,
    engine,
    hf_greedy,
    image,
    max_logprob_diff,
    stock_greedy,
    vllm_greedy,
)
from onevision_checkpoint import SIDE, llava_onevision  # noqa: E402

from apet_kernels.integrations import apply_apet, last_selection, remove_apet  # noqa: E402
from apet_kernels.integrations.vllm._config import parse_apet  # noqa: E402
from apet_kernels.integrations.vllm.llava_onevision import (  # noqa: E402
    _check_supported,
    grid_shape,
    image_tokens,
)

MAX_TOKENS = 6
KEEP = 0.5
#: (text, images as (width, height, seed), videos as (frames, width, height, seed)):
#: wide (64x40 -> a 64x64 grid, unpadded), large (120x100 -> 128x128 grid, 14x16 unpadded,
#: resampled to 11x12), tall, two images (each tiled, crops padded to the larger count), videos
#: of 4 and 2 frames (vLLM batches them as a list), an image and a video, text only
PROMPTS = [
    ("w1 w2 <image> w3", [(64, 40, 0)], []),
    ("w4 <image> w5 w6", [(120, 100, 1)], []),
    ("w7 w8 <image> w9", [(24, 40, 2)], []),
    ("w10 <image> w11 <image> w12", [(40, 24, 3), (32, 32, 4)], []),
    ("w13 <video> w14", [], [(4, 40, 48, 5)]),
    ("w18 <video> w19", [], [(2, 32, 32, 7)]),
    ("w20 <image> w21 <video> w22", [(48, 40, 8)], [(2, 40, 32, 9)]),
    ("w15 w16 w17", [], []),
]


def video(frames: int, width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic random ``(frames, height, width, 3)`` uint8 video."""
    rng = np.random.default_rng(100 + seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def vllm_prompt(text: str, images: list, videos: list) -> dict:
    out = {"prompt": text}
    data = {}
    if images:
        data["image"] = [image(*spec) for spec in images]
    if videos:
        data["video"] = [video(*spec) for spec in videos]
    if data:
        out["multi_modal_data"] = data
    return out


@pytest.fixture(scope="module")
def path(checkpoint_root) -> str:
    return str(llava_onevision(checkpoint_root))


@pytest.fixture(scope="module")
def hf(path):
    model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval(), transformers.AutoProcessor.from_pretrained(path)


def _hf_inputs(processor, text: str, images: list, videos: list) -> dict:
    kwargs = {}
    if images:
        kwargs["images"] = [image(*spec) for spec in images]  # flat: every image tiled
    if videos:
        kwargs["videos"] = [video(*spec) for spec in videos]
    return dict(processor(text=text, return_tensors="pt", **kwargs))


def _hf_run(hf, specs, **apet):
    """Per prompt: (greedy, tokens the shim dropped); the unpatched model when ``apet`` is empty."""
    model, processor = hf
    out = []
    if apet:
        apply_apet(model, layer=None, **apet)
    try:
        for text, images, videos in specs:
            greedy = hf_greedy(model, _hf_inputs(processor, text, images, videos), MAX_TOKENS)
            dropped = 0
            if apet and (images or videos):
                sel = last_selection(model)
                dropped = sum(u.num_tokens - len(u.kept) for u in sel.units)
            out.append((greedy, dropped))
    finally:
        remove_apet(model)
    return out


def _budget(path: str, text: str, images: list, videos: list) -> int:
    """The closed-form compressed prompt length: words + per image keep(16) + keep(rows*cols) +
    rows + per video frames * keep(4) + 1."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    apet = parse_apet({"vision_keep": KEEP}, "llava_onevision")
    total = len(text.replace("<image>", "").replace("<video>", "").split())
    for w, h, _ in images:
        total += image_tokens(cfg, apet, h, w)
    for frames, *_ in videos:
        total += frames * apet.stage1_keep(((SIDE + 1) // 2) ** 2) + 1
    return total


@pytest.fixture(scope="module")
def apet_llm(path):
    with engine(
        path,
        hf_overrides={"apet": {"vision_keep": KEEP}},
        limit_mm_per_prompt={"image": 2, "video": 1},
    ) as llm:
        yield llm


def test_grid_shape_equals_hf_packing(path):
    """The host layout (rows, cols) equals what the model's own ``pack_image_features`` makes of
    zero features (anyres_max_9) over sizes that pad, unpad and resample, and a hand-computed
    case: 120x100 px -> 128x128 pinpoint, 16x16 tokens unpadded to 14x16, r = sqrt(224/144)
    = 1.25 > 1.1 -> int(14 // r) x int(16 // r) = 11x12."""
    from transformers.models.llava_onevision import modeling_llava_onevision as m

    cfg = transformers.AutoConfig.from_pretrained(path)
    model = transformers.LlavaOnevisionModel(cfg)
    assert grid_shape(cfg, 100, 120) == (11, 12)
    for h in (17, 24, 32, 40, 64, 100, 127, 128):
        for w in (9, 32, 48, 90, 120, 128):  # (100, 120) is the resampled case above
            crops = m.image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, 32)
            packed, _ = model.pack_image_features(
                [torch.zeros(crops, SIDE * SIDE, 1)],
                torch.tensor([[h, w]]),
                image_newline=torch.ones(1),
                vision_aspect_ratio="anyres_max_9",
            )
            grid = packed[0][SIDE * SIDE :, 0]
            rows = int(grid.sum())
            assert grid_shape(cfg, h, w) == (rows, grid.numel() // rows - 1), (h, w)


def test_unsupported_feature_strategy_raises(path):
    """SigLIP with the "default" strategy (first token dropped: not side**2 tokens per crop)
    raises, naming the supported combinations; the checkpoint's own config passes."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    _check_supported(cfg)
    cfg.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="SigLIP tower and vision_feature_select_strategy='full'"):
        _check_supported(cfg)


def test_equals_hf_shim(apet_llm, path, hf):
    got = vllm_greedy(apet_llm, [vllm_prompt(*s) for s in PROMPTS], MAX_TOKENS)
    want = _hf_run(hf, PROMPTS, vision_keep=KEEP)
    print(
        "max |logprob diff| vs shim:",
        [max_logprob_diff(g, w) for g, (w, _) in zip(got, want, strict=True)],
    )
    for spec, g, (w, dropped) in zip(PROMPTS, got, want, strict=True):
        # vLLM's prompt: the uncompressed HF prompt less the tokens ApET dropped, and the budget
        assert g.prompt_tokens == w.prompt_tokens - dropped, spec
        assert g.prompt_tokens == _budget(path, *spec), spec
        assert_same(g, w)
    # negative control: kept tokens at their original (uncompressed) positions instead of
    # vLLM's consecutive ones must fail the comparison, on logprobs if not on tokens
    shifted = _hf_run(hf, PROMPTS, vision_keep=KEEP, positions="original")
    diffs = [max_logprob_diff(g, w) for g, (w, _) in zip(got, shifted, strict=True)]
    print("negative control, max |logprob diff|:", diffs)
    for (_, images, videos), diff in zip(PROMPTS, diffs, strict=True):
        if images or videos:
            assert diff > 100 * LOGPROB_TOL, diffs


def test_prefix_cache_hit_equals_first_run(apet_llm):
    """The same compressed prompt twice: the second run reads its first KV blocks from the prefix
    cache (over compressed image tokens) and gives the same tokens and logprobs."""
    from vllm import SamplingParams

    long = vllm_prompt("w20 " * 30 + "<image> w21", [(120, 100, 6)], [])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    first, second = (apet_llm.generate([long], params, use_tqdm=False)[0] for _ in range(2))
    assert len(first.prompt_token_ids) == 31 + 85  # 31 words + 8 + 66 + 11 for the image
    assert second.num_cached_tokens >= 64  # two blocks: the second one holds image tokens
    assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    lp = [
        [
            step[t].logprob
            for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
        ]
        for o in (first, second)
    ]
    assert lp[0] == lp[1]


def _runs(llm) -> list:
    """Greedy runs of PROMPTS in two ``generate`` calls: stock vLLM 0.32 crashes when one batch
    holds videos of different frame counts (its list path of ``_process_video_pixels`` returns
    ``(1, L, D)`` tensors), so the 4-frame video runs alone; the 2-frame ones share a batch."""
    alone = [i for i, (_, _, v) in enumerate(PROMPTS) if v and v[0][0] == 4]
    rest = [i for i in range(len(PROMPTS)) if i not in alone]
    out = {}
    for group in (rest, alone):
        runs = vllm_greedy(llm, [vllm_prompt(*PROMPTS[i]) for i in group], MAX_TOKENS)
        out.update(zip(group, runs, strict=True))
    return [out[i] for i in range(len(PROMPTS))]


def test_without_apet_is_stock_and_keep_all_equals_it(path, hf):
    """No ``apet`` key: apet's subclass (plugin loaded) == stock vLLM (plugin not loaded; image
    prompts, which ``stock_greedy`` builds), and equals the unpatched HF model on every prompt.
    ``vision_keep=1.0`` (every token kept, each merged with itself only) gives the same prompts,
    tokens and logprobs bit for bit: the apet layout and assembly add nothing of their own."""
    limits = {"image": 2, "video": 1}
    with engine(path, limit_mm_per_prompt=limits) as llm:
        plugin = _runs(llm)
    images_only = [(t, i) for t, i, v in PROMPTS if not v]
    stock = stock_greedy(path, images_only, MAX_TOKENS, limit_mm_per_prompt=limits)
    plugin_images = [g for g, (_, _, v) in zip(plugin, PROMPTS, strict=True) if not v]
    assert [(g.prompt_tokens, g.tokens, g.logprobs) for g in plugin_images] == [
        (g.prompt_tokens, g.tokens, g.logprobs) for g in stock
    ]
    for g, (w, _) in zip(plugin, _hf_run(hf, PROMPTS), strict=True):
        assert g.prompt_tokens == w.prompt_tokens
        assert_same(g, w)
    apet = {"apet": {"vision_keep": 1.0}}
    with engine(path, hf_overrides=apet, limit_mm_per_prompt=limits) as llm:
        keep_all = _runs(llm)
    assert [(g.prompt_tokens, g.tokens, g.logprobs) for g in keep_all] == [
        (g.prompt_tokens, g.tokens, g.logprobs) for g in plugin
    ]
