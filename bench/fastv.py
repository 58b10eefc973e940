"""The attention-score baseline: FastV-style pruning inside the LLM (Chen et al., 2024).

After decoder layer ``layer - 1`` the visual tokens that receive the most attention from the last
prompt token (averaged over heads) are kept, the others are dropped from the hidden states of
every later layer (and so from their KV cache). The scores are attention *probabilities*, which
FlashAttention never materializes: the LLM has to run eager attention (an (B, H, L, L) matrix per
layer), which is the cost this baseline exists to show next to ApET, which keeps SDPA/flash.

Implemented with hooks on the Hugging Face decoder layers (Llama, Qwen2), no model edits:
    - a forward hook on ``layers[layer - 1].self_attn`` reads its attention weights at prefill;
    - forward pre-hooks on ``layers[layer:]`` gather the kept positions from the hidden states,
      the rotary (cos, sin), the 4D eager mask and the position ids the model passes every layer.
During decoding the pruned layers' caches are shorter than the mask the model builds, so the
hooks drop the mask's leading columns (no padding: they are all "attend").
"""

from __future__ import annotations

import torch

FASTV_LAYER = 2  # FastV's K: prune after the second layer


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The LLM's decoder layers of a LLaVA / Video-LLaVA / Qwen2.5-VL model."""
    return model.model.language_model.layers


def _take(t: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather the ``keep (B, L')`` positions along ``dim`` of ``t``, whose dim 0 is the batch
    (or size 1, broadcast to B)."""
    t = t.expand(keep.shape[0], *t.shape[1:])
    index_shape = [1] * t.dim()
    index_shape[0], index_shape[dim] = keep.shape
    size = list(t.shape)
    size[dim] = keep.shape[1]
    return torch.gather(t, dim, keep.view(index_shape).expand(size))


class FastV:
    """Prune visual tokens by the last token's attention after layer ``layer - 1``.

    Args:
        model: a LLaVA-family or Qwen2.5-VL model whose LLM runs eager attention.
        visual_token_id: placeholder id of the visual tokens in ``input_ids``.
        keep: visual tokens kept per prompt.
        layer: first layer that sees the pruned sequence.

    Use ``set_inputs(input_ids)`` before each prefill, ``remove()`` to take the hooks off.
    """

    def __init__(
        self, model: torch.nn.Module, visual_token_id: int, keep: int, layer: int = FASTV_LAYER
    ):
        self.visual_token_id = visual_token_id
        self.keep = keep
        self.prefill_len = 0
        self.visual_pos: torch.Tensor | None = None  # (V,) positions of the visual tokens
        self.kept_pos: torch.Tensor | None = None  # (B, L') positions kept for layers >= layer
        layers = decoder_layers(model)
        self.handles = [layers[layer - 1].self_attn.register_forward_hook(self._score)]
        self.handles += [
            block.register_forward_pre_hook(self._prune, with_kwargs=True)
            for block in layers[layer:]
        ]

    def set_inputs(self, input_ids: torch.Tensor) -> None:
        """Record where the visual tokens sit (every row has the same layout)."""
        self.prefill_len = input_ids.shape[1]
        self.visual_pos = (input_ids[0] == self.visual_token_id).nonzero().squeeze(1)
        self.kept_pos = None

    def _score(self, module, args, output) -> None:
        weights = output[1]  # (B, H, L, L): None unless the attention is eager
        if weights is None or weights.shape[-2] != self.prefill_len:
            if weights is None:
                raise RuntimeError("FastV needs eager attention in the LLM (no attention weights)")
            return  # a decode step
        scores = weights[:, :, -1, self.visual_pos].float().mean(1)  # (B, V)
        top = scores.topk(min(self.keep, scores.shape[1]), dim=1).indices
        chosen = self.visual_pos[top]  # (B, keep)
        length = weights.shape[-1]
        is_kept = torch.ones(weights.shape[0], length, dtype=torch.bool, device=weights.device)
        is_kept[:, self.visual_pos] = False
        is_kept.scatter_(1, chosen, True)
        # Same count per row, so a stable sort lists each row's kept positions in order.
        order = torch.sort((~is_kept).to(torch.uint8), dim=1, stable=True).indices
        self.kept_pos = order[:, : length - self.visual_pos.numel() + chosen.shape[1]]

    def _prune(self, module, args, kwargs):
        if self.kept_pos is None:
            return None
        hidden = args[0]
        dropped = self.prefill_len - self.kept_pos.shape[1]
        mask = kwargs.get("attention_mask")
        cos, sin = kwargs["position_embeddings"]
        if cos.shape[1] == self.prefill_len:  # prefill: gather the kept positions
            keep = self.kept_pos
            if hidden.shape[1] == self.prefill_len:  # the first pruned layer
                hidden = _take(hidden, keep, 1)
            kwargs["position_embeddings"] = (_take(cos, keep, 1), _take(sin, keep, 1))  # (B, L, d)
            if isinstance(kwargs.get("position_ids"), torch.Tensor):  # (B|1, L)
                kwargs["position_ids"] = _take(kwargs["position_ids"], keep, 1)
            if mask is not None and mask.dim() == 4:  # (B|1, 1, L, L): rows, then columns
                kwargs["attention_mask"] = _take(_take(mask, keep, 2), keep, 3)
        elif mask is not None and mask.dim() == 4:  # decode: the cache here is `dropped` shorter
            kwargs["attention_mask"] = mask[..., dropped:]
        return (hidden, *args[1:]), kwargs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
