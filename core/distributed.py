"""Data-parallel training with ``torch.distributed``: the process group, and the
collectives losses and the trainer share.

Everything here is the identity (rank 0 of 1) when no process group is initialised, so
losses can call it unconditionally.

``torchrun`` launches the processes and sets ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT``; :func:`setup` reads them and starts the process group
(gloo on the CPU, NCCL on CUDA) with a timeout on every collective, so that a process
whose peer died ends with :class:`~embplex.errors.DistributedError` instead of waiting
forever.

Gradients across processes (what makes data-parallel training equal a single process on
the same global batch, see ``docs/concepts.md``, "Losses across processes"):
:func:`gather_with_offset` hands back every process's rows, and its backward sends the
gradient that each process computed for a row back to the process that owns the row, where
they are summed. A loss that is a mean over its local anchors, scaled by the trainer by
``local rows × processes / global rows``, then gives, after :func:`average_gradients`,
exactly the gradient of the single-process loss.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import DistributedError, OptionError

__all__ = [
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "broadcast_object",
    "broadcast_parameters",
    "gather_object",
    "gather_with_grad",
    "gather_with_offset",
    "is_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "rank",
    "same_on_every_process",
    "setup",
    "shutdown",
    "world_size",
]

T = TypeVar("T")

#: seconds a collective waits for the other processes before failing (``train.distributed_timeout``)
DEFAULT_TIMEOUT = 300.0


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files, logs and evaluates."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (``torchrun`` sets it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def setup(timeout: float = DEFAULT_TIMEOUT, device: torch.device | None = None) -> bool:
    """Start the process group the environment describes, once; True when one is running.

    A plain run (no ``WORLD_SIZE``, or 1) starts nothing. The backend is NCCL when this
    process trains on CUDA, gloo otherwise. ``timeout`` bounds every collective: a
    process whose peer died fails after at most that long (at once when the peer's
    connection closes, which is the usual case on one machine).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1, but this build of torch has no torch.distributed.")
    if not timeout > 0:
        raise OptionError(f"train.distributed_timeout must be a positive number of seconds, not {timeout!r}.")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch with "
            "torchrun --nproc_per_node N -m embplex train ... (it sets them)."
        )
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    # NCCL checks its collectives' timeout only with asynchronous error handling on
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    try:
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=float(timeout)),
            **({"device_id": device} if cuda else {}),
        )
    except Exception as error:  # a peer that never came, an address in use
        raise DistributedError(
            f"could not start the process group of {os.environ['WORLD_SIZE']} processes "
            f"(rank {os.environ['RANK']}, {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): {error}"
        ) from error
    return dist.get_world_size() > 1


def _collective(what: str, call: Callable[[], T]) -> T:
    """Run a collective; a failure (a peer that died, the timeout) is a DistributedError
    that says so, instead of the backend's message alone."""
    try:
        return call()
    except DistributedError:
        raise
    except Exception as error:  # gloo raises RuntimeError, NCCL DistBackendError
        raise DistributedError(
            f"process {rank()} of {world_size()}: {what} across processes failed ({error}). Another "
            "process probably stopped (see its log) or did not answer within train.distributed_timeout; "
            "this process stops too. The run resumes from its last checkpoint when launched again."
        ) from error


