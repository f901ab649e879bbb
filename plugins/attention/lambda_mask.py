"""Attention ``lambda_mask``: LM-Infinite's Λ-shaped mask, global start tokens plus a local window.

Paper: LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language Models
(Han et al., 2023, arXiv:2308.16137). Attention on inputs longer than the training length
fails because queries meet unseen distances and attend to too many tokens; a Λ-shaped mask
lets every query see only the first ``n_global`` tokens and the tokens within ``window``
positions of itself, training-free. Ours is a mask only: it narrows the backbone's own mask
(padding and, for decoders, causality still apply), counts the global tokens among each
text's real tokens (so left padding does not move them), and is symmetric for bidirectional
encoders (a window on both sides). LM-Infinite's distance ceiling is the option
``distance_cap`` (off by default): on rotary models every query-key pair further apart than
the cap is scored as if exactly ``distance_cap`` apart (queries and keys are un-rotated and
re-rotated with the positions the backbone reports); on absolute-position models (BERT),
where a token's position is its distance from the start tokens, the position ids fed are
clipped to ``distance_cap``, so no token sits at a position the table never trained.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import embplex
from embplex.components import Attention, Positions
from embplex.errors import OptionError


class LambdaMask(Attention):
    def __init__(
        self,
        n_global: int = 4,
        window: int = 256,
        distance_cap: int | None = None,
    ) -> None:
        super().__init__()
        if window < 1:
            raise OptionError(
                f"option window={window} lets a token see no neighbour; give the local window "
                "a size of at least 1 token (LM-Infinite uses the training length, e.g. 256)."
            )
        if n_global < 0:
            raise OptionError(f"option n_global={n_global} must be 0 or more start tokens.")
        if distance_cap is not None and (isinstance(distance_cap, bool) or not isinstance(distance_cap, int) or distance_cap < 1):
            raise OptionError(
                f"option distance_cap={distance_cap!r} must be a positive number of positions (LM-Infinite "
                "uses the pretraining length, e.g. 512), or null for no cap."
            )
        self.n_global, self.window, self.distance_cap = n_global, window, distance_cap
        self._positions: Positions | None = None  # this forward pass's, from feed_positions

    def pattern(self, padding_mask: Tensor) -> Tensor:
        """``[batch, 1, q, k]``: True inside the Λ (global start keys or local keys)."""
        length = padding_mask.shape[-1]
        # the band |q - k| < window, built as a band of ones (no int64 distance matrix)
        band = torch.ones(length, length, dtype=torch.bool, device=padding_mask.device)
        local = band.triu(-(self.window - 1)).tril(self.window - 1)
        # a key's rank among its text's real tokens: the first n_global are global
        rank = padding_mask.long().cumsum(dim=-1) - 1
        start = (rank < self.n_global) & padding_mask.bool()
        return local[None, None] | start[:, None, None, :]

    def mask(self, padding_mask: Tensor) -> Tensor:
        return super().mask(padding_mask) & self.pattern(padding_mask)

    def feed_positions(self, positions: Positions) -> Tensor:
        self._positions = positions
        if self.distance_cap is None or positions.kind == "rotary":
            return positions.ids
        if positions.kind == "absolute":  # a position here is the distance from the start
            return positions.ids.clamp(max=self.distance_cap)
        raise OptionError(
            f"attention lambda_mask: distance_cap={self.distance_cap} needs a backbone with an absolute "
            "position table or Llama-style rotary embeddings, and this one has neither (or embplex cannot "
            "re-rotate its rotary layout); set distance_cap=null."
        )

    @property
    def computes_qk_scores(self) -> bool:
        return self.distance_cap is not None  # without a cap: the mask alone, fused kernel

    def qk_scores(self, query: Tensor, key: Tensor, scaling: float, layer: int) -> Tensor:
        plain = super().qk_scores(query, key, scaling, layer)
        positions = self._positions
        if self.distance_cap is None or positions is None or positions.kind != "rotary":
            return plain
        if positions.ids.shape[-1] != query.shape[-2]:
            raise OptionError(
                "attention lambda_mask: distance_cap on a rotary model needs the positions of this pass, "
                "and the backbone reported none for it; use a backbone that calls feed_positions."
            )
        ids = positions.ids[:, None, :]  # [batch, 1, length]: the same for every head
        # q_i·k_j after rotation is q·R(j - i)·k: un-rotate both, then turn the queries by
        # ∓cap so that pairs beyond the cap are scored at distance exactly cap
        query_raw, key_raw = positions.rotate(query, -ids), positions.rotate(key, -ids)
        cap = torch.tensor(self.distance_cap, device=query.device)
        key_before = torch.matmul(positions.rotate(query_raw, cap), key_raw.transpose(-1, -2)) * scaling
        key_after = torch.matmul(positions.rotate(query_raw, -cap), key_raw.transpose(-1, -2)) * scaling
        distance = (positions.ids[:, None, :] - positions.ids[:, :, None])[:, None]  # key - query
        capped = torch.where(distance < -self.distance_cap, key_before, plain)
        return torch.where(distance > self.distance_cap, key_after, capped)


@embplex.hookimpl
def register_attentions(register: Any) -> None:
    register(
        "lambda_mask",
        LambdaMask,
        paper="LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language Models (2023), arXiv:2308.16137",
    )
