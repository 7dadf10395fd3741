"""Keeping factors identical across processes, through torch.distributed only.

Initialisation is seeded the same everywhere and broadcast from rank 0 once; every
statistic a rule uses is averaged across processes before the update, so all ranks
apply the same update to the same factors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def average_(tensors: list[Tensor]) -> None:
    """In-place mean across processes, as one flat all-reduce."""
    size = world_size()
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_(tensors: list[Tensor], src: int = 0) -> None:
    """Rank ``src``'s values everywhere (one flat broadcast)."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def sharded_weight_reason(weight: Tensor) -> str | None:
    """Why a weight cannot be read outside forward (FSDP / ZeRO-3 shards), or ``None``."""
    if hasattr(weight, "ds_id") or hasattr(weight, "ds_tensor"):
        return "DeepSpeed ZeRO-3 partitions this weight"
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            return "it is a DTensor shard (FSDP2 / tensor parallel)"
    except ImportError:  # pragma: no cover
        pass
    if weight.numel() == 0:
        return "it is empty here (a flattened FSDP parameter or a ZeRO-3 partition)"
    return None
