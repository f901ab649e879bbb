"""Pooling ``cls``: the hidden state of the first token.

Baseline from BERT (Devlin et al., 2018, arXiv:1810.04805), compared against the other
poolings for LLM embedders in Pooling And Attention (Tang & Yang, 2024, arXiv:2409.02727).
The first real token is found from the attention mask, so left padding works too. With
``exclude_instruction`` the first real token that is not part of the prompt is taken;
special tokens placed before the prompt ([CLS], a decoder's BOS) are not prompt tokens,
so on BERT-style models this is always [CLS], while on a decoder without BOS it is the
first token of the text proper instead of the prompt's first token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import embplex
from embplex.components import Features, Pooling, SentenceTransformersModule


class ClsPooling(Pooling):
    def __init__(self, exclude_instruction: bool = True) -> None:
        super().__init__()
        self.exclude_instruction = exclude_instruction

    def forward(self, features: Features) -> Tensor:
        mask = features.pooling_mask(self.exclude_instruction)
        first = mask.int().argmax(dim=1)
        states = features.last_hidden_state
        return states[torch.arange(states.shape[0], device=states.device), first]

    def sentence_transformers_export(self, hidden_size: int) -> SentenceTransformersModule:
        # sentence-transformers also takes the first real token. Only the encoder backbone
        # exports, and its [CLS] precedes any prompt, so the two agree with prompts too.
        return embplex.sentence_transformers_pooling("cls", hidden_size)


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register("cls", ClsPooling, paper="BERT (2018), arXiv:1810.04805")
