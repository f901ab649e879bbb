"""Index ``faiss``: approximate nearest-neighbour search through the FAISS library.

Paper: "Billion-scale similarity search with GPUs" (Johnson, Douze and Jégou, 2017,
arXiv:1702.08734) and "The Faiss library" (Douze et al., 2024, arXiv:2401.08281); the
structures it exposes are HNSW ("Efficient and robust approximate nearest neighbor search
using Hierarchical Navigable Small World graphs", Malkov and Yashunin, 2016,
arXiv:1603.09320) and IVF-PQ (product quantization, Jégou, Douze and Schmid, 2011, TPAMI).
Three settings behind one option: ``structure: flat`` (exact inner products), ``hnsw`` (a
graph, float vectors kept) and ``ivfpq`` (inverted lists of product-quantized codes).

Where ours differs from plain FAISS: items are keyed by string ids (mapped to int64
labels), carry metadata that filters a search (a FAISS ``IDSelector``), and can be deleted
from every structure — HNSW cannot remove graph nodes, so a deleted item stays in the graph as
a tombstone that searches skip. An IVF-PQ index needs training data: until it has
``train_size`` items it keeps them as float vectors and searches them exactly, then
trains on all of them at once. ``faiss-cpu`` is imported only when an index is built
(extra ``embplex[faiss]``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

import embplex
from embplex.components import Index, SearchResult
from embplex.errors import InputError, ModelFileError, OptionError
from embplex.indexing import ItemTable, as_matrix, check_filter, check_k, check_not_empty, empty_result, read_description, result, top_k

FORMAT_VERSION = 1
METADATA_FILE = "index.json"
FAISS_FILE = "faiss.index"
PENDING_FILE = "pending.npy"
METRICS = ("cosine", "ip")
STRUCTURES = ("flat", "hnsw", "ivfpq")


def _faiss(threads: int | None = None) -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise OptionError(
            "index 'faiss' needs the faiss-cpu package: pip install 'embplex[faiss]' (or faiss-cpu)."
        ) from exc
    if threads is not None:
        # OpenMP's thread count is process-wide in faiss; on a busy machine more threads
        # than free cores make k-means and search many times slower
        faiss.omp_set_num_threads(threads)
    return faiss


class FaissIndex(Index):
    """String ids and metadata over a FAISS ``flat``, ``hnsw`` or ``ivfpq`` index
    (inner product; ``metric: cosine`` normalises vectors and queries first)."""

    def __init__(
        self,
        dim: int | None = None,
        metric: str = "cosine",
        structure: Literal["flat", "hnsw", "ivfpq"] = "hnsw",
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        nlist: int = 1024,
        pq_m: int = 16,
        pq_bits: int = 8,
        nprobe: int = 32,
        train_size: int | None = None,
        threads: int | None = None,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise OptionError(f"index 'faiss' needs dim, the embedding width, as a positive integer (got {dim!r}).")
        if metric not in METRICS:
            raise OptionError(f"index 'faiss' metric must be one of {', '.join(METRICS)}, not {metric!r}.")
        if structure not in STRUCTURES:
            raise OptionError(f"index 'faiss' structure must be one of {', '.join(STRUCTURES)}, not {structure!r}.")
        numbers = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search, "nlist": nlist,
                   "pq_m": pq_m, "nprobe": nprobe}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"index 'faiss' {name} must be a positive integer, not {value!r}.")
        if pq_bits not in (4, 5, 6, 7, 8):
            raise OptionError(f"index 'faiss' pq_bits must be between 4 and 8 (bits per PQ code), not {pq_bits!r}.")
        if structure == "ivfpq" and dim % pq_m and dim != 1:
            raise OptionError(
                f"index 'faiss' pq_m={pq_m} must divide the dimension {dim} (each sub-quantizer codes "
                f"dim/pq_m values); choose a divisor of {dim}, e.g. {_divisor_near(dim, pq_m)}."
            )
        if train_size is not None and (isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1):
            raise OptionError(f"index 'faiss' train_size must be a positive integer or null, not {train_size!r}.")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise OptionError(f"index 'faiss' threads must be a positive integer or null, not {threads!r}.")
        self.dim, self.metric, self.structure = int(dim), metric, structure
        self.options = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search,
                        "nlist": nlist, "pq_m": pq_m, "pq_bits": pq_bits, "nprobe": nprobe, "train_size": train_size, "threads": threads}
        self._items = ItemTable()
        self._labels = np.zeros(0, dtype=np.int64)  # label of each row of _items
        self._next_label = 0
        self._tombstones = 0  # deleted HNSW nodes still in the graph
        self._pending = np.zeros((0, self.dim), dtype=np.float32)  # IVF-PQ rows before training
        self._index: Any = None  # built on first add: the constructor stays cheap

    # -- structure ----------------------------------------------------------------------

    @property
    def trained(self) -> bool:
        return self.structure != "ivfpq" or (self._index is not None and self._index.is_trained)

    @property
    def minimum_training(self) -> int:
        """IVF-PQ items needed before training: enough for k-means on the coarse lists
        and on each sub-quantizer's codebook."""
        return self.options["train_size"] or max(self.options["nlist"], 2 ** self.options["pq_bits"])

    def _build(self) -> Any:
        faiss, o = _faiss(), self.options
        if self.structure == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.structure == "hnsw":
            graph = faiss.IndexHNSWFlat(self.dim, o["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = o["ef_construction"]
            return faiss.IndexIDMap2(graph)
        quantizer = faiss.IndexFlatIP(self.dim)
        # faiss's Python wrapper keeps the quantizer alive as long as the IVF index
        return faiss.IndexIVFPQ(quantizer, self.dim, o["nlist"], o["pq_m"], o["pq_bits"], faiss.METRIC_INNER_PRODUCT)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Vectors or codes, graph links and label maps held by FAISS, plus the float
        vectors of an IVF-PQ index that is not trained yet."""
        held = self._pending.nbytes
        if self._index is None or not self.trained:
            return int(held)
        faiss, total = _faiss(), self._index.ntotal
        if self.structure == "flat":
            return int(held + total * (4 * self.dim + 8))
        if self.structure == "hnsw":
            graph = faiss.downcast_index(self._index.index)
            links = graph.hnsw.neighbors.size() * 4 + graph.hnsw.offsets.size() * 8 + graph.hnsw.levels.size() * 4
            return int(held + total * (4 * self.dim + 8) + links)
        ivf = self._index
        centroids = self.options["nlist"] * self.dim * 4 + ivf.pq.centroids.size() * 4
        return int(held + total * (ivf.code_size + 8) + centroids)

    # -- contents ------------------------------------------------------------------------

    def add(self, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray], metadata: Any = None) -> None:
        matrix = self._prepare(vectors, "vectors")
        ids, metadata = self._items.check_new(ids, matrix.shape[0], metadata)
        _faiss(self.options["threads"])
        if self._index is None:
            self._index = self._build()
        labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
        if self.trained:
            self._index.add_with_ids(matrix, labels)
        else:
            self._pending = np.concatenate([self._pending, matrix])
            if len(self._pending) >= self.minimum_training:
                self._index.train(self._pending)
                self._index.add_with_ids(self._pending, np.concatenate([self._labels, labels]))
                self._pending = np.zeros((0, self.dim), dtype=np.float32)
        self._next_label += len(ids)
        self._labels = np.concatenate([self._labels, labels])
        self._items.append(ids, metadata)

    def delete(self, ids: Sequence[str]) -> None:
        doomed = self._items.rows_of(ids)
        keep = np.setdiff1d(np.arange(len(self)), doomed)
        if not self.trained:
            self._pending = self._pending[keep]
        elif self.structure == "hnsw":
            self._tombstones += len(doomed)  # HNSW graphs cannot drop nodes: skipped at search
        else:
            self._index.remove_ids(_faiss().IDSelectorBatch(self._labels[doomed]))
        self._labels = self._labels[keep]
        self._items.keep_rows(keep)

    # -- search --------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray | Sequence[np.ndarray],
        k: int,
        *,
        filter: dict[str, Any] | None = None,
        rescore: bool | None = None,
    ) -> SearchResult:
        """The ``k`` best items per query. ``rescore=True`` is refused by a trained
        IVF-PQ index, which keeps only codes; flat and HNSW scores are already the float
        inner products."""
        k = check_k(k)
        matrix = self._prepare(queries, "queries")
        allowed = self._items.allowed(check_filter(filter))
        check_not_empty(len(self), "faiss")
        if rescore and self.structure == "ivfpq" and self.trained:
            raise InputError(
                "index 'faiss' structure ivfpq keeps only product-quantized codes, no float vectors to rescore "
                "with; search with rescore=false, or use structure flat or hnsw, or the binary index."
            )
        rows = np.arange(len(self)) if allowed is None else np.flatnonzero(allowed)
        k = min(k, len(rows))
        if k == 0:
            return empty_result(matrix.shape[0])
        if not self.trained:  # IVF-PQ before training: exact search over its float rows
            scores = np.full((matrix.shape[0], len(self)), -np.inf, dtype=np.float32)
            scores[:, rows] = matrix @ self._pending[rows].T
            best, columns = top_k(scores, k)
            return result(self._items.ids, columns, best)
        restrict = allowed is not None or self._tombstones > 0
        labels = self._labels[rows] if restrict else None
        scores, found = self._search(matrix, k, labels, exhaustive=False)
        short = np.flatnonzero((found[:, :k] < 0).any(axis=1))
        if len(short):  # a filter the graph or the probed lists could not satisfy: look everywhere
            scores[short], found[short] = self._search(matrix[short], k, labels, exhaustive=True)
        row_of_label = {int(label): row for row, label in enumerate(self._labels.tolist())}
        found_rows = np.vectorize(lambda label: row_of_label.get(int(label), -1), otypes=[np.int64])(found)
        return result(self._items.ids, found_rows, scores)

    def _search(self, matrix: np.ndarray, k: int, labels: np.ndarray | None, exhaustive: bool) -> tuple[np.ndarray, np.ndarray]:
        faiss, o = _faiss(self.options["threads"]), self.options
        selector = None if labels is None else faiss.IDSelectorBatch(labels)
        if self.structure == "hnsw":
            ef = max(o["ef_search"], k) if not exhaustive else max(self._index.ntotal, k)
            params = faiss.SearchParametersHNSW(efSearch=ef, sel=selector)
        elif self.structure == "ivfpq":
            params = faiss.SearchParametersIVF(nprobe=o["nlist"] if exhaustive else o["nprobe"], sel=selector)
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, found = self._index.search(matrix, k, params=params)
        return scores, found

    def _prepare(self, vectors: Any, what: str) -> np.ndarray:
        return as_matrix(vectors, self.dim, what, "faiss", normalize=self.metric == "cosine")

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """``faiss.index`` (FAISS's own binary format, no pickle), ``pending.npy`` and
        ``index.json`` (options, ids, labels, metadata), checksummed by the core."""
        faiss = _faiss() if self._index is not None else None
        with embplex.storage.saving_index(path, self, "faiss") as root:
            if self._index is not None:
                (root / FAISS_FILE).write_bytes(faiss.serialize_index(self._index).tobytes())
            with (root / PENDING_FILE).open("wb") as handle:
                np.save(handle, self._pending, allow_pickle=False)
            embplex.storage.write_json(
                root / METADATA_FILE,
                {
                    "format": FORMAT_VERSION, "index": "faiss", "dim": self.dim, "metric": self.metric,
                    "structure": self.structure, "options": self.options, "labels": self._labels.tolist(),
                    "next_label": self._next_label, "tombstones": self._tombstones, **self._items.to_json(),
                },
            )

    @classmethod
    def load(cls, path: str | Path) -> "FaissIndex":
        root = Path(path)
        manifest = embplex.storage.verify_index(root, "faiss")
        meta = read_description(root, "faiss", (FORMAT_VERSION,))
        redo = "save the index again."
        try:
            index = cls(dim=meta["dim"], metric=meta["metric"], structure=meta["structure"], **meta["options"])
            items = ItemTable.from_json(meta)
            labels = np.asarray(meta["labels"], dtype=np.int64)
            pending = np.load(io.BytesIO((root / PENDING_FILE).read_bytes()), allow_pickle=False)
        except (KeyError, TypeError, ValueError, OptionError, InputError, OSError) as exc:
            raise ModelFileError(f"{root} holds a corrupt faiss index ({exc}); {redo}") from exc
        if (root / FAISS_FILE).exists():
            faiss = _faiss()
            try:
                index._index = faiss.deserialize_index(np.frombuffer((root / FAISS_FILE).read_bytes(), dtype=np.uint8))
            except RuntimeError as exc:
                raise ModelFileError(f"{root / FAISS_FILE} is corrupt ({exc}); {redo}") from exc
        stored = (index._index.ntotal if index._index is not None and index._index.is_trained else 0) + len(pending)
        expected = len(items) + (meta["tombstones"] if meta["structure"] == "hnsw" else 0)
        if len(labels) != len(items) or stored != expected or pending.shape[1:] != (index.dim,):
            raise ModelFileError(f"{root}: the faiss index, its pending vectors and its ids do not match; {redo}")
        if manifest["size"] != len(items):
            raise ModelFileError(f"{root}: index.json lists {len(items)} items, the manifest {manifest['size']}; {redo}")
        index._items, index._labels, index._pending = items, labels, pending.astype(np.float32)
        index._next_label, index._tombstones = int(meta["next_label"]), int(meta["tombstones"])
        index.built_from = manifest["built_from"]
        return index


def _divisor_near(dim: int, wanted: int) -> int:
    return min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: abs(d - wanted))


@embplex.hookimpl
def register_indexes(register: Any) -> None:
    register(
        "faiss",
        FaissIndex,
        paper="Billion-scale similarity search with GPUs (2017), arXiv:1702.08734; HNSW arXiv:1603.09320",
    )
