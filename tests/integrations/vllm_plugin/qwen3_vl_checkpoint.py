"""A tiny random Qwen3-VL checkpoint vLLM can load (built from configs in code, no downloads).

Qwen2.5-VL's patch sizes (``qwen_checkpoint``: 4 px patches merged 2x2, so an image of ``H x W``
pixels, multiples of 8, is an ``H/8 x W/8`` grid of LLM tokens, and a video of ``2k`` frames is
``k`` frames of the LLM grid, temporal patch 2) on Qwen3-VL's config and processor classes, with
two DeepStack planes (``deepstack_visual_indexes=[0, 1]``: the features after vision blocks 0
and 1, added to the outputs of decoder layers 0 and 1 of 3) and a word-level tokenizer that also
knows the timestamp words Qwen3-VL writes before every video frame (``<0.2 seconds>`` is the two
words ``<0.2`` and ``seconds>``). ``head_dim`` is set explicitly (32: vLLM's CPU attention), as
tiny Qwen3 configs need.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from qwen_checkpoint import FACTOR, MERGE, PATCH, SPECIAL, TEMPORAL, WORDS

#: the timestamp words of ``<{t:.1f} seconds>`` for t below 10 s
TIME_WORDS = [f"<{i / 10:.1f}" for i in range(100)] + ["seconds>"]
#: DeepStack: vision blocks whose outputs feed decoder layers 0, 1, ...
DEEPSTACK = [0, 1]


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + TIME_WORDS)}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
    )
    fast.save_pretrained(path)
    return fast


def build(path: str | Path) -> Path:
    """Write the checkpoint to ``path`` (created) and return it. Deterministic (seed 0)."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    end = ids["<|endoftext|>"]
    vision = dict(
        depth=3,
        hidden_size=64,  # vision head_dim 32 (vLLM's CPU attention)
        intermediate_size=128,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        out_hidden_size=128,
        num_position_embeddings=64,  # an 8 x 8 grid of learned positions, interpolated
        deepstack_visual_indexes=DEEPSTACK,
    )
    text = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=len(tok),
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 6, 6],
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
    )
    cfg = transformers.Qwen3VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg.eos_token_id = end
    cfg.pad_token_id = end
    cfg.torch_dtype = torch.float32
    torch.manual_seed(0)
    model = transformers.Qwen3VLForConditionalGeneration(cfg).eval()
    # as in qwen_checkpoint: a larger scale makes tokens and ApET's selections distinct
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.save_pretrained(path)
    size = {"shortest_edge": FACTOR * FACTOR, "longest_edge": FACTOR * FACTOR * 256}
    image = dict(
        size=size,
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        image_processor_type="Qwen2VLImageProcessor",
        processor_class="Qwen3VLProcessor",
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        rescale_factor=1 / 255,
    )
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=1))
    video = dict(
        image,
        video_processor_type="Qwen3VLVideoProcessor",
        do_sample_frames=False,
        min_frames=2,
        fps=2,
    )
    del video["image_processor_type"]
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=1))
    return path
