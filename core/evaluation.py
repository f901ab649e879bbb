"""Benchmarks: semantic textual similarity (STS) and retrieval (BEIR layout).

The functions here take data that is already loaded (lists of sentences, dicts of
documents), so they work on any source; :func:`evaluate_sts_file` and
:func:`evaluate_beir` are thin wrappers that read files with :mod:`embplex.data`.

Every figure is reported ×100 with a percentile bootstrap confidence interval: STS by
resampling sentence pairs, retrieval by resampling queries. Retrieval metrics follow
BEIR / ``pytrec_eval``: nDCG uses the graded relevance score as gain with a ``log2``
discount and an ideal ranking built from the qrels; only queries present in the qrels are
evaluated.
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .errors import InputError, NonFiniteError
from .storage import write_json

if TYPE_CHECKING:
    from .components import Index
    from .model import EmbeddingModel

__all__ = [
    "bootstrap_ci",
    "describe_model",
    "evaluate_beir",
    "evaluate_retrieval",
    "evaluate_sts",
    "evaluate_sts_file",
    "mrr_at_k",
    "ndcg_at_k",
    "paired_change",
    "rank",
    "recall_at_k",
    "spearman",
    "write_results",
]

RESULTS_FORMAT = 1


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def rank(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the average of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.empty(len(values), dtype=bool)
    starts_group[:1] = True
    starts_group[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts_group) - 1
    sizes = np.bincount(group)
    last = np.cumsum(sizes)  # 1-based position of each group's last member
    first = last - sizes + 1
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((first + last) / 2.0)[group]
    return ranks


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks.

    Returns ``nan`` when either side is constant (the correlation is undefined).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"spearman needs two 1-D sequences of equal length, got shapes {a.shape} and {b.shape}.")
    if len(a) < 2:
        raise InputError("spearman needs at least two pairs.")
    ranks_a = rank(a) - (len(a) + 1) / 2.0
    ranks_b = rank(b) - (len(b) + 1) / 2.0
    spread = math.sqrt(float(ranks_a @ ranks_a) * float(ranks_b @ ranks_b))
    return float(ranks_a @ ranks_b) / spread if spread > 0 else float("nan")


def bootstrap_ci(
    data: Any,
    statistic: Callable[..., float],
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` at confidence ``1 - alpha``.

    :param data: one array of per-item values (``statistic(values)``), or a *tuple* of
        aligned arrays resampled together (``statistic(a, b)``, e.g. predicted and gold
        scores of the same pairs).
    :param n: number of resamples; ``seed`` makes them reproducible.
    """
    arrays = [np.asarray(part) for part in data] if isinstance(data, tuple) else [np.asarray(data)]
    size = len(arrays[0])
    if any(len(part) != size for part in arrays):
        raise InputError(f"bootstrap_ci got arrays of different lengths: {[len(p) for p in arrays]}.")
    if size == 0:
        raise InputError("bootstrap_ci needs at least one item.")
    if n < 1 or not 0 < alpha < 1:
        raise InputError(f"bootstrap_ci needs n >= 1 and 0 < alpha < 1, got n={n}, alpha={alpha}.")
    rng = np.random.default_rng(seed)
    estimates = np.empty(n, dtype=np.float64)
    for i in range(n):
        picked = rng.integers(0, size, size)
        estimates[i] = statistic(*(part[picked] for part in arrays))
    low, high = np.nanpercentile(estimates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def paired_change(
    before: Mapping[str, Any], after: Mapping[str, Any], n: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """The change of every headline metric from ``before`` to ``after`` (two evaluations of
    the same data, as :func:`evaluate_sts` / :func:`evaluate_retrieval` return them), ×100,
    with a paired percentile bootstrap 95% interval: each resample draws the same pairs
    (STS) or queries (retrieval) for both, so what both evaluations share cancels out, and
    the interval is usually much narrower than the two separate ones suggest.

    :returns: ``{metric: {"change": x, "change_ci": [low, high]}}``.
    :raises InputError: the two results do not carry per-item scores of the same items.
    """
    items_before, items_after = before.get("per_item"), after.get("per_item")
    if not items_before or not items_after:
        raise InputError("paired_change needs both evaluations' per-item scores (the 'per_item' entry of the results).")
    if items_before["ids"] != items_after["ids"] or before.get("task") != after.get("task"):
        raise InputError("paired_change compares two evaluations of the same items; these scored different ones.")
    changes: dict[str, dict[str, Any]] = {}
    if before["task"] == "sts":
        gold = np.asarray(items_before["gold"])

        def sts_change(old: np.ndarray, new: np.ndarray, truth: np.ndarray) -> float:
            return 100 * (spearman(new, truth) - spearman(old, truth))

        data = (np.asarray(items_before["cosine"]), np.asarray(items_after["cosine"]), gold)
        low, high = bootstrap_ci(data, sts_change, n=n, seed=seed)
        changes["spearman"] = {"change": sts_change(*data), "change_ci": [low, high]}
        return changes

    def mean_change(old: np.ndarray, new: np.ndarray) -> float:
        return 100 * float(np.mean(new) - np.mean(old))

    for name in (key for key in before if f"{key}_ci" in before and key in items_before):
        data = (np.asarray(items_before[name]), np.asarray(items_after[name]))
        low, high = bootstrap_ci(data, mean_change, n=n, seed=seed)
        changes[name] = {"change": mean_change(*data), "change_ci": [low, high]}
    return changes


# ---------------------------------------------------------------------------
# Retrieval metrics for one query
# ---------------------------------------------------------------------------


def ndcg_at_k(ranked: Sequence[str], relevance: Mapping[str, float], k: int) -> float:
    """nDCG@k as ``pytrec_eval``'s ``ndcg_cut``: gain = relevance score, discount
    ``log2(rank + 1)``, normalised by the best possible ordering of the judged documents.
    0 when the query has no relevant document."""
    _check_k(k)
    dcg = sum(
        relevance.get(doc, 0) / math.log2(position + 2)
        for position, doc in enumerate(ranked[:k])
        if relevance.get(doc, 0) > 0
    )
    ideal_gains = sorted((score for score in relevance.values() if score > 0), reverse=True)[:k]
    ideal = sum(gain / math.log2(position + 2) for position, gain in enumerate(ideal_gains))
    return dcg / ideal if ideal > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevance: Mapping[str, float], k: int) -> float:
    """Share of the relevant documents (score > 0) found in the top k; 0 when none exist."""
    _check_k(k)
    relevant = {doc for doc, score in relevance.items() if score > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], relevance: Mapping[str, float], k: int) -> float:
    """Reciprocal rank of the first relevant document in the top k; 0 when there is none."""
    _check_k(k)
    for position, doc in enumerate(ranked[:k]):
        if relevance.get(doc, 0) > 0:
            return 1.0 / (position + 1)
    return 0.0


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, not {k!r}.")


