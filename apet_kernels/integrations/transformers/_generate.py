"""``generate``'s per-row input expansion (beam search, ``num_return_sequences``) on a patched
model: each copy of a row gets that row's visual items."""

from __future__ import annotations

import torch

from ._state import Patch


def expand_for_generation(
    patch: Patch, expand_size: int, is_encoder_decoder: bool, input_ids, model_kwargs: dict
):
    """``generate``'s ``_expand_inputs_for_generation`` on a patched model.

    generate repeats every input tensor along dim 0 (``repeat_interleave``), which is right for
    per-row tensors but not for per-item ones (a row with images A, B becomes A, A, B, B instead
    of A, B, A, B; Qwen's patch rows are split apart). Unpatched, generate repeats the encoded
    images per row instead, a path apet has to bypass (stage 1 runs before the projector); so the
    per-item inputs are repeated here, row by row, and the rest as generate does.
    """
    orig = patch.orig_expand
    kw = model_kwargs
    if expand_size == 1 or input_ids is None or not patch.shim.has_visual(kw):
        return orig(expand_size, is_encoder_decoder, input_ids, **kw)
    expanded = {}
    for group in patch.shim.items(patch.model, input_ids, kw):
        bounds, item = [], 0  # items [start, end) of every row
        for count in (input_ids == group.token_id).sum(1).tolist():
            start = item
            while count > 0 and item < len(group.tokens):
                count -= group.tokens[item]
                item += 1
            if count != 0:
                raise ValueError(
                    f"apet: input_ids' placeholder tokens {group.token_id} do not split into whole "
                    f"visual items ({group.tokens} tokens each)"
                )
            bounds.append((start, item))
        for name, rows in group.tensors.items():
            first = [0, *torch.tensor(rows).cumsum(0).tolist()]
            index = [
                r
                for start, end in bounds
                for _ in range(expand_size)
                for r in range(first[start], first[end])
            ]
            value = kw.pop(name)
            if isinstance(value, torch.Tensor):
                expanded[name] = value[torch.tensor(index, dtype=torch.long, device=value.device)]
            else:  # e.g. second_per_grid_ts as a list of floats
                expanded[name] = [value[i] for i in index]
    input_ids, kw = orig(expand_size, is_encoder_decoder, input_ids, **kw)
    kw.update(expanded)
    return input_ids, kw
