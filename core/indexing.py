"""Checks and bookkeeping every index plugin needs, so that all of them refuse the same
bad input with the same words (``docs/concepts.md``, "Index").

An index plugin validates what it is given with these functions *before* it changes
anything, so a refused call leaves the index as it was:

* :func:`check_ids`, :func:`as_matrix`, :func:`check_k`, :func:`check_metadata`,
  :func:`check_filter` turn arguments into plain values or raise
  :class:`~embplex.errors.InputError` / :class:`~embplex.errors.DimensionError`;
  :func:`check_not_empty` refuses to search an index that holds nothing
  (:class:`~embplex.errors.EmptyIndexError`);
* :class:`ItemTable` keeps the ids of the rows an index stores (unique strings, in row
  order) with their metadata, refuses an id added twice or deleted while unknown, and
  answers a metadata filter with a mask over the rows.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .components import SearchResult
from .errors import DimensionError, EmptyIndexError, InputError, ModelFileError

__all__ = [
    "ItemTable",
    "as_matrix",
    "check_filter",
    "check_ids",
    "check_k",
    "check_metadata",
    "check_not_empty",
    "empty_result",
    "load_arrays",
    "preview",
    "result",
    "save_arrays",
    "shortlist_search",
    "top_k",
]

#: what a metadata field may be called: a name every backend (Milvus included) accepts
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: the values a metadata field may hold
SCALARS = (str, bool, int, float)


def preview(ids: Sequence[Any], limit: int = 5) -> str:
    """The first few of ``ids`` for an error message."""
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def check_ids(ids: Any) -> list[str]:
    """``ids`` as a list of strings, or :class:`InputError`."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InputError(f"ids must be a list of strings, not {type(ids).__name__}.")
    ids = list(ids)
    wrong = [i for i in ids if not isinstance(i, str)]
    if wrong:
        raise InputError(f"ids must be strings; got {type(wrong[0]).__name__} {wrong[0]!r}. Convert them with str().")
    return ids


def as_matrix(vectors: Any, dim: int, what: str, index: str, normalize: bool = False) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 ``[n, dim]`` array, each row scaled to unit
    length when ``normalize`` (an all-zero row stays zero).

    Takes numpy arrays, torch tensors of any float dtype and lists of rows; ``what`` is
    ``"vectors"`` or ``"queries"`` (a single ``[dim]`` query becomes one row). A width other
    than ``dim`` is a :class:`DimensionError`, NaN or infinity an :class:`InputError`.
    """
    try:
        import torch

        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().float().cpu().numpy()
        elif isinstance(vectors, (list, tuple)):
            vectors = [v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else v for v in vectors]
    except ImportError:  # pragma: no cover - torch is a dependency of embplex
        pass
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{what} must be a numeric array of shape [n, {dim}] ({exc}); index '{index}' stores one vector per item."
        ) from exc
    if array.ndim == 1 and what == "queries":
        array = array[None, :]
    if array.ndim >= 1 and array.shape[0] == 0:
        array = np.zeros((0, dim), dtype=np.float32)
    if array.ndim != 2:
        raise DimensionError(
            f"{what} must be a 2-D array [n, {dim}], got shape {tuple(array.shape)}; "
            f"index '{index}' stores one vector per item."
        )
    if array.shape[1] != dim:
        raise DimensionError(
            f"{what} have dimension {array.shape[1]} but the index was built for dimension "
            f"{dim}; embed with the model the index was built for."
        )
    if not np.isfinite(array).all():
        raise InputError(f"{what} contain NaN or infinite values; check the model's output.")
    if normalize:
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        array = array / np.where(norms == 0, 1, norms)
    return np.ascontiguousarray(array, dtype=np.float32)


def check_k(k: Any) -> int:
    """``k`` as a positive ``int``, or :class:`InputError`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, not {k!r}.")
    return int(k)