# ---------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------


def describe_model(model: Any) -> dict[str, Any]:
    """What produced the numbers: plugin names, options and versions, dim, normalize."""
    from . import __version__

    return {
        "components": getattr(model, "specs", None),
        "dim": getattr(model, "dim", None),
        "normalize": getattr(model, "normalize", None),
        "device": str(model.device) if hasattr(model, "device") else None,  # the one it ran on
        "embplex_version": __version__,
    }


def evaluate_sts(
    model: "EmbeddingModel",
    s1: Sequence[str],
    s2: Sequence[str],
    gold: Sequence[float],
    batch_size: int = 32,
    prompt: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    encode_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Spearman ×100 between the cosine similarity of each pair's embeddings and the gold
    scores, with a 95% bootstrap interval over pairs.

    :param encode_options: extra keyword arguments for ``model.encode`` (e.g. ``layer``
        or ``dim`` to evaluate a smaller model cut from this one).
    """
    s1, s2 = list(s1), list(s2)
    gold_scores = np.asarray(gold, dtype=np.float64)
    if not len(s1) == len(s2) == len(gold_scores):
        raise InputError(
            f"STS data must be aligned: got {len(s1)} first sentences, {len(s2)} second "
            f"sentences and {len(gold_scores)} scores."
        )
    if len(s1) < 2:
        raise InputError("STS evaluation needs at least two sentence pairs.")
    started = time.perf_counter()
    texts = list(dict.fromkeys(s1 + s2))  # each distinct sentence is embedded once
    vectors = _encode(model, texts, batch_size, prompt, encode_options)
    row = {text: i for i, text in enumerate(texts)}
    left = vectors[[row[t] for t in s1]]
    right = vectors[[row[t] for t in s2]]
    cosine = np.einsum("ij,ij->i", left, right)
    # Spearman's correlation with a constant is undefined (NaN): say why instead of reporting it
    if np.ptp(gold_scores) == 0:
        raise InputError(f"every STS pair has the same gold score ({gold_scores[0]:g}); Spearman's correlation needs varied scores.")
    if np.ptp(cosine) == 0:
        raise NonFiniteError(
            f"every one of the {len(cosine)} STS pairs got the same cosine similarity ({cosine[0]:.6g}), so Spearman's "
            "correlation is undefined (NaN): the model gives every text the same embedding. A pooling that reads "
            "only the first token under causal attention does this (that token sees only itself); choose another "
            "pooling or attention."
        )
    low, high = bootstrap_ci((cosine, gold_scores), spearman, n=bootstrap, seed=seed)
    return {
        "task": "sts",
        "spearman": 100 * spearman(cosine, gold_scores),
        "spearman_ci": [100 * low, 100 * high],
        "confidence": 0.95,
        "bootstrap_samples": bootstrap,
        "pairs": len(s1),
        "similarity": "cosine",
        "seconds": round(time.perf_counter() - started, 2),
        "model": describe_model(model),
        "per_item": {"ids": list(range(len(s1))), "cosine": cosine.tolist(), "gold": gold_scores.tolist()},
    }


def evaluate_retrieval(
    model: "EmbeddingModel",
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, float]],
    index_factory: Callable[[int], "Index"],
    k: int = 100,
    batch_size: int = 32,
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    encode_options: Mapping[str, Any] | None = None,
    recall_at: Sequence[int] = (),
) -> dict[str, Any]:
    """Embed the corpus, index it, search every judged query and score the hits.

    :param corpus: document id -> text (BEIR: title + " " + text).
    :param queries: query id -> text; every query in ``qrels`` must be here.
    :param qrels: query id -> {document id: relevance score}.
    :param index_factory: builds an empty index for a dimension (the configured index
        plugin, e.g. ``lambda dim: registry.create("index", "exact", dim=dim)``).
    :param k: search depth and the cut-off of recall; nDCG and MRR are cut at 10.
    :param recall_at: more recall cut-offs (each at most ``k``), reported as ``recall@{c}``.
    :returns: ``ndcg@10``, ``recall@{k}`` and ``mrr@10`` as means over queries ×100, each
        with a 95% bootstrap interval over queries (``<metric>_ci``), plus counts.
    """
    _check_k(k)
    if any(not 1 <= c <= k for c in recall_at):
        raise InputError(f"recall_at={list(recall_at)}: each cut-off must be between 1 and k={k}.")
    if not corpus:
        raise InputError("the corpus is empty; nothing to retrieve from.")
    judged = [qid for qid in qrels if qrels[qid]]
    if not judged:
        raise InputError("the qrels judge no query; check the split you loaded.")
    missing = [qid for qid in judged if qid not in queries]
    if missing:
        raise InputError(
            f"{len(missing)} judged queries have no text (e.g. {missing[0]!r}); load the "
            "queries file that belongs to these qrels."
        )
    started = time.perf_counter()
    doc_ids = list(corpus)
    doc_vectors = _encode(model, [corpus[d] for d in doc_ids], batch_size, corpus_prompt, encode_options)
    index = index_factory(int((doc_vectors[0] if isinstance(doc_vectors, list) else doc_vectors).shape[-1]))
    index.add(doc_ids, doc_vectors)
    query_vectors = _encode(model, [queries[q] for q in judged], batch_size, query_prompt, encode_options)
    hits = index.search(query_vectors, max(k, 10))

    recall_name = f"recall@{k}"
    per_query: dict[str, np.ndarray] = {
        "ndcg@10": np.array([ndcg_at_k(ranked, qrels[q], 10) for q, ranked in zip(judged, hits.ids)]),
        recall_name: np.array([recall_at_k(ranked, qrels[q], k) for q, ranked in zip(judged, hits.ids)]),
        "mrr@10": np.array([mrr_at_k(ranked, qrels[q], 10) for q, ranked in zip(judged, hits.ids)]),
    }
    for cut in sorted(set(recall_at) - {k}):
        per_query[f"recall@{cut}"] = np.array([recall_at_k(ranked, qrels[q], cut) for q, ranked in zip(judged, hits.ids)])
    results: dict[str, Any] = {"task": "retrieval"}
    for name, values in per_query.items():
        low, high = bootstrap_ci(values, np.mean, n=bootstrap, seed=seed)
        results[name] = 100 * float(values.mean())
        results[f"{name}_ci"] = [100 * low, 100 * high]
    results.update(
        {
            "confidence": 0.95,
            "bootstrap_samples": bootstrap,
            "queries": len(judged),
            "corpus": len(doc_ids),
            "k": k,
            "index": type(index).__name__,
            "seconds": round(time.perf_counter() - started, 2),
            "model": describe_model(model),
            "per_item": {"ids": judged, **{name: values.tolist() for name, values in per_query.items()}},
        }
    )
    return results


def _encode(
    model: Any,
    texts: list[str],
    batch_size: int,
    prompt: str | None,
    encode_options: Mapping[str, Any] | None,
) -> np.ndarray | list[np.ndarray]:
    options = {"batch_size": batch_size, "normalize": True, **(encode_options or {})}
    if prompt is not None:
        options["prompt"] = prompt
    vectors = model.encode(texts, **options)
    if isinstance(vectors, list):  # sets of vectors (late interaction): one [tokens, dim] array per text
        return [np.asarray(v, dtype=np.float32) for v in vectors]
    return np.asarray(vectors, dtype=np.float32)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def evaluate_sts_file(model: "EmbeddingModel", path: str | Path, **options: Any) -> dict[str, Any]:
    """:func:`evaluate_sts` on a TSV read by :func:`embplex.data.load_sts`."""
    from .data import load_sts

    s1, s2, scores = load_sts(path)
    return {**evaluate_sts(model, s1, s2, scores, **options), "data": str(path)}


def evaluate_beir(
    model: "EmbeddingModel",
    folder: str | Path,
    index_factory: Callable[[int], "Index"],
    split: str = "test",
    **options: Any,
) -> dict[str, Any]:
    """:func:`evaluate_retrieval` on a BEIR folder read by :func:`embplex.data.load_beir`."""
    from .data import load_beir

    corpus, queries, qrels = load_beir(folder, split)
    results = evaluate_retrieval(model, corpus, queries, qrels, index_factory, **options)
    return {**results, "data": str(folder), "split": split}


def write_results(path: str | Path, results: Any, model: Any | None = None) -> None:
    """Write results as JSON, atomically, with what produced them.

    ``model`` adds its description (plugin names, options, versions); results from
    :func:`evaluate_sts` / :func:`evaluate_retrieval` already carry it.
    """
    from . import __version__

    payload: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "embplex_version": __version__,
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    if model is not None:
        payload["model"] = describe_model(model)
    write_json(path, payload)
