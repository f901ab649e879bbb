"""Index ``binary``: binary codes searched by Hamming distance, rescored with float vectors.

Papers: "Binary Embedding-based Retrieval at Tencent" (BEBR; Gan et al., 2023,
arXiv:2302.08714), which composes each embedding of several binary vectors (recurrent
binarization, a chosen number of bits per dimension) and compares codes symmetrically;
and "Binary Paragraph Vectors" (Grzegorczyk and Kurdziel, 2016, arXiv:1611.01116), which
retrieves documents by the Hamming distance of short binary codes.

Each vector becomes ``bits`` sign planes (1, 2 or 4 bits per dimension): the first is the
sign of the vector, each next one the sign of what the planes so far leave unexplained
(the residual), each with a scale, the mean absolute residual. The planes are packed 8
dimensions to a byte. A query is coded the same way and scored against every item by
XOR and popcount over the packed bits (symmetric distance). ``rescore`` takes the best
``oversample × k`` items by code score and orders them by the exact float score.

Where ours differs: BEBR learns the binarization with a small residual MLP trained
embedding-to-embedding; ours is training-free (signs of residuals with per-vector
scales), so it works on any model's vectors with nothing to fit, at some cost in
quality. At 1 bit no scale is stored (all codes of unit vectors have nearly the same
one), so the codes take exactly 1/32 of float32's memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

import embplex
from embplex.components import Index, SearchResult
from embplex.errors import InputError, ModelFileError, OptionError
from embplex.indexing import (
    ItemTable,
    as_matrix,
    check_filter,
    check_k,
    check_not_empty,
    empty_result,
    load_arrays,
    read_description,
    result,
    save_arrays,
    shortlist_search,
)

FORMAT_VERSION = 1
METRICS = ("cosine", "ip")
QUERY_BLOCK = 16  # queries scored at once: a block's scores are QUERY_BLOCK x n float32
# items scored at once within a query block: the temporaries of one chunk (a few
# QUERY_BLOCK x CORPUS_CHUNK arrays) stay in the CPU cache instead of streaming through
# memory once per word and plane pair
CORPUS_CHUNK = 4096


def binarize(vectors: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Recurrent residual binarization: ``(planes [bits, n, ceil(dim/8)] uint8,
    scales [bits, n] float32)``, where ``sum_p scales[p] * (2 * unpack(planes[p]) - 1)``
    approximates the vectors."""
    residual = vectors.astype(np.float32).copy()
    planes, scales = [], []
    for _ in range(bits):
        positive = residual >= 0
        scale = np.abs(residual).mean(axis=1).astype(np.float32)
        planes.append(np.packbits(positive, axis=1))
        scales.append(scale)
        residual -= np.where(positive, scale[:, None], -scale[:, None])
    return np.stack(planes), np.stack(scales)


def _words(packed: np.ndarray) -> np.ndarray:
    """Rows of packed bits viewed as 64-bit words when they fill whole words (8x fewer
    popcounts), else as bytes."""
    packed = np.ascontiguousarray(packed)
    return packed.view(np.uint64) if packed.shape[-1] % 8 == 0 else packed


