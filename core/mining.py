"""Hard-negative mining with the model being trained: what the mining samplers share.

A mining sampler encodes a corpus with ``context.model``, indexes it with
``context.make_index(dim)``, and gives every example the negatives found at ranks
``[skip, skip + negatives)`` of its anchor's search, known positives left out. The
sampler plugins ``hard_negatives``, ``adaptive_margin`` and ``refresh_mining`` are this
class with different options (a margin on the positive's similarity, re-mining every N
steps), as Hugging Face backbones share :class:`embplex.hf.TransformersBackbone`. The
core never uses it; it is a library for plugins, like :mod:`embplex.distributed`.

How it fits the sampler contract (``docs/concepts.md``, Sampler):

* which examples share a batch is the choice of an inner *batching* sampler, built by
  name from the registry (option ``batching``, default ``no_duplicates``);
* the examples it yields are copies of the training examples whose ``negatives`` are the
  mined ones (and whose ``scores`` are dropped: teacher scores belong to the file's
  negatives, not to mined ones);
* what it mined is its state (corpus positions, ``int64``), so a resumed run reuses it and
  re-mines exactly when an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .components import Example, Sampler, TrainingContext
from .errors import InputError, OptionError

if TYPE_CHECKING:
    from .model import EmbeddingModel
    from .registry import Registry

__all__ = ["MiningSampler", "read_corpus"]


def read_corpus(path: str | Path, option: str) -> list[str]:
    """The texts of a corpus file: JSON lines with ``text`` (and ``title``, as a BEIR
    ``corpus.jsonl``) or plain text, one text per line. An empty one is refused."""
    from .data import read_texts

    path = Path(path).expanduser()
    if not path.is_file():
        raise OptionError(f"{option}={str(path)!r} is not a file; give a corpus.jsonl or a text file, one text per line.")
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise OptionError(f"{option}: {path}, line {number} has no 'text' string.")
                text = f"{record.get('title') or ''} {record['text']}".strip()
                if text:
                    texts.append(text)
    else:
        try:
            texts = read_texts(path)
        except InputError as exc:
            raise OptionError(f"{option}: {exc}") from None
    if not texts:
        raise OptionError(f"{option}={str(path)!r} holds no text: mining needs a corpus to search.")
    return texts


def _whole(value: Any, option: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise OptionError(f"{option} must be a whole number of at least {least}, not {value!r}.")
    return value


class MiningSampler(Sampler):
    """Mines every example's negatives with the live model (see the module docstring).

    :param negatives: negatives per example.
    :param skip: ranks left out at the top of each anchor's search (likely unlabelled positives).
    :param pool: 0 takes ranks ``[skip, skip + negatives)`` in order; ``pool >= negatives``
        draws them at random, seeded by ``(seed, epoch of the mining, round)``, from ranks
        ``[skip, skip + pool)``.
    :param corpus: a file of extra texts to mine from, besides every training positive.
    :param batching: the sampler that groups examples into batches (a name or a config).
    :param margin: keep a negative only when its similarity to the anchor is below
        ``margin`` × the positive's (LG-ANNA, NV-Embed's TopK-PercPos); ``None``: off.
    :param refresh_every: re-mine with the current model every this many optimizer steps;
        0 mines once, when training starts.
    :param encode_batch_size: texts per forward pass while mining.
    """

    def __init__(
        self,
        negatives: int = 4,
        skip: int = 0,
        pool: int = 0,
        corpus: str | None = None,
        batching: str | Mapping[str, Any] = "no_duplicates",
        margin: float | None = None,
        refresh_every: int = 0,
        encode_batch_size: int = 64,
        *,
        registry: "Registry",
    ) -> None:
        self.negatives = _whole(negatives, "negatives", 1)
        self.skip = _whole(skip, "skip", 0)
        self.pool = _whole(pool, "pool", 0)
        if self.pool and self.pool < self.negatives:
            raise OptionError(
                f"pool={pool} is smaller than negatives={negatives}; draw from at least as many ranks "
                "as negatives are wanted, or set pool=0 to take the top ranks in order."
            )
        if margin is not None and not (isinstance(margin, (int, float)) and 0 < margin <= 1):
            raise OptionError(
                f"margin must be in (0, 1], not {margin!r}: a negative is kept when its similarity to the "
                "anchor is below margin x the positive's (0.95 drops negatives almost as close as the positive)."
            )
        self.margin = None if margin is None else float(margin)
        self.refresh_every = _whole(refresh_every, "refresh_every", 0)
        self.encode_batch_size = _whole(encode_batch_size, "encode_batch_size", 1)
        self.corpus = corpus
        self._extra = read_corpus(corpus, "corpus") if corpus is not None else []
        self.batching = batching
        self.inner: Sampler = registry.create_part("sampler", batching, option="sampler.batching")
        if isinstance(self.inner, MiningSampler):
            raise OptionError("batching must group examples (random, no_duplicates, ...), not mine them again.")
        self._texts: list[str] | None = None
        self._table: torch.Tensor | None = None  # [examples, width] corpus positions, -1 pads
        self._mined_at = 0  # the optimizer step the table was mined at
        self._rounds = 0  # minings so far (seeds the pool draws)

    # -- the corpus ------------------------------------------------------------------

    def corpus_texts(self, examples: Sequence[Example]) -> list[str]:
        """Every training positive, then the corpus file's texts, each text once."""
        if self._texts is None:
            self._texts = list(dict.fromkeys([e.positive for e in examples] + self._extra))
        return self._texts

    def _fingerprint(self, texts: Sequence[str]) -> str:
        return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()

    # -- mining ------------------------------------------------------------------------

    def mine(self, examples: Sequence[Example], context: TrainingContext, seed: int, epoch: int, spare: int) -> torch.Tensor:
        """Each example's candidate negatives as corpus positions, best first: ``[examples,
        negatives + spare]``, ``-1`` where too few remain. ``spare`` extra candidates
        replace those that a batch makes invalid (another example's positive)."""
        model, make_index = context.model, context.make_index
        if model is None or make_index is None:
            raise InputError(
                f"sampler {type(self).__name__} mines with the model being trained and an index: the training "
                "context needs model and make_index (embplex.training.train(..., make_index=...); the CLI passes both)."
            )
        texts = self.corpus_texts(examples)
        if self.skip >= len(texts):
            raise OptionError(
                f"sampler.skip={self.skip} leaves nothing to mine: the corpus (training positives"
                f"{' and ' + repr(self.corpus) if self.corpus else ''}) has {len(texts)} distinct texts; "
                "lower skip or add texts with the corpus option."
            )
        position = {text: i for i, text in enumerate(texts)}
        known: dict[str, set[int]] = {}
        for example in examples:  # an anchor's every positive, and the anchor itself when it is in the corpus
            excluded = known.setdefault(example.anchor, {position[example.anchor]} if example.anchor in position else set())
            excluded.add(position[example.positive])
        corpus = self._encode(model, texts, None)
        queries = list(dict.fromkeys((e.anchor, e.prompt) for e in examples))
        query_vectors = np.zeros((len(queries), corpus.shape[1]), dtype=np.float32)
        for prompt in dict.fromkeys(p for _, p in queries):
            rows = [i for i, (_, p) in enumerate(queries) if p == prompt]
            query_vectors[rows] = self._encode(model, [queries[i][0] for i in rows], prompt)
        index = make_index(corpus.shape[1])
        index.add([str(i) for i in range(len(texts))], corpus)

        width = self.negatives + spare
        window = max(self.pool, width)
        most_known = max(len(ids) for ids in known.values())
        first_depth = min(len(texts), self.skip + window + most_known)
        ranked = self._ranked(index, query_vectors, first_depth)
        rng = np.random.default_rng([seed, epoch, self._rounds])
        table = torch.full((len(examples), width), -1, dtype=torch.int64)
        row_of = {query: i for i, query in enumerate(queries)}
        short = 0
        for number, example in enumerate(examples):
            row = row_of[(example.anchor, example.prompt)]
            excluded = known[example.anchor]
            threshold = None
            if self.margin is not None:
                threshold = self.margin * float(corpus[position[example.positive]] @ query_vectors[row])
            depth, hits = first_depth, ranked[row]
            while True:
                candidates = [c for c in hits if c not in excluded][self.skip :]
                if threshold is not None:  # LG-ANNA: drop what is nearly as close as the positive
                    candidates = [c for c in candidates if float(corpus[c] @ query_vectors[row]) < threshold]
                if len(candidates) >= window or depth >= len(texts):
                    break
                depth = min(len(texts), depth * 2)  # the margin dropped too many: search deeper
                hits = self._ranked(index, query_vectors[row : row + 1], depth)[0]
            candidates = candidates[:window]
            if self.pool:
                candidates = [candidates[i] for i in rng.permutation(len(candidates))]
            chosen = candidates[:width]
            short += len(chosen) < self.negatives
            table[number, : len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
        if short:
            warnings.warn(
                f"sampler {type(self).__name__}: {short} of {len(examples)} examples got fewer than "
                f"{self.negatives} negatives (the corpus of {len(texts)} texts, after skip={self.skip}, their "
                f"known positives{' and the margin' if self.margin is not None else ''}, has too few); a batch "
                "holding one of them trains every anchor with that smaller number of negatives.",
                UserWarning,
                stacklevel=2,
            )
        self._rounds += 1
        self._mined_at = context.step
        return table

    def _encode(self, model: "EmbeddingModel", texts: Sequence[str], prompt: str | None) -> np.ndarray:
        vectors = model.encode(
            list(texts), batch_size=self.encode_batch_size, prompt=prompt, normalize=True,
            convert_to="numpy", show_progress=False, truncation="silent",
        )
        return np.asarray(vectors, dtype=np.float32)

    @staticmethod
    def _ranked(index: Any, queries: np.ndarray, k: int) -> list[list[int]]:
        return [[int(i) for i in hits] for hits in index.search(queries, k).ids]

    # -- batches -----------------------------------------------------------------------

    def batches(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        epoch: int,
        context: TrainingContext,
    ) -> Iterator[list[Example]]:
        spare = max(0, batch_size - 1)  # at most the other examples' positives can clash
        if self._table is not None and self._table.shape[0] != len(examples):
            raise InputError(
                f"sampler {type(self).__name__} holds negatives mined for {self._table.shape[0]} examples, "
                f"not these {len(examples)}."
            )
        texts = self.corpus_texts(examples)
        for batch in self.inner.batches(examples, batch_size, seed, epoch, context):
            if self._table is None or self._due(context.step):
                self._table = self.mine(examples, context, seed, epoch, spare)
            yield self._with_negatives(examples, batch, texts)

    def _due(self, step: int) -> bool:
        every = self.refresh_every
        return bool(every) and step // every > self._mined_at // every

    def _with_negatives(self, examples: Sequence[Example], batch: Sequence[Any], texts: list[str]) -> list[Example]:
        if any(isinstance(item, Example) for item in batch):
            raise TypeError(
                f"sampler.batching {type(self.inner).__name__} yielded Example objects; a mining sampler needs "
                "positions to look up what it mined (use random or no_duplicates)."
            )
        members = self.inner.examples_of(examples, batch)
        positives = {e.positive for e in members}
        planned = []
        for number, example in zip(batch, members):
            # a text that is another example's positive in this batch would be a false negative
            mined = [texts[c] for c in self._table[number].tolist() if c >= 0]
            kept = [t for t in mined if t not in positives][: self.negatives]
            planned.append(dataclasses.replace(example, negatives=kept, scores=None))
        return planned

    def num_batches(self, examples: Sequence[Example], batch_size: int) -> int:
        return self.inner.num_batches(examples, batch_size)

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "table": self._table,
            "mined_at": self._mined_at,
            "rounds": self._rounds,
            "corpus_file_sha256": self._fingerprint(self._extra),
            "batching": self.inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"table", "mined_at", "rounds", "corpus_file_sha256", "batching"}
        if set(state) != expected:
            raise ValueError(f"not a {type(self).__name__} state: keys {sorted(state)}, expected {sorted(expected)}")
        table = state["table"]
        if table is not None and (not isinstance(table, torch.Tensor) or table.dim() != 2 or table.dtype != torch.int64):
            raise ValueError("the mined table must be a 2-D int64 tensor")
        self._table, self._mined_at, self._rounds = table, int(state["mined_at"]), int(state["rounds"])
        if state["corpus_file_sha256"] != self._fingerprint(self._extra):
            raise ValueError(f"its negatives were mined from another corpus file than {self.corpus!r} holds now")
        self.inner.load_state_dict(state["batching"])