# ---------------------------------------------------------------------------
# gathering with gradient
# ---------------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """Every process's rows in rank order; the backward sums, over the processes, the
    gradient each one computed for this process's rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, counts: list[int]) -> Tensor:
        ctx.counts = counts
        longest = max(counts)
        padded = tensor
        if tensor.shape[0] < longest:
            padding = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
            padded = torch.cat([tensor, padding])
        shards = [torch.empty_like(padded) for _ in counts]
        _collective("gathering embeddings", lambda: dist.all_gather(shards, padded.contiguous()))
        return torch.cat([shard[:count] for shard, count in zip(shards, counts)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()  # reduced in place: never the caller's buffer
        # the whole gathered gradient is summed (the rows are few next to the model),
        # then each process keeps its own rows
        _collective("summing embedding gradients", lambda: dist.all_reduce(grad, op=dist.ReduceOp.SUM))
        start = sum(ctx.counts[: dist.get_rank()])
        return grad[start : start + ctx.counts[dist.get_rank()]], None


def gather_with_offset(tensor: Tensor) -> tuple[Tensor, int]:
    """All processes' ``tensor`` concatenated along dim 0 in rank order, and the row where
    this process's own rows start.

    Every row carries gradient: the gradient a process computes for another process's
    rows is sent back to their owner in the backward pass (summed over the processes), as
    ``torch.distributed.nn.all_gather`` does and as CLIP-style training needs for the
    result to equal one process on the whole batch. Every process must therefore call it
    the same number of times, and run its backward. Processes may hold different numbers
    of rows; the other dimensions must agree.
    """
    if not is_distributed():
        return tensor, 0
    local_rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    row_counts = [torch.zeros_like(local_rows) for _ in range(dist.get_world_size())]
    _collective("gathering row counts", lambda: dist.all_gather(row_counts, local_rows))
    counts = [int(count.item()) for count in row_counts]
    gathered = _GatherRows.apply(tensor, counts)
    return gathered, sum(counts[: dist.get_rank()])


def gather_with_grad(tensor: Tensor) -> Tensor:
    """:func:`gather_with_offset` without the offset."""
    return gather_with_offset(tensor)[0]


# ---------------------------------------------------------------------------
# what the trainer synchronises
# ---------------------------------------------------------------------------


def all_reduce_sum(value: float | Tensor, device: torch.device | None = None) -> Tensor:
    """The sum over the processes (a float64 tensor; the value itself in one process)."""
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    if is_distributed():
        _collective("summing a value", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return tensor


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the processes, in one flat all-reduce.

    A parameter without a gradient here counts as a zero gradient, so every process sends
    the same layout even when a branch of the model saw no input on one of them. One
    without a gradient on every process keeps none, as in one process: the optimizer then
    skips it (AdamW would otherwise decay it, which one process does not).
    """
    if not is_distributed():
        return
    parameters = list(parameters)
    if not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    has_grad = torch.tensor([float(p.grad is not None) for p in parameters], device=parameters[0].device)
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads] + [has_grad])
    _collective("averaging gradients", lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
    present = flat[-len(parameters) :].tolist()
    flat = flat[: -len(parameters)] / dist.get_world_size()
    offset = 0
    for parameter, count_with_grad in zip(parameters, present):
        count = parameter.numel()
        if count_with_grad:
            parameter.grad = flat[offset : offset + count].view_as(parameter).to(parameter.dtype).clone()
        offset += count


def broadcast_parameters(modules: Iterable[torch.nn.Module]) -> None:
    """Give every process rank 0's parameters and buffers (as DDP does at the start)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                _collective("sharing the initial weights", lambda t=tensor: dist.broadcast(t.data, src=0))


def shutdown() -> None:
    """End the process group this process started (nothing when none runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def same_on_every_process(digest: bytes, device: torch.device | None = None) -> bool:
    """Whether every process holds the same ``digest`` (its first 8 bytes are compared)."""
    if not is_distributed():
        return True
    mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    _collective("comparing batches", lambda: dist.all_gather(everyone, mine))
    return all(bool((other == mine).all()) for other in everyone)


def barrier() -> None:
    """Wait for every process (nothing in one process)."""
    if is_distributed():
        _collective("waiting for the other processes", dist.barrier)


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every process (any picklable value)."""
    if not is_distributed():
        return value
    box = [value]
    _collective("sharing a value", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def gather_object(value: T) -> list[T]:
    """Every process's ``value``, in rank order, on every process."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    _collective("gathering values", lambda: dist.all_gather_object(out, value))
    return out
