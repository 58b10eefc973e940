"""Tiny builds of the models beyond the paper's four (issue 14), from configs in code.

Same contract as ``tiny_vlms``: every builder returns ``(model, make_inputs)`` with the prompt
format described there, float32 and a few hundred thousand parameters.
"""

from __future__ import annotations

import torch
import transformers
from tiny_vlms import (
    CLIP,
    IMAGE_ID,
    TEXT,
    VIDEO_ID,
    _finish,
    _pad_batch,
    _pixels,
    _seg,
    _text_tokens,
    build_qwen2_5_vl,
)


def build_qwen2_vl(attn: str = "sdpa"):
    """Qwen2-VL shape: the Qwen2.5-VL builder's patches and grids (4 px patches, 2x2 merge; an
    image 3x4 tokens, a video 2 temporal slices of 2x2 tokens) on Qwen2-VL's vision tower."""
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=TEXT["hidden_size"],  # Qwen2-VL's name for the merger's output width
        mlp_ratio=2,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    cfg = transformers.Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=252,
        vision_end_token_id=253,
    )
    model = _finish(transformers.Qwen2VLForConditionalGeneration, cfg, attn)
    # The inputs (placeholders, mm_token_type_ids, flattened patches, grids) are laid out exactly
    # as for Qwen2.5-VL, whose builder's make_inputs does not depend on its model.
    _, make_inputs = build_qwen2_5_vl(attn)
    return model, make_inputs


def build_llava_onevision(attn: str = "sdpa"):
    """LLaVA-OneVision shape: SigLIP 32 px crops of 4x4 tokens (no CLS, "full" strategy), anyres
    pinpoints up to 64x64 px and ``anyres_max_1``, so that a tiled image's unpadded grid is
    bilinearly resampled after the projector (the real models' ``anyres_max_9`` does so above
    about 11 crops); videos of 2 frames pooled to 2x2 tokens each, one newline per video.

    ``("image", seed, (h, w))`` sets an image's size (default (40, 24)); the placeholder count is
    what the model's own ``pack_image_features`` makes of it. A prompt with one image is tiled;
    with several, each image is one crop (``batch_num_images``, as the processor sets it).
    """
    vision = transformers.SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        **{k: v for k, v in CLIP.items() if k != "projection_dim"},
    )
    text = transformers.Qwen2Config(**TEXT)
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=[[32, 32], [64, 32], [32, 64], [64, 64]],
        vision_aspect_ratio="anyres_max_1",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = _finish(transformers.LlavaOnevisionForConditionalGeneration, cfg, attn)
    from transformers.models.llava_onevision import modeling_llava_onevision as m

    def image_tokens(size, tiled: bool):
        crops = m.image_size_to_num_patches(size, cfg.image_grid_pinpoints, 32) if tiled else 1
        packed, _ = model.model.pack_image_features(
            [torch.zeros(crops, 16, 1)],
            torch.tensor([size]),
            image_newline=torch.zeros(1),
            vision_aspect_ratio=cfg.vision_aspect_ratio,
        )
        return crops, packed[0].shape[0]

    def make_inputs(prompts, pad="left"):
        rows, pixels, sizes, counts, videos = [], [], [], [], []
        for prompt in prompts:
            row = []
            segs = [seg if isinstance(seg, tuple) else _seg(seg) for seg in prompt]
            tiled = sum(s[0] == "image" for s in segs) == 1
            counts.append(sum(s[0] == "image" for s in segs))
            for kind, seed, *rest in segs:
                if kind == "text":
                    row += _text_tokens(seed, len(row))
                elif kind == "image":
                    size = rest[0] if rest else (40, 24)
                    crops, n = image_tokens(size, tiled)
                    row += [IMAGE_ID] * n
                    pixels.append(_pixels((crops, 3, 32, 32), seed))
                    sizes.append(size)
                else:
                    row += [VIDEO_ID] * (2 * 4 + 1)
                    videos.append(_pixels((2, 3, 32, 32), 100 + seed))
            rows.append(row)
        ids, mask = _pad_batch(rows, pad)
        out = dict(input_ids=ids, attention_mask=mask)
        if pixels:
            most = max(p.shape[0] for p in pixels)
            padded = torch.zeros(len(pixels), most, 3, 32, 32)
            for i, p in enumerate(pixels):
                padded[i, : p.shape[0]] = p
            out.update(
                pixel_values=padded,
                image_sizes=torch.tensor(sizes),
                batch_num_images=torch.tensor(counts),
            )
        if videos:
            out["pixel_values_videos"] = torch.stack(videos)
        return out

    return model, make_inputs


def build_qwen3_vl(attn: str = "sdpa", moe: bool = False):
    """Qwen3-VL shape: 4 px patches, 2x2 merge, a learned 4x4 position grid; vision blocks 0 and
    1 feed two DeepStack planes (added after decoder layers 0 and 1). An image is a 6x8 patch grid
    = 3x4 tokens; a video 2 temporal slices of 4x4 patches = 2 x 2x2 tokens, laid out as the
    processor does: per slice, timestamp text, vision_start, its tokens, vision_end.

    ``moe``: Qwen3-VL-MoE (``qwen3_vl_moe``, e.g. Qwen3-VL-30B-A3B): the same vision tower and
    DeepStack path, a decoder whose MLPs are 4 experts (2 per token)."""
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=TEXT["hidden_size"],
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    text = dict(
        TEXT,
        head_dim=TEXT["hidden_size"] // TEXT["num_attention_heads"],  # the config's default: 128
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    )
    config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    if moe:
        config_cls = transformers.Qwen3VLMoeConfig
        model_cls = transformers.Qwen3VLMoeForConditionalGeneration
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    cfg = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=252,
        vision_end_token_id=253,
    )
    model = _finish(model_cls, cfg, attn)
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
                for s in range(thw[0]):
                    stamp = [] if kind == "image" else [40 + s, 41]  # "<0.5 seconds>"
                    row += stamp + [252] + [tok] * (n // thw[0] // 4) + [253]
                    typ += [0] * (len(stamp) + 1) + [t] * (n // thw[0] // 4) + [0]
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
    "qwen2_vl": build_qwen2_vl,
    "llava_onevision": build_llava_onevision,
    "qwen3_vl": build_qwen3_vl,
    "qwen3_vl_moe": lambda attn="sdpa": build_qwen3_vl(attn, moe=True),
}
#: as in ``tiny_vlms``: two prompts (the second with more items) and a budget that compresses.
PROMPTS = {
    "qwen2_vl": [[3, "image", 4], [2, "video", 3, ("image", 2), 2]],
    "llava_onevision": [
        [3, ("image", 0, (64, 40)), 4],
        [2, "video", 3, ("image", 1, (24, 40)), 2, ("image", 2), 2],
    ],
    # two videos around an image: the DeepStack planes' sequence order interleaves kinds
    "qwen3_vl": [[3, "image", 4], [2, "video", 3, ("image", 2), 2, ("video", 5), 1]],
}
PROMPTS["qwen3_vl_moe"] = PROMPTS["qwen3_vl"]
BUDGETS = {
    "qwen2_vl": dict(vision_keep=0.5, layer=2, layer_keep=0.5),
    "llava_onevision": dict(vision_keep=0.5, layer=2, layer_keep=0.5),
    # layer 2: the first stage-2 layer after the tiny model's two DeepStack layers (0, 1)
    "qwen3_vl": dict(vision_keep=0.5, layer=2, layer_keep=0.5),
}
BUDGETS["qwen3_vl_moe"] = BUDGETS["qwen3_vl"]
