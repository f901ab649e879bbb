"""Sampler ``length_buckets``: batches of similar token length under a constant token budget.

From "Dataset Decomposition: Faster LLM Training with Variable Sequence Length
Curriculum" (Pouransari et al., 2024, arXiv:2405.13226): instead of padding every batch
to one fixed length, sequences are grouped into buckets of the same length and each step
takes a batch from one bucket, with a batch size that keeps the tokens per step constant,
optionally ordered from short to long (a length curriculum). For embedding training a
batch has several roles (anchors, positives, negatives), each padded to its own longest
text; we count a batch's cost as ``Σ_roles rows × longest``, sort the examples by their
roles' token lengths (the role with the most tokens first) and cut the sorted list into
batches that stay within ``max_tokens``. Batches are shuffled (seeded by ``(seed,
epoch)``), or ordered by length with ``curriculum: short_to_long``. Lengths come from
``context.model.backbone.tokenize`` (truncated as training truncates).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Literal, Sequence

import numpy as np

import embplex
from embplex.components import Example, Sampler, TrainingContext
from embplex.errors import InputError, OptionError


def token_lengths(backbone: Any, texts: Sequence[str], prompt: str | None = None, chunk: int = 256) -> list[int]:
    """Each text's token count as training tokenizes it (prompt and truncation included)."""
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        features = backbone.tokenize(list(texts[start : start + chunk]), prompt=prompt)
        lengths += features.attention_mask.sum(dim=1).tolist()
    return [int(n) for n in lengths]


def _fingerprint(examples: Sequence[Example]) -> int:
    """Which examples the cached lengths belong to (within this process)."""
    return hash(tuple((e.anchor, e.positive, tuple(e.negatives), e.prompt) for e in examples))


