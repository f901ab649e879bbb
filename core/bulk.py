"""Bulk encoding: a corpus streamed into Parquet shards, resumable, across processes.

::

    embplex encode encode.input=corpus.jsonl encode.output=embeddings   # a folder of shards
    torchrun --nproc_per_node 2 -m embplex encode encode.input=... encode.output=embeddings

The input is read twice and never held: once to check it and take its SHA-256, once to
encode it ``encode.shard_size`` rows at a time. Shard ``i`` holds input rows
``[i·size, (i+1)·size)``; under ``torchrun`` process ``r`` of ``W`` encodes the shards with
``i % W == r``. A shard is written atomically, then its record (rows, SHA-256) beside it;
a rerun skips every shard whose file matches its record and encodes the others again
(a shard that is missing or whose checksum differs, saying so). Each shard's vectors
depend only on its own texts, so a resumed or a multi-process run writes the same bytes
as one uninterrupted process. The output folder::

    manifest.json          the model's fingerprint, the input, the settings, every shard
    shard-00000.parquet    columns id (string) and embedding (fixed_size_list<float32>[dim])
    shard-00000.json       the shard's record, written after the shard
    ...

``manifest.json`` is written before any encoding (a folder that is not writable fails
then) and again, with ``complete: true`` and the shards, by rank 0 once every shard is
done. An output folder written with another model, input or settings is refused, naming
the differences, unless ``encode.overwrite=true``.

Inputs (:func:`describe_input`):

* a folder: a BEIR data set, its ``corpus.jsonl``;
* a ``.jsonl`` file: one JSON object per line, the id in ``id`` (or BEIR's ``_id``), the
  text in ``text``, with ``title`` put before it when there is one (as BEIR's corpus
  texts are read everywhere in embplex); blank lines are skipped;
* any other file: UTF-8 text, one text per line, the id its line number (from 1); a
  blank line is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from . import distributed, storage
from .data import jsonl_record
from .errors import InputError, ModelFileError, OutputError

if TYPE_CHECKING:
    from .model import EmbeddingModel

__all__ = ["EncodeJob", "InputSummary", "describe_input", "encode_to_shards", "read_shards", "verify_output"]

MANIFEST = "manifest.json"
FORMAT = "embplex-embeddings"
VERSION = 1


@dataclass
class InputSummary:
    """What is encoded: the file read, its kind, its rows, its size and SHA-256."""

    path: str
    kind: str  # "text", "jsonl" or "beir"
    rows: int
    bytes: int
    sha256: str


@dataclass
class EncodeJob:
    """The settings that decide the vectors and the shards (all of them in the manifest)."""

    batch_size: int
    shard_size: int
    prompt: str | None = None
    truncation: str = "warn"
    layer: int | None = None
    dim: int | None = None
    domain: str | int | None = None  # for a backbone that routes by domain (Backbone.takes_domain)


# ---------------------------------------------------------------------------
# reading the input, streamed
# ---------------------------------------------------------------------------


def _input_file(path: str | Path) -> tuple[Path, str]:
    path = Path(path).expanduser()
    if path.is_dir():
        corpus = path / "corpus.jsonl"
        if not corpus.is_file():
            raise InputError(
                f"encode.input={path} is a folder without corpus.jsonl; give a BEIR data set folder, a "
                ".jsonl file or a text file with one text per line."
            )
        return corpus, "beir"
    if not path.is_file():
        raise InputError(
            f"input file {path} does not exist; encode.input must be a text file (one text per line), a "
            ".jsonl file or a BEIR folder."
        )
    return path, "jsonl" if path.suffix == ".jsonl" else "text"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)``, lines ending at ``\\n`` only, as :func:`embplex.data.read_texts`."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark is not text
            yield number, raw


def _rows(path: Path, kind: str) -> Iterator[tuple[str, str]]:
    """``(id, text)`` per row of the input, refusing what cannot be encoded with its line."""
    for number, raw in _lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}, line {number} is not UTF-8 text ({exc}); save the file as UTF-8.") from None
        line = line[:-1] if line.endswith("\n") else line
        line = line[:-1] if line.endswith("\r") else line
        if kind == "text":
            if not line.strip():
                raise InputError(
                    f"{path}: line {number} is blank; every line is one text and one row of the output, so "
                    "remove blank lines or put a text on them."
                )
            yield str(number), line
            continue
        if not line.strip():
            continue
        record = jsonl_record(path, number, line)
        key = "id" if "id" in record else "_id"
        if record.get(key) in (None, ""):
            raise InputError(f"{path}, line {number} has no 'id' (or '_id'); every row needs one.")
        text = ((record.get("title") or "") + " " + (record.get("text") or "")).strip()
        if not text:
            raise InputError(f"{path}, line {number} (id {record[key]!r}) has no 'text' (or 'title') to encode.")
        yield str(record[key]), text


def describe_input(path: str | Path) -> InputSummary:
    """Check the whole input (every row readable) and take its size and SHA-256, reading
    it once, without holding it."""
    file, kind = _input_file(path)
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    rows = sum(1 for _ in _rows(file, kind))
    if rows == 0:
        raise InputError(f"{file} holds no text to encode.")
    return InputSummary(str(file.resolve()), kind, rows, file.stat().st_size, digest.hexdigest())


# ---------------------------------------------------------------------------
# the output folder
# ---------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _record_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.json"


def _identity(fingerprint: str, source: InputSummary, job: EncodeJob, dim: int) -> dict[str, Any]:
    """What the output folder must agree with to be resumed."""
    return {
        "model": fingerprint,
        "input": {"sha256": source.sha256, "bytes": source.bytes, "rows": source.rows, "kind": source.kind},
        "settings": asdict(job),
        "dim": dim,
    }


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    from .checkpoints import describe_differences

    return [line.replace(" in the checkpoint,", " in the output,") for line in describe_differences(saved, current)]


def _check_existing(folder: Path, identity: dict[str, Any], overwrite: bool) -> bool:
    """True when ``folder`` holds an output of another job that ``overwrite`` allows to
    replace; an error when it is not allowed."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return False
    saved = storage.read_json(manifest, "embeddings manifest")
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise InputError(f"{manifest} is not an embplex embeddings manifest; choose another encode.output.")
    earlier = {key: saved.get(key) for key in identity}
    if earlier == identity:
        return False
    if overwrite:
        return True
    differences = "; ".join(_differences(earlier, identity)) or "the manifests differ"
    raise InputError(
        f"{folder} holds embeddings written by another model, input or settings ({differences}). Choose "
        "another encode.output, or set encode.overwrite=true to replace them."
    )


