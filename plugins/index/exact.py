"""Index ``exact``: brute-force exact search over single vectors.

Baseline, no paper of its own: the exact ("flat") search that approximate indexes are
measured against (cf. FAISS, "Billion-scale similarity search with GPUs", 2017,
arXiv:1702.08734). Every query is scored against every stored vector with one matrix
product per chunk, the best ``k`` of each chunk are kept with ``torch.topk`` and merged, so
memory stays at ``chunk_size x chunk_size`` scores however large the index grows. Unlike
FAISS's ``IndexFlat`` it keys items by string ids and supports deleting them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import embplex
from embplex.components import Index, SearchResult
from embplex.errors import DimensionError, InputError, ModelFileError, OptionError

FORMAT_VERSION = 1
METADATA_FILE = "index.json"
VECTORS_FILE = "vectors.safetensors"
METRICS = ("cosine", "ip")


class ExactIndex(Index):
    """Stores ``[n, dim]`` float32 vectors under unique string ids and finds the exact
    top ``k`` by cosine similarity or inner product.

    Adding an id that is already stored raises :class:`~embplex.errors.InputError`
    (delete it first to replace it): silently overwriting would hide bugs such as a corpus
    with duplicated document ids. Searching an empty index returns empty hit lists.
    """

    def __init__(self, dim: int | None = None, metric: str = "cosine", chunk_size: int = 4096) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise OptionError(
                f"index 'exact' needs dim, the embedding width, as a positive integer (got {dim!r}); "
                "embplex passes the model's dim when it builds the index."
            )
        if metric not in METRICS:
            raise OptionError(f"index 'exact' metric must be one of {', '.join(METRICS)}, not {metric!r}.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise OptionError(f"index 'exact' chunk_size must be a positive integer, not {chunk_size!r}.")
        self.dim = int(dim)
        self.metric = metric
        self.chunk_size = chunk_size
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._vectors = torch.empty(0, self.dim, dtype=torch.float32)

    # -- contents ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """Stored ids, in insertion order."""
        return list(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row_of

    def add(self, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray]) -> None:
        ids = _check_ids(ids)
        matrix = self._as_matrix(vectors, "vectors")
        if matrix.shape[0] != len(ids):
            raise InputError(f"got {len(ids)} ids but {matrix.shape[0]} vectors; pass one id per vector.")
        repeated = sorted(item_id for item_id, count in Counter(ids).items() if count > 1)
        if repeated:
            raise InputError(f"ids {_preview(repeated)} appear more than once in this add; ids must be unique.")
        stored = [i for i in ids if i in self._row_of]
        if stored:
            raise InputError(
                f"ids {_preview(stored)} are already in the index; delete them first to replace their vectors."
            )
        if self.metric == "cosine":
            matrix = torch.nn.functional.normalize(matrix, dim=-1)
        start = len(self._ids)
        self._vectors = torch.cat([self._vectors, matrix])
        self._ids.extend(ids)
        self._row_of.update({item_id: start + offset for offset, item_id in enumerate(ids)})

    def delete(self, ids: Sequence[str]) -> None:
        ids = _check_ids(ids)
        unknown = [i for i in ids if i not in self._row_of]
        if unknown:
            raise InputError(
                f"cannot delete ids {_preview(unknown)}: they are not in the index "
                f"({len(self)} items); nothing was deleted."
            )
        doomed = {self._row_of[i] for i in ids}
        keep = [row for row in range(len(self._ids)) if row not in doomed]
        self._vectors = self._vectors[keep]
        self._ids = [self._ids[row] for row in keep]
        self._row_of = {item_id: row for row, item_id in enumerate(self._ids)}

    # -- search ------------------------------------------------------------------------

    def search(self, queries: np.ndarray | Sequence[np.ndarray], k: int) -> SearchResult:
        """The ``k`` best stored items per query, best first.

        ``queries`` is ``[q, dim]`` or a single ``[dim]`` vector (answered as one row).
        ``k`` larger than the index is capped at its size; an empty index gives empty rows.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, not {k!r}.")
        matrix = self._as_matrix(queries, "queries")
        if self.metric == "cosine":
            matrix = torch.nn.functional.normalize(matrix, dim=-1)
        k = min(int(k), len(self))
        if k == 0:
            empty = np.zeros((matrix.shape[0], 0), dtype=np.float32)
            return SearchResult(ids=[[] for _ in range(matrix.shape[0])], scores=empty)
        scores, rows = self._top_k(matrix, k)
        return SearchResult(
            ids=[[self._ids[row] for row in hit_rows] for hit_rows in rows.tolist()],
            scores=scores.numpy(),
        )

    def _top_k(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        best_scores, best_rows = [], []
        with torch.inference_mode():
            for q_start in range(0, queries.shape[0], self.chunk_size):
                block = queries[q_start : q_start + self.chunk_size]
                scores = torch.full((block.shape[0], 0), float("-inf"))
                rows = torch.empty((block.shape[0], 0), dtype=torch.long)
                for s_start in range(0, len(self), self.chunk_size):
                    stored = self._vectors[s_start : s_start + self.chunk_size]
                    chunk_scores, chunk_rows = torch.topk(block @ stored.T, min(k, stored.shape[0]), dim=1)
                    # Merge with the best so far: the overall top k is inside the union.
                    scores = torch.cat([scores, chunk_scores], dim=1)
                    rows = torch.cat([rows, chunk_rows + s_start], dim=1)
                    scores, keep = torch.topk(scores, min(k, scores.shape[1]), dim=1)
                    rows = torch.gather(rows, 1, keep)
                best_scores.append(scores)
                best_rows.append(rows)
        return torch.cat(best_scores), torch.cat(best_rows)

    def _as_matrix(self, vectors: Any, what: str) -> torch.Tensor:
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().float().cpu().numpy()
        elif isinstance(vectors, (list, tuple)):
            vectors = [v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else v for v in vectors]
        try:
            array = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{what} must be a numeric array of shape [n, {self.dim}] ({exc}); "
                "index 'exact' stores one vector per item."
            ) from exc
        if array.ndim == 1 and what == "queries":
            array = array[None, :]
        if array.ndim >= 1 and array.shape[0] == 0:
            array = np.zeros((0, self.dim), dtype=np.float32)
        if array.ndim != 2:
            raise DimensionError(
                f"{what} must be a 2-D array [n, {self.dim}], got shape {tuple(array.shape)}; "
                "index 'exact' stores one vector per item."
            )
        if array.shape[1] != self.dim:
            raise DimensionError(
                f"{what} have dimension {array.shape[1]} but the index was built for dimension "
                f"{self.dim}; embed with the model the index was built for."
            )
        if not np.isfinite(array).all():
            raise InputError(f"{what} contain NaN or infinite values; check the model's output.")
        return torch.from_numpy(np.ascontiguousarray(array))

    # -- persistence -------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write ``vectors.safetensors`` and ``index.json`` to the folder ``path``,
        atomically (an interrupted save leaves the previous index in place), with the
        core's checksummed ``manifest.json``."""
        from safetensors.torch import save_file

        with embplex.storage.saving_index(path, self, "exact") as root:
            save_file({"vectors": self._vectors.contiguous()}, str(root / VECTORS_FILE))
            embplex.storage.write_json(
                root / METADATA_FILE,
                {
                    "format": FORMAT_VERSION,
                    "index": "exact",
                    "metric": self.metric,
                    "dim": self.dim,
                    "chunk_size": self.chunk_size,
                    "ids": self._ids,
                },
            )

    @classmethod
    def load(cls, path: str | Path) -> "ExactIndex":
        root = Path(path)
        manifest = embplex.storage.verify_index(root, "exact")
        meta = embplex.storage.read_json(root / METADATA_FILE, "index metadata")
        redo = "save the index again."
        if not isinstance(meta, dict) or meta.get("index") != "exact":
            raise ModelFileError(f"{root / METADATA_FILE} does not describe an 'exact' index; {redo}")
        if meta.get("format") != FORMAT_VERSION:
            raise ModelFileError(
                f"{root} has index format {meta.get('format')!r}, this embplex reads format {FORMAT_VERSION}; {redo}"
            )
        try:
            index = cls(dim=meta["dim"], metric=meta["metric"], chunk_size=meta.get("chunk_size", 4096))
            ids = _check_ids(meta["ids"])
        except (KeyError, OptionError, InputError) as exc:
            raise ModelFileError(f"{root / METADATA_FILE} is corrupt ({exc}); {redo}") from exc
        vectors = embplex.storage.load_safetensors(root / VECTORS_FILE).get("vectors")
        if vectors is None or tuple(vectors.shape) != (len(ids), index.dim) or vectors.dtype != torch.float32:
            shape = None if vectors is None else tuple(vectors.shape)
            raise ModelFileError(
                f"{root / VECTORS_FILE} does not match {METADATA_FILE} (vectors of shape {shape}, "
                f"expected ({len(ids)}, {index.dim}) float32); {redo}"
            )
        if len(set(ids)) != len(ids):
            raise ModelFileError(f"{root / METADATA_FILE} lists an id twice; {redo}")
        if (manifest["dim"], manifest["size"]) != (index.dim, len(ids)):
            raise ModelFileError(
                f"{root / METADATA_FILE} describes {len(ids)} vectors of dimension {index.dim}, its manifest "
                f"{manifest['size']} of dimension {manifest['dim']}; {redo}"
            )
        index.built_from = manifest["built_from"]
        index._vectors = vectors
        index._ids = ids
        index._row_of = {item_id: row for row, item_id in enumerate(ids)}
        return index


def _check_ids(ids: Any) -> list[str]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InputError(f"ids must be a list of strings, not {type(ids).__name__}.")
    ids = list(ids)
    wrong = [i for i in ids if not isinstance(i, str)]
    if wrong:
        raise InputError(f"ids must be strings; got {type(wrong[0]).__name__} {wrong[0]!r}. Convert them with str().")
    return ids


def _preview(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


@embplex.hookimpl
def register_indexes(register: Any) -> None:
    register(
        "exact",
        ExactIndex,
        paper="Baseline (exact search; cf. Billion-scale similarity search with GPUs (2017), arXiv:1702.08734)",
    )
