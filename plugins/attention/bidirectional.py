"""Attention ``bidirectional``: every token sees every real token of its text.

Paper: NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models
(Lee et al., 2024, arXiv:2405.17428); KaLM-Embedding-V2 (2025, arXiv:2506.20923) and
ULLME (2024, arXiv:2408.03402) do the same. A decoder LLM's causal mask is removed during
contrastive training so that early tokens read the whole text. We replace the mask the
model would build with embplex's padding-only mask inside every self-attention layer
(fused ``scaled_dot_product_attention``); unlike ULLME we patch no model classes, so any
family transformers routes through its attention interface works.
"""

from __future__ import annotations

from typing import Any

import embplex
from embplex.components import Attention


class BidirectionalAttention(Attention):
    causal = False

    def __init__(self) -> None:  # no options; an explicit signature lets the registry refuse any
        super().__init__()


@embplex.hookimpl
def register_attentions(register: Any) -> None:
    register(
        "bidirectional",
        BidirectionalAttention,
        paper="NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models (2024), arXiv:2405.17428",
    )
