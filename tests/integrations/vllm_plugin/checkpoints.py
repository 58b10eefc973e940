"""Tiny random LLaVA-1.5 and LLaVA-NeXT checkpoints that both vLLM and transformers load, built
from configs in code (no downloads) with a word-level tokenizer built from scratch
(``bench/vllm_checkpoint.py``).

Sizes fit vLLM's CPU backend: head_dim 32 in the decoder and in CLIP, float32. Text is words
``w0`` ... ``w245`` (one token each, ids 4 ... 249), so a prompt's text token count is its word
count; ``<image>`` is id 250. Weights are drawn larger than the default init (as
``tests/integrations/tiny_vlms.py`` does) so that greedy tokens and ApET's selections are
distinct. Each builder writes into ``root/<name>`` once and returns the directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from bench.vllm_checkpoint import clip_image_processor, llava_processor, save_for_vllm

IMAGE_ID = 250
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,  # head_dim 32: the CPU attention backend's minimum
    num_key_value_heads=1,
    vocab_size=256,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
CLIP = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=32,
    patch_size=8,
)
PINPOINTS = [[32, 32], [64, 32], [32, 64]]


def _random(model):
    """Weights ~ N(0, 0.15^2), seeded: distinct tokens and selections."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model.eval()


def llava(root: Path) -> Path:
    """LLaVA-1.5 shape: CLIP 48 px / 8 px patches = 6x6 = 36 tokens per image (CLS dropped)."""
    out = root / "llava-1.5-tiny"
    if (out / "done").exists():
        return out
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=48, **CLIP),
        text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMAGE_ID,
        image_seq_length=36,
    )
    model = _random(transformers.LlavaForConditionalGeneration(cfg))
    processor = llava_processor(model, transformers.LlavaProcessor, clip_image_processor(48))
    return save_for_vllm(model, processor, out)


def llava_next(root: Path) -> Path:
    """LLaVA-NeXT shape: 32 px crops of 4x4 tokens, anyres pinpoints up to 64x32 px."""
    out = root / "llava-next-tiny"
    if (out / "done").exists():
        return out
    cfg = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=32, **CLIP),
        text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMAGE_ID,
        image_grid_pinpoints=PINPOINTS,
        image_seq_length=16,
    )
    model = _random(transformers.LlavaNextForConditionalGeneration(cfg))
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=PINPOINTS,
    )
    processor = llava_processor(model, transformers.LlavaNextProcessor, image_processor)
    return save_for_vllm(model, processor, out)
