"""Which device a command runs on: the ``device`` setting and its checks.

``device`` is ``auto`` (CUDA when available, then Apple's MPS, then the CPU), ``cpu``,
``cuda`` (the current GPU; under ``torchrun`` the process's ``LOCAL_RANK`` GPU),
``cuda:N`` or ``mps``. A device the machine does not have is refused here, before any
work starts, with what it does have.
"""

from __future__ import annotations

import os
import re

import torch

from .errors import DeviceError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """The devices this machine offers, in the order ``auto`` prefers them."""
    found = [f"cuda:{i}" for i in range(cuda_count())]
    if mps_available():
        found.append("mps")
    return [*found, "cpu"]


def _local_cuda() -> torch.device:
    """``cuda`` without an index: the GPU of this process. ``torchrun`` gives every process
    its own through ``LOCAL_RANK``; a plain run takes the current one."""
    local_rank = os.environ.get("LOCAL_RANK")
    index = int(local_rank) if local_rank is not None and local_rank.isdigit() else torch.cuda.current_device()
    return _checked_cuda(index, "cuda" if local_rank is None else f"cuda (LOCAL_RANK={local_rank})")


def _checked_cuda(index: int, written: str) -> torch.device:
    count = cuda_count()
    if index >= count:
        raise DeviceError(
            f"device={written}: this machine has {count} CUDA device(s), so the highest is "
            f"cuda:{count - 1}. Available: {', '.join(available_devices())}."
        )
    return torch.device("cuda", index)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names on this machine.

    :raises DeviceError: a form that is not a device, or a device the machine lacks; the
        message names the setting and the devices that exist.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    written = "auto" if spec is None else str(spec).strip().lower()
    if written == "auto":
        if cuda_count():
            return _local_cuda()
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if written == "cpu":
        return torch.device("cpu")
    if written == "mps":
        if not mps_available():
            raise DeviceError(
                f"device=mps: this machine has no MPS (Apple GPU) backend. Available: "
                f"{', '.join(available_devices())}; device=auto picks the best of them."
            )
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", written)
    if match is None:
        raise DeviceError(f"device={spec!r} is not a device: write {DEVICE_FORMS}.")
    if not cuda_count():
        built = "" if torch.version.cuda else " (this PyTorch build has no CUDA support)"
        raise DeviceError(
            f"device={written}: this machine has no CUDA device{built}. Available: "
            f"{', '.join(available_devices())}; device=auto picks the best of them."
        )
    if match.group(1) is None:
        return _local_cuda()
    return _checked_cuda(int(match.group(1)), written)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an accelerator running out of memory (CUDA's own error, or the
    runtime error MPS and older builds raise)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
