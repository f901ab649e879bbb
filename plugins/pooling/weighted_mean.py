"""Pooling ``weighted_mean``: a mean in which later tokens weigh more (position-weighted).

Paper: SGPT: GPT Sentence Embeddings for Semantic Search (Muennighoff, 2022,
arXiv:2202.08904). Under causal attention a token has read only the tokens before it,
so SGPT weights the i-th token by i (normalised to sum to one). Positions count real
tokens only, so left and right padding give the same vector. With
``exclude_instruction`` the prompt tokens are left out but the text's tokens keep their
positions in the full sequence (they did read the prompt), as sentence-transformers does.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

import embplex
from embplex.components import Features, Pooling, SentenceTransformersModule


class WeightedMeanPooling(Pooling):
    def __init__(self, exclude_instruction: bool = True) -> None:
        super().__init__()
        self.exclude_instruction = exclude_instruction

    def forward(self, features: Features) -> Tensor:
        mask = features.pooling_mask(self.exclude_instruction)
        states = features.last_hidden_state
        positions = features.attention_mask.long().cumsum(dim=1)
        weights = (positions * mask).unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def sentence_transformers_export(self, hidden_size: int) -> SentenceTransformersModule:
        # Same position weights as sentence-transformers' "weightedmean" without a prompt;
        # it cannot leave out the prompt while keeping [CLS] (docs/concepts.md says so).
        return embplex.sentence_transformers_pooling("weightedmean", hidden_size)


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register(
        "weighted_mean",
        WeightedMeanPooling,
        paper="SGPT: GPT Sentence Embeddings for Semantic Search (2022), arXiv:2202.08904",
    )
