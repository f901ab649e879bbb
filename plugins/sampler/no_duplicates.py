"""Sampler ``no_duplicates``: no text appears in two examples of the same batch.

Baseline (no paper), as sentence-transformers' ``NoDuplicatesBatchSampler``. With
in-batch negatives, a text that appears twice in a batch (the same query with two
positives, a passage that is one anchor's positive and another's negative) becomes a
false negative. Examples are visited in a seeded random order and each batch takes the
next examples whose texts (anchor, positive and every negative) are all new to it; the
ones skipped wait for a later batch. Unlike sentence-transformers we check hard negatives
too, and the order depends only on ``(seed, epoch)`` so resuming is exact.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence


import embplex
from embplex.components import Example, Sampler, TrainingContext
from embplex.errors import OptionError


def example_texts(example: Example) -> set[str]:
    return {example.anchor, example.positive, *example.negatives}


class NoDuplicatesSampler(Sampler):
    def __init__(self, drop_last: bool = False) -> None:
        self.drop_last = bool(drop_last)

    def batches(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        epoch: int,
        context: TrainingContext,
    ) -> Iterator[list[int]]:
        if batch_size < 1:
            raise OptionError(f"batch_size must be at least 1, not {batch_size}.")
        order = self.permutation(len(examples), seed, epoch)
        texts = [example_texts(examples[i]) for i in range(len(examples))]
        # dict keeps the shuffled order and deletes in O(1)
        remaining = dict.fromkeys(order)
        while remaining:
            batch: list[int] = []
            seen: set[str] = set()
            for index in remaining:
                if texts[index] & seen:
                    continue
                batch.append(index)
                seen |= texts[index]
                if len(batch) == batch_size:
                    break
            for index in batch:
                del remaining[index]
            # A short batch means no remaining example fits next to these; with
            # drop_last they are dropped for this epoch, as a short final batch would be.
            if len(batch) == batch_size or not self.drop_last:
                yield batch

    def num_batches(self, examples: Sequence[Example], batch_size: int) -> int:
        """The count for data without duplicates; heavy duplication yields more, shorter batches."""
        if self.drop_last:
            return len(examples) // batch_size
        return math.ceil(len(examples) / batch_size)


@embplex.hookimpl
def register_samplers(register: Any) -> None:
    register("no_duplicates", NoDuplicatesSampler)
