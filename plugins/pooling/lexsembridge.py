"""Pooling ``lexsembridge``: the dense vector modulated element-wise by the input's tokens.

Paper: LexSemBridge: Fine-Grained Dense Representation Enhancement through Token-Aware
Embedding Augmentation (2025, arXiv:2508.17858). An enhancement vector built from the
text's own tokens multiplies the dense vector element-wise, which keeps its direction
while amplifying the dimensions the tokens point at. Three ways to weigh the tokens, as in
the paper: ``statistical`` (token frequency in the text), ``learned`` (a trainable weight
per token id) and ``contextual`` (a weight computed from each token's state). Where ours
differs: token ids are mapped to dimensions by ``id mod hidden`` (the paper projects a
vocabulary-space vector), and the dense vector is the ``base`` pooling (mean or [CLS]) of
the same layer; the enhancement is ``1 + strength · e`` with ``e`` scaled to [0, 1].
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

import embplex
from embplex.components import Backbone, Features, Pooling
from embplex.errors import OptionError

MODES = ("statistical", "learned", "contextual")


class LexSemBridgePooling(Pooling):
    def __init__(
        self,
        mode: Literal["statistical", "learned", "contextual"] = "statistical",
        strength: float = 0.5,
        base: Literal["mean", "cls"] = "mean",
        buckets: int = 32768,
        exclude_instruction: bool = True,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise OptionError(f"option mode must be one of {', '.join(MODES)}, not {mode!r}.")
        if base not in ("mean", "cls"):
            raise OptionError(f"option base must be 'mean' or 'cls', not {base!r}.")
        if not 0 <= strength <= 10:
            raise OptionError(f"option strength must be between 0 and 10, not {strength}.")
        if buckets < 1:
            raise OptionError(f"option buckets must be at least 1, not {buckets}.")
        self.mode, self.strength, self.base, self.buckets = mode, strength, base, buckets
        self.exclude_instruction = exclude_instruction
        self.hidden: int | None = None
        if mode == "learned":  # one weight per token id (ids beyond `buckets` share by id mod buckets)
            self.token_weights = nn.Parameter(torch.zeros(buckets))

    def bind(self, backbone: Backbone) -> None:
        d = backbone.hidden_size
        if self.hidden is not None:
            if self.hidden != d:
                raise OptionError(f"lexsembridge was built for width {self.hidden}, not {d}.")
            return
        self.hidden = d
        if self.mode == "contextual":
            self.token_scorer = nn.Linear(d, 1)

    def token_weight(self, features: Features) -> Tensor:
        """``[batch, tokens]``: how much each token contributes (0 where left out)."""
        mask = features.pooling_mask(self.exclude_instruction)
        if self.mode == "statistical":
            weights = torch.ones_like(mask, dtype=features.last_hidden_state.dtype)
        elif self.mode == "learned":
            weights = nn.functional.softplus(self.token_weights[features.input_ids % self.buckets] + 1.0)
        else:
            states = features.last_hidden_state.masked_fill(~mask[..., None], 0.0)
            weights = nn.functional.softplus(self.token_scorer(states).squeeze(-1) + 1.0)
        return weights * mask

    def enhancement(self, features: Features) -> Tensor:
        """``[batch, hidden]`` in [0, 1]: the token weights gathered on dimension
        ``id mod hidden`` (token frequency for ``statistical``), divided by their maximum."""
        d = features.last_hidden_state.shape[-1]
        weights = self.token_weight(features)
        gathered = torch.zeros(weights.shape[0], d, dtype=weights.dtype, device=weights.device)
        gathered = gathered.scatter_add(1, features.input_ids.long() % d, weights)
        return gathered / gathered.amax(dim=1, keepdim=True).clamp(min=1e-9)

    def dense(self, features: Features) -> Tensor:
        """The unmodulated vector: ``base`` pooling of the same tokens."""
        mask = features.pooling_mask(self.exclude_instruction)
        states = features.last_hidden_state.masked_fill(~mask[..., None], 0.0)
        if self.base == "cls":
            first = features.attention_mask.bool().int().argmax(dim=1)
            return features.last_hidden_state[torch.arange(states.shape[0], device=states.device), first]
        weights = mask[..., None].to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def forward(self, features: Features) -> Tensor:
        if self.mode == "contextual" and self.hidden is None:
            raise RuntimeError("lexsembridge is not bound to a backbone; compose it into a model first.")
        return self.dense(features) * (1.0 + self.strength * self.enhancement(features))


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register(
        "lexsembridge",
        LexSemBridgePooling,
        paper="LexSemBridge: Fine-Grained Dense Representation Enhancement through Token-Aware Embedding Augmentation (2025), arXiv:2508.17858",
    )
