"""Index ``muvera``: multi-vector search through fixed-dimensional encodings, re-ranked by Chamfer.

Paper: MUVERA: Multi-Vector Retrieval via Fixed Dimensional Encodings (Dhulipala, Hadian,
Jayaram, Lee & Mirrokni, 2024, arXiv:2405.19504); reference implementation in
google/graph-mining (``sketching/point_cloud/fixed_dimensional_encoding*``). Each set of
vectors becomes one fixed-dimensional encoding (FDE): in each of ``r_reps`` repetitions
``k_sim`` random hyperplanes (SimHash) cut the space into ``2**k_sim`` partitions,
numbered by Gray code; the vectors of each partition are projected to ``d_proj``
dimensions and summed (queries) or averaged (documents, whose empty partitions take the
vector nearest to them); the blocks are concatenated, optionally count-sketched to
``final_dim``. The FDE inner product approximates the Chamfer similarity, so a
single-vector index (any plugin, named by ``inner``) finds ``candidates`` per query,
which are then re-ranked by their exact Chamfer score. Ours differs from the reference in
the inner projection (a dense random ±1/sqrt(d_proj) map as in the paper, not a sparse
count sketch), in its defaults (the paper's end-to-end setting, not the reference's
single identity repetition) and in keeping the random matrices in the saved index.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

import embplex
from embplex.components import Index, SearchResult
from embplex.errors import DimensionError, InputError, ModelFileError, OptionError
from embplex.indexing import check_k, check_not_empty

FORMAT_VERSION = 1
METADATA_FILE = "index.json"
SETS_FILE = "sets.safetensors"
RANDOM_FILE = "projections.safetensors"
INNER_FOLDER = "inner"
METRICS = ("cosine", "ip")
#: Sets turned into FDEs at once, and the most similarity scores held while re-ranking.
ENCODE_BATCH = 256
SCORE_BUDGET = 1 << 24


class MuveraIndex(Index):
    """Stores a set of ``[tokens, dim]`` vectors per id; finds candidates by FDE inner
    product in an inner single-vector index and ranks them by exact Chamfer similarity
    ``sum_q max_d <q, d>`` (on unit vectors with ``metric: cosine``)."""

    #: It stores sets of vectors, not one vector per item (suites of single-vector checks skip it).
    multi_vector = True

    def __init__(
        self,
        dim: int | None = None,
        metric: str = "cosine",
        k_sim: int = 5,
        r_reps: int = 20,
        d_proj: int | None = 16,
        final_dim: int | None = None,
        fill_empty: bool = True,
        seed: int = 1,
        candidates: int | None = 100,
        inner: str | dict[str, Any] = "exact",
        *,
        registry: embplex.Registry | None = None,
    ) -> None:
        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                also = " or null" if allow_none else ""
                raise OptionError(f"index 'muvera' {name} must be a positive integer{also}, not {value!r}.")

        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise OptionError(
                f"index 'muvera' needs dim, the width of each vector of a set, as a positive integer (got {dim!r}); "
                "embplex passes the model's dim when it builds the index."
            )
        if metric not in METRICS:
            raise OptionError(f"index 'muvera' metric must be one of {', '.join(METRICS)}, not {metric!r}.")
        if isinstance(k_sim, bool) or not isinstance(k_sim, int) or not 0 <= k_sim <= 16:
            raise OptionError(f"index 'muvera' k_sim (SimHash bits, 2**k_sim partitions) must be 0..16, not {k_sim!r}.")
        positive("r_reps", r_reps)
        positive("d_proj", d_proj, allow_none=True)
        positive("final_dim", final_dim, allow_none=True)
        positive("candidates", candidates, allow_none=True)
        self.dim, self.metric, self.k_sim, self.r_reps = int(dim), metric, k_sim, int(r_reps)
        self.d_proj, self.final_dim, self.fill_empty = d_proj, final_dim, bool(fill_empty)
        self.seed, self.candidates, self.inner_spec = int(seed), candidates, inner
        self.partitions = 2**k_sim
        self.block = self.dim if d_proj is None else int(d_proj)
        self.fde_dim = final_dim or self.r_reps * self.partitions * self.block
        self._registry = registry or embplex.load_registry()
        self._inner = self._make_inner()
        self._random = self._draw_random()
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._vectors = torch.empty(0, self.dim)
        self._offsets = torch.zeros(1, dtype=torch.long)

    def options(self) -> dict[str, Any]:
        """The options this index was built with (saved in ``index.json``)."""
        names = ("metric", "k_sim", "r_reps", "d_proj", "final_dim", "fill_empty", "seed", "candidates")
        return {"dim": self.dim, **{n: getattr(self, n) for n in names}, "inner": self.inner_spec}

    def _make_inner(self) -> Index:
        spec = {"name": self.inner_spec} if isinstance(self.inner_spec, str) else dict(self.inner_spec)
        fixed = sorted({"dim", "metric"} & set(spec))
        if fixed:
            raise OptionError(
                f"index.inner.{fixed[0]} is set by 'muvera' itself (the FDE width {self.fde_dim}, inner product); "
                "remove it from the inner index's options."
            )
        return self._registry.create_part("index", {**spec, "dim": self.fde_dim, "metric": "ip"}, option="index.inner")

    def _draw_random(self) -> dict[str, Tensor]:
        """SimHash hyperplanes and projections, one seed per repetition (as the reference's
        ``seed + repetition``); the final count sketch has a seed of its own."""
        random: dict[str, list[np.ndarray] | np.ndarray] = {"simhash": [], "projection": []}
        for rep in range(self.r_reps):
            rng = np.random.default_rng([self.seed, rep])
            random["simhash"].append(rng.standard_normal((self.dim, self.k_sim)))
            if self.d_proj is not None:
                signs = rng.choice([-1.0, 1.0], size=(self.dim, self.d_proj))
                random["projection"].append(signs / math.sqrt(self.d_proj))
        out = {key: torch.from_numpy(np.stack(value)).float() for key, value in random.items() if value}
        if self.final_dim is not None:
            rng = np.random.default_rng([self.seed, self.r_reps, 1])
            width = self.r_reps * self.partitions * self.block
            out["final_index"] = torch.from_numpy(rng.integers(0, self.final_dim, size=width)).long()
            out["final_sign"] = torch.from_numpy(rng.choice([-1.0, 1.0], size=width)).float()
        return out

    # -- contents ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def nbytes(self) -> int:
        """Bytes of memory the stored sets (kept for re-ranking) and the inner index hold."""
        try:
            inner = int(self._inner.nbytes)
        except (AttributeError, NotImplementedError):  # an inner index that does not say
            inner = len(self) * self.fde_dim * 4
        return int(self._vectors.numel() * self._vectors.element_size() + self._offsets.numel() * 8) + inner

    def nbytes_per_item(self) -> dict[str, float]:
        """Mean bytes per stored item: its vectors (for re-ranking) and its FDE."""
        count = max(len(self), 1)
        return {"vectors": self._vectors.numel() * 4 / count, "fde": self.fde_dim * 4.0}

    def add(self, ids: Sequence[str], vectors: Any, metadata: Sequence[dict[str, Any]] | None = None) -> None:
        if metadata is not None:
            raise InputError("index 'muvera' stores no metadata; filter with a single-vector index instead.")
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InputError(f"ids must be a list of strings, not {type(ids).__name__}.")
        ids = list(ids)
        sets = self._as_sets(vectors, "vectors", ids)
        if len(sets) != len(ids):
            raise InputError(f"got {len(ids)} ids but {len(sets)} sets of vectors; pass one id per set.")
        if not sets:
            return
        # The inner index refuses ids that are not strings, repeated or already stored (every
        # index must: the index contract), before anything is stored here.
        self._inner.add(ids, self.encode(sets, query=False).numpy())
        start = len(self._ids)
        lengths = torch.tensor([len(s) for s in sets], dtype=torch.long)
        self._vectors = torch.cat([self._vectors, *sets])
        self._offsets = torch.cat([self._offsets, self._offsets[-1] + lengths.cumsum(0)])
        self._ids.extend(ids)
        self._row_of.update({item_id: start + offset for offset, item_id in enumerate(ids)})

    def delete(self, ids: Sequence[str]) -> None:
        self._inner.delete(ids)  # refuses unknown ids, deleting nothing, as every index must
        doomed = {self._row_of[i] for i in ids}
        keep = [row for row in range(len(self._ids)) if row not in doomed]
        lengths = (self._offsets[1:] - self._offsets[:-1])[keep]
        tokens = torch.cat([torch.arange(self._offsets[r], self._offsets[r + 1]) for r in keep]) if keep else None
        self._vectors = self._vectors[tokens] if tokens is not None else torch.empty(0, self.dim)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self._ids = [self._ids[row] for row in keep]
        self._row_of = {item_id: row for row, item_id in enumerate(self._ids)}

    # -- fixed-dimensional encodings ---------------------------------------------------

    def encode(self, sets: Sequence[Tensor], query: bool) -> Tensor:
        """The FDEs ``[len(sets), fde_dim]`` of checked sets: summed per partition for
        queries, averaged for documents (whose empty partitions are filled when
        ``fill_empty``)."""
        out = [self._encode_batch(sets[i : i + ENCODE_BATCH], query) for i in range(0, len(sets), ENCODE_BATCH)]
        return torch.cat(out) if out else torch.empty(0, self.fde_dim)

    def _encode_batch(self, sets: Sequence[Tensor], query: bool) -> Tensor:
        count, parts = len(sets), self.partitions
        points = torch.cat(list(sets))
        owner = torch.repeat_interleave(torch.arange(count), torch.tensor([len(s) for s in sets]))
        gray = _gray_decode(self.k_sim)  # SimHash code -> partition id
        blocks = []
        for rep in range(self.r_reps):
            code = _simhash_code(points, self._random["simhash"][rep])
            cell = owner * parts + gray[code]
            projected = points if self.d_proj is None else points @ self._random["projection"][rep]
            block = torch.zeros(count * parts, self.block).index_add_(0, cell, projected)
            if not query:
                sizes = torch.zeros(count * parts).index_add_(0, cell, torch.ones(len(points)))
                block = block / sizes.clamp(min=1)[:, None]
                if self.fill_empty and self.k_sim > 0:
                    empty = sizes == 0
                    if bool(empty.any()):
                        nearest = _nearest_points(code, owner, count, self.k_sim)  # [count, parts]
                        block[empty] = projected[nearest.flatten()[empty]]
            blocks.append(block.view(count, parts * self.block))
        fde = torch.cat(blocks, dim=1)
        if self.final_dim is not None:
            sketched = fde * self._random["final_sign"]
            fde = torch.zeros(count, self.final_dim).index_add_(1, self._random["final_index"], sketched)
        return fde

    # -- search ------------------------------------------------------------------------

    def search(
        self, queries: Any, k: int, *, filter: dict[str, Any] | None = None, rescore: bool | None = None
    ) -> SearchResult:
        """The ``k`` items of best Chamfer score per query set, best first, among the
        ``candidates`` of best FDE inner product (all items when ``candidates`` is null or
        at least the index size: then the search is exact). Candidates are always
        re-ranked by Chamfer similarity, so ``rescore=False`` is refused, as is a
        metadata ``filter`` (this index stores none)."""
        if filter is not None:
            raise InputError("index 'muvera' stores no metadata, so it cannot filter; pass filter=None.")
        if rescore is False:
            raise InputError("index 'muvera' always re-ranks its candidates by exact Chamfer similarity.")
        k = check_k(k)
        sets = self._as_sets(queries, "queries")
        check_not_empty(len(self), "muvera")
        k = min(k, len(self))
        if not sets:
            return SearchResult(ids=[[] for _ in sets], scores=np.zeros((len(sets), 0), dtype=np.float32))
        pool = len(self) if self.candidates is None else min(len(self), max(k, self.candidates))
        if pool == len(self):
            rows = [torch.arange(len(self))] * len(sets)
        else:
            found = self._inner.search(self.encode(sets, query=True).numpy(), pool)
            rows = [torch.tensor([self._row_of[i] for i in hit_ids], dtype=torch.long) for hit_ids in found.ids]
        ids, scores = [], np.zeros((len(sets), k), dtype=np.float32)
        for q, (query, candidates) in enumerate(zip(sets, rows)):
            if len(candidates) < k:  # an approximate inner index found too few: score every item
                candidates = torch.arange(len(self))
            chamfer = self.chamfer(query, candidates)
            best, order = torch.topk(chamfer, k)
            ids.append([self._ids[int(row)] for row in candidates[order]])
            scores[q] = best.numpy()
        return SearchResult(ids=ids, scores=scores)

    def chamfer(self, query: Tensor, rows: Tensor) -> Tensor:
        """Exact Chamfer scores ``sum_i max_j <query_i, item_j>`` of one query set against
        the stored items ``rows``, in blocks that keep about ``SCORE_BUDGET`` scores."""
        lengths = self._offsets[rows + 1] - self._offsets[rows]
        ends = lengths.cumsum(0)
        # block boundaries: a new block whenever the tokens so far pass another budget's worth
        per_block = max(1, SCORE_BUDGET // max(len(query), 1))
        marks = torch.arange(per_block, max(int(ends[-1]), per_block), per_block)
        cuts = torch.unique(torch.searchsorted(ends, marks, right=True)).tolist()
        bounds = [0, *[c for c in cuts if 0 < c < len(rows)], len(rows)]
        out = []
        with torch.inference_mode():
            for start, stop in zip(bounds, bounds[1:]):
                block, sizes = rows[start:stop], lengths[start:stop]
                owner = torch.repeat_interleave(torch.arange(len(block)), sizes)
                first = sizes.cumsum(0) - sizes  # where each item's tokens start within the block
                positions = self._offsets[block][owner] + torch.arange(len(owner)) - first[owner]
                similarity = query @ self._vectors[positions].T  # [query vectors, tokens]
                best = torch.full((len(query), len(block)), float("-inf")).scatter_reduce_(
                    1, owner.expand(len(query), -1), similarity, "amax"
                )
                out.append(best.sum(dim=0))
        return torch.cat(out)

    # -- input checks ------------------------------------------------------------------

    def _as_sets(self, vectors: Any, what: str, ids: Sequence[str] | None = None) -> list[Tensor]:
        """A list of checked ``[tokens, dim]`` float32 sets (unit rows under cosine)."""
        if isinstance(vectors, (np.ndarray, Tensor)):
            shape = tuple(vectors.shape)
            if len(shape) == 2 and shape[0] == 0:
                return []
            hint = (
                "a [n, dim] array is one vector per item, what a single-vector pooling (mean, cls, ...) gives: "
                "encode with pooling=multi_vector, or use a single-vector index such as exact"
                if len(shape) == 2
                else "a padded [n, tokens, dim] array would count its padding as vectors"
                if len(shape) == 3
                else f"got an array of shape {shape}"
            )
            raise InputError(
                f"index 'muvera' takes {what} as a list of [tokens_i, {self.dim}] arrays, one set of vectors per "
                f"item ({'for one query pass [vectors]; ' if what == 'queries' else ''}{hint})."
            )
        if isinstance(vectors, (str, bytes)) or not isinstance(vectors, Sequence):
            raise InputError(f"{what} must be a list of [tokens_i, {self.dim}] arrays, not {type(vectors).__name__}.")
        sets = []
        for position, item in enumerate(vectors):
            name = f"{what} item {position}" + (f" (id {ids[position]!r})" if ids and position < len(ids) else "")
            if isinstance(item, Tensor):
                item = item.detach().float().cpu().numpy()
            try:
                array = np.asarray(item, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise InputError(f"{name} is not a numeric [tokens, {self.dim}] array ({exc}).") from exc
            if array.ndim != 2:
                raise DimensionError(
                    f"{name} has shape {tuple(array.shape)}; each item is a set of vectors, a [tokens, {self.dim}] "
                    "array (one vector per item belongs in a single-vector index such as exact)."
                )
            if array.shape[1] != self.dim:
                raise DimensionError(
                    f"{name} has vectors of width {array.shape[1]}, but the index holds width {self.dim}; every "
                    "set must come from the model the index was built for."
                )
            if array.shape[0] == 0:
                raise InputError(
                    f"{name} is an empty set (a text whose every token the pooling leaves out, e.g. only "
                    "punctuation): it has no Chamfer score. Leave it out, or keep more tokens (pooling.skip_punctuation=false)."
                )
            if not np.isfinite(array).all():
                raise InputError(f"{name} contains NaN or infinite values; check the model's output.")
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            sets.append(torch.nn.functional.normalize(tensor, dim=-1) if self.metric == "cosine" else tensor)
        return sets

    # -- persistence -------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the sets, the random matrices, ``index.json`` and the inner index (in
        ``inner/``) to the folder ``path`` atomically, with the core's checksummed manifest."""
        from safetensors.torch import save_file

        with embplex.storage.saving_index(path, self, "muvera") as root:
            save_file({"vectors": self._vectors.contiguous(), "offsets": self._offsets}, str(root / SETS_FILE))
            save_file({k: v.contiguous() for k, v in self._random.items()}, str(root / RANDOM_FILE))
            self._inner.save(root / INNER_FOLDER)
            embplex.storage.write_json(
                root / METADATA_FILE,
                {"format": FORMAT_VERSION, "index": "muvera", "options": self.options(), "ids": self._ids},
            )

    @classmethod
    def load(cls, path: str | Path, registry: embplex.Registry | None = None) -> "MuveraIndex":
        """Load a saved index; ``registry`` loads the inner index (default: the installed plugins)."""
        from embplex.app import load_index

        root = Path(path)
        manifest = embplex.storage.verify_index(root, "muvera")
        meta = embplex.storage.read_json(root / METADATA_FILE, "index metadata")
        redo = "save the index again."
        if not isinstance(meta, dict) or meta.get("index") != "muvera" or meta.get("format") != FORMAT_VERSION:
            raise ModelFileError(f"{root / METADATA_FILE} does not describe a 'muvera' index of format {FORMAT_VERSION}; {redo}")
        registry = registry or embplex.load_registry()
        try:
            index = cls(**meta["options"], registry=registry)
            ids = list(meta["ids"])
            if not all(isinstance(i, str) for i in ids):
                raise InputError("ids must be strings")
        except (KeyError, TypeError, OptionError, InputError) as exc:
            raise ModelFileError(f"{root / METADATA_FILE} is corrupt ({exc}); {redo}") from exc
        sets = embplex.storage.load_safetensors(root / SETS_FILE)
        random = embplex.storage.load_safetensors(root / RANDOM_FILE)
        vectors, offsets = sets.get("vectors"), sets.get("offsets")
        consistent = (
            vectors is not None and offsets is not None and vectors.dim() == 2 and vectors.shape[1] == index.dim
            and tuple(offsets.shape) == (len(ids) + 1,) and int(offsets[0]) == 0 and int(offsets[-1]) == len(vectors)
            and bool((offsets[1:] > offsets[:-1]).all())
            and set(random) == set(index._random)
            and all(random[key].shape == index._random[key].shape for key in random)
            and len(set(ids)) == len(ids) and (manifest["dim"], manifest["size"]) == (index.dim, len(ids))
        )
        if not consistent:
            raise ModelFileError(f"{root} holds sets, random matrices or ids that do not match {METADATA_FILE}; {redo}")
        inner = load_index(root / INNER_FOLDER, registry, dim=index.fde_dim)
        if len(inner) != len(ids):
            raise ModelFileError(f"{root / INNER_FOLDER} holds {len(inner)} items, {METADATA_FILE} {len(ids)}; {redo}")
        index.built_from = manifest["built_from"]
        index._inner, index._random = inner, random
        index._vectors, index._offsets = vectors, offsets.long()
        index._ids = ids
        index._row_of = {item_id: row for row, item_id in enumerate(ids)}
        return index


