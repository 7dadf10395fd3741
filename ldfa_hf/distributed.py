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


def _flat(tensors: list[Tensor], collective, dtype: torch.dtype | None = None) -> None:
    """Run ``collective`` on all ``tensors`` as one flat buffer (in ``dtype``) and copy the result back."""
    flat = torch.cat([t.reshape(-1) if dtype is None else t.reshape(-1).to(dtype) for t in tensors])
    collective(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_(tensors: list[Tensor]) -> None:
    """In-place mean across processes, as one flat all-reduce in float32."""
    size = world_size()
    if size == 1 or not tensors:
        return

    def mean(flat: Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= size

    _flat(tensors, mean, dtype=torch.float32)


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """In-place sum across processes, as one flat all-reduce."""
    if world_size() > 1 and tensors:
        _flat(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))


def broadcast_(tensors: list[Tensor], src: int = 0) -> None:
    """Rank ``src``'s values everywhere (one flat broadcast)."""
    if world_size() > 1 and tensors:
        _flat(tensors, lambda flat: dist.broadcast(flat, src=src))


def is_dtensor(weight: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(weight, DTensor)


def full_tensor(weight: Tensor) -> Tensor:
    """The whole tensor: gathered from its shards for a DTensor (FSDP2), else itself."""
    return weight.full_tensor() if is_dtensor(weight) else weight


def row_shard(weight: Tensor) -> tuple[Tensor, int] | None:
    """(local block, index of its first row) of a DTensor sharded on dim 0 only (FSDP2's
    layout, which follows ``torch.chunk``); ``None`` for any other tensor or layout."""
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Shard

    placements = weight.placements
    if len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        return None
    mesh = weight.device_mesh
    rows, parts, rank = weight.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // parts)
    local = weight.to_local()
    start = min(rank * chunk, rows)
    if local.shape[0] != max(0, min(chunk, rows - start)):  # an unexpected layout: let the caller gather
        return None
    return local, start


def all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor is finite on every process (local shards in, one all-reduce)."""
    if not tensors:
        return []
    sums = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
    if world_size() > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums.isfinite().tolist()


def sharded_weight_reason(weight: Tensor) -> str | None:
    """Why a weight cannot be read outside forward (FSDP1 / ZeRO-3 shards), or ``None``."""
    if hasattr(weight, "ds_id") or hasattr(weight, "ds_tensor"):
        return "DeepSpeed ZeRO-3 partitions this weight"
    if is_dtensor(weight):
        return None  # FSDP2: gathered one layer at a time, or used shard by shard
    if weight.numel() == 0:
        return "it is empty here (a flattened FSDP parameter or a ZeRO-3 partition)"
    return None
