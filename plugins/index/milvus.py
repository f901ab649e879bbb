"""Index ``milvus``: the Milvus vector database, embedded (Milvus Lite) or a server/cluster.

Not a technique of its own: an existing distributed vector database behind embplex's
index contract. Paper: "Milvus: A Purpose-Built Vector Data Management System" (Wang et
al., SIGMOD 2021; no arXiv version); the embedded mode is Milvus Lite, the ``milvus-lite``
package. Similarity search itself follows the exact/ANN baselines (cf. "Billion-scale
similarity search with GPUs", 2017, arXiv:1702.08734).

By default the index is a Milvus Lite database in a private temporary folder (nothing to
start by hand); ``uri: path/to/file.db`` keeps it in a file that later runs reopen, and
``uri: http://host:19530`` (with ``token``) talks to a Milvus server or cluster through
the same code. Items are rows of one collection: the string id is the primary key, the
vector a float field, the metadata dynamic fields that filters are translated into
Milvus expressions for. Every collection is created with ``consistency_level="Strong"``,
so a search sees the adds and deletes before it. ``pymilvus`` and ``milvus-lite`` are
imported on first use (extra ``embplex[milvus]``).

Where ours differs from a plain client: it refuses an id already stored or an unknown id
to delete (Milvus itself would upsert or ignore them), asking the database first, and a
saved Lite index is a checksummed copy of the database folder that loads into a private
working copy, so the saved folder never changes under its checksums.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

import embplex
from embplex.components import Index, SearchResult
from embplex.errors import DimensionError, InputError, ModelFileError, OptionError
from embplex.indexing import as_matrix, check_filter, check_ids, check_k, check_metadata, check_not_empty, empty_result
from embplex.indexing import preview, read_description

FORMAT_VERSION = 1
METRICS = ("cosine", "ip")
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX")
RESERVED = ("id", "vector")  # the collection's own fields: no metadata field may take their names
MAX_ID_LENGTH = 512
BATCH = 2000  # rows per insert / lookup request
LITE_FOLDER = "milvus.db"
TOKEN_VARIABLE = "EMBPLEX_MILVUS_TOKEN"
EMBEDDED_DEFAULT = (
    "leave uri unset for the embedded Milvus Lite default (a private temporary database), or give "
    "uri=path/to/file.db for a Milvus Lite file that persists"
)


def _is_server(uri: str | None) -> bool:
    return uri is not None and "://" in uri


class MilvusIndex(Index):
    """One Milvus collection of ``(id, vector, metadata)`` rows."""

    def __init__(
        self,
        dim: int | None = None,
        metric: str = "cosine",
        uri: str | None = None,
        token: str | None = None,
        collection: str = "embplex",
        index_type: Literal["FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"] = "FLAT",
        timeout: float = 30.0,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise OptionError(f"index 'milvus' needs dim, the embedding width, as a positive integer (got {dim!r}).")
        if metric not in METRICS:
            raise OptionError(f"index 'milvus' metric must be one of {', '.join(METRICS)}, not {metric!r}.")
        if index_type not in INDEX_TYPES:
            raise OptionError(f"index 'milvus' index_type must be one of {', '.join(INDEX_TYPES)}, not {index_type!r}.")
        if uri is not None and not _is_server(uri) and not str(uri).endswith(".db"):
            raise OptionError(
                f"index 'milvus' uri={uri!r} is neither a server address (http://host:19530) nor a Milvus "
                "Lite file (a path ending in .db)."
            )
        if not isinstance(collection, str) or not collection.replace("_", "a").isalnum() or collection[0].isdigit():
            raise OptionError(f"index 'milvus' collection must be letters, digits and '_' (got {collection!r}).")
        self.dim, self.metric, self.index_type, self.timeout = int(dim), metric, index_type, float(timeout)
        self.uri, self.collection = (str(uri) if uri is not None else None), collection
        self._token = token
        self._client: Any = None  # connected on first use: the constructor stays cheap
        self._workdir: str | None = None  # the private folder of a temporary Lite database

    # -- connection ----------------------------------------------------------------------

    @property
    def target(self) -> str:
        """Where the data lives: the server address or the Lite database file."""
        if self.uri is None:
            self._workdir = self._workdir or _private_folder(self)
            self.uri = str(Path(self._workdir) / LITE_FOLDER)
        return self.uri

    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        try:
            from pymilvus import MilvusClient
        except ImportError as exc:
            raise OptionError(
                "index 'milvus' needs pymilvus and milvus-lite: pip install 'embplex[milvus]'."
            ) from exc
        target = self.target
        token = self._token if self._token is not None else os.environ.get(TOKEN_VARIABLE, "")
        try:
            client = MilvusClient(uri=target, token=token, timeout=self.timeout)
        except Exception as exc:  # pymilvus raises its own exception types, and OSError for Lite files
            if _is_server(target):
                raise OptionError(
                    f"index 'milvus' cannot reach a Milvus server at uri={target} ({_first_line(exc)}). Start the "
                    f"server or fix uri and token (or ${TOKEN_VARIABLE}); or {EMBEDDED_DEFAULT}."
                ) from exc
            raise OptionError(
                f"index 'milvus' cannot open the Milvus Lite database {target} ({_first_line(exc)}). Milvus Lite "
                "lets one process at a time open a file: close the other process, or use a Milvus server "
                "(uri=http://host:19530) for several."
            ) from exc
        self._client = client
        self._adopt_collection()
        return client

    def _adopt_collection(self) -> None:
        """Reopen an existing collection, refusing one of another width."""
        client = self._client
        if not client.has_collection(self.collection):
            return
        fields = client.describe_collection(self.collection).get("fields", [])
        widths = [f.get("params", {}).get("dim") for f in fields if f.get("name") == "vector"]
        if not widths or int(widths[0]) != self.dim:
            raise DimensionError(
                f"the Milvus collection '{self.collection}' at {self.target} holds vectors of dimension "
                f"{widths[0] if widths else '?'}, not {self.dim}; choose another collection or drop it."
            )
        client.load_collection(self.collection)  # a reopened collection starts released

    def _ensure_collection(self) -> None:
        from pymilvus import DataType, MilvusClient

        client = self._connect()
        if client.has_collection(self.collection):
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        params = client.prepare_index_params()
        build = {"M": 16, "efConstruction": 200} if self.index_type == "HNSW" else {}
        if self.index_type == "IVF_FLAT":
            build = {"nlist": 128}
        params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP", params=build)
        # Strong: a search right after an insert or a delete sees it (Milvus's default,
        # Bounded, may still return a deleted id)
        client.create_collection(self.collection, schema=schema, index_params=params, consistency_level="Strong")

    def close(self) -> None:
        """Release the connection; for a Lite file, also stop its embedded server, which
        writes the data to the folder (another process can then open it)."""
        _close(self.__dict__)

    # -- contents ------------------------------------------------------------------------

    def __len__(self) -> int:
        client = self._connect()
        if not client.has_collection(self.collection):
            return 0
        rows = client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @property
    def nbytes(self) -> int:
        """The float32 vectors Milvus stores (``4 · dim`` bytes per item), held by the
        database, not by this process; Milvus's own index structures come on top."""
        return len(self) * 4 * self.dim

    def _stored(self, ids: list[str]) -> set[str]:
        client = self._connect()
        if not ids or not client.has_collection(self.collection):
            return set()
        found: set[str] = set()
        for start in range(0, len(ids), BATCH):
            rows = client.get(self.collection, ids=ids[start : start + BATCH], output_fields=["id"])
            found.update(row["id"] for row in rows)
        return found

    def add(self, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray], metadata: Any = None) -> None:
        matrix = as_matrix(vectors, self.dim, "vectors", "milvus", normalize=self.metric == "cosine")
        ids = check_ids(ids)
        if len(ids) != matrix.shape[0]:
            raise InputError(f"got {len(ids)} ids but {matrix.shape[0]} vectors; pass one id per vector.")
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            raise InputError(f"ids {preview(repeated)} appear more than once in this add; ids must be unique.")
        too_long = [i for i in ids if len(i.encode("utf-8")) > MAX_ID_LENGTH or not i]
        if too_long:
            raise InputError(f"ids {preview(too_long)} are empty or longer than {MAX_ID_LENGTH} bytes, Milvus's limit.")
        metadata = check_metadata(metadata, len(ids)) or [{} for _ in ids]
        clash = sorted({field for entry in metadata for field in entry if field in RESERVED})
        if clash:
            raise InputError(f"metadata fields {clash} are the collection's own; rename them.")
        stored = self._stored(ids)
        if stored:
            raise InputError(
                f"ids {preview(sorted(stored))} are already in the index; delete them first to replace their vectors."
            )
        if not ids:
            return
        self._ensure_collection()
        for start in range(0, len(ids), BATCH):
            rows = [
                {**metadata[row], "id": ids[row], "vector": matrix[row].tolist()}
                for row in range(start, min(start + BATCH, len(ids)))
            ]
            self._client.insert(self.collection, rows)

    def delete(self, ids: Sequence[str]) -> None:
        ids = check_ids(ids)
        unknown = sorted(set(ids) - self._stored(list(dict.fromkeys(ids))))
        if unknown:
            raise InputError(f"cannot delete ids {preview(unknown)}: they are not in the index; nothing was deleted.")
        for start in range(0, len(ids), BATCH):
            self._client.delete(self.collection, ids=ids[start : start + BATCH])

    # -- search --------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray | Sequence[np.ndarray],
        k: int,
        *,
        filter: dict[str, Any] | None = None,
        rescore: bool | None = None,
    ) -> SearchResult:
        """The ``k`` best items per query from Milvus (``rescore`` changes nothing: the
        scores are the float inner products Milvus computes)."""
        k = check_k(k)
        matrix = as_matrix(queries, self.dim, "queries", "milvus", normalize=self.metric == "cosine")
        expression = _expression(check_filter(filter))
        size = len(self)
        check_not_empty(size, "milvus")
        if matrix.shape[0] == 0:
            return empty_result(matrix.shape[0])
        search_params: dict[str, Any] = {"metric_type": "IP"}
        if self.index_type == "HNSW":
            search_params["params"] = {"ef": max(128, min(k, size))}
        hits = self._client.search(
            self.collection, data=matrix.tolist(), limit=min(k, size, 16384), filter=expression,
            output_fields=["id"], search_params=search_params,
        )
        ids = [[hit["id"] for hit in row] for row in hits]
        width = min((len(row) for row in ids), default=0)
        scores = np.array([[hit["distance"] for hit in row[:width]] for row in hits], dtype=np.float32)
        return SearchResult(ids=[row[:width] for row in ids], scores=scores.reshape(len(ids), width))

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """A Lite index: a copy of its database folder (``milvus.db/``) and
        ``index.json``; a server index: ``index.json`` with the address and collection
        (never the token). Checksummed by the core."""
        server = _is_server(self.uri)
        source = None if server else Path(self.target)
        if source is not None:
            self._connect()
            self.close()  # the embedded server writes its files when it stops: copy a complete folder
        with embplex.storage.saving_index(path, self, "milvus") as root:
            if source is not None and source.exists():
                shutil.copytree(source, root / LITE_FOLDER, ignore=shutil.ignore_patterns("LOCK"))
            embplex.storage.write_json(
                root / "index.json",
                {"format": FORMAT_VERSION, "index": "milvus", "dim": self.dim, "metric": self.metric,
                 "uri": self.uri if server else None, "collection": self.collection,
                 "index_type": self.index_type, "timeout": self.timeout},
            )

    @classmethod
    def load(cls, path: str | Path) -> "MilvusIndex":
        """Reconnect to the server, or open a private working copy of the saved Lite
        database (the saved folder is never written to)."""
        root = Path(path)
        manifest = embplex.storage.verify_index(root, "milvus")
        meta = read_description(root, "milvus", (FORMAT_VERSION,))
        try:
            options = {key: meta[key] for key in ("dim", "metric", "uri", "collection", "index_type", "timeout")}
        except KeyError as exc:
            raise ModelFileError(f"{root / 'index.json'} lacks {exc}; save the index again.") from exc
        index = cls(**options)
        if options["uri"] is None:
            index._workdir = _private_folder(index)
            if (root / LITE_FOLDER).is_dir():
                shutil.copytree(root / LITE_FOLDER, Path(index._workdir) / LITE_FOLDER)
            index.uri = str(Path(index._workdir) / LITE_FOLDER)
        if len(index) != manifest["size"]:
            raise ModelFileError(
                f"{root}: the Milvus collection '{index.collection}' holds {len(index)} items, the manifest "
                f"{manifest['size']}; save the index again."
            )
        index.built_from = manifest["built_from"]
        return index