def _gray_decode(bits: int) -> Tensor:
    """Partition id of each SimHash code (its bits, first hyperplane most significant):
    the reference appends each bit to a Gray code, so the code is the Gray code of the id
    and neighbouring ids differ in one hyperplane."""
    codes = torch.arange(2**bits)
    ids = codes.clone()
    shift = codes >> 1
    while bool(shift.any()):
        ids ^= shift
        shift = shift >> 1
    return ids


def _simhash_code(points: Tensor, hyperplanes: Tensor) -> Tensor:
    """Each point's side of every hyperplane as an integer, first hyperplane most significant."""
    bits = hyperplanes.shape[1]
    if bits == 0:
        return torch.zeros(len(points), dtype=torch.long)
    weights = 2 ** torch.arange(bits - 1, -1, -1)
    return ((points @ hyperplanes > 0).long() * weights).sum(dim=1)


def _nearest_points(code: Tensor, owner: Tensor, count: int, bits: int) -> Tensor:
    """``[count, partitions]``: for each set and partition, the set's point whose SimHash
    code differs from the partition's in the fewest bits (the first such point on a tie,
    as the reference), as an index into the batch's points."""
    partitions = torch.arange(2**bits)
    pattern = partitions ^ (partitions >> 1)  # the code (Gray code) of each partition id
    popcount = torch.tensor([bin(value).count("1") for value in range(2**bits)])
    distance = popcount[code[:, None] ^ pattern[None, :]]  # [points, partitions]
    # smallest distance first, then the earliest point: one integer key, taken per set
    key = distance * len(code) + torch.arange(len(code))[:, None]
    best = torch.full((count, len(partitions)), torch.iinfo(torch.long).max)
    best.scatter_reduce_(0, owner[:, None].expand_as(key), key, "amin")
    return best % len(code)


@embplex.hookimpl
def register_indexes(register: Any) -> None:
    register(
        "muvera",
        MuveraIndex,
        paper="MUVERA: Multi-Vector Retrieval via Fixed Dimensional Encodings (2024), arXiv:2405.19504",
    )