def _clear(folder: Path) -> None:
    for entry in folder.glob("shard-*"):
        entry.unlink()


def _shard_done(folder: Path, index: int, start: int, stop: int) -> str | None:
    """Why shard ``index`` must be encoded (``None``: its file matches its record)."""
    record_path, shard = _record_path(folder, index), folder / shard_name(index)
    if not shard.exists():
        return "missing"
    if not record_path.exists():
        return "written without its record (killed in between)"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "its record is corrupt"
    if record.get("start") != start or record.get("stop") != stop:
        return "its record covers other rows"
    if storage.sha256_file(shard) != record.get("sha256"):
        return "corrupt (its SHA-256 differs from its record)"
    return None


def _write_shard(folder: Path, index: int, start: int, ids: list[str], vectors: np.ndarray) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    table = pa.table({"id": pa.array(ids, type=pa.string()), "embedding": embedding})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    record = {
        "file": shard_name(index),
        "start": start,
        "stop": start + len(ids),
        "rows": len(ids),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    with storage.atomic_file(folder / shard_name(index)) as handle:
        handle.write(data)
    storage.write_json(_record_path(folder, index), record)  # after the shard: its record vouches for it
    return record


def _shards(rows: int, size: int) -> list[tuple[int, int, int]]:
    return [(i, start, min(rows, start + size)) for i, start in enumerate(range(0, rows, size))]


# ---------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------


def encode_to_shards(
    model: "EmbeddingModel",
    source: str | Path,
    folder: str | Path,
    job: EncodeJob,
    fingerprint: str,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Encode ``source`` into Parquet shards in ``folder``; return the final manifest.

    Under ``torchrun`` (a process group running, or the environment of one) every process
    calls it alike and encodes its own shards; rank 0 writes the manifest.
    """
    if job.shard_size < 1 or job.batch_size < 1:
        raise InputError(f"encode.shard_size and encode.batch_size must be at least 1, not {job.shard_size} and {job.batch_size}.")
    folder = Path(folder)
    if folder.suffix == ".npy":
        raise InputError(f"{folder} names a .npy file; shards go to a folder (encode.output=<folder name>).")
    summary = describe_input(source)
    dim = job.dim or model.dim
    identity = _identity(fingerprint, summary, job, dim)
    replace = _check_existing(folder, identity, overwrite)  # every process checks: all refuse alike
    processes, rank = distributed.world_size(), distributed.rank()
    shards = _shards(summary.rows, job.shard_size)
    manifest = {"format": FORMAT, "version": VERSION, **identity, "input_path": summary.path, "complete": False, "shards": []}
    if rank == 0:
        storage.output_folder(folder)
        if replace:
            print(f"encode.overwrite=true: replacing the embeddings in {folder}", flush=True)
            _clear(folder)
        # written first: a folder that cannot be written fails before any encoding
        storage.write_json(folder / MANIFEST, manifest)
        storage.remove_stale_staging(folder)  # what killed atomic writes left (dead writers' only)
    distributed.barrier()

    mine = [(i, start, stop) for i, start, stop in shards if i % processes == rank]
    todo: dict[int, tuple[int, int]] = {}
    for index, start, stop in mine:
        why = _shard_done(folder, index, start, stop)
        if why is not None:
            if why != "missing" or _record_path(folder, index).exists():  # not merely not yet written
                print(f"shard {index} ({shard_name(index)}): {why}; encoding it again", flush=True)
            todo[index] = (start, stop)
    skipped = len(mine) - len(todo)
    if skipped:
        print(f"process {rank}: {skipped} of its {len(mine)} shards are done and verified; skipping them", flush=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(stop - start for start, stop in todo.values()), desc="Encoding", unit="text",
               disable=not (show_progress and rank == 0))
    if todo:
        file, kind = _input_file(source)
        ids: list[str] = []
        texts: list[str] = []
        last = max(todo)
        for position, (row_id, text) in enumerate(_rows(file, kind)):
            index = position // job.shard_size
            if index > last:
                break
            if index not in todo:
                continue
            ids.append(row_id)
            texts.append(text)
            if len(ids) == todo[index][1] - todo[index][0]:
                vectors = model.encode(
                    texts, batch_size=job.batch_size, prompt=job.prompt, truncation=job.truncation,
                    show_progress=False, layer=job.layer, dim=job.dim, domain=job.domain,
                )
                _write_shard(folder, index, todo[index][0], ids, vectors)
                bar.update(len(ids))
                ids, texts = [], []
    bar.close()

    distributed.barrier()  # every process's shards are written
    records = []
    for index, start, stop in shards:
        record_path = _record_path(folder, index)
        if not record_path.exists():
            raise OutputError(f"shard {index} of {folder} was not written (its record {record_path} is missing).")
        records.append(json.loads(record_path.read_text(encoding="utf-8")))
    manifest.update(complete=True, shards=records)
    if rank == 0:
        storage.write_json(folder / MANIFEST, manifest)
    distributed.barrier()
    return manifest


# ---------------------------------------------------------------------------
# reading shards back
# ---------------------------------------------------------------------------


def verify_output(folder: str | Path, fingerprint: str | None = None) -> dict[str, Any]:
    """The manifest of a complete output folder whose every shard matches its checksum,
    made by the model of ``fingerprint`` when given; an error naming what is wrong."""
    folder = Path(folder).expanduser()
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise InputError(f"{folder} holds no {MANIFEST}; give a folder written by embplex encode.")
    manifest = storage.read_json(manifest_path, "embeddings manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{manifest_path} is not an embplex embeddings manifest.")
    if not manifest.get("complete"):
        raise InputError(
            f"the embeddings in {folder} are incomplete (an encode was interrupted); rerun the same embplex "
            "encode command to finish them."
        )
    if fingerprint is not None and manifest.get("model") != fingerprint:
        raise InputError(
            f"the embeddings in {folder} were encoded by another model than the configured one (fingerprint "
            f"{str(manifest.get('model'))[:12]}…, not {fingerprint[:12]}…); configure the model that encoded "
            "them, or encode the corpus again with this one."
        )
    for record in manifest["shards"]:
        path = folder / record["file"]
        if not path.exists() or storage.sha256_file(path) != record["sha256"]:
            raise ModelFileError(
                f"{path} is {'missing' if not path.exists() else 'corrupt (its SHA-256 differs from the manifest)'}; "
                "rerun the embplex encode command that wrote the folder to encode it again."
            )
    return manifest


def read_shards(
    folder: str | Path, fingerprint: str | None = None, manifest: dict[str, Any] | None = None
) -> tuple[list[str], np.ndarray]:
    """Every id and vector of a verified output folder, in input order (``manifest``: what
    :func:`verify_output` returned for it, to skip verifying again)."""
    import pyarrow.parquet as pq

    folder = Path(folder).expanduser()
    manifest = manifest or verify_output(folder, fingerprint)
    ids: list[str] = []
    parts = []
    for record in manifest["shards"]:
        table = pq.read_table(folder / record["file"])
        ids.extend(table.column("id").to_pylist())
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        parts.append(flat.reshape(len(table), manifest["dim"]))
    return ids, np.concatenate(parts) if parts else np.zeros((0, manifest["dim"]), dtype=np.float32)

