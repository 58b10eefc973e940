"""Hugging Face checkpoints that vLLM loads, written from a model built in code (no downloads):
a word-level tokenizer built from scratch, and LLaVA weights renamed to vLLM's layout.

Used by ``bench/serve.py`` (scaled and 7B LLaVA-1.5 architectures, random weights) and by the
vLLM plugin tests (``tests/integrations/vllm_plugin/checkpoints.py``, tiny models).

Text is words ``w0``, ``w1``, ... (one token each, ids 4, 5, ...): a prompt's text token count is
its word count. Ids 0-3 are ``<pad> <s> </s> <unk>``; ``<image>`` sits at the model's image id.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

#: a chat template whose content is a plain string (vLLM's "string" content format: it puts one
#: "<image>" per image part before the text)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
)
FIRST_WORD = 4


def words(ids: list[int]) -> str:
    """The prompt text of word token ids."""
    return " ".join(f"w{i - FIRST_WORD}" for i in ids)


def text(n: int, seed: int, num_words: int) -> str:
    """``n`` deterministic words drawn from the first ``num_words``."""
    g = torch.Generator().manual_seed(1000 + 7 * n + seed)
    return words(torch.randint(FIRST_WORD, FIRST_WORD + num_words, (n,), generator=g).tolist())


def word_tokenizer(vocab_size: int, image_id: int) -> transformers.PreTrainedTokenizerFast:
    """Words up to ``image_id``, ``<image>`` at ``image_id``, ``<extraN>`` above it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": FIRST_WORD + i for i in range(image_id - FIRST_WORD)})
    vocab["<image>"] = image_id
    vocab.update({f"<extra{i}>": i for i in range(image_id + 1, vocab_size)})
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


def clip_image_processor(size: int) -> transformers.CLIPImageProcessor:
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


def llava_processor(model, processor_cls, image_processor):
    """The LLaVA(-NeXT) processor of ``model`` (default feature strategy: CLS dropped)."""
    cfg = model.config
    return processor_cls(
        image_processor=image_processor,
        tokenizer=word_tokenizer(cfg.text_config.vocab_size, cfg.image_token_index),
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def save_for_vllm(model, processor, out: Path) -> Path:
    """``save_pretrained`` the model and processor into ``out`` once (a ``done`` file marks a
    finished checkpoint), then rename the vision tower's weights to the layout vLLM's loader
    reads: transformers 5 saves them as ``vision_tower.<x>``, vLLM's CLIPVisionModel wants
    ``vision_tower.vision_model.<x>`` (transformers loads both). Returns ``out``."""
    from safetensors.torch import load_file, save_file

    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tower, inner = "vision_tower.", "vision_tower.vision_model."
    for path in sorted(out.glob("*.safetensors")):
        state = load_file(path)
        renamed = {
            (k.replace(tower, inner, 1) if tower in k and inner not in k else k): v
            for k, v in state.items()
        }
        save_file(renamed, path, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():  # sharded: rename the index's keys the same way
        data = json.loads(index.read_text())
        data["weight_map"] = {
            (k.replace(tower, inner, 1) if tower in k and inner not in k else k): v
            for k, v in data["weight_map"].items()
        }
        index.write_text(json.dumps(data, indent=2))
    (out / "done").write_text(json.dumps({"transformers": transformers.__version__}))
    return out
