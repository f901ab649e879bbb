"""Pooling ``example_first_token``: the hidden state of each text's first real token.

An example plugin, written to show how a third-party package extends embplex; it adds no
technique of its own. With BERT-style encoders the first token is ``[CLS]``, so this is
the CLS pooling of Sentence-BERT (Reimers & Gurevych, 2019, arXiv:1908.10084). Unlike
plain index-0 pooling it finds the first real token under left padding too, and skips
instruction tokens when ``exclude_instruction`` is on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import embplex
from embplex.components import Features, Pooling

__version__ = "0.1.0"

# Config folders are given to Hydra as search paths; pkg:// finds them inside the package.
CONFIG_PATH = "pkg://embplex_example_plugin.conf"


class FirstTokenPooling(Pooling):
    """The state of the first token that pooling may read.

    :param exclude_instruction: when a prompt was prepended, take the first token after it
        instead of the prompt's first token.
    """

    def __init__(self, exclude_instruction: bool = True) -> None:
        super().__init__()
        self.exclude_instruction = exclude_instruction

    def forward(self, features: Features) -> Tensor:
        # Real tokens, without the prompt's when asked (all real tokens for a text that
        # is nothing but prompt, so padding is never read).
        mask = features.pooling_mask(self.exclude_instruction)
        # argmax returns the first maximum: the first position where the mask is set,
        # whichever side the batch was padded on.
        first = mask.int().argmax(dim=1)
        states = features.last_hidden_state
        return states[torch.arange(states.shape[0], device=states.device), first]


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register("example_first_token", FirstTokenPooling, paper="Sentence-BERT (2019), arXiv:1908.10084")


@embplex.hookimpl
def register_config_paths(register: Any) -> None:
    register(CONFIG_PATH)
