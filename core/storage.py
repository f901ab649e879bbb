"""Atomic writes and safe reads. Nothing here ever unpickles arbitrary objects."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

import torch

from .errors import DimensionError, EmbplexError, ModelFileError, OutputError

if TYPE_CHECKING:
    from .components import Index


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an operating-system error while writing ``path`` (a read-only folder, a full
    disk) into one :class:`OutputError` that names the path."""
    try:
        yield
    except EmbplexError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(
            f"cannot write {path}: {reason}. Check that its folder is writable and the disk has "
            "space, or choose another output_dir; nothing was left half-written."
        ) from exc


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, and the folders holding them, to the disk."""
    for item in sorted(root.rglob("*")):
        if item.is_file():
            with item.open("rb") as handle:
                os.fsync(handle.fileno())
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_directory(folder)


def _fsync_directory(folder: Path) -> None:
    # A rename is durable only once the folder holding it is flushed. Windows cannot open
    # a folder for that (and its renames do not need it).
    if os.name == "nt":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path.parent, target=path.name)  # what a killed earlier save of it left
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(path.name), dir=path.parent))
        try:
            yield staging
            _fsync_tree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{_owner()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        try:
            os.replace(staging, path)
        except OSError:
            if old is not None:  # put the previous contents back where they were
                os.replace(old, path)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_directory(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def output_folder(path: str | Path) -> Path:
    """Create the folder ``path`` (and its parents) for outputs, or say why it cannot be."""
    path = Path(path)
    with _writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write, in ``path``'s folder; on success it is flushed to the disk
    and replaces ``path`` in one step.

    If anything fails, ``path`` keeps what it had before and the temporary file is
    removed; an operating-system error (read-only folder, full disk) becomes an
    :class:`~embplex.errors.OutputError` naming ``path``.
    """
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, staging = tempfile.mkstemp(prefix=_staging_prefix(path.name), dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, path)
            _fsync_directory(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read in blocks (files may be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# -- saved indexes -----------------------------------------------------------------------

INDEX_MANIFEST = "manifest.json"
INDEX_MANIFEST_FORMAT = 1


@contextlib.contextmanager
def saving_index(path: str | Path, index: "Index", name: str) -> Iterator[Path]:
    """Save an index atomically, with a checksum of every file it writes.

    The index plugin writes its files into the yielded (staging) folder; on success the
    core adds ``manifest.json`` -- the plugin ``name``, ``index.dim``, ``len(index)``,
    ``index.built_from`` and the SHA-256 of every file -- and the folder replaces ``path``
    in one step. :func:`verify_index` checks all of it on load::

        with embplex.storage.saving_index(path, self, "exact") as root:
            save_file({"vectors": ...}, str(root / "vectors.safetensors"))
    """
    with atomic_directory(path) as root:
        yield root
        checksums = checksum_tree(root)
        write_json(
            root / INDEX_MANIFEST,
            {
                "format": INDEX_MANIFEST_FORMAT,
                "index": name,
                "dim": int(index.dim),
                "size": len(index),
                "built_from": getattr(index, "built_from", None),
                "sha256": checksums,
            },
        )


def read_index_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an index saved with :func:`saving_index` (no checksums verified:
    cheap, for deciding whether a saved index is the one wanted)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelFileError(f"no saved index at {root}: the folder does not exist; build the index first.")
    manifest_path = root / INDEX_MANIFEST
    if not manifest_path.exists():
        raise ModelFileError(
            f"{root} has no {INDEX_MANIFEST}: it was not saved by embplex's index helper (or was saved "
            "before indexes recorded checksums), so its contents cannot be verified; build the index again."
        )
    manifest = read_json(manifest_path, "index manifest")
    fields = {"format": int, "index": str, "dim": int, "size": int, "sha256": dict}
    if not isinstance(manifest, dict) or any(not isinstance(manifest.get(k), t) for k, t in fields.items()):
        raise ModelFileError(f"{manifest_path} is corrupt (fields {', '.join(fields)} expected); build the index again.")
    if manifest["format"] != INDEX_MANIFEST_FORMAT:
        raise ModelFileError(
            f"{manifest_path} has format {manifest['format']}, this embplex reads format "
            f"{INDEX_MANIFEST_FORMAT}; build the index again."
        )
    return manifest


def verify_index(path: str | Path, name: str, dim: int | None = None) -> dict[str, Any]:
    """Check a saved index before its plugin reads it, and return its manifest.

    Refuses (:class:`~embplex.errors.ModelFileError`, :class:`~embplex.errors.DimensionError`)
    an index saved by another plugin than ``name``, of another dimension than ``dim``
    (when given), with a file missing or with bytes that differ from the recorded SHA-256.
    """
    root = Path(path)
    manifest = read_index_manifest(root)
    if manifest["index"] != name:
        raise ModelFileError(
            f"{root} holds an index saved by the '{manifest['index']}' index plugin, not '{name}'; "
            f"load it with index={manifest['index']}, or build a '{name}' index."
        )
    if dim is not None and manifest["dim"] != dim:
        raise DimensionError(
            f"{root} holds vectors of dimension {manifest['dim']}, but dimension {dim} was expected "
            "(a different model?); build the index again with this model."
        )
    verify_checksums(root, manifest["sha256"], root / INDEX_MANIFEST, remedy="build the index again")
    return manifest


def checksum_tree(root: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative/path: sha256}`` for every file under ``root`` except ``skip``
    (paths relative to ``root``, with ``/`` separators)."""
    root = Path(root)
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() not in skip
    }


def verify_checksums(
    root: str | Path, recorded: dict[str, str], record: str | Path, remedy: str = "save the model again"
) -> None:
    """Raise :class:`ModelFileError` naming the first file under ``root`` that is missing
    or whose bytes differ from its checksum in ``recorded`` (read from ``record``);
    ``remedy`` is what the message tells the user to do."""
    root = Path(root)
    for name, expected in sorted(recorded.items()):
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelFileError(f"{record} lists {name!r}, which is outside {root}; {remedy}.")
        if not path.is_file():
            raise ModelFileError(
                f"{path} is missing: {record} lists it as part of what was saved. Restore it "
                f"from a backup or {remedy}."
            )
        if sha256_file(path) != expected:
            raise ModelFileError(
                f"{path} is corrupt: its bytes no longer match the SHA-256 recorded in {record} "
                f"when it was saved (disk corruption, a partial copy or an edit). Restore the file "
                f"from a backup or {remedy}; loading it would give wrong vectors."
            )