"""A tiny random Qwen2.5-VL checkpoint vLLM can load (built from configs in code, no downloads),
and the images and videos the tests feed it.

vLLM needs what a hub checkpoint has: ``config.json`` + safetensors, a tokenizer with Qwen's
special tokens, and the image/video processor configs. The sizes fit vLLM's CPU backend (text
head_dim 32, vision head_dim 32) and the grids are small: 4 px patches merged 2x2, so an image of
``H x W`` pixels (multiples of 8) is an ``H/8 x W/8`` grid of LLM tokens, and a video of 4 frames
is 2 temporal slices (temporal patch 2) of such a grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

#: special tokens of Qwen2.5-VL's tokenizer the processor and vLLM's model file look up by name
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = [f"w{i}" for i in range(200)]
PATCH, MERGE, TEMPORAL = 4, 2, 2
#: pixels per LLM token along each side
FACTOR = PATCH * MERGE
#: video sampling: 2 frames per second and temporal patch 2 -> 1 s per temporal slice; with
#: tokens_per_second 2 the slices' t positions are 0, 2, 4, ... (a non-unit step, as in real
#: videos, so "text continues after the uncompressed maximum" is tested for real).
FPS, TOKENS_PER_SECOND = 2.0, 2


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
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
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        window_size=16,  # 2x2 merged tokens per attention window
        out_hidden_size=128,
        fullatt_block_indexes=[1],
        tokens_per_second=TOKENS_PER_SECOND,
    )
    text = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    cfg.torch_dtype = torch.float32
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    # Random init gives near-uniform attention and logits; a larger scale makes tokens (greedy
    # decoding, ApET's selections) distinct, which the equality tests need.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.save_pretrained(path)
    sizes = dict(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        min_pixels=FACTOR * FACTOR,
        max_pixels=FACTOR * FACTOR * 256,
    )
    image = dict(
        sizes,
        image_processor_type="Qwen2VLImageProcessor",
        processor_class="Qwen2_5_VLProcessor",
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
        video_processor_type="Qwen2VLVideoProcessor",
        do_sample_frames=False,
        min_frames=2,
    )
    del video["image_processor_type"]
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=1))
    return path


def image(height: int, width: int, seed: int):
    """A random RGB PIL image whose sides are multiples of :data:`FACTOR` (no resize)."""
    from PIL import Image

    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (height, width, 3), dtype=np.uint8))


def video(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """``(frames, H, W, 3)`` uint8 random frames (``frames`` even: temporal patch 2)."""
    g = np.random.default_rng(1000 + seed)
    return g.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def video_metadata(frames: int) -> dict:
    """What vLLM's Qwen2.5-VL data parser wants with each video (all frames, :data:`FPS`)."""
    return dict(
        total_num_frames=frames,
        fps=FPS,
        duration=frames / FPS,
        frames_indices=list(range(frames)),
        video_backend="opencv",
        do_sample_frames=False,
    )


def grid(height: int, width: int, frames: int = 1) -> tuple[int, int, int]:
    """LLM token grid ``(t, h, w)`` of an item (t = frames / temporal patch for videos)."""
    return max(frames // TEMPORAL, 1), height // FACTOR, width // FACTOR
