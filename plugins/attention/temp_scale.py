"""Attention ``temp_scale``: a softmax temperature below 1 inside attention, against length collapse.

Paper: Length-Induced Embedding Collapse in PLM-based Models (Zhou et al., 2024,
arXiv:2410.24200), whose TempScale sharpens attention on long inputs: as a text grows, each
query's attention spreads over more keys, acts as a stronger low-pass filter, and the
embeddings of long texts crowd together. Dividing the scaled scores by a temperature
``< 1`` restores sharper attention, training-free. Ours divides the scores of the chosen
layers (all by default), and with ``min_length`` only those of texts longer than that many
real tokens, so short texts keep their exact embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import embplex
from embplex.components import Attention
from embplex.errors import OptionError


class TempScale(Attention):
    def __init__(self, temperature: float = 0.9, min_length: int = 0, layers: list[int] | None = None) -> None:
        super().__init__()
        if not temperature > 0:
            raise OptionError(
                f"option temperature={temperature} must be positive: the scores are divided by it "
                "(TempScale uses values a little below 1, e.g. 0.9)."
            )
        if min_length < 0:
            raise OptionError(f"option min_length={min_length} must be 0 (every text) or a token count.")
        self.temperature, self.min_length, self.layers = float(temperature), int(min_length), layers
        self._scale: Tensor | None = None

    def mask(self, padding_mask: Tensor) -> Tensor:
        # the backbone asks for the mask once per pass, before any layer: the moment to
        # learn each text's length (scores only sees the padded width)
        lengths = padding_mask.sum(dim=-1)
        scale = torch.where(lengths > self.min_length, 1.0 / self.temperature, 1.0)
        self._scale = scale.to(torch.float32)[:, None, None, None]
        return super().mask(padding_mask)

    def score_scale(self, layer: int) -> Tensor:
        # a factor per text rather than a rewrite of the scores: the backbone folds it
        # into the queries and keeps the fused kernel (at 4096 tokens about 8× faster)
        if self._scale is None:
            raise RuntimeError("temp_scale: score_scale called before mask(); run it through the backbone.")
        return self._scale


@embplex.hookimpl
def register_attentions(register: Any) -> None:
    register(
        "temp_scale",
        TempScale,
        paper="Length-Induced Embedding Collapse in PLM-based Models (2024), arXiv:2410.24200",
    )
