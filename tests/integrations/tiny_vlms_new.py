"""Tiny builds of the models beyond the paper's four (issue 14), from configs in code.

Same contract as ``tiny_vlms``: every builder returns ``(model, make_inputs)`` with the prompt
format described there, float32 and a few hundred thousand parameters.
"""

from __future__ import annotations

import transformers
from tiny_vlms import IMAGE_ID, TEXT, VIDEO_ID, _finish, build_qwen2_5_vl


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


BUILDERS = {"qwen2_vl": build_qwen2_vl}
#: as in ``tiny_vlms``: two prompts (the second with more items) and a budget that compresses.
PROMPTS = {"qwen2_vl": [[3, "image", 4], [2, "video", 3, ("image", 2), 2]]}
BUDGETS = {"qwen2_vl": dict(vision_keep=0.5, layer=2, layer_keep=0.5)}
