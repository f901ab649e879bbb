"""Sampler ``random``: a seeded shuffle cut into batches.

Baseline (no paper): the order every trainer uses by default. The permutation depends only
on ``(seed, epoch)``, so an interrupted run resumes with exactly the batches it would have
seen; a new epoch gets a new order. ``drop_last`` drops the final short batch.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence


import embplex
from embplex.components import Example, Sampler, TrainingContext
from embplex.errors import OptionError


class RandomSampler(Sampler):
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
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < batch_size and self.drop_last:
                return
            yield batch

    def num_batches(self, examples: Sequence[Example], batch_size: int) -> int:
        if self.drop_last:
            return len(examples) // batch_size
        return math.ceil(len(examples) / batch_size)


@embplex.hookimpl
def register_samplers(register: Any) -> None:
    register("random", RandomSampler)
