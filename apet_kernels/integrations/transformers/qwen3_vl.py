"""Qwen3-VL (``model_type == "qwen3_vl"``): Qwen2.5-VL's data path plus DeepStack.

Stage 1 runs per image on the vision merger's output and per temporal slice of a video (in the
prompt each slice is its own group of placeholders after its timestamp text). Positions default
to "original": kept tokens keep their M-RoPE (t, h, w) ids from ``get_rope_index`` (which gives
every slice its own grid), timestamps keep theirs, and decoding continues from the uncompressed
maximum position + 1.

DeepStack: the vision tower also merges the hidden states of the blocks in
``vision_config.deepstack_visual_indexes`` into planes ``(T, D_text)`` (one row per visual token,
like the merger output), and the decoder stack adds plane i to the visual tokens' hidden states
after decoder layer i. Each plane is compressed with the kept indices and merge groups of the
main visual tokens (:func:`apet_kernels.apply_selection`), so every kept token gets the plane
features of its own group, and passed to the decoder stack as ``visual_pos_masks (B, L1)`` and
``deepstack_visual_embeds`` (planes in sequence order, images and videos interleaved as they sit
in the prompt). Qwen3-VL's multimodal forward builds those two only from pixel values, and the
shim feeds it ``inputs_embeds``, so a pre-hook on the decoder stack passes them.

Stage 2 must come after the last DeepStack layer: the decoder adds every plane through one mask
over the stage-1 sequence, so ``layer`` (stage 2 runs before it) must be at least the number of
planes; ``apply_apet`` refuses an earlier one.
"""

from __future__ import annotations

from ._compat import packed_planes
from ._config import ApetConfig
from .qwen2_5_vl import Qwen25VLShim


class Qwen3VLShim(Qwen25VLShim):
    """Qwen3-VL: one unit per image, one per temporal slice of a video; DeepStack planes follow
    their tokens."""

    model_types = ("qwen3_vl",)
    visual_keys = tuple(k for k in Qwen25VLShim.visual_keys if k != "second_per_grid_ts")
    default_preset = "qwen3-vl/30%"
    # Ours, not the paper's (it has no Qwen3-VL row): Qwen2.5-VL's ratios, 30% of each image's
    # tokens, then a third of those before layer 18 (the middle of the 4B / 8B decoders' 36;
    # well after the DeepStack layers 0-2).
    presets = {"qwen3-vl/30%": ApetConfig(0.30, layer=18, layer_keep=1 / 3)}
    has_planes = True

    def check(self, model, config: ApetConfig) -> None:
        planes = len(self.base(model).config.vision_config.deepstack_visual_indexes)
        if config.layer is not None and config.layer < planes:
            raise ValueError(
                f"layer must be >= {planes} for this Qwen3-VL, got {config.layer}: its decoder "
                f"adds {planes} DeepStack planes after layers 0..{planes - 1} through one mask "
                "over the stage-1 sequence, so stage 2 must run after the last DeepStack layer "
                f"({planes - 1})"
            )

    def encode(self, encode, pixels, thw):
        out = encode(pixels, thw, return_dict=True)
        return out.pooler_output, packed_planes(out.deepstack_features)

    def plane_kwargs(self, visual, planes):
        return {"visual_pos_masks": visual, "deepstack_visual_embeds": planes}

    def rope_kwargs(self, kwargs):
        return {}  # Qwen3-VL's get_rope_index takes no second_per_grid_ts


class Qwen3VLMoeShim(Qwen3VLShim):
    """Qwen3-VL-MoE (``qwen3_vl_moe``, e.g. Qwen3-VL-30B-A3B): Qwen3-VL's vision tower, DeepStack
    planes, positions and forward arguments; only the decoder's MLPs are experts, which the
    shim never touches."""

    model_types = ("qwen3_vl_moe",)
    default_preset = "qwen3-vl-moe/30%"
    # Ours, not the paper's: Qwen3-VL's ratios, stage 2 before layer 24 (the middle of the
    # 30B-A3B decoder's 48 layers; well after the DeepStack layers 0-2).
    presets = {"qwen3-vl-moe/30%": ApetConfig(0.30, layer=24, layer_keep=1 / 3)}
