"""Pooling ``mean``: the average of the token states.

Baseline from Sentence-BERT (Reimers & Gurevych, 2019, arXiv:1908.10084), the pooling of
all-MiniLM-L6-v2. Padding is always left out; instruction tokens are left out when
``exclude_instruction`` is on (as NV-Embed does, arXiv:2405.17428).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

import embplex
from embplex.components import Features, Pooling, SentenceTransformersModule


class MeanPooling(Pooling):
    def __init__(self, exclude_instruction: bool = True) -> None:
        super().__init__()
        self.exclude_instruction = exclude_instruction

    def forward(self, features: Features) -> Tensor:
        mask = features.pooling_mask(self.exclude_instruction)
        states = features.last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def sentence_transformers_export(self, hidden_size: int) -> SentenceTransformersModule:
        return embplex.sentence_transformers_pooling("mean", hidden_size)


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register("mean", MeanPooling, paper="Sentence-BERT (2019), arXiv:1908.10084")
