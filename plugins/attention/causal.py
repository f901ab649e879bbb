"""Attention ``causal``: every token sees only itself and the tokens before it.

Paper: Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?
(Tang & Yang, 2024, arXiv:2409.02727), which compares a decoder's default causal
attention with bidirectional attention (as NV-Embed, arXiv:2405.17428, uses). Composing
``causal`` states the policy explicitly: the mask is built by embplex (causal over real
tokens, with each token always seeing itself so left-padded rows stay finite) and runs
through the fused ``scaled_dot_product_attention`` kernel in every layer. On an encoder
it turns BERT-style models causal, which no paper recommends but makes ablations easy.
"""

from __future__ import annotations

from typing import Any

import embplex
from embplex.components import Attention


class CausalAttention(Attention):
    causal = True

    def __init__(self) -> None:  # no options; an explicit signature lets the registry refuse any
        super().__init__()


@embplex.hookimpl
def register_attentions(register: Any) -> None:
    register(
        "causal",
        CausalAttention,
        paper="Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models? (2024), arXiv:2409.02727",
    )
