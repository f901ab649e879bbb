"""Index ``matryoshka_funnel``: search a short prefix of every vector, rescore with all of it.

Papers: "Matryoshka Representation Learning" (MRL; Kusupati et al., 2022,
arXiv:2205.13147), whose embeddings keep their meaning when cut to their first
dimensions and which proposes adaptive retrieval (shortlist with a low-dimensional prefix,
rerank with the full vector); and "2D Matryoshka Sentence Embeddings" (2DMSE; Li et al.,
2024, arXiv:2402.14776), which trains such prefixes at every depth.

The funnel scores every item on the first ``prefix`` dimensions (each prefix normalised
again under ``metric: cosine``, as a Matryoshka model's sub-embedding is used), keeps the
best ``oversample × k``, and reorders those by the full vector. Search costs about
``n · prefix + oversample · k · dim`` multiply-adds per query instead of ``n · dim``.

Where ours differs: MRL's funnel narrows in several stages (e.g. 16 → 64 → 256 → full);
ours has one stage, the prefix then the full vector. The full float vectors stay in
memory (the prefix is a view of them), so the funnel trades recall for search time, not
for memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

import embplex
from embplex.components import Index, SearchResult
from embplex.errors import InputError, ModelFileError, OptionError
from embplex.indexing import ItemTable, as_matrix, check_filter, check_k, check_not_empty, empty_result, result, shortlist_search
from embplex.indexing import load_arrays, read_description, save_arrays

FORMAT_VERSION = 1
METRICS = ("cosine", "ip")
QUERY_BLOCK = 64


class MatryoshkaFunnelIndex(Index):
    """Full float vectors, searched on a prefix and rescored in full."""

    def __init__(
        self,
        dim: int | None = None,
        metric: str = "cosine",
        prefix: int = 64,
        oversample: int = 10,
        rescore: bool = True,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise OptionError(
                f"index 'matryoshka_funnel' needs dim, the embedding width, as a positive integer (got {dim!r})."
            )
        if metric not in METRICS:
            raise OptionError(f"index 'matryoshka_funnel' metric must be one of {', '.join(METRICS)}, not {metric!r}.")
        for name, value in (("prefix", prefix), ("oversample", oversample)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"index 'matryoshka_funnel' {name} must be a positive integer, not {value!r}.")
        # embplex checks the options with dim=1 before it knows the model's width
        if dim > 1 and prefix > dim:
            raise OptionError(
                f"index 'matryoshka_funnel' prefix={prefix} is longer than the vectors (dim {dim}); "
                f"choose a prefix of at most {dim} dimensions."
            )
        self.dim, self.metric, self.prefix = int(dim), metric, prefix
        self.oversample, self.rescore = oversample, rescore
        self._items = ItemTable()
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._prefixes = np.zeros((0, min(prefix, self.dim)), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """The float32 vectors (``4 · dim`` bytes per item) and, under cosine, the
        normalised prefixes (``4 · prefix``)."""
        return int(self._vectors.nbytes + (self._prefixes.nbytes if self.metric == "cosine" else 0))

    def cost(self, k: int) -> float:
        """Multiply-adds per query relative to a full exact search: ``(n · prefix +
        oversample · k · dim) / (n · dim)`` (the x axis of a recall-against-cost curve)."""
        n = max(len(self), 1)
        rescored = min(n, self.oversample * k) * self.dim if self.rescore else 0
        return (n * min(self.prefix, self.dim) + rescored) / (n * self.dim)

    def _prefix_of(self, matrix: np.ndarray) -> np.ndarray:
        short = matrix[:, : self.prefix]
        if self.metric != "cosine":
            return short
        norms = np.linalg.norm(short, axis=1, keepdims=True)
        return np.ascontiguousarray(short / np.where(norms == 0, 1, norms), dtype=np.float32)

    def add(self, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray], metadata: Any = None) -> None:
        matrix = as_matrix(vectors, self.dim, "vectors", "matryoshka_funnel", normalize=self.metric == "cosine")
        ids, metadata = self._items.check_new(ids, matrix.shape[0], metadata)
        self._vectors = np.concatenate([self._vectors, matrix])
        if self.metric == "cosine":  # under ip the prefix is a view of the vectors
            self._prefixes = np.concatenate([self._prefixes, self._prefix_of(matrix)])
        self._items.append(ids, metadata)

    def delete(self, ids: Sequence[str]) -> None:
        doomed = self._items.rows_of(ids)
        keep = np.setdiff1d(np.arange(len(self)), doomed)
        self._vectors = self._vectors[keep]
        if self.metric == "cosine":
            self._prefixes = self._prefixes[keep]
        self._items.keep_rows(keep)

    def search(
        self,
        queries: np.ndarray | Sequence[np.ndarray],
        k: int,
        *,
        filter: dict[str, Any] | None = None,
        rescore: bool | None = None,
    ) -> SearchResult:
        """The best ``oversample · k`` items by prefix score, reordered by the full
        vectors (``rescore``, by default the index's option); without rescoring, the
        best ``k`` by prefix score with their prefix scores."""
        k = check_k(k)
        matrix = as_matrix(queries, self.dim, "queries", "matryoshka_funnel", normalize=self.metric == "cosine")
        allowed = self._items.allowed(check_filter(filter))
        check_not_empty(len(self), "matryoshka_funnel")
        rescore = self.rescore if rescore is None else rescore
        available = len(self) if allowed is None else int(allowed.sum())
        k = min(k, available)
        if k == 0:
            return empty_result(matrix.shape[0])
        stored = self._prefixes if self.metric == "cosine" else self._vectors[:, : self.prefix]
        scores, rows = shortlist_search(
            matrix, k, min(available, self.oversample * k), lambda block: self._prefix_of(block) @ stored.T,
            vectors=self._vectors if rescore else None, allowed=allowed, block=QUERY_BLOCK,
        )
        return result(self._items.ids, rows, scores)

    def save(self, path: str | Path) -> None:
        """``vectors.npy`` and ``index.json`` (options, ids, metadata), checksummed by
        the core; the prefixes are recomputed on load."""
        with embplex.storage.saving_index(path, self, "matryoshka_funnel") as root:
            save_arrays(root, {"vectors": self._vectors})
            embplex.storage.write_json(
                root / "index.json",
                {"format": FORMAT_VERSION, "index": "matryoshka_funnel", "dim": self.dim, "metric": self.metric,
                 "prefix": self.prefix, "oversample": self.oversample, "rescore": self.rescore,
                 **self._items.to_json()},
            )

    @classmethod
    def load(cls, path: str | Path) -> "MatryoshkaFunnelIndex":
        root = Path(path)
        manifest = embplex.storage.verify_index(root, "matryoshka_funnel")
        meta = read_description(root, "matryoshka_funnel", (FORMAT_VERSION,))
        try:
            index = cls(**{key: meta[key] for key in ("dim", "metric", "prefix", "oversample", "rescore")})
            items = ItemTable.from_json(meta)
        except (KeyError, OptionError, InputError) as exc:
            raise ModelFileError(f"{root / 'index.json'} is corrupt ({exc}); save the index again.") from exc
        vectors = load_arrays(root, {"vectors": (np.float32, (len(items), index.dim))})["vectors"]
        if manifest["size"] != len(items):
            raise ModelFileError(f"{root}: index.json lists {len(items)} items, the manifest {manifest['size']}.")
        index._items, index._vectors = items, vectors
        if index.metric == "cosine":
            index._prefixes = index._prefix_of(vectors)
        index.built_from = manifest["built_from"]
        return index


@embplex.hookimpl
def register_indexes(register: Any) -> None:
    register(
        "matryoshka_funnel",
        MatryoshkaFunnelIndex,
        paper="Matryoshka Representation Learning (2022), arXiv:2205.13147; 2D Matryoshka Sentence Embeddings (2024), arXiv:2402.14776",
    )
