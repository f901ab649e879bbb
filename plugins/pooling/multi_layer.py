"""Pooling ``multi_layer``: cross-attention over the pooled outputs of every layer.

Paper: Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?
(Tang & Yang, 2024, arXiv:2409.02727), which proposes Multi-Layers Trainable Pooling: a
cross-attention network over the outputs of all hidden layers. Each layer's output is
mean-pooled over the text's tokens; the last layer's pooled vector is the query of a
multi-head cross-attention whose keys and values are the pooled vectors of all layers
(1..k when pooling at layer k, so elastic depth works). A learned per-layer prior
(``layer_logits``, saved with the model) is added to every head's scores:
``layer_weights()`` reads it back as the static share of each layer. Where ours differs:
the values and output projections start as the identity, so before training the result
is an attention-weighted average of the layers' mean poolings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import embplex
from embplex.components import Backbone, Features, Pooling
from embplex.errors import OptionError


class MultiLayerPooling(Pooling):
    def __init__(self, heads: int = 4, exclude_instruction: bool = True) -> None:
        super().__init__()
        if heads < 1:
            raise OptionError(f"option heads must be at least 1, not {heads}.")
        self.heads = heads
        self.exclude_instruction = exclude_instruction
        self.hidden: int | None = None
        self.depth: int | None = None

    def bind(self, backbone: Backbone) -> None:
        d, depth = backbone.hidden_size, backbone.num_layers
        if self.hidden is not None:
            if (self.hidden, self.depth) != (d, depth):
                raise OptionError(
                    f"multi_layer was built for {self.depth} layers of width {self.hidden}, "
                    f"not {depth} of width {d}."
                )
            return
        if d % self.heads:
            raise OptionError(f"option heads={self.heads} must divide the backbone's width {d}.")
        self.hidden, self.depth = d, depth
        self.layer_logits = nn.Parameter(torch.zeros(depth))
        self.layer_embeddings = nn.Parameter(torch.randn(depth, d) * 0.02)  # tells the layers apart
        self.to_q, self.to_k = nn.Linear(d, d), nn.Linear(d, d)
        self.to_v, self.to_out = nn.Linear(d, d), nn.Linear(d, d)
        with torch.no_grad():
            for linear in (self.to_v, self.to_out):
                linear.weight.copy_(torch.eye(d))
                linear.bias.zero_()

    def layer_weights(self) -> Tensor:
        """The learned prior share of each layer 1..depth (sums to 1)."""
        return torch.softmax(self.layer_logits.detach(), dim=0)

    def forward(self, features: Features) -> Tensor:
        if self.hidden is None:
            raise RuntimeError("multi_layer is not bound to a backbone; compose it into a model first.")
        if features.hidden_states is None:
            raise RuntimeError("the backbone has not run on these features yet")
        computed = len(features.hidden_states) - 1
        count = computed if features.layer is None else features.layer
        if not 1 <= count <= self.depth:
            raise OptionError(f"multi_layer was built for {self.depth} layers, not {count}.")
        mask = features.pooling_mask(self.exclude_instruction)
        weights = mask[..., None].to(features.hidden_states[1].dtype)
        total = weights.sum(dim=1).clamp(min=1e-9)
        pooled = torch.stack(
            [(state.masked_fill(~mask[..., None], 0.0) * weights).sum(dim=1) / total for state in features.hidden_states[1 : count + 1]],
            dim=1,
        )  # [batch, layers, d]
        batch, layers, d = pooled.shape
        head_dim = d // self.heads
        keys_in = pooled + self.layer_embeddings[:layers]
        query = self.to_q(keys_in[:, -1]).view(batch, self.heads, 1, head_dim)
        key = self.to_k(keys_in).view(batch, layers, self.heads, head_dim).transpose(1, 2)
        value = self.to_v(pooled).view(batch, layers, self.heads, head_dim).transpose(1, 2)
        scores = query @ key.transpose(-1, -2) * head_dim**-0.5 + self.layer_logits[:layers]
        attended = torch.softmax(scores, dim=-1) @ value  # [batch, heads, 1, head_dim]
        return self.to_out(attended.reshape(batch, d))


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register(
        "multi_layer",
        MultiLayerPooling,
        paper="Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models? (2024), arXiv:2409.02727",
    )