def hamming(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``[q, n]`` Hamming distances between packed codes ``[q, b]`` and ``[n, b]``.

    One word position at a time, XOR, popcount and sum written in place into three
    ``[q, n]`` buffers: the original form (``(a ^ b).astype(...)`` per word) allocated
    and converted a fresh ``[q, n]`` array three times per word, which is what made
    multi-bit search slow (profiled: docs/plugins/index/binary.md). The codes are read
    word-major (``[b, n]``) so each word's column is contiguous.
    """
    left = _words(queries)
    right = np.ascontiguousarray(_words(codes).T)
    distances = np.zeros((left.shape[0], right.shape[1]), dtype=np.int32)
    xor = np.empty(distances.shape, dtype=right.dtype)
    counts = np.empty(distances.shape, dtype=np.uint8)
    for column in range(left.shape[1]):
        np.bitwise_xor(left[:, column, None], right[column][None, :], out=xor)
        np.bitwise_count(xor, out=counts)
        distances += counts
    return distances


class DiskVectors:
    """Float32 rows in a private temporary file, memory-mapped read-only: rescoring reads
    the few rows it needs through the page cache, and the index holds none of them.
    Adds append to the file; deletes rewrite it."""

    def __init__(self, dim: int) -> None:
        self.dim, self.rows = dim, 0
        self._path: Path | None = None  # created on the first add: the constructor stays cheap
        self.view: np.ndarray = np.zeros((0, dim), dtype=np.float32)

    @property
    def path(self) -> Path:
        if self._path is None:
            folder = tempfile.mkdtemp(prefix="embplex-binary-")
            weakref.finalize(self, shutil.rmtree, folder, True)
            self._path = Path(folder) / "vectors.f32"
            self._path.touch()
        return self._path

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    def __getitem__(self, rows: Any) -> np.ndarray:
        return np.asarray(self.view[rows])

    def append(self, matrix: np.ndarray, block: int = 65536) -> None:
        with self.path.open("ab") as handle:
            for start in range(0, len(matrix), block):
                handle.write(np.ascontiguousarray(matrix[start : start + block], dtype=np.float32).tobytes())
        self.rows += len(matrix)
        self._map()

    def keep(self, rows: np.ndarray, block: int = 65536) -> None:
        staging = self.path.with_suffix(".new")
        with staging.open("wb") as handle:
            for start in range(0, len(rows), block):
                handle.write(np.ascontiguousarray(self.view[rows[start : start + block]]).tobytes())
        self.view = np.zeros((0, self.dim), dtype=np.float32)  # release the old mapping first
        os.replace(staging, self.path)
        self.rows = len(rows)
        self._map()

    def _map(self) -> None:
        self.view = (
            np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.dim))
            if self.rows else np.zeros((0, self.dim), dtype=np.float32)
        )


class BinaryIndex(Index):
    """Packed sign planes (``bits`` per dimension) with optional float rescoring."""

    def __init__(
        self,
        dim: int | None = None,
        metric: str = "cosine",
        bits: Literal[1, 2, 4] = 1,
        rescore: bool = True,
        oversample: int = 4,
        keep_vectors: bool = True,
        vectors_on_disk: bool = False,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise OptionError(f"index 'binary' needs dim, the embedding width, as a positive integer (got {dim!r}).")
        if metric not in METRICS:
            raise OptionError(f"index 'binary' metric must be one of {', '.join(METRICS)}, not {metric!r}.")
        if bits not in (1, 2, 4) or isinstance(bits, bool):
            raise OptionError(f"index 'binary' bits must be 1, 2 or 4 (bits per dimension), not {bits!r}.")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 1:
            raise OptionError(f"index 'binary' oversample must be a positive integer, not {oversample!r}.")
        if rescore and not keep_vectors:
            raise OptionError(
                "index 'binary' rescore=true needs the float vectors: set keep_vectors=true, or rescore=false "
                "to search the codes alone."
            )
        self.dim, self.metric, self.bits = int(dim), metric, bits
        if vectors_on_disk and not keep_vectors:
            raise OptionError("index 'binary' vectors_on_disk=true needs keep_vectors=true (it says where they are kept).")
        self.rescore, self.oversample, self.keep_vectors = rescore, oversample, keep_vectors
        self.vectors_on_disk = vectors_on_disk
        self._items = ItemTable()
        width = (self.dim + 7) // 8
        self._planes = np.zeros((bits, 0, width), dtype=np.uint8)
        # 1 bit: no scales kept (ranking by sign agreement needs none)
        self._scales = np.zeros((self._scale_planes, 0), dtype=np.float32)
        self._vectors: Any = DiskVectors(self.dim) if vectors_on_disk else np.zeros((0, self.dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def _scale_planes(self) -> int:
        return self.bits if self.bits > 1 else 0

    @property
    def nbytes(self) -> int:
        """Packed planes (``bits · dim / 8`` bytes per item), their scales when
        ``bits > 1`` (4 bytes per plane) and the float vectors when kept."""
        vectors = 0 if self.vectors_on_disk else self._vectors.nbytes
        return int(self._planes.nbytes + self._scales.nbytes + vectors)

    # -- contents ------------------------------------------------------------------------

    def add(self, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray], metadata: Any = None) -> None:
        matrix = self._prepare(vectors, "vectors")
        ids, metadata = self._items.check_new(ids, matrix.shape[0], metadata)
        planes, scales = binarize(matrix, self.bits)
        self._planes = np.concatenate([self._planes, planes], axis=1)
        self._scales = np.concatenate([self._scales, scales[: self._scale_planes]], axis=1)
        if self.vectors_on_disk:
            self._vectors.append(matrix)
        elif self.keep_vectors:
            self._vectors = np.concatenate([self._vectors, matrix])
        self._items.append(ids, metadata)

    def delete(self, ids: Sequence[str]) -> None:
        doomed = self._items.rows_of(ids)
        keep = np.setdiff1d(np.arange(len(self)), doomed)
        self._planes, self._scales = self._planes[:, keep], self._scales[:, keep]
        if self.vectors_on_disk:
            self._vectors.keep(keep)
        elif self.keep_vectors:
            self._vectors = self._vectors[keep]
        self._items.keep_rows(keep)

    # -- search --------------------------------------------------------------------------

    def code_scores(self, queries: np.ndarray) -> np.ndarray:
        """``[q, n]`` estimates of the float scores from the codes alone: at 1 bit the
        agreement of signs, ``(dim - 2 · hamming) / dim``; with more bits the inner
        product of the two reconstructions, ``sum_pr scale_p · scale_r · (dim - 2 ·
        hamming_pr)``."""
        planes, scales = binarize(queries, self.bits)
        total = np.empty((queries.shape[0], len(self)), dtype=np.float32)
        for start in range(0, len(self), CORPUS_CHUNK):
            stop = min(start + CORPUS_CHUNK, len(self))
            total[:, start:stop] = self._chunk_scores(planes, scales, start, stop)
        return total

    def _chunk_scores(self, planes: np.ndarray, scales: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Code scores of items ``start:stop``: every query plane against each item plane
        in one Hamming pass, then combined plane pair by plane pair in the same order and
        float32 operations as ever (the scores, hence ties and rankings, are unchanged)."""
        q = planes.shape[1]
        if self.bits == 1:
            return (self.dim - 2 * hamming(planes[0], self._planes[0, start:stop])).astype(np.float32) / self.dim
        stacked = planes.reshape(self.bits * q, -1)  # query plane r is rows r*q:(r+1)*q
        total = np.zeros((q, stop - start), dtype=np.float32)
        term = np.empty_like(total)
        for p in range(self.bits):
            agreement = (self.dim - 2 * hamming(stacked, self._planes[p, start:stop])).astype(np.float32)
            for r in range(self.bits):  # total += scale_r · scale_p · agreement, in place
                np.multiply(scales[r][:, None], self._scales[p, start:stop][None, :], out=term)
                term *= agreement[r * q : (r + 1) * q]
                total += term
        return total

    def search(
        self,
        queries: np.ndarray | Sequence[np.ndarray],
        k: int,
        *,
        filter: dict[str, Any] | None = None,
        rescore: bool | None = None,
    ) -> SearchResult:
        """The ``k`` best items per query by code score, or (``rescore``, by default the
        index's option) the best ``oversample · k`` by code score reordered by their
        float scores."""
        k = check_k(k)
        matrix = self._prepare(queries, "queries")
        allowed = self._items.allowed(check_filter(filter))
        check_not_empty(len(self), "binary")
        rescore = self.rescore if rescore is None else rescore
        if rescore and not self.keep_vectors:
            raise InputError(
                "index 'binary' was built with keep_vectors=false: it holds no float vectors to rescore "
                "with; search with rescore=false."
            )
        available = len(self) if allowed is None else int(allowed.sum())
        k = min(k, available)
        if k == 0:
            return empty_result(matrix.shape[0])
        scores, rows = shortlist_search(
            matrix, k, min(available, k * self.oversample), self.code_scores,
            vectors=self._vectors if rescore else None, allowed=allowed, block=QUERY_BLOCK,
        )
        return result(self._items.ids, rows, scores)

    def _prepare(self, vectors: Any, what: str) -> np.ndarray:
        return as_matrix(vectors, self.dim, what, "binary", normalize=self.metric == "cosine")

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """``planes.npy``, ``scales.npy``, ``vectors.npy`` and ``index.json`` (options,
        ids, metadata), checksummed by the core."""
        with embplex.storage.saving_index(path, self, "binary") as root:
            vectors = self._vectors.view if self.vectors_on_disk else self._vectors
            save_arrays(root, {"planes": self._planes, "scales": self._scales, "vectors": vectors})
            embplex.storage.write_json(
                root / "index.json",
                {"format": FORMAT_VERSION, "index": "binary", **self._options(), **self._items.to_json()},
            )

    def _options(self) -> dict[str, Any]:
        return {"dim": self.dim, "metric": self.metric, "bits": self.bits, "rescore": self.rescore,
                "oversample": self.oversample, "keep_vectors": self.keep_vectors,
                "vectors_on_disk": self.vectors_on_disk}

    @classmethod
    def load(cls, path: str | Path) -> "BinaryIndex":
        root = Path(path)
        manifest = embplex.storage.verify_index(root, "binary")
        meta = read_description(root, "binary", (FORMAT_VERSION,))
        try:
            options = ("dim", "metric", "bits", "rescore", "oversample", "keep_vectors", "vectors_on_disk")
            index = cls(**{key: meta[key] for key in options})
            items = ItemTable.from_json(meta)
        except (KeyError, OptionError, InputError) as exc:
            raise ModelFileError(f"{root / 'index.json'} is corrupt ({exc}); save the index again.") from exc
        n, width = len(items), (index.dim + 7) // 8
        arrays = load_arrays(root, {
            "planes": (np.uint8, (index.bits, n, width)),
            "scales": (np.float32, (index._scale_planes, n)),
            "vectors": (np.float32, (n if index.keep_vectors else 0, index.dim)),
        }, mapped=("vectors",) if index.vectors_on_disk else ())
        if manifest["size"] != n:
            raise ModelFileError(f"{root}: index.json lists {n} items, the manifest {manifest['size']}; save it again.")
        index._items, index._planes, index._scales = items, arrays["planes"], arrays["scales"]
        if index.vectors_on_disk:  # a private copy: the saved file never changes under its checksum
            index._vectors.append(arrays["vectors"])
        else:
            index._vectors = arrays["vectors"]
        index.built_from = manifest["built_from"]
        return index


@embplex.hookimpl
def register_indexes(register: Any) -> None:
    register(
        "binary",
        BinaryIndex,
        paper="Binary Embedding-based Retrieval at Tencent (2023), arXiv:2302.08714; Binary Paragraph Vectors (2016), arXiv:1611.01116",
    )
