"""Pooling ``last_token``: the hidden state of the last real token (EOS for decoders).

Papers: "EOS-last token pooling" in Pooling And Attention: What Are Effective Designs For
LLM-Based Embedding Models? (Tang & Yang, 2024, arXiv:2409.02727), as used by E5-Mistral
and SGPT-style decoder embedders. Under causal attention only the last token has read the
whole text, so it summarises it. The last real token is located from the attention mask,
so right and left padding give the same vector. ``exclude_instruction`` takes the last
real token that is not part of the prompt; the prompt comes first, so this differs only
when the text itself was truncated away.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import embplex
from embplex.components import Features, Pooling, SentenceTransformersModule


class LastTokenPooling(Pooling):
    def __init__(self, exclude_instruction: bool = True) -> None:
        super().__init__()
        self.exclude_instruction = exclude_instruction

    def forward(self, features: Features) -> Tensor:
        mask = features.pooling_mask(self.exclude_instruction)
        width = mask.shape[1]
        last = width - 1 - mask.int().flip(dims=[1]).argmax(dim=1)
        states = features.last_hidden_state
        return states[torch.arange(states.shape[0], device=states.device), last]

    def sentence_transformers_export(self, hidden_size: int) -> SentenceTransformersModule:
        # The prompt precedes the text, so leaving it out never moves the last token:
        # sentence-transformers' "lasttoken" is the same vector with prompts too.
        return embplex.sentence_transformers_pooling("lasttoken", hidden_size)


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register(
        "last_token",
        LastTokenPooling,
        paper="Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models? (2024), arXiv:2409.02727",
    )
