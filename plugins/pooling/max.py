"""Pooling ``max``: the element-wise maximum over the token states.

Baseline from Sentence-BERT (Reimers & Gurevych, 2019, arXiv:1908.10084), which compares
max, mean and [CLS] pooling. Padding never takes part; prompt tokens are left out when
``exclude_instruction`` is on (as NV-Embed does for mean pooling, arXiv:2405.17428).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

import embplex
from embplex.components import Features, Pooling


class MaxPooling(Pooling):
    def __init__(self, exclude_instruction: bool = True) -> None:
        super().__init__()
        self.exclude_instruction = exclude_instruction

    def forward(self, features: Features) -> Tensor:
        mask = features.pooling_mask(self.exclude_instruction)
        states = features.last_hidden_state
        return states.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)

    def sentence_transformers_module(
        self, root: Path, index: int, hidden_size: int
    ) -> dict[str, str] | None:
        # sentence-transformers either pools over the prompt or leaves out the prompt
        # *and* [CLS]; neither equals leaving out the prompt alone, so with
        # exclude_instruction on we write no sentence-transformers layout.
        if self.exclude_instruction:
            return None
        return embplex.sentence_transformers_pooling(root, index, "max", hidden_size)



@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register("max", MaxPooling, paper="Sentence-BERT (2019), arXiv:1908.10084")
