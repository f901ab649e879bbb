"""Atomic writes and safe reads. Nothing here ever unpickles arbitrary objects."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ModelFileError


# Staging names carry their writer's process id and host (".model.tmp-<pid>@<host>-<random>"),
# so a later run can tell the leftover of a killed writer from a save still in progress.
STALE_UNOWNED_SECONDS = 3600


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def _staging_prefix(name: str) -> str:
    return f".{name}.tmp-{_owner()}-"


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# what atomic_directory / atomic_write_text name their staging and swap entries: with the
# writer ("<pid>@<host>"), or without (older embplex); tempfile adds 8 characters
_STAGING = re.compile(r"\..+\.(?:tmp-(?P<pid>\d+)@(?P<host>.+)-[a-z0-9_]{8}|old-(?P<old_pid>\d+)@(?P<old_host>.+))")
_UNOWNED_STAGING = re.compile(r"\..+\.(?:tmp-[a-z0-9_]{8}|old-\d+)")


def _is_stale(entry: Path, now: float) -> bool:
    """A staging leftover whose writer is gone (or, unnamed, untouched for an hour)."""
    owned = _STAGING.fullmatch(entry.name)
    if owned is None and _UNOWNED_STAGING.fullmatch(entry.name) is None:
        return False  # not ours: never touched
    if owned is not None:
        pid = owned["pid"] or owned["old_pid"]
        if (owned["host"] or owned["old_host"]) == socket.gethostname():
            return int(pid) != os.getpid() and not _writer_alive(int(pid))
    # another host's process, or a name from an older embplex: only its age tells
    try:
        return now - entry.lstat().st_mtime > STALE_UNOWNED_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_staging(folder: str | Path, target: str | None = None) -> list[Path]:
    """Delete what interrupted atomic writes left in ``folder``; return what was removed.

    Only leftovers of writers that are no longer running are removed (see
    :data:`STALE_UNOWNED_SECONDS` for those whose writer cannot be checked), so a save in
    progress in another process is never touched. ``target``: only the leftovers of
    writes to ``folder/target``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    removed = []
    for entry in folder.iterdir():
        if target is not None and not entry.name.startswith((f".{target}.tmp-", f".{target}.old-")):
            continue
        if not _is_stale(entry, now):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    If anything fails, ``path`` keeps what it had before. The staging folder's name
    carries this process's id and host, so the next save of ``path`` (and the next
    training run in its folder) can delete it if this process is killed mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path.parent, target=path.name)  # what a killed earlier save of it left
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(path.name), dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{_owner()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_staging_prefix(path.name), dir=path.parent)
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
