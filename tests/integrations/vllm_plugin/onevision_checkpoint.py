"""A tiny random LLaVA-OneVision checkpoint that both vLLM and transformers load, from configs in
code (no downloads), with a word-level tokenizer built from scratch (``bench/vllm_checkpoint.py``'s,
plus ``<video>``).

Shape: SigLIP 32 px crops of 8 px patches (4x4 = 16 tokens per crop, no CLS, "full" strategy),
a Qwen2 decoder (head_dim 32, vLLM's CPU minimum), anyres pinpoints up to 128x128 px (4x4 crops)
and the real models' ``anyres_max_9``: an image whose unpadded grid holds more than about 11 crops
of tokens (e.g. 120x100 px -> a 14x16 grid) is bilinearly resampled after the projector (to 11x12).
Stock vLLM 0.32 hardcodes ``anyres_max_9``, so with this value stock vLLM and transformers agree.
Videos: frames resized to 32x32, 2x2 pooled tokens each, one newline per video.

Text is words ``w0`` ... ``w245`` (ids 4 ... 249, one token each); ``<image>`` is id 250,
``<video>`` id 251. Weights are drawn larger than the default init (N(0, 0.15^2)) so that greedy
tokens and ApET's selections are distinct.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from bench.vllm_checkpoint import CHAT_TEMPLATE, FIRST_WORD, save_for_vllm

IMAGE_ID = 250
VIDEO_ID = 251
CROP = 32
PATCH = 8
SIDE = CROP // PATCH
PINPOINTS = [[32, 32], [64, 32], [32, 64], [64, 64], [128, 128]]
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
SIGLIP = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=CROP,
    patch_size=PATCH,
)


def _tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": FIRST_WORD + i for i in range(IMAGE_ID - FIRST_WORD)})
    vocab["<image>"] = IMAGE_ID
    vocab["<video>"] = VIDEO_ID
    vocab.update({f"<extra{i}>": i for i in range(VIDEO_ID + 1, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llava_onevision(root: Path) -> Path:
    """Write ``root/llava-onevision-tiny`` once and return it."""
    out = root / "llava-onevision-tiny"
    if (out / "done").exists():
        return out
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(**SIGLIP),
        text_config=transformers.Qwen2Config(**TEXT),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
        model.model.image_newline.normal_(0.0, 1.0)
    model.eval()
    size = {"height": CROP, "width": CROP}
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=PINPOINTS
        ),
        video_processor=transformers.LlavaOnevisionVideoProcessor(size=size),
        tokenizer=_tokenizer(TEXT["vocab_size"]),
        num_image_tokens=SIDE * SIDE,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=CHAT_TEMPLATE,
    )
    return save_for_vllm(model, processor, out)
