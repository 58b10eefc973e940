"""Tiny VLMs built from configs in code (no downloads) and inputs that fit them.

Every builder returns ``(model, make_inputs)``: ``make_inputs(prompts, pad="left")`` turns a list of
prompts into a batch of model inputs. A prompt is a list of segments: an int n is n text tokens
(drawn from a generator seeded by the prompt), ``"image"``/``"video"`` (or ``("image", seed)``)
is one visual item whose placeholders and pixels the builder lays out as the real processor would.
Models are float32 and small (a few hundred thousand parameters) so that a whole shim test suite
runs in a few minutes on two CPU cores.
"""

from __future__ import annotations

import inspect

import torch
import transformers

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=32,
)
IMAGE_ID, VIDEO_ID = 250, 251
NUM_LAYERS = TEXT["num_hidden_layers"]


def _seg(seg):
    """Normalize a prompt segment to (kind, seed)."""
    if isinstance(seg, int):
        return "text", seg
    if isinstance(seg, str):
        return seg, 0
    return seg


def _text_tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + 7 * n + seed)
    return torch.randint(3, 200, (n,), generator=g).tolist()


def _pixels(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pad_batch(rows: list[list[int]], pad: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows to one length on the ``pad`` side: ``input_ids, attention_mask (B, L)``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if pad == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    return ids, mask


def _finish(model_cls, config, attn: str):
    torch.manual_seed(0)
    config._attn_implementation = attn
    model = model_cls(config).eval()
    # Random init gives near-uniform attention; a larger embedding scale makes tokens (and so
    # greedy decoding and ApET's selections) distinct, which the equality tests need.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.generation_config.pad_token_id = 0
    return model


def build_llava(attn: str = "sdpa"):
    """LLaVA-1.5 shape: CLIP 48 px / 8 px patches = 6x6 tokens per image (CLS dropped)."""
    vision = transformers.CLIPVisionConfig(image_size=48, patch_size=8, **CLIP)
    text = transformers.LlamaConfig(**TEXT)
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_ID, image_seq_length=36
    )
    model = _finish(transformers.LlavaForConditionalGeneration, cfg, attn)

    def make_inputs(prompts, pad="left"):
        rows, pixels = [], []
        for prompt in prompts:
            row = []
            for seg in prompt:
                kind, seed = _seg(seg)
                if kind == "text":
                    row += _text_tokens(seed, len(row))
                else:
                    row += [IMAGE_ID] * 36
                    pixels.append(_pixels((3, 48, 48), seed))
            rows.append(row)
        ids, mask = _pad_batch(rows, pad)
        out = dict(input_ids=ids, attention_mask=mask)
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out

    return model, make_inputs


def build_video_llava(attn: str = "sdpa"):
    """Video-LLaVA shape: images 6x6 tokens (CLS dropped); videos 4 frames of 1 + 6x6 tokens."""
    vision = transformers.CLIPVisionConfig(image_size=48, patch_size=8, **CLIP)
    text = transformers.LlamaConfig(**TEXT)
    cfg = transformers.VideoLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_seq_length=36,
        video_seq_length=4 * 37,
    )
    model = _finish(transformers.VideoLlavaForConditionalGeneration, cfg, attn)
    # transformers < 5.23 names the image input pixel_values_images
    params = inspect.signature(model.forward).parameters
    image_key = "pixel_values" if "pixel_values" in params else "pixel_values_images"

    def make_inputs(prompts, pad="left"):
        rows, images, videos = [], [], []
        for prompt in prompts:
            row = []
            for seg in prompt:
                kind, seed = _seg(seg)
                if kind == "text":
                    row += _text_tokens(seed, len(row))
                elif kind == "image":
                    row += [IMAGE_ID] * 36
                    images.append(_pixels((3, 48, 48), seed))
                else:
                    row += [VIDEO_ID] * (4 * 37)
                    videos.append(_pixels((4, 3, 48, 48), 100 + seed))
            rows.append(row)
        ids, mask = _pad_batch(rows, pad)
        out = dict(input_ids=ids, attention_mask=mask)
        if images:
            out[image_key] = torch.stack(images)
        if videos:
            out["pixel_values_videos"] = torch.stack(videos)
        return out

    return model, make_inputs


