"""What a Forward call moves to its device, in one transfer.

A call's token rows, their FP8 scales and its routing plan (rows per expert, each row's token and
weight) are host arrays of several dtypes. On a GPU each would be a pinned allocation and a copy
of its own; here they are packed into one pinned buffer at aligned offsets and sent with one
asynchronous copy, and the device tensors are views of its one device buffer (no
synchronization). On a CPU the arrays are copied into tensors of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ALIGN = 16  # bytes: every part starts at a multiple, so any dtype can view it


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays (any numeric dtype and shape, read-only views allowed) -> tensors of the same
    dtypes and shapes on device, in order. On a GPU: one pinned buffer, one transfer, no sync."""
    if device.type != "cuda":
        return [torch.from_numpy(np.array(a)) for a in arrays]
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += _aligned(a.nbytes)
    host = torch.empty(max(total, ALIGN), dtype=torch.uint8, pin_memory=True)
    flat = host.numpy()
    for a, start in zip(arrays, offsets, strict=True):
        flat[start : start + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    staged = host.to(device, non_blocking=True)
    out = []
    for a, start in zip(arrays, offsets, strict=True):
        dtype = torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype
        out.append(staged[start : start + a.nbytes].view(dtype).view(a.shape))
    return out
