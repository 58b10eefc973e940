"""Host-built index tables to the device in one transfer, without a host sync."""

from __future__ import annotations

import torch


def upload(host: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host int64 tensors -> views of one device buffer, with the same shapes, in one copy.

    On CUDA the buffer is staged in pinned memory and copied with ``non_blocking=True`` on the
    current stream: a pageable copy would make the host wait for all work queued on the stream
    (the caching host allocator keeps the staging block until the copy is done).
    """
    flat = torch.cat([t.reshape(-1) for t in host])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    pieces = torch.split(flat, [t.numel() for t in host])
    return [piece.view(t.shape) for piece, t in zip(pieces, host, strict=True)]
