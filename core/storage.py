"""Atomic writes and safe reads. Nothing here ever unpickles arbitrary objects."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ModelFileError


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    If anything fails, ``path`` keeps what it had before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{what} not found: {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{what} at {path} is corrupt ({exc}); save it again.") from exc


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"weights file {path} is missing; save the model again.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"weights file {path} is corrupt ({exc}); save the model again.") from exc


def load_torch_state(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only``)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} is missing.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ModelFileError(f"{path} is corrupt or not a checkpoint file ({exc}).") from exc


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex. Reads in 1 MiB chunks, so any size fits."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_tree(root: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative/path: sha256}`` for every file under ``root`` except ``skip``
    (paths relative to ``root``, with ``/`` separators)."""
    root = Path(root)
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() not in skip
    }


def verify_checksums(root: str | Path, recorded: dict[str, str], record: str | Path) -> None:
    """Raise :class:`ModelFileError` naming the first file under ``root`` that is missing
    or whose bytes differ from its checksum in ``recorded`` (read from ``record``)."""
    root = Path(root)
    for name, expected in sorted(recorded.items()):
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelFileError(f"{record} lists {name!r}, which is outside {root}; save the model again.")
        if not path.is_file():
            raise ModelFileError(
                f"{path} is missing: {record} lists it as part of the saved model. Restore it "
                "from a backup or save the model again."
            )
        if sha256_file(path) != expected:
            raise ModelFileError(
                f"{path} is corrupt: its bytes no longer match the SHA-256 recorded in {record} "
                "when it was saved. Restore the file from a backup or save the model again; "
                "loading it would give wrong vectors."
            )
