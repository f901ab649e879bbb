"""Pooling ``latent_attention``: token states attend to trainable latents, then an MLP, then a mean.

Paper: NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models
(Lee et al., 2024, arXiv:2405.17428). Each token state is a query; ``latents`` (r)
trainable vectors are the keys and values of a multi-head cross-attention; an MLP follows
and the result is mean-pooled over the text's tokens (padding and, with
``exclude_instruction``, the prompt left out). As in NV-Embed's released model both steps
are pre-norm residual blocks. Where ours differs: the attention's inner width is the
backbone's width (NV-Embed uses 8 heads of 4096 dimensions each on a 4096-wide model) and
the MLP is a plain GELU MLP of ``mlp_ratio`` × width (NV-Embed's is gated). The parameter
count is ``r·d + (4 + 2m)·d² + (m + 8)·d`` for width ``d`` and ``mlp_ratio`` ``m``
(docs/plugins/pooling/latent_attention.md derives it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import embplex
from embplex.components import Backbone, Features, Pooling
from embplex.errors import OptionError


class LatentAttentionPooling(Pooling):
    def __init__(
        self, latents: int = 512, heads: int = 8, mlp_ratio: int = 4, exclude_instruction: bool = True
    ) -> None:
        super().__init__()
        for option, value in (("latents", latents), ("heads", heads), ("mlp_ratio", mlp_ratio)):
            if value < 1:
                raise OptionError(f"option {option} must be at least 1, not {value}.")
        self.num_latents, self.heads, self.mlp_ratio = latents, heads, mlp_ratio
        self.exclude_instruction = exclude_instruction
        self.hidden: int | None = None

    @staticmethod
    def parameter_count(hidden: int, latents: int, mlp_ratio: int) -> int:
        """The formula of the docs page: latents, three layer norms, q/k/v/out
        projections (bias on out only) and the two MLP layers."""
        d, r, m = hidden, latents, mlp_ratio
        return r * d + (4 + 2 * m) * d * d + (m + 8) * d

    def bind(self, backbone: Backbone) -> None:
        d = backbone.hidden_size
        if self.hidden is not None:
            if self.hidden != d:
                raise OptionError(f"latent_attention was built for width {self.hidden}, not {d}.")
            return
        if d % self.heads:
            raise OptionError(
                f"option heads={self.heads} must divide the backbone's width {d}; pick a divisor of {d}."
            )
        self.hidden = d
        self.latents = nn.Parameter(torch.randn(self.num_latents, d) * d**-0.5)
        self.norm_queries, self.norm_latents, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_kv = nn.Linear(d, 2 * d, bias=False)
        self.to_out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, self.mlp_ratio * d), nn.GELU(), nn.Linear(self.mlp_ratio * d, d))

    def forward(self, features: Features) -> Tensor:
        if self.hidden is None:
            raise RuntimeError("latent_attention is not bound to a backbone; compose it into a model first.")
        mask = features.pooling_mask(self.exclude_instruction)
        # padding states may hold anything: zero them so no inf or NaN can leak through
        states = features.last_hidden_state.masked_fill(~mask[..., None], 0.0)
        batch, tokens, d = states.shape
        head_dim = d // self.heads
        query = self.to_q(self.norm_queries(states)).view(batch, tokens, self.heads, head_dim).transpose(1, 2)
        key, value = self.to_kv(self.norm_latents(self.latents)).chunk(2, dim=-1)
        key = key.view(-1, self.heads, head_dim).transpose(0, 1)  # [heads, r, head_dim]
        value = value.view(-1, self.heads, head_dim).transpose(0, 1)
        # every token attends to the latents only: tokens never see each other here
        attended = nn.functional.scaled_dot_product_attention(query, key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1))
        states = states + self.to_out(attended.transpose(1, 2).reshape(batch, tokens, d))
        states = states + self.mlp(self.norm_mlp(states))
        weights = mask[..., None].to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register(
        "latent_attention",
        LatentAttentionPooling,
        paper="NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models (2024), arXiv:2405.17428",
    )
