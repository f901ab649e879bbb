"""Attention ``sink_calibration``: find attention sinks beyond the first token and lower their attention.

Papers: Unveiling and Harnessing Hidden Attention Sinks: Training-Free Attention
Calibration (ACT; Yu et al., 2024, arXiv:2406.15765) and Efficient Streaming Language
Models with Attention Sinks (StreamingLLM; Xiao et al., 2023, arXiv:2309.17453). Some
tokens besides the first (separators, punctuation) soak up attention while carrying
little information; ACT finds them per input and head, on the fly, and moves part of
their attention to the other tokens. Ours flags a key of a head as a sink when it receives
more than ``threshold`` times the uniform share of attention (averaged over the text's
queries) and its value vector's norm is below ``value_ratio`` times the mean over the
text's keys; the first real token (the initial sink StreamingLLM keeps) is never flagged.
Each query's attention on the flagged keys is multiplied by ``factor`` and the mass taken
away is given to the other keys in proportion to their attention, so the mass on sinks
drops by exactly ``factor`` and every row still sums to 1. ACT calibrates only chosen
heads found on a held-out set; ours applies to every head of the chosen layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import embplex
from embplex.components import Attention
from embplex.errors import OptionError


class SinkCalibration(Attention):
    def __init__(
        self,
        factor: float = 0.5,
        threshold: float = 4.0,
        value_ratio: float = 1.0,
        layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= factor < 1:
            raise OptionError(f"option factor={factor} must be in [0, 1): sinks keep that share of their attention.")
        if not threshold > 1:
            raise OptionError(f"option threshold={threshold} must exceed 1 (times the uniform share of attention).")
        if not value_ratio > 0:
            raise OptionError(f"option value_ratio={value_ratio} must be positive.")
        self.factor, self.threshold, self.value_ratio, self.layers = factor, threshold, value_ratio, layers
        self._real: Tensor | None = None

    def mask(self, padding_mask: Tensor) -> Tensor:
        self._real = padding_mask.bool()  # which keys are the texts' real tokens
        return super().mask(padding_mask)

    def sinks(self, probs: Tensor, value: Tensor) -> Tensor:
        """``[batch, heads, k]``: True on the non-initial sink keys of each text and head."""
        if self._real is None or self._real.shape != (probs.shape[0], probs.shape[-1]):
            raise RuntimeError("sink_calibration: probabilities seen before mask(); run it through the backbone.")
        real = self._real.to(probs.device)
        count = real.sum(dim=-1).clamp(min=1)[:, None, None]  # real tokens per text
        queries = real[:, None, None, :].to(probs.dtype)  # [batch, 1, 1, q]
        # mean over the text's real queries, as a product: no [batch, heads, q, k] temporary
        received = torch.matmul(queries, probs)[:, :, 0] / count
        norms = value.float().norm(dim=-1)  # [batch, heads, k]
        mean_norm = (norms * real[:, None]).sum(dim=-1, keepdim=True) / count
        first = (real.long().cumsum(dim=-1) == 1) & real
        return (
            (received > self.threshold / count)
            & (norms < self.value_ratio * mean_norm)
            & real[:, None]
            & ~first[:, None]
        )

    def probs_with_values(self, probs: Tensor, value: Tensor, layer: int) -> Tensor:
        sinks = self.sinks(probs, value)  # [batch, heads, k]: the same keys for every query
        if not bool(sinks.any()):
            return probs
        # the sinks are a few columns: gather them rather than pass over every entry
        batch, head, key = sinks.nonzero(as_tuple=True)
        columns = probs[batch, head, :, key]  # [sinks, q]
        on_sinks = probs.new_zeros(probs.shape[:3]).index_put_((batch, head), columns, accumulate=True)[..., None]
        rest = 1.0 - on_sinks
        # the others share what the sinks give up, in proportion to their own attention;
        # a row with all its attention on sinks (rest == 0) cannot give it away: unchanged
        keep = rest > 1e-6
        grow = torch.where(keep, (1.0 - self.factor * on_sinks) / rest.clamp(min=1e-6), torch.ones_like(rest))
        shrink = torch.where(keep, torch.full_like(rest, self.factor), torch.ones_like(rest))
        # every key grows, then the sink columns are set to their shrunk values: one
        # [batch, heads, q, k] tensor is made, the result (at 4096 tokens each is 64 MiB
        # per text and head, and passes over them were most of the time)
        calibrated = probs * grow
        calibrated[batch, head, :, key] = columns * shrink[batch, head, :, 0]
        return calibrated


@embplex.hookimpl
def register_attentions(register: Any) -> None:
    register(
        "sink_calibration",
        SinkCalibration,
        paper="Unveiling and Harnessing Hidden Attention Sinks: Training-Free Attention Calibration (2024), arXiv:2406.15765",
    )
