"""Helpers for data-parallel training with ``torch.distributed``.

Everything here is the identity (rank 0 of 1) when no process group is initialised, so
losses can call it unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_with_grad", "gather_with_offset", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_offset(tensor: Tensor) -> tuple[Tensor, int]:
    """All processes' ``tensor`` concatenated along dim 0 in rank order, and the row where
    this process's own rows start.

    Only the local rows carry gradient (the others are constants here and get their
    gradient on their own process), the usual trade-off for cross-device negatives
    (CLIP, FlagEmbedding). Processes may hold different numbers of rows; the other
    dimensions must agree.
    """
    if not is_distributed():
        return tensor, 0
    tensor = tensor.contiguous()
    processes = dist.get_world_size()
    here = dist.get_rank()
    local_rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    row_counts = [torch.zeros_like(local_rows) for _ in range(processes)]
    dist.all_gather(row_counts, local_rows)
    counts = [int(count.item()) for count in row_counts]
    longest = max(counts)
    padded = tensor
    if tensor.shape[0] < longest:
        padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, padding])
    shards = [torch.empty_like(padded) for _ in range(processes)]
    dist.all_gather(shards, padded.detach())
    pieces = [shard[:count] for shard, count in zip(shards, counts)]
    pieces[here] = tensor  # the local rows keep their autograd history
    return torch.cat(pieces), sum(counts[:here])


def gather_with_grad(tensor: Tensor) -> Tensor:
    """:func:`gather_with_offset` without the offset."""
    return gather_with_offset(tensor)[0]
