"""Tiny random LLaVA-1.5 and LLaVA-NeXT checkpoints that both vLLM and transformers load, built
from configs in code (no downloads), with a word-level tokenizer built from scratch.

Sizes fit vLLM's CPU backend: head_dim 32 in the decoder and in CLIP, float32. Text is words
``w0`` ... ``w245`` (one token each, ids 4 ... 249), so a prompt's text token count is its word
count; ``<image>`` is id 250. Weights are scaled like ``tests/integrations/tiny_vlms.py`` does so
that greedy tokens and ApET's selections are distinct.

Each builder writes into ``root/<name>`` once (a ``done`` file marks a finished checkpoint) and
returns the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

IMAGE_ID = 250
VOCAB = 256
WORDS = 246  # w0 .. w245 -> ids 4 .. 249
#: a chat template whose content is a plain string (vLLM's "string" content format): vLLM puts
#: one "<image>" per image part before the text.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
)

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,  # head_dim 32: the CPU attention backend's minimum
    num_key_value_heads=1,
    vocab_size=VOCAB,
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


def words(ids: list[int]) -> str:
    """The prompt text of token ids 4..249 (each a word)."""
    return " ".join(f"w{i - 4}" for i in ids)


def text(n: int, seed: int) -> str:
    """``n`` deterministic words."""
    g = torch.Generator().manual_seed(1000 + 7 * n + seed)
    return words(torch.randint(4, 4 + WORDS, (n,), generator=g).tolist())


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": 4 + i for i in range(WORDS)})
    vocab["<image>"] = IMAGE_ID
    for i in range(IMAGE_ID + 1, VOCAB):
        vocab[f"<extra{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _scaled(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02).mul_(3.0 / 0.02 * 0.05)  # a fixed, distinct init
    return model


def _save(model, processor, out: Path) -> None:
    """save_pretrained, then rename CLIP's weights to the layout vLLM's loader reads:
    transformers 5 saves them as ``vision_tower.<x>``, vLLM's CLIPVisionModel wants
    ``vision_tower.vision_model.<x>`` (transformers loads both)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    path = out / "model.safetensors"
    state = load_file(path)
    tower, inner = "vision_tower.", "vision_tower.vision_model."
    renamed = {
        (k.replace(tower, inner, 1) if tower in k and inner not in k else k): v
        for k, v in state.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def _build(out: Path, make) -> Path:
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model, processor = make()
    _save(model, processor, out)
    (out / "done").write_text(json.dumps({"transformers": transformers.__version__}))
    return out


def llava(root: Path) -> Path:
    """LLaVA-1.5 shape: CLIP 48 px / 8 px patches = 6x6 = 36 tokens per image (CLS dropped)."""

    def make():
        vision = transformers.CLIPVisionConfig(image_size=48, **CLIP)
        cfg = transformers.LlavaConfig(
            vision_config=vision,
            text_config=transformers.LlamaConfig(**TEXT),
            image_token_index=IMAGE_ID,
            image_seq_length=36,
        )
        cfg.architectures = ["LlavaForConditionalGeneration"]
        model = _scaled(transformers.LlavaForConditionalGeneration(cfg).eval())
        image_processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}
        )
        processor = transformers.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=_tokenizer(),
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        )
        return model, processor

    return _build(root / "llava-1.5-tiny", make)


def llava_next(root: Path) -> Path:
    """LLaVA-NeXT shape: 32 px crops of 4x4 tokens, anyres pinpoints up to 64x32 px."""

    def make():
        vision = transformers.CLIPVisionConfig(image_size=32, **CLIP)
        cfg = transformers.LlavaNextConfig(
            vision_config=vision,
            text_config=transformers.LlamaConfig(**TEXT),
            image_token_index=IMAGE_ID,
            image_grid_pinpoints=[[32, 32], [64, 32], [32, 64]],
            image_seq_length=16,
        )
        cfg.architectures = ["LlavaNextForConditionalGeneration"]
        model = _scaled(transformers.LlavaNextForConditionalGeneration(cfg).eval())
        image_processor = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=[[32, 32], [64, 32], [32, 64]],
        )
        processor = transformers.LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=_tokenizer(),
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        )
        return model, processor

    return _build(root / "llava-next-tiny", make)