def check_not_empty(size: int, index: str) -> None:
    """Refuse to search an index of ``size`` 0 (:class:`EmptyIndexError`): empty rows
    would read as "nothing relevant" — a recall of 0 that looks like a result — when the
    vectors were never added (or all were deleted)."""
    if size == 0:
        raise EmptyIndexError(
            f"index '{index}' is empty: it holds no vectors to search. Add vectors first "
            "(index.add(ids, vectors), or `embplex index` for a corpus), or load a saved index that has them."
        )


def empty_result(queries: int) -> SearchResult:
    """``queries`` empty hit lists (a filter nothing matches)."""
    return SearchResult(ids=[[] for _ in range(queries)], scores=np.zeros((queries, 0), dtype=np.float32))


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row of ``scores`` ``[q, n]``, best first (ties in
    column order): ``(scores [q, k'], columns [q, k'])`` with ``k' = min(k, n)``. ``-inf``
    marks a column that must not be returned; rows keep only finite hits."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((scores.shape[0], 0), dtype=np.float32), np.zeros((scores.shape[0], 0), dtype=np.int64)
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    chosen = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -chosen), axis=1)
    columns = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, columns, axis=1).astype(np.float32), columns.astype(np.int64)


def shortlist_search(
    queries: np.ndarray,
    k: int,
    shortlist: int,
    approximate: Callable[[np.ndarray], np.ndarray],
    vectors: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    block: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Search in two steps, ``block`` queries at a time: ``approximate(queries) -> [b, n]``
    scores every row (codes, a prefix), the best ``shortlist`` rows are kept (only those in
    ``allowed``), then, given the float ``vectors``, reordered by their exact inner product
    with the query and cut to ``k``. Returns ``(scores, rows)``, ``[q, k']`` each."""
    all_scores, all_rows = [], []
    for start in range(0, queries.shape[0], block):
        chunk = queries[start : start + block]
        scores = approximate(chunk)
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
        scores, rows = top_k(scores, shortlist if vectors is not None else k)
        if vectors is not None:
            scores, order = top_k(np.einsum("qd,qcd->qc", chunk, vectors[rows]), k)
            rows = np.take_along_axis(rows, order, axis=1)
        all_scores.append(scores)
        all_rows.append(rows)
    return np.concatenate(all_scores), np.concatenate(all_rows)


def result(ids: Sequence[str], rows: np.ndarray, scores: np.ndarray) -> SearchResult:
    """A :class:`SearchResult` from row numbers ``[q, k]`` into ``ids``; a hit whose row is
    negative or whose score is ``-inf`` (nothing there) ends its query's list."""
    hits, kept = [], []
    for row_numbers, row_scores in zip(rows.tolist(), scores):
        valid = [r >= 0 and np.isfinite(s) and s > -1e30 for r, s in zip(row_numbers, row_scores)]
        count = valid.index(False) if False in valid else len(valid)
        hits.append([ids[r] for r in row_numbers[:count]])
        kept.append(count)
    # every query answers the same number of hits (scores is one array): an approximate
    # index that found fewer for one query (a filter its graph could not satisfy) cuts the
    # others to match; the plugins search such queries again exhaustively first
    width = min(kept, default=0)
    hits = [row[:width] for row in hits]
    return SearchResult(ids=hits, scores=np.ascontiguousarray(scores[:, :width], dtype=np.float32))


def check_metadata(metadata: Any, count: int) -> list[dict[str, Any]] | None:
    """``metadata`` as one ``dict`` per item (or ``None``), or :class:`InputError`.

    Each item's metadata maps a field name (letters, digits and ``_``, not starting with
    a digit) to a string, number or boolean.
    """
    if metadata is None:
        return None
    if isinstance(metadata, (str, bytes, Mapping)) or not isinstance(metadata, Sequence):
        raise InputError(f"metadata must be a list with one dict per id, not {type(metadata).__name__}.")
    metadata = list(metadata)
    if len(metadata) != count:
        raise InputError(f"got {count} ids but {len(metadata)} metadata entries; pass one dict per id.")
    checked = []
    for position, entry in enumerate(metadata):
        if not isinstance(entry, Mapping):
            raise InputError(f"metadata[{position}] must be a dict of field -> value, not {type(entry).__name__}.")
        for field, value in entry.items():
            if not isinstance(field, str) or not FIELD_NAME.fullmatch(field):
                raise InputError(
                    f"metadata[{position}] has the field name {field!r}; use letters, digits and '_' "
                    "(not starting with a digit, at most 64 characters)."
                )
            if not isinstance(value, SCALARS) or (isinstance(value, float) and not np.isfinite(value)):
                raise InputError(
                    f"metadata[{position}][{field!r}] is {value!r}; metadata values are strings, finite "
                    "numbers or booleans."
                )
        checked.append(dict(entry))
    return checked


def check_filter(filter: Any) -> dict[str, list[Any]] | None:
    """A metadata filter as ``{field: [accepted values]}`` (or ``None``).

    ``{"lang": "en"}`` keeps the items whose ``lang`` is ``"en"``; ``{"year": [2023, 2024]}``
    those whose ``year`` is one of the values; several fields must all match. An item
    without the field never matches.
    """
    if filter is None:
        return None
    if not isinstance(filter, Mapping) or not filter:
        raise InputError(
            f"filter must be a non-empty dict of field -> value or list of values (got {filter!r}), "
            "e.g. {'lang': 'en', 'year': [2023, 2024]}."
        )
    checked = {}
    for field, accepted in filter.items():
        if not isinstance(field, str) or not FIELD_NAME.fullmatch(field):
            raise InputError(f"filter field {field!r} is not a metadata field name.")
        values = list(accepted) if isinstance(accepted, (list, tuple, set, frozenset)) else [accepted]
        if not values or any(not isinstance(v, SCALARS) for v in values):
            raise InputError(f"filter[{field!r}] must be a string, number or boolean, or a non-empty list of them.")
        checked[field] = values
    return checked


def _same(value: Any, accepted: Any) -> bool:
    # True == 1 in Python; a boolean field matches only booleans, so a filter on 1 does
    # not select items whose flag is True
    return isinstance(value, bool) == isinstance(accepted, bool) and value == accepted


def matches(entry: Mapping[str, Any] | None, filter: Mapping[str, list[Any]]) -> bool:
    """Whether one item's metadata passes a filter checked by :func:`check_filter`."""
    entry = entry or {}
    return all(field in entry and any(_same(entry[field], v) for v in values) for field, values in filter.items())


class ItemTable:
    """The ids of an index's rows, in row order, with their metadata.

    An index that stores its items in rows keeps one of these next to its vectors or
    codes: :meth:`check_new` before it adds (refusing ids already stored or repeated),
    :meth:`rows_of` before it deletes (refusing unknown ids), :meth:`allowed` to turn a
    filter into a mask over its rows.
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.metadata: list[dict[str, Any]] = []
        self.row_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.row_of

    def check_new(self, ids: Any, count: int, metadata: Any = None) -> tuple[list[str], list[dict[str, Any]]]:
        """Validate the ids and metadata of ``count`` vectors about to be added."""
        ids = check_ids(ids)
        if count != len(ids):
            raise InputError(f"got {len(ids)} ids but {count} vectors; pass one id per vector.")
        repeated = sorted(item_id for item_id, n in Counter(ids).items() if n > 1)
        if repeated:
            raise InputError(f"ids {preview(repeated)} appear more than once in this add; ids must be unique.")
        stored = [i for i in ids if i in self.row_of]
        if stored:
            raise InputError(
                f"ids {preview(stored)} are already in the index; delete them first to replace their vectors."
            )
        metadata = check_metadata(metadata, len(ids))
        return ids, metadata if metadata is not None else [{} for _ in ids]

    def append(self, ids: list[str], metadata: list[dict[str, Any]]) -> None:
        start = len(self.ids)
        self.ids.extend(ids)
        self.metadata.extend(metadata)
        self.row_of.update({item_id: start + offset for offset, item_id in enumerate(ids)})

    def rows_of(self, ids: Any) -> np.ndarray:
        """The rows of ``ids``, all of which must be stored (else :class:`InputError`)."""
        ids = check_ids(ids)
        unknown = [i for i in ids if i not in self.row_of]
        if unknown:
            raise InputError(
                f"cannot delete ids {preview(unknown)}: they are not in the index "
                f"({len(self)} items); nothing was deleted."
            )
        return np.array(sorted({self.row_of[i] for i in ids}), dtype=np.int64)

    def keep_rows(self, keep: np.ndarray) -> None:
        """Keep only the rows ``keep`` (ascending), renumbered from 0."""
        self.ids = [self.ids[row] for row in keep.tolist()]
        self.metadata = [self.metadata[row] for row in keep.tolist()]
        self.row_of = {item_id: row for row, item_id in enumerate(self.ids)}

    def allowed(self, filter: Mapping[str, list[Any]] | None) -> np.ndarray | None:
        """A boolean mask over the rows passing ``filter`` (``None`` when no filter)."""
        if filter is None:
            return None
        return np.fromiter((matches(entry, filter) for entry in self.metadata), dtype=bool, count=len(self.ids))

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "metadata": self.metadata}

    @classmethod
    def from_json(cls, data: Any) -> "ItemTable":
        """Rebuild from :meth:`to_json`'s output; :class:`InputError` if it is malformed."""
        if not isinstance(data, dict):
            raise InputError("the id table is not an object")
        table = cls()
        ids = check_ids(data.get("ids"))
        if len(set(ids)) != len(ids):
            raise InputError("an id is listed twice")
        metadata = data.get("metadata", [{} for _ in ids])
        if not isinstance(metadata, list) or len(metadata) != len(ids):
            raise InputError("the list of ids does not match the list of metadata entries")
        metadata = check_metadata(metadata, len(ids)) or []
        table.append(ids, metadata)
        return table


def save_arrays(root: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write each array as ``<name>.npy`` in ``root`` (the staging folder of
    :func:`embplex.storage.saving_index`), without pickle."""
    for name, array in arrays.items():
        np.save(Path(root) / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)


def load_arrays(
    root: str | Path, specs: Mapping[str, tuple[Any, tuple[int | None, ...]]], mapped: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Read the arrays :func:`save_arrays` wrote, each checked against ``(dtype, shape)``
    (``None`` in a shape: any size); a missing, unreadable or mis-shaped one is a
    :class:`~embplex.errors.ModelFileError` naming the file. The arrays named in
    ``mapped`` are memory-mapped read-only instead of read."""
    arrays = {}
    for name, (dtype, shape) in specs.items():
        path = Path(root) / f"{name}.npy"
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r" if name in mapped else None)
        except (OSError, ValueError, EOFError) as exc:
            raise ModelFileError(f"{path} is missing or corrupt ({exc}); save the index again.") from exc
        wrong_shape = array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape))
        if array.dtype != np.dtype(dtype) or wrong_shape:
            raise ModelFileError(
                f"{path} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} of shape "
                f"{tuple('any' if s is None else s for s in shape)}; save the index again."
            )
        arrays[name] = array
    return arrays


def read_description(root: str | Path, name: str, formats: Sequence[int]) -> dict[str, Any]:
    """The ``index.json`` of a saved ``name`` index, refused (:class:`ModelFileError`)
    when it describes another plugin's index or a format this version cannot read."""
    from .storage import read_json

    path = Path(root) / "index.json"
    meta = read_json(path, "index description")
    if not isinstance(meta, dict) or meta.get("index") != name:
        raise ModelFileError(f"{path} does not describe a '{name}' index; save the index again.")
    if meta.get("format") not in formats:
        raise ModelFileError(
            f"{path} has index format {meta.get('format')!r}; this version of '{name}' reads format "
            f"{', '.join(map(str, formats))}. Build the index again with this version."
        )
    return meta