def _private_folder(index: MilvusIndex) -> str:
    """A temporary folder removed (after the connection closes) with the index."""
    folder = tempfile.mkdtemp(prefix="embplex-milvus-")
    weakref.finalize(index, _cleanup, folder, index.__dict__)
    return folder


def _close(state: dict[str, Any]) -> None:
    """Close an index's client (its ``__dict__``) and the embedded server of its Lite file.

    Milvus Lite serves a file from a server inside this process that outlives the client
    and writes its data when it stops: stopping it is what makes the folder complete."""
    client, state["_client"] = state.get("_client"), None
    if client is not None:
        client.close()
    uri = state.get("uri")
    if uri is not None and not _is_server(uri):
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:  # pragma: no cover - milvus-lite without a server manager
            return
        release = getattr(server_manager_instance, "release_server", None)
        if release is not None:
            release(uri)


def _cleanup(folder: str, state: dict[str, Any]) -> None:
    try:
        _close(state)
    except Exception:  # the embedded server may already be gone at interpreter exit
        pass
    shutil.rmtree(folder, ignore_errors=True)


def _expression(filter: dict[str, list[Any]] | None) -> str:
    """A Milvus boolean expression for a filter checked by ``check_filter``."""
    if filter is None:
        return ""
    clauses = []
    for field, values in filter.items():
        if field in RESERVED:
            raise InputError(f"filter field {field!r} is the collection's own, not metadata.")
        literal = ", ".join(json.dumps(v) for v in values)  # JSON literals: "text", 3, 2.5, true
        clauses.append(f"{field} in [{literal}]")
    return " and ".join(clauses)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@embplex.hookimpl
def register_indexes(register: Any) -> None:
    register(
        "milvus",
        MilvusIndex,
        paper="Milvus: A Purpose-Built Vector Data Management System (SIGMOD 2021); Milvus Lite; cf. arXiv:1702.08734",
    )
