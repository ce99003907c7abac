"""Host-to-device copies that never make the host wait for the GPU."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``; a host tensor bound for a GPU is copied without waiting for
    the GPU's queued work.

    A non_blocking copy from pageable host memory may still make the CUDA driver synchronise
    the stream to stage the data (CUDA runtime API, "API synchronization behavior"), which
    drains the queued training step before the next batch is even augmented; a copy from
    pinned memory does not. So host tensors bound for a GPU go through the caching pinned
    allocator first.
    """
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    # Other directions stay blocking: a non_blocking copy to the host returns before the data.
    return tensor.to(device)
