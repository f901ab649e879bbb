"""Pooling ``attentive_stats``: channel-wise attention, weighted mean and standard deviation.

Paper: ECAPA-TDNN: Emphasized Channel Attention, Propagation and Aggregation in TDNN Based
Speaker Verification (Desplanques et al., 2020, arXiv:2005.07143), attentive statistics
pooling. Every channel c of every token t gets a score ``e[t, c] = v_c · tanh(W h_t + b) +
k_c``; a softmax over the text's tokens turns them into weights that sum to 1 per channel;
the output is the weighted mean and weighted standard deviation of the token states,
concatenated (2 × hidden). With ``global_context`` (ECAPA-TDNN's extension) the attention
also sees the text's plain mean and standard deviation next to each token. Where ours
differs: tokens replace speech frames, and padding and (with ``exclude_instruction``)
prompt tokens get no weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import embplex
from embplex.components import Backbone, Features, Pooling
from embplex.errors import OptionError


def _weighted_stats(states: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation over tokens (dim 1) under weights summing to 1."""
    mean = (weights * states).sum(dim=1)
    variance = (weights * states.pow(2)).sum(dim=1) - mean.pow(2)
    return mean, variance.clamp(min=1e-6).sqrt()  # the floor keeps sqrt's gradient finite


class AttentiveStatsPooling(Pooling):
    def __init__(self, bottleneck: int = 128, global_context: bool = True, exclude_instruction: bool = True) -> None:
        super().__init__()
        if bottleneck < 1:
            raise OptionError(f"option bottleneck must be at least 1, not {bottleneck}.")
        self.bottleneck, self.global_context = bottleneck, global_context
        self.exclude_instruction = exclude_instruction
        self.hidden: int | None = None

    def output_dim(self, hidden_size: int) -> int:
        return 2 * hidden_size

    def bind(self, backbone: Backbone) -> None:
        d = backbone.hidden_size
        if self.hidden is not None:
            if self.hidden != d:
                raise OptionError(f"attentive_stats was built for width {self.hidden}, not {d}.")
            return
        self.hidden = d
        inputs = 3 * d if self.global_context else d
        self.attention = nn.Sequential(nn.Linear(inputs, self.bottleneck), nn.Tanh(), nn.Linear(self.bottleneck, d))

    def channel_weights(self, features: Features) -> Tensor:
        """``[batch, tokens, hidden]``: each channel's weights over the tokens (1 in sum
        per channel, 0 on padding and left-out prompt tokens)."""
        if self.hidden is None:
            raise RuntimeError("attentive_stats is not bound to a backbone; compose it into a model first.")
        mask = features.pooling_mask(self.exclude_instruction)[..., None]
        states = features.last_hidden_state.masked_fill(~mask, 0.0)
        inputs = states
        if self.global_context:
            uniform = mask.to(states.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)
            mean, std = _weighted_stats(states, uniform)
            tokens = states.shape[1]
            inputs = torch.cat([states, mean[:, None].expand(-1, tokens, -1), std[:, None].expand(-1, tokens, -1)], dim=-1)
        scores = self.attention(inputs).masked_fill(~mask, torch.finfo(states.dtype).min)
        return torch.softmax(scores, dim=1).masked_fill(~mask, 0.0)

    def forward(self, features: Features) -> Tensor:
        weights = self.channel_weights(features)
        mask = features.pooling_mask(self.exclude_instruction)[..., None]
        mean, std = _weighted_stats(features.last_hidden_state.masked_fill(~mask, 0.0), weights)
        return torch.cat([mean, std], dim=-1)


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register(
        "attentive_stats",
        AttentiveStatsPooling,
        paper="ECAPA-TDNN: Emphasized Channel Attention, Propagation and Aggregation in TDNN Based Speaker Verification (2020), arXiv:2005.07143",
    )