def build_llava_next(attn: str = "sdpa"):
    """LLaVA-NeXT shape: 32 px crops of 4x4 tokens, anyres grid pinpoints up to 64x32 px.

    ``("image", seed)`` segments take an optional size: ``("image", seed, (h, w))``; the default
    (40, 24) selects the 64x32 grid (base + 2 crops) and unpads part of it.
    """
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, **CLIP)
    text = transformers.LlamaConfig(**TEXT)
    cfg = transformers.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_grid_pinpoints=[[32, 32], [64, 32], [32, 64]],
        image_seq_length=16,
    )
    model = _finish(transformers.LlavaNextForConditionalGeneration, cfg, attn)
    from transformers.models.llava_next import modeling_llava_next as m

    def num_tokens(size):
        crops = m.image_size_to_num_patches(size, cfg.image_grid_pinpoints, 32)
        feats = [torch.zeros(crops, 16, 1)]
        packed, _ = model.model.pack_image_features(
            feats, torch.tensor([size]), "default", image_newline=torch.zeros(1)
        )
        return crops, packed[0].shape[0]

    def make_inputs(prompts, pad="left"):
        rows, pixels, sizes = [], [], []
        for prompt in prompts:
            row = []
            for seg in prompt:
                kind, seed, *rest = _seg(seg) if not isinstance(seg, tuple) else seg
                if kind == "text":
                    row += _text_tokens(seed, len(row))
                    continue
                size = rest[0] if rest else (40, 24)
                crops, n = num_tokens(size)
                row += [IMAGE_ID] * n
                pixels.append(_pixels((crops, 3, 32, 32), seed))
                sizes.append(size)
            rows.append(row)
        ids, mask = _pad_batch(rows, pad)
        out = dict(input_ids=ids, attention_mask=mask)
        if pixels:
            most = max(p.shape[0] for p in pixels)
            padded = torch.zeros(len(pixels), most, 3, 32, 32)
            for i, p in enumerate(pixels):
                padded[i, : p.shape[0]] = p
            out["pixel_values"] = padded
            out["image_sizes"] = torch.tensor(sizes)
        return out

    return model, make_inputs


def build_qwen2_5_vl(attn: str = "sdpa"):
    """Qwen2.5-VL shape: 4 px patches, 2x2 merge; an image is a 6x8 patch grid = 3x4 tokens,
    a video 2 temporal groups of 4x4 patches = 2 x 2x2 tokens."""
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        out_hidden_size=TEXT["hidden_size"],
        fullatt_block_indexes=[1],
    )
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=252,
        vision_end_token_id=253,
    )
    model = _finish(transformers.Qwen2_5_VLForConditionalGeneration, cfg, attn)
    patch_dim = 3 * 2 * 4 * 4

    def make_inputs(prompts, pad="left"):
        rows, types = [], []
        images, image_thw, videos, video_thw = [], [], [], []
        for prompt in prompts:
            row, typ = [], []
            for seg in prompt:
                kind, seed = _seg(seg)
                if kind == "text":
                    new = _text_tokens(seed, len(row))
                    row += new
                    typ += [0] * len(new)
                    continue
                thw = (1, 6, 8) if kind == "image" else (2, 4, 4)
                n = thw[0] * thw[1] * thw[2]
                tok, t = (IMAGE_ID, 1) if kind == "image" else (VIDEO_ID, 2)
                row += [252] + [tok] * (n // 4) + [253]
                typ += [0] + [t] * (n // 4) + [0]
                (images if kind == "image" else videos).append(_pixels((n, patch_dim), seed))
                (image_thw if kind == "image" else video_thw).append(thw)
            rows.append(row)
            types.append(typ)
        ids, mask = _pad_batch(rows, pad)
        tt, _ = _pad_batch(types, pad)
        out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=tt)
        if images:
            out["pixel_values"] = torch.cat(images)
            out["image_grid_thw"] = torch.tensor(image_thw)
        if videos:
            out["pixel_values_videos"] = torch.cat(videos)
            out["video_grid_thw"] = torch.tensor(video_thw)
        return out

    return model, make_inputs


BUILDERS = {
    "llava": build_llava,
    "video_llava": build_video_llava,
    "llava_next": build_llava_next,
    "qwen2_5_vl": build_qwen2_5_vl,
}

#: Two different prompts per model (the second has more visual items, so rows compress to
#: different lengths) and a compressing budget that fits the tiny models.
PROMPTS = {
    "llava": [[3, "image", 4], [2, ("image", 1), 3, ("image", 2), 5]],
    "video_llava": [[3, "image", 4], [2, "video", 3, ("image", 2), 2]],
    "llava_next": [[3, "image", 4], [2, ("image", 1, (24, 40)), 3, ("image", 2, (32, 32)), 2]],
    "qwen2_5_vl": [[3, "image", 4], [2, "video", 3, ("image", 2), 2]],
}
BUDGETS = {
    "llava": dict(vision_keep=8, layer=2, layer_keep=3),
    "video_llava": dict(vision_keep=6, layer=2, layer_keep=0.5),
    "llava_next": dict(vision_keep=5, layer=2, layer_keep=2),
    "qwen2_5_vl": dict(vision_keep=0.5, layer=2, layer_keep=0.5),
}
#: token ids generate must not produce (placeholders would break a no-cache re-run).
SUPPRESS = [IMAGE_ID, VIDEO_ID, 252, 253]


def patching():
    """Body of the test modules' ``patched`` fixture: yields ``patch(model, **cfg)`` (apply_apet)
    and removes every patch it made afterwards."""
    from apet_kernels.integrations import apply_apet, remove_apet

    models = []

    def patch(model, **cfg):
        models.append(model)
        return apply_apet(model, **cfg)

    yield patch
    for model in models:
        remove_apet(model)
