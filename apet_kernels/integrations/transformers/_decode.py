"""Decode steps on a compressed KV cache.

The cache holds L1 + g entries in layers before ``layer`` and L2 + g from it (g = tokens cached
since the prompt), while ``generate`` tracks the uncompressed L0 + g. Each step rebuilds every
group's 2D mask as ``cat(group mask, generated part of generate's mask)`` and its positions from
the group's next position, so masks, cache lengths and positions agree per layer. It checks the
cache lengths and the mask against each other, since callers that size inputs by the (shorter)
cache length would otherwise feed the wrong tokens.
"""

from __future__ import annotations

import torch

from ._layout import next_positions
from ._state import CallContext, Patch, SeqState


def tokens_since_prompt(patch: Patch, cache, state: SeqState) -> int:
    """Tokens every layer cached after its compressed prompt, checked to be one number >= 0 (a
    cache cropped into the prompt, as assisted decoding's rollback can do, or edited per layer
    fails). Host ints only: no sync."""
    groups = [state.group1] * len(patch.shim.language_model(patch.model).layers)
    if state.group2 is not None:
        groups[patch.config.layer :] = [state.group2] * (len(groups) - patch.config.layer)
    seen = [cache.get_seq_length(i) - g.valid.shape[1] for i, g in enumerate(groups)]
    if min(seen) < 0 or len(set(seen)) > 1:
        raise ValueError(
            f"apet: the compressed KV cache holds {seen} tokens after the prompt per layer; was "
            "it cropped or edited (assisted decoding is not supported)?"
        )
    return seen[0]


def decode_inputs(patch: Patch, kw: dict, cache, state: SeqState) -> CallContext:
    """Rewrite one decode step's ``attention_mask`` and ``position_ids`` (group 1's, in place
    in ``kw``) and return the call's context (group 2's are built in the layer hooks).

    Raises:
        NotImplementedError: several tokens without an attention mask.
        ValueError: an attention mask whose length disagrees with the cache.
    """
    ids = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    q = ids.shape[1]
    mask_in = kw.get("attention_mask")
    g1 = state.group1
    seen = tokens_since_prompt(patch, cache, state)
    # The cache is shorter than the sequence generate tracks, so anything that sizes new inputs
    # by the cache length (generate continuing from a returned cache, assisted decoding) feeds
    # the wrong tokens: refuse what cannot be checked, check the mask where there is one.
    if mask_in is None:
        if q > 1:
            raise NotImplementedError(
                f"apet: {q} tokens fed at once to a compressed KV cache without an "
                "attention_mask. generate cannot continue from a compressed cache and assisted "
                "decoding is not supported; a manual loop must pass attention_mask covering the "
                f"uncompressed prompt ({state.prompt_len} columns), the {seen} tokens since and "
                f"these {q}"
            )
        # generate drops an all-ones mask; the generated count comes from the cache then.
        extra = torch.ones(g1.valid.shape[0], seen + q, dtype=torch.bool, device=ids.device)
    else:
        expected = state.prompt_len + seen + q
        if mask_in.dim() != 2 or mask_in.shape[1] != expected:
            raise ValueError(
                f"apet: attention_mask of shape {tuple(mask_in.shape)} on a compressed KV cache; "
                f"expected (batch, {expected}): the uncompressed prompt ({state.prompt_len}), the "
                f"{seen} tokens cached since and the {q} new ones (generate cannot continue from "
                "a compressed cache; assisted decoding is not supported)"
            )
        extra = mask_in[:, state.prompt_len :].bool()
    extra = extra.to(g1.valid.device)
    pos1 = next_positions(g1.next_pos, extra, q)[None].expand(patch.shim.pos_axes, -1, -1)
    kw.update(
        attention_mask=torch.cat([g1.valid, extra], dim=1).long(),
        position_ids=patch.shim.position_kwarg(pos1),
    )
    return CallContext(prefill=False, state=state, extra=extra, q=q)
