"""Pooling ``max``: the element-wise maximum over the token states.

Baseline from Sentence-BERT (Reimers & Gurevych, 2019, arXiv:1908.10084), which compares
max, mean and [CLS] pooling. Padding never takes part; prompt tokens are left out when
``exclude_instruction`` is on (as NV-Embed does for mean pooling, arXiv:2405.17428).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

import embplex
from embplex.components import Features, Pooling, SentenceTransformersModule


class MaxPooling(Pooling):
    def __init__(self, exclude_instruction: bool = True) -> None:
        super().__init__()
        self.exclude_instruction = exclude_instruction

    def forward(self, features: Features) -> Tensor:
        mask = features.pooling_mask(self.exclude_instruction)
        states = features.last_hidden_state
        return states.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)

    def sentence_transformers_export(self, hidden_size: int) -> SentenceTransformersModule:
        # Without a prompt both take the maximum over every real token. With one,
        # sentence-transformers either pools over the prompt or leaves out the prompt *and*
        # [CLS]: neither equals exclude_instruction=True (docs/concepts.md says so).
        return embplex.sentence_transformers_pooling("max", hidden_size)


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register("max", MaxPooling, paper="Sentence-BERT (2019), arXiv:1908.10084")
