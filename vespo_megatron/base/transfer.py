"""Host-to-device copies that do not stall the host.

A blocking copy from pageable host memory (`t.to("cuda")`) waits for everything queued on the stream first: a
stream sync, so the host stops launching work until the GPU is idle. In a host-bound loop (the testbed's small
updates, the engine's decode steps) that serialises the two. Staging the tensor in pinned memory makes the copy
asynchronous; torch's caching host allocator keeps the pinned block until the copy has run.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_device"]


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """`t` on `device`; a CPU tensor goes to a CUDA device by a non-blocking copy from pinned memory."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
