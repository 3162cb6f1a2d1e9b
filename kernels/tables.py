"""Small host-built tables (pointers, offsets, scalars) that kernels read on the device."""
from __future__ import annotations

import torch


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`table` (built on the host) on `device`, copied without a host synchronisation."""
    if device.type == "cpu":
        return table
    # Pinned staging makes the copy asynchronous; torch's host allocator keeps it alive until done.
    return table.pin_memory().to(device, non_blocking=True)
