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


def _popcount_rows(packed: np.ndarray) -> np.ndarray:
    """Rows of packed bits viewed as 64-bit words when they fill whole words (8x fewer
    popcounts), else as bytes."""
    if packed.shape[-1] % 8 == 0:
        return packed.view(np.uint64)
    return packed


def hamming(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``[q, n]`` Hamming distances between packed codes ``[q, b]`` and ``[n, b]``."""
    left, right = _popcount_rows(np.ascontiguousarray(queries)), _popcount_rows(np.ascontiguousarray(codes))
    distances = np.zeros((left.shape[0], right.shape[0]), dtype=np.int32)
    for column in range(left.shape[1]):  # one word at a time keeps the temporary [q, n]
        distances += np.bitwise_count(left[:, column, None] ^ right[None, :, column]).astype(np.int32)
    return distances


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
        self.rescore, self.oversample, self.keep_vectors = rescore, oversample, keep_vectors
        self._items = ItemTable()
        width = (self.dim + 7) // 8
        self._planes = np.zeros((bits, 0, width), dtype=np.uint8)
        # 1 bit: no scales kept (ranking by sign agreement needs none)
        self._scales = np.zeros((self._scale_planes, 0), dtype=np.float32)
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def _scale_planes(self) -> int:
        return self.bits if self.bits > 1 else 0

    @property
    def nbytes(self) -> int:
        """Packed planes (``bits · dim / 8`` bytes per item), their scales when
        ``bits > 1`` (4 bytes per plane) and the float vectors when kept."""
        return int(self._planes.nbytes + self._scales.nbytes + self._vectors.nbytes)

    # -- contents ------------------------------------------------------------------------

    def add(self, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray], metadata: Any = None) -> None:
        matrix = self._prepare(vectors, "vectors")
        ids, metadata = self._items.check_new(ids, matrix.shape[0], metadata)
        planes, scales = binarize(matrix, self.bits)
        self._planes = np.concatenate([self._planes, planes], axis=1)
        self._scales = np.concatenate([self._scales, scales[: self._scale_planes]], axis=1)
        if self.keep_vectors:
            self._vectors = np.concatenate([self._vectors, matrix])
        self._items.append(ids, metadata)

    def delete(self, ids: Sequence[str]) -> None:
        doomed = self._items.rows_of(ids)
        keep = np.setdiff1d(np.arange(len(self)), doomed)
        self._planes, self._scales = self._planes[:, keep], self._scales[:, keep]
        if self.keep_vectors:
            self._vectors = self._vectors[keep]
        self._items.keep_rows(keep)

    # -- search --------------------------------------------------------------------------

    def code_scores(self, queries: np.ndarray) -> np.ndarray:
        """``[q, n]`` estimates of the float scores from the codes alone: at 1 bit the
        agreement of signs, ``(dim - 2 · hamming) / dim``; with more bits the inner
        product of the two reconstructions, ``sum_pr scale_p · scale_r · (dim - 2 ·
        hamming_pr)``."""
        planes, scales = binarize(queries, self.bits)
        if self.bits == 1:
            return (self.dim - 2 * hamming(planes[0], self._planes[0])).astype(np.float32) / self.dim
        total = np.zeros((queries.shape[0], len(self)), dtype=np.float32)
        for p in range(self.bits):
            for r in range(self.bits):
                agreement = (self.dim - 2 * hamming(planes[r], self._planes[p])).astype(np.float32)
                total += scales[r][:, None] * self._scales[p][None, :] * agreement
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
            save_arrays(root, {"planes": self._planes, "scales": self._scales, "vectors": self._vectors})
            embplex.storage.write_json(
                root / "index.json",
                {"format": FORMAT_VERSION, "index": "binary", **self._options(), **self._items.to_json()},
            )

    def _options(self) -> dict[str, Any]:
        return {"dim": self.dim, "metric": self.metric, "bits": self.bits, "rescore": self.rescore,
                "oversample": self.oversample, "keep_vectors": self.keep_vectors}

    @classmethod
    def load(cls, path: str | Path) -> "BinaryIndex":
        root = Path(path)
        manifest = embplex.storage.verify_index(root, "binary")
        meta = read_description(root, "binary", (FORMAT_VERSION,))
        try:
            index = cls(**{key: meta[key] for key in ("dim", "metric", "bits", "rescore", "oversample", "keep_vectors")})
            items = ItemTable.from_json(meta)
        except (KeyError, OptionError, InputError) as exc:
            raise ModelFileError(f"{root / 'index.json'} is corrupt ({exc}); save the index again.") from exc
        n, width = len(items), (index.dim + 7) // 8
        arrays = load_arrays(root, {
            "planes": (np.uint8, (index.bits, n, width)),
            "scales": (np.float32, (index._scale_planes, n)),
            "vectors": (np.float32, (n if index.keep_vectors else 0, index.dim)),
        })
        if manifest["size"] != n:
            raise ModelFileError(f"{root}: index.json lists {n} items, the manifest {manifest['size']}; save it again.")
        index._items, index._planes, index._scales, index._vectors = items, arrays["planes"], arrays["scales"], arrays["vectors"]
        index.built_from = manifest["built_from"]
        return index


@embplex.hookimpl
def register_indexes(register: Any) -> None:
    register(
        "binary",
        BinaryIndex,
        paper="Binary Embedding-based Retrieval at Tencent (2023), arXiv:2302.08714; Binary Paragraph Vectors (2016), arXiv:1611.01116",
    )