class LengthBuckets(Sampler):
    def __init__(
        self,
        max_tokens: int = 16384,
        curriculum: Literal["none", "short_to_long"] = "none",
        max_batch_size: int | None = None,
    ) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise OptionError(f"max_tokens must be a positive number of tokens per batch, not {max_tokens!r}.")
        if curriculum not in ("none", "short_to_long"):
            raise OptionError(f"curriculum must be 'none' or 'short_to_long', not {curriculum!r}.")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or max_batch_size < 1):
            raise OptionError(f"max_batch_size must be at least 1 or null, not {max_batch_size!r}.")
        self.max_tokens = max_tokens
        self.curriculum = curriculum
        self.max_batch_size = max_batch_size
        self._lengths: tuple[int, np.ndarray] | None = None  # (the examples' fingerprint, [examples, roles])

    def lengths(self, examples: Sequence[Example], context: TrainingContext) -> np.ndarray:
        """``[examples, 3]``: anchor, positive and longest-negative token counts (0: none)."""
        key = _fingerprint(examples)
        if self._lengths is not None and self._lengths[0] == key:
            return self._lengths[1]
        if context.model is None:
            raise InputError("sampler length_buckets counts tokens with the model's tokenizer: the training context needs the model.")
        backbone = context.model.backbone
        table = np.zeros((len(examples), 3), dtype=np.int64)
        for prompt in dict.fromkeys(e.prompt for e in examples):
            rows = [i for i, e in enumerate(examples) if e.prompt == prompt]
            table[rows, 0] = token_lengths(backbone, [examples[i].anchor for i in rows], prompt)
        table[:, 1] = token_lengths(backbone, [e.positive for e in examples])
        negatives = [(i, text) for i, e in enumerate(examples) for text in e.negatives]
        if negatives:
            for (i, _), n in zip(negatives, token_lengths(backbone, [t for _, t in negatives])):
                table[i, 2] = max(table[i, 2], n)
        self._lengths = (key, table)
        return table

    @staticmethod
    def cost(lengths: np.ndarray, negatives: Sequence[int]) -> int:
        """Padded tokens of a batch: per role, rows × its longest text (``k`` negatives each,
        ``k`` the smallest count in the batch, as :func:`make_training_batch` keeps)."""
        rows = lengths.shape[0]
        k = min(negatives) if len(negatives) else 0
        return int(rows * lengths[:, 0].max() + rows * lengths[:, 1].max() + rows * k * lengths[:, 2].max())

    def plan(self, examples: Sequence[Example], context: TrainingContext) -> list[list[int]]:
        """The epoch's batches before ordering: sorted by length, cut under the budget."""
        lengths = self.lengths(examples, context)
        counts = [len(e.negatives) for e in examples]
        single = [self.cost(lengths[i : i + 1], counts[i : i + 1]) for i in range(len(examples))]
        worst = int(np.argmax(single))
        if single[worst] > self.max_tokens:
            raise OptionError(
                f"sampler.max_tokens={self.max_tokens} is smaller than example {worst} alone ({single[worst]} tokens "
                f"with its anchor, positive and negatives, as the tokenizer truncates them); raise max_tokens "
                f"to at least {max(single)}."
            )
        leaves: list[list[int]] = []
        self._split(list(range(len(examples))), lengths, counts, leaves)
        # the splits leave batches under the budget: join neighbours (by their longest texts) that fit together
        leaves.sort(key=lambda batch: tuple(lengths[batch].max(axis=0)))
        batches = [leaves[0]]
        for leaf in leaves[1:]:
            joined = batches[-1] + leaf
            small = self.max_batch_size is None or len(joined) <= self.max_batch_size
            if small and self.cost(lengths[joined], [counts[i] for i in joined]) <= self.max_tokens:
                batches[-1] = joined
            else:
                batches.append(leaf)
        return batches

    def _split(self, members: list[int], lengths: np.ndarray, counts: list[int], out: list[list[int]]) -> None:
        """Cut ``members`` into batches within the budget, k-d style: split along the role
        that wastes most padding, at the count that leaves whole budgets on each side, so
        every role of a batch spans a narrow range of lengths."""
        cost = self.cost(lengths[members], [counts[i] for i in members])
        too_many = self.max_batch_size is not None and len(members) > self.max_batch_size
        if (cost <= self.max_tokens and not too_many) or len(members) == 1:
            out.append(members)
            return
        rows = lengths[members]
        waste = rows.max(axis=0) * len(members) - rows.sum(axis=0)
        waste[2] *= max(1, min(counts[i] for i in members))
        role = int(np.argmax(waste))
        members = sorted(members, key=lambda i: (lengths[i, role], i))
        parts = max(2, math.ceil(cost / self.max_tokens), math.ceil(len(members) / (self.max_batch_size or len(members))))
        cut = max(1, min(len(members) - 1, round(len(members) * (parts // 2) / parts)))
        self._split(members[:cut], lengths, counts, out)
        self._split(members[cut:], lengths, counts, out)

    def batches(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        epoch: int,
        context: TrainingContext,
    ) -> Iterator[list[int]]:
        planned = self.plan(examples, context)
        rng = np.random.default_rng([seed, epoch])
        shuffled = [planned[i] for i in rng.permutation(len(planned))]
        if self.curriculum == "short_to_long":  # stable: equal lengths keep the shuffled order
            lengths = self.lengths(examples, context)
            shuffled.sort(key=lambda batch: float(lengths[batch].sum(axis=1).mean()))
        yield from shuffled

    def num_batches(self, examples: Sequence[Example], batch_size: int) -> int:
        """An estimate before the lengths are known; set ``train.max_steps`` for exact schedules."""
        if self._lengths is not None and self._lengths[0] == _fingerprint(examples):
            return len(self.plan(examples, TrainingContext()))
        return math.ceil(len(examples) / batch_size)


@embplex.hookimpl
def register_samplers(register: Any) -> None:
    register(
        "length_buckets",
        LengthBuckets,
        paper="Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum (2024), arXiv:2405.13226",
    )
