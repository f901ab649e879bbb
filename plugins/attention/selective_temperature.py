"""Attention ``selective_temperature``: a learnable softmax temperature per query and position.

Paper: Selective Attention: Enhancing Transformer through Principled Context Control
(Zhang et al., 2024, arXiv:2411.12892), Selective Self-Attention (SSA). Each query is
scaled by an inverse temperature ``β`` before the softmax, so a query can make its own
attention sharper or flatter depending on what it is and where it stands (longer contexts
flatten attention; a position term counters that). Ours, per layer ``ℓ``::

    β(q, p) = exp(B · tanh(a_ℓ · (|q| / sqrt(head_dim) - 1) + b_ℓ + c_ℓ · log(1 + p)))

with ``p`` the query's position among the text's real tokens and ``B`` the option
``max_log_scale``: ``β`` stays within ``[exp(-B), exp(B)]``. Three parameters per layer,
all 0 at the start (``β = 1``: the backbone's own attention until training moves them).
Where ours differs: the paper's query term is a learned projection of the token; an
attention policy learns the backbone's depth but not its head width before the first pass
(the contract binds ``depth`` only), so the query enters through its norm, and the
parameters are shared by the heads of a layer. The value temperature of SSA is not
implemented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import embplex
from embplex.components import Attention, fused_attention
from embplex.errors import OptionError


class SelectiveTemperatureAttention(Attention):
    def __init__(self, max_log_scale: float = 1.0, layers: list[int] | None = None) -> None:
        super().__init__()
        if not 0 < max_log_scale <= 10:
            raise OptionError(f"option max_log_scale must be in (0, 10], not {max_log_scale}.")
        self.max_log_scale = max_log_scale
        self.layers = layers
        self.positions: Tensor | None = None

    def bind(self, depth: int, causal: bool) -> None:
        super().bind(depth, causal)
        existing = getattr(self, "coefficients", None)
        if existing is None:
            # a, b, c of every layer (rows 0..depth-1 for layers 1..depth)
            self.coefficients = nn.Parameter(torch.zeros(depth, 3))
        elif existing.shape[0] != depth:
            raise OptionError(
                f"selective_temperature was trained on a backbone of {existing.shape[0]} layers, not {depth}."
            )

    def mask(self, padding_mask: Tensor) -> Tensor:
        # the backbone asks for the mask once per pass, before any layer: the place to
        # learn each query's position among its text's real tokens (padding side aside)
        self.positions = (padding_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        return super().mask(padding_mask)

    def inverse_temperature(self, query: Tensor, positions: Tensor, layer: int) -> Tensor:
        """``β`` of every query, ``[batch, heads, q]``, for ``query`` ``[batch, heads, q,
        head_dim]`` at ``positions`` ``[batch, q]`` in layer ``layer`` (1..depth)."""
        a, b, c = self.coefficients[layer - 1]
        norm = query.float().norm(dim=-1) * query.shape[-1] ** -0.5
        place = torch.log1p(positions.to(query.device).float())[:, None, :]
        return torch.exp(self.max_log_scale * torch.tanh(a * (norm - 1.0) + b + c * place))

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor,
        scaling: float,
        layer: int,
        dropout: float = 0.0,
    ) -> tuple[Tensor, Tensor | None]:
        if self.positions is None or self.positions.shape != (query.shape[0], query.shape[2]):
            raise RuntimeError("selective_temperature needs the backbone to ask for its mask before attending.")
        beta = self.inverse_temperature(query, self.positions, layer).to(query.dtype)
        return fused_attention(query * beta[..., None], key, value, mask, scaling, dropout), None

    @classmethod
    def from_saved(cls, directory: Path, options: dict[str, Any]) -> "SelectiveTemperatureAttention":
        from embplex.storage import load_safetensors

        policy = cls(**options)
        weights = directory / cls.weights_file
        if weights.exists():
            state = load_safetensors(weights)
            policy.coefficients = nn.Parameter(torch.zeros_like(state["coefficients"]))
            policy.load_state_dict(state, strict=True)
        return policy


@embplex.hookimpl
def register_attentions(register: Any) -> None:
    register(
        "selective_temperature",
        SelectiveTemperatureAttention,
        paper="Selective Attention: Enhancing Transformer through Principled Context Control (2024), arXiv:2411.12892",
    )
