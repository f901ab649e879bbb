"""Synthetic long-document retrieval tasks in the style of LongEmbed: ``passkey`` and ``needle``.

LongEmbed (Zhu et al., 2024, arXiv:2404.12096) judges context extension with two synthetic
tasks: for each context length, 50 queries, each to be answered from 100 candidate
documents of that length. Here both are generated deterministically from a seed and the
Paul Graham essays (``long/paul-graham-essays``), with documents measured in the evaluated
model's own tokens:

* ``passkey``: every candidate hides "{Name}'s pass key is {N}. Remember it. {N} is the pass
  key for {Name}." at a random depth of filler (essay text, or LongEmbed's repeated
  "The grass is green..." lines with ``filler: repeat``); the query asks for one person's
  pass key. Reported: nDCG@1 (= top-1 accuracy) and nDCG@10.
* ``needle``: every candidate is an essay excerpt with its own distinctive sentence
  ("{Name} keeps a {colour} {object} in the {place}.") at a random depth; the query asks
  where that person keeps it. Reported: nDCG@10 and nDCG@1.

Each length gets a 95% percentile bootstrap interval over its queries. Search goes through
the configured index. Where ours differs from LongEmbed: documents come from the essays
(LongEmbed's passkey uses only the repeated filler; its needle haystack is the same
essays), lengths are counted in the evaluated model's tokens (LongEmbed's in its own
tokenizer's, once for all models), and every candidate of a length carries a needle or
key of its own, so a query must find the one document that mentions its person.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import InputError
from .storage import atomic_file

_log = logging.getLogger(__name__)  # one line per length: long runs show their progress

TASKS = ("passkey", "needle")
LENGTHS = (256, 512, 1024, 2048, 4096)
REPEATED_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NAMES = (
    "Aaron Abigail Adrian Alice Amelia Andrew Anna Arthur Audrey Beatrice Benjamin Bianca "
    "Caleb Camila Carlos Caroline Cecilia Charles Chloe Clara Daniel David Diana Dmitri "
    "Eleanor Elias Elena Emil Emma Esther Felix Fiona Francis Gabriel Grace Hannah Harold "
    "Hugo Ingrid Isaac Isabel Ivan Jacob Jasmine Joel Julia Karen Kenji Laura Leon Lena "
    "Lucas Lucy Magnus Marcus Maria Martin Maya Mina Nadia Nathan Nina Noah Olga Oliver "
    "Omar Oscar Paula Peter Priya Quentin Rachel Rafael Rosa Ruben Samuel Sara Simon "
    "Sofia Stefan Tara Theo Thomas Ursula Victor Vera Walter Wendy Xavier Yara Yusuf "
    "Zara Zoe Agnes Boris Clement Dora Edgar Flora Gustav Helga Igor Jonas"
).split()
COLOURS = "red blue green yellow purple orange silver golden black white".split()
OBJECTS = "umbrella violin lantern compass teapot notebook bicycle kite clock telescope".split()
PLACES = "attic garage cellar garden kitchen library greenhouse barn studio pantry".split()


def essays(folder: str | Path) -> list[list[str]]:
    """The essays of ``folder`` as word lists, in file-name order (the licence left out)."""
    root = Path(folder)
    files = sorted(p for p in root.glob("*.txt") if p.name.lower() != "license.txt")
    if not files:
        raise InputError(f"no essays (*.txt) in {root}; point data.eval.path at long/paul-graham-essays.")
    return [p.read_text(encoding="utf-8").split() for p in files]


def _token_count(backbone: Any, text: str) -> int:
    import warnings

    with warnings.catch_warnings():  # transformers warns that max_length is unused untruncated
        warnings.simplefilter("ignore", UserWarning)
        return int(backbone.tokenize([text], truncate=False).attention_mask.sum())


def fit_to_length(backbone: Any, words: list[str], insert: str, depth: float, length: int) -> str:
    """``words`` cut so that, with ``insert`` placed at ``depth`` (0..1) of them, the text
    has at most ``length`` tokens of ``backbone``'s tokenizer, and as many as the words
    allow. ``words`` must hold enough text (it is cut, never repeated)."""

    def build(count: int) -> str:
        kept = words[:count]
        at = int(round(depth * len(kept)))
        return " ".join([*kept[:at], insert, *kept[at:]])

    low, high = 0, len(words)
    if _token_count(backbone, build(high)) <= length:
        raise InputError(f"the filler holds fewer than {length} tokens; use a longer source text.")
    while low < high:  # the largest word count that fits
        middle = (low + high + 1) // 2
        if _token_count(backbone, build(middle)) <= length:
            low = middle
        else:
            high = middle - 1
    return build(low)


def _filler_words(
    rng: np.random.Generator, texts: list[list[str]], filler: str, length: int, names: frozenset[str]
) -> list[str]:
    """Enough words for ``length`` tokens (about 1.5 tokens per word at most, doubled).
    Words that are one of the task's ``names`` are left out of essay text, so a person is
    named only in their own document."""
    wanted = 2 * length
    if filler == "repeat":
        line = REPEATED_FILLER.split()
        return (line * (wanted // len(line) + 1))[:wanted]
    pool = [words for words in texts if len(words) > 50]
    words: list[str] = []
    while len(words) < wanted:  # start inside a random essay; go on into others if short
        essay = pool[int(rng.integers(len(pool)))]
        start = int(rng.integers(max(1, len(essay) - wanted))) if len(essay) > wanted else 0
        words.extend(w for w in essay[start : start + wanted - len(words)] if w.strip(".,;:!?'\"()").removesuffix("'s") not in names)
    return words


def generate(
    task: str,
    backbone: Any,
    folder: str | Path,
    length: int,
    queries: int = 50,
    candidates: int = 100,
    seed: int = 0,
    filler: str = "essay",
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, float]]]:
    """One length of ``task``: ``(corpus, queries, qrels)`` in BEIR's shape, the same for
    the same arguments and tokenizer."""
    if task not in TASKS:
        raise InputError(f"unknown long-context task {task!r}; use one of {', '.join(TASKS)}.")
    if not 1 <= queries <= candidates <= len(NAMES):
        raise InputError(
            f"need 1 <= queries ({queries}) <= candidates ({candidates}) <= {len(NAMES)} (one name each)."
        )
    if filler not in ("essay", "repeat"):
        raise InputError(f"filler must be 'essay' or 'repeat', not {filler!r}.")
    rng = np.random.default_rng([seed, length, TASKS.index(task)])
    texts = essays(folder)
    names = [NAMES[i] for i in rng.permutation(len(NAMES))[:candidates]]
    corpus: dict[str, str] = {}
    asked: dict[str, str] = {}
    for number, name in enumerate(names):
        if task == "passkey":
            key = int(rng.integers(10000, 100000))
            insert = f"{name}'s pass key is {key}. Remember it. {key} is the pass key for {name}."
            question = f"What is the pass key for {name}?"
            source = filler
        else:
            colour, thing, place = (str(rng.choice(vocab)) for vocab in (COLOURS, OBJECTS, PLACES))
            insert = f"{name} keeps a {colour} {thing} in the {place}."
            question = f"Where does {name} keep the {colour} {thing}?"
            source = "essay"
        depth = float(rng.uniform(0.0, 1.0))
        words = _filler_words(rng, texts, source, length, frozenset(names))
        doc = f"{task}-{length}-{number}"
        corpus[doc] = fit_to_length(backbone, words, insert, depth, length)
        asked[doc] = question
    chosen = sorted(rng.choice(candidates, size=queries, replace=False).tolist())
    docs = list(corpus)
    query_texts = {f"q-{docs[i]}": asked[docs[i]] for i in chosen}
    qrels = {f"q-{docs[i]}": {docs[i]: 1.0} for i in chosen}
    return corpus, query_texts, qrels


def evaluate_long_context(
    model: Any,
    task: str,
    folder: str | Path,
    index_factory: Callable[[int], Any],
    lengths: Sequence[int] = LENGTHS,
    queries: int = 50,
    candidates: int = 100,
    seed: int = 0,
    filler: str = "essay",
    batch_size: int = 8,
    bootstrap: int = 1000,
    encode_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """nDCG@1 and nDCG@10 (×100, 95% bootstrap intervals over queries) at every length;
    ``encode_options`` are extra keyword arguments for ``model.encode`` (``domain``)."""
    from .evaluation import bootstrap_ci, describe_model, ndcg_at_k

    started = time.perf_counter()
    per_length: dict[str, Any] = {}
    limit = int(model.backbone.max_length)
    for length in lengths:
        corpus, query_texts, qrels = generate(task, model.backbone, folder, length, queries, candidates, seed, filler)
        doc_ids, query_ids = list(corpus), list(query_texts)
        # plain truncation is the baseline: longer documents are cut at the model's maximum
        vectors = model.encode([corpus[d] for d in doc_ids], batch_size=batch_size, truncation="silent", **(encode_options or {}))
        index = index_factory(int(vectors.shape[1]))
        index.add(doc_ids, vectors)
        found = index.search(model.encode([query_texts[q] for q in query_ids], batch_size=batch_size, **(encode_options or {})), 10)
        entry: dict[str, Any] = {
            "queries": len(query_ids),
            "candidates": len(doc_ids),
            "truncated_to": limit if length > limit else None,
        }
        for k in (1, 10):
            values = np.array([ndcg_at_k(ranked, qrels[q], k) for q, ranked in zip(query_ids, found.ids)])
            low, high = bootstrap_ci(values, np.mean, n=bootstrap, seed=seed)
            entry[f"ndcg@{k}"] = 100 * float(values.mean())
            entry[f"ndcg@{k}_ci"] = [100 * low, 100 * high]
        per_length[str(length)] = entry
        _log.info(
            "%s %d tokens: %d documents and %d queries, nDCG@1 %.1f, %.0f s so far",
            task, length, len(doc_ids), len(query_ids), entry["ndcg@1"], time.perf_counter() - started,
        )
    metric = "ndcg@1" if task == "passkey" else "ndcg@10"
    # the headline metric per length at the top level, as `embplex eval` prints and a
    # sweep's summary tabulates every metric that has a `_ci`
    headline: dict[str, Any] = {}
    for length, entry in per_length.items():
        headline[f"{metric}@{length}"] = entry[metric]
        headline[f"{metric}@{length}_ci"] = entry[f"{metric}_ci"]
    return {
        "task": task,
        "metric": metric,
        **headline,
        "lengths": per_length,
        "filler": filler if task == "passkey" else "essay",
        "seed": seed,
        "confidence": 0.95,
        "bootstrap_samples": bootstrap,
        "max_length": limit,
        "seconds": round(time.perf_counter() - started, 2),
        "model": describe_model(model),
    }


def plot(runs: Mapping[str, Mapping[str, Any]], path: str | Path, metric: str | None = None) -> Path:
    """Score against length, one line (with its 95% band) per configuration in ``runs``
    (label -> the result of :func:`evaluate_long_context`), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, result in runs.items():
        name = metric or result["metric"]
        lengths = sorted(int(n) for n in result["lengths"])
        scores = [result["lengths"][str(n)][name] for n in lengths]
        low = [result["lengths"][str(n)][f"{name}_ci"][0] for n in lengths]
        high = [result["lengths"][str(n)][f"{name}_ci"][1] for n in lengths]
        axes.plot(lengths, scores, marker="o", label=label)
        axes.fill_between(lengths, low, high, alpha=0.15)
    first = next(iter(runs.values()))
    axes.set_xscale("log", base=2)
    axes.set_xlabel("document length (tokens)")
    axes.set_ylabel(f"{metric or first['metric']} (×100, 95% CI)")
    axes.set_title(f"{first['task']}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)
    return target


def label(specs: Mapping[str, Any]) -> str:
    """A short name for a model's configuration: its plugins joined by ``+``."""
    names = []
    for kind in ("backbone", "attention"):
        spec = specs.get(kind)
        for member in spec if isinstance(spec, list) else [spec] if spec else []:
            names.append(str(member.get("name")))
    return " + ".join(names) or "model"
