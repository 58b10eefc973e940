"""The end-to-end study's models, built from configs in code with random weights (no downloads).

``full`` sizes are the real 7B architectures (LLaVA-1.5-7B, Qwen2.5-VL-7B, Video-LLaVA-7B): the
same layer counts, widths, heads, vocabularies and visual token counts as the released
checkpoints. ``scaled`` sizes keep each architecture's classes, token layout and visual token
count (where the CPU can afford it) but shrink widths and depths so a prefill takes milliseconds
on a CPU. Latency does not depend on weight values, so random weights time the same as trained
ones; generated text is meaningless and never compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

# Prompt layout around the visual tokens: a system prompt, then the question after them.
PREFIX_TOKENS = 35
SUFFIX_TOKENS = 20


@dataclass
class Arch:
    """One architecture at one size.

    Attributes:
        name: "llava15", "qwen25vl" or "video_llava".
        size: "7B" or "scaled".
        build: ``build(device, dtype, attn) -> model`` (eval mode, random weights).
        make_inputs: ``make_inputs(batch, device, dtype) -> dict`` of model inputs, every row
            the same prompt length (no padding, so SDPA can run its flash kernel).
        visual_tokens: visual tokens per prompt reaching the LLM without compression.
        unit_tokens: tokens per image unit (image or frame) entering stage 1.
        units: image units per prompt.
        visual_token_id: the placeholder id marking visual tokens in ``input_ids``.
        num_layers: LLM decoder layers.
        note: what was scaled, for the report.
    """

    name: str
    size: str
    build: Callable[[torch.device, torch.dtype, str], torch.nn.Module]
    make_inputs: Callable[[int, torch.device, torch.dtype], dict]
    visual_tokens: int
    unit_tokens: int
    units: int
    visual_token_id: int
    num_layers: int
    note: str


def _text_ids(n: int, vocab_limit: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_limit, (n,), generator=gen)


def _prompt(placeholders: list[int], vocab_limit: int) -> torch.Tensor:
    """``(L,)`` ids: prefix text, the visual placeholders, suffix text."""
    return torch.cat(
        [
            _text_ids(PREFIX_TOKENS, vocab_limit, 1),
            torch.tensor(placeholders, dtype=torch.long),
            _text_ids(SUFFIX_TOKENS, vocab_limit, 2),
        ]
    )


def _instantiate(cls, config, device: torch.device, dtype: torch.dtype, attn: str):
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    model.eval()
    # Fixed-length greedy decoding: no early stop at an end-of-sequence token.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


# --- LLaVA-1.5 and Video-LLaVA: CLIP ViT-L/14 + Llama-2/Vicuna-7B ---------------------------

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
LLAMA_SCALED = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=1024,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
CLIP_L = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_SCALED = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=14,
    projection_dim=64,
    hidden_act="quick_gelu",
)


def llava15(full: bool) -> Arch:
    """LLaVA-1.5: one 336 px image = 24x24 = 576 visual tokens (CLS dropped)."""
    text = LLAMA_7B if full else LLAMA_SCALED
    image_id = 32000 if full else 1000
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            image_size=336, **(CLIP_L if full else CLIP_SCALED)
        ),
        text_config=transformers.LlamaConfig(**text),
        image_token_index=image_id,
        image_seq_length=576,
    )

    def build(device, dtype, attn):
        return _instantiate(transformers.LlavaForConditionalGeneration, config, device, dtype, attn)

    def make_inputs(batch, device, dtype):
        ids = _prompt([image_id] * 576, image_id - 10).repeat(batch, 1)
        pixels = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(3))
        return dict(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            pixel_values=pixels.to(device, dtype),
        )

    return Arch(
        "llava15",
        "7B" if full else "scaled",
        build,
        make_inputs,
        576,
        576,
        1,
        image_id,
        text["num_hidden_layers"],
        "real 7B" if full else "LLM 4 layers x 128, CLIP 2 layers x 64; 576 visual tokens as in 7B",
    )


def video_llava(full: bool) -> Arch:
    """Video-LLaVA: 8 frames of 224 px = 8 x (1 CLS + 16x16) = 2056 visual tokens."""
    text = LLAMA_7B if full else LLAMA_SCALED
    image_id, video_id = (32000, 32001) if full else (1000, 1001)
    frames, per_frame = 8, 257
    config = transformers.VideoLlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            image_size=224, **(CLIP_L if full else CLIP_SCALED)
        ),
        text_config=transformers.LlamaConfig(**text),
        image_token_index=image_id,
        video_token_index=video_id,
        image_seq_length=256,
        video_seq_length=frames * per_frame,
    )

    def build(device, dtype, attn):
        cls = transformers.VideoLlavaForConditionalGeneration
        return _instantiate(cls, config, device, dtype, attn)

    def make_inputs(batch, device, dtype):
        ids = _prompt([video_id] * (frames * per_frame), image_id - 10).repeat(batch, 1)
        gen = torch.Generator().manual_seed(4)
        pixels = torch.randn(batch, frames, 3, 224, 224, generator=gen)
        return dict(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            pixel_values_videos=pixels.to(device, dtype),
        )

    return Arch(
        "video_llava",
        "7B" if full else "scaled",
        build,
        make_inputs,
        frames * per_frame,
        per_frame,
        frames,
        video_id,
        text["num_hidden_layers"],
        "real 7B" if full else "LLM 4 layers x 128, CLIP 2 layers x 64; 8x257 tokens as in 7B",
    )


# --- Qwen2.5-VL-7B -------------------------------------------------------------------------

QWEN_IDS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)
QWEN_SCALED_IDS = dict(
    image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003
)


def qwen25vl(full: bool) -> Arch:
    """Qwen2.5-VL: a 896x1792 px image = 64x128 patches of 14 px, merged 2x2 = 2048 visual tokens
    (scaled: 896x896 px = 1024 tokens, so the CPU vision tower stays fast)."""
    grid = (1, 64, 128) if full else (1, 64, 64)
    tokens = grid[0] * grid[1] * grid[2] // 4
    ids = QWEN_IDS if full else QWEN_SCALED_IDS
    if full:
        text = dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
        )
        vision = dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
        )
    else:
        text = dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        )
        vision = dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            fullatt_block_indexes=[1],
        )
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112)
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    image_id = ids["image_token_id"]
    patch_dim = 3 * 2 * 14 * 14

    def build(device, dtype, attn):
        cls = transformers.Qwen2_5_VLForConditionalGeneration
        return _instantiate(cls, config, device, dtype, attn)

    def make_inputs(batch, device, dtype):
        start, end = ids["vision_start_token_id"], ids["vision_end_token_id"]
        row = _prompt([start] + [image_id] * tokens + [end], image_id - 10)
        types = (row == image_id).long()  # 1 marks image tokens (mm_token_type_ids)
        patches = grid[0] * grid[1] * grid[2]
        pixels = torch.randn(batch * patches, patch_dim, generator=torch.Generator().manual_seed(5))
        return dict(
            input_ids=row.repeat(batch, 1).to(device),
            attention_mask=torch.ones(batch, row.numel(), dtype=torch.long, device=device),
            mm_token_type_ids=types.repeat(batch, 1).to(device),
            pixel_values=pixels.to(device, dtype),
            image_grid_thw=torch.tensor([grid] * batch, device=device),
        )

    return Arch(
        "qwen25vl",
        "7B" if full else "scaled",
        build,
        make_inputs,
        tokens,
        tokens,
        1,
        image_id,
        text["num_hidden_layers"],
        "real 7B"
        if full
        else "LLM 4 layers x 128, ViT 2 blocks x 64; 1024 visual tokens (7B: 2048)",
    )


ARCHS = {"llava15": llava15, "qwen25vl": qwen25vl, "video_llava": video_llava}


def get(name: str, full: bool) -> Arch:
    return ARCHS[name](full)
