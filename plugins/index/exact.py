"""Index ``exact``: brute-force exact search over single vectors.

Baseline, no paper of its own: the exact ("flat") search that approximate indexes are
measured against (cf. FAISS, "Billion-scale similarity search with GPUs", 2017,
arXiv:1702.08734). Every query is scored against every stored vector with one matrix
product per chunk, the best ``k`` of each chunk are kept with ``torch.topk`` and merged, so
memory stays at ``chunk_size x chunk_size`` scores however large the index grows. Unlike
FAISS's ``IndexFlat`` it keys items by string ids and supports deleting them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import embplex
from embplex.components import Index, SearchResult
from embplex.errors import InputError, ModelFileError, OptionError
from embplex.indexing import ItemTable, as_matrix, check_filter, check_k, check_not_empty, empty_result

# format 2 adds the items' metadata to index.json; format 1 (no metadata) still loads
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
METADATA_FILE = "index.json"
VECTORS_FILE = "vectors.safetensors"
METRICS = ("cosine", "ip")


class ExactIndex(Index):
    """Stores ``[n, dim]`` float32 vectors under unique string ids and finds the exact
    top ``k`` by cosine similarity or inner product.

    Adding an id that is already stored raises :class:`~embplex.errors.InputError`
    (delete it first to replace it): silently overwriting would hide bugs such as a corpus
    with duplicated document ids. Searching an empty index raises
    :class:`~embplex.errors.EmptyIndexError`.
    """

    def __init__(
        self, dim: int | None = None, metric: str = "cosine", chunk_size: int = 4096, device: str = "cpu"
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise OptionError(
                f"index 'exact' needs dim, the embedding width, as a positive integer (got {dim!r}); "
                "embplex passes the model's dim when it builds the index."
            )
        if metric not in METRICS:
            raise OptionError(f"index 'exact' metric must be one of {', '.join(METRICS)}, not {metric!r}.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise OptionError(f"index 'exact' chunk_size must be a positive integer, not {chunk_size!r}.")
        from embplex.devices import resolve_device

        self.dim = int(dim)
        self.metric = metric
        self.chunk_size = chunk_size
        # where the vectors live and are scored: the run's device by default (conf/index/exact.yaml)
        self.device = resolve_device(device)
        self._items = ItemTable()
        self._vectors = torch.empty(0, self.dim, dtype=torch.float32, device=self.device)

    # -- contents ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """The float32 vectors: ``4 * dim`` bytes per item."""
        return int(self._vectors.numel() * self._vectors.element_size())

    @property
    def ids(self) -> list[str]:
        """Stored ids, in insertion order."""
        return list(self._items.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def add(self, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray], metadata: Any = None) -> None:
        matrix = self._as_matrix(vectors, "vectors")
        ids, metadata = self._items.check_new(ids, matrix.shape[0], metadata)
        if self.metric == "cosine":
            matrix = torch.nn.functional.normalize(matrix, dim=-1)
        self._vectors = torch.cat([self._vectors, matrix.to(self.device)])
        self._items.append(ids, metadata)

    def delete(self, ids: Sequence[str]) -> None:
        doomed = self._items.rows_of(ids)
        keep = np.setdiff1d(np.arange(len(self)), doomed)
        self._vectors = self._vectors[torch.from_numpy(keep).to(self.device)]
        self._items.keep_rows(keep)

    # -- search ------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray | Sequence[np.ndarray],
        k: int,
        *,
        filter: dict[str, Any] | None = None,
        rescore: bool | None = None,
    ) -> SearchResult:
        """The ``k`` best stored items per query, best first.

        ``queries`` is ``[q, dim]`` or a single ``[dim]`` vector (answered as one row).
        ``k`` larger than the index is capped at its size; an empty index is refused
        (``EmptyIndexError``); a filter nothing matches gives empty rows.
        ``filter`` keeps the items whose metadata match; ``rescore`` changes nothing (the
        scores are already those of the float vectors).
        """
        k = check_k(k)
        matrix = self._as_matrix(queries, "queries")
        check_not_empty(len(self), "exact")
        allowed = self._items.allowed(check_filter(filter))
        if self.metric == "cosine":
            matrix = torch.nn.functional.normalize(matrix, dim=-1)
        rows_searched = None if allowed is None else np.flatnonzero(allowed)
        stored = self._vectors if rows_searched is None else self._vectors[torch.from_numpy(rows_searched).to(self.device)]
        k = min(k, stored.shape[0])
        if k == 0:
            return empty_result(matrix.shape[0])
        scores, rows = self._top_k(matrix.to(self.device), stored, k)
        scores, rows = scores.cpu(), rows.cpu()
        rows = rows.numpy() if rows_searched is None else rows_searched[rows.numpy()]
        ids = self._items.ids
        return SearchResult(ids=[[ids[row] for row in hit_rows] for hit_rows in rows.tolist()], scores=scores.numpy())

    def _top_k(self, queries: torch.Tensor, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        best_scores, best_rows = [], []
        with torch.inference_mode():
            for q_start in range(0, queries.shape[0], self.chunk_size):
                block = queries[q_start : q_start + self.chunk_size]
                scores = torch.full((block.shape[0], 0), float("-inf"), device=block.device)
                rows = torch.empty((block.shape[0], 0), dtype=torch.long, device=block.device)
                for s_start in range(0, vectors.shape[0], self.chunk_size):
                    stored = vectors[s_start : s_start + self.chunk_size]
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
        return torch.from_numpy(as_matrix(vectors, self.dim, what, "exact"))

    # -- persistence -------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write ``vectors.safetensors`` and ``index.json`` to the folder ``path``,
        atomically (an interrupted save leaves the previous index in place), with the
        core's checksummed ``manifest.json``."""
        from safetensors.torch import save_file

        with embplex.storage.saving_index(path, self, "exact") as root:
            save_file({"vectors": self._vectors.cpu().contiguous()}, str(root / VECTORS_FILE))
            embplex.storage.write_json(
                root / METADATA_FILE,
                {
                    "format": FORMAT_VERSION,
                    "index": "exact",
                    "metric": self.metric,
                    "dim": self.dim,
                    "chunk_size": self.chunk_size,
                    **self._items.to_json(),
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
        if meta.get("format") not in READABLE_FORMATS:
            raise ModelFileError(
                f"{root} has index format {meta.get('format')!r}, this embplex reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}; {redo}"
            )
        try:
            index = cls(dim=meta["dim"], metric=meta["metric"], chunk_size=meta.get("chunk_size", 4096))
            items = ItemTable.from_json(meta)
        except (KeyError, OptionError, InputError) as exc:
            raise ModelFileError(f"{root / METADATA_FILE} is corrupt ({exc}); {redo}") from exc
        ids = items.ids
        vectors = embplex.storage.load_safetensors(root / VECTORS_FILE).get("vectors")
        if vectors is None or tuple(vectors.shape) != (len(ids), index.dim) or vectors.dtype != torch.float32:
            shape = None if vectors is None else tuple(vectors.shape)
            raise ModelFileError(
                f"{root / VECTORS_FILE} does not match {METADATA_FILE} (vectors of shape {shape}, "
                f"expected ({len(ids)}, {index.dim}) float32); {redo}"
            )
        if (manifest["dim"], manifest["size"]) != (index.dim, len(ids)):
            raise ModelFileError(
                f"{root / METADATA_FILE} describes {len(ids)} vectors of dimension {index.dim}, its manifest "
                f"{manifest['size']} of dimension {manifest['dim']}; {redo}"
            )
        index.built_from = manifest["built_from"]
        index._vectors = vectors
        index._items = items
        return index


@embplex.hookimpl
def register_indexes(register: Any) -> None:
    register(
        "exact",
        ExactIndex,
        paper="Baseline (exact search; cf. Billion-scale similarity search with GPUs (2017), arXiv:1702.08734)",
    )
