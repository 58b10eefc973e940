"""A tiny random Qwen2-VL checkpoint vLLM can load (from configs in code, no downloads).

The Qwen2.5-VL checkpoint's tokenizer, patch sizes and media helpers (``qwen_checkpoint``) on
Qwen2-VL's config and processor classes: 4 px patches merged 2x2, so an image of ``H x W`` pixels
(multiples of 8) is an ``H/8 x W/8`` grid of LLM tokens and a video of ``2k`` frames is ``k``
temporal slices. Qwen2-VL has no ``tokens_per_second``: a video's t positions step by 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from qwen_checkpoint import FACTOR, MERGE, PATCH, SPECIAL, TEMPORAL, _tokenizer


def build(path: str | Path) -> Path:
    """Write the checkpoint to ``path`` (created) and return it. Deterministic (seed 0)."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    end = ids["<|endoftext|>"]
    vision = dict(
        depth=2,
        embed_dim=64,  # vision head_dim 32 (vLLM's CPU attention)
        hidden_size=128,  # Qwen2-VL's name for the merger's output width (= the text width)
        mlp_ratio=2,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
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
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
    )
    cfg = transformers.Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=end,
        pad_token_id=end,
        tie_word_embeddings=False,
    )
    cfg.torch_dtype = torch.float32
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    # as in qwen_checkpoint: a larger scale makes tokens and ApET's selections distinct
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.save_pretrained(path)
    image = dict(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        min_pixels=FACTOR * FACTOR,
        max_pixels=FACTOR * FACTOR * 256,
        image_processor_type="Qwen2VLImageProcessor",
        processor_class="Qwen2VLProcessor",
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        rescale_factor=1 / 255,
    )
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=1))
    video = dict(image, video_processor_type="Qwen2VLVideoProcessor", do_sample_frames=False)
    del video["image_processor_type"]
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=1))
    return path
