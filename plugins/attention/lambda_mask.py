"""Attention ``lambda_mask``: LM-Infinite's Λ-shaped mask, global start tokens plus a local window.

Paper: LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language Models
(Han et al., 2023, arXiv:2308.16137). Attention on inputs longer than the training length
fails because queries meet unseen distances and attend to too many tokens; a Λ-shaped mask
lets every query see only the first ``n_global`` tokens and the tokens within ``window``
positions of itself, training-free. Ours is a mask only: it narrows the backbone's own mask
(padding and, for decoders, causality still apply), counts the global tokens among each
text's real tokens (so left padding does not move them), and is symmetric for bidirectional
encoders (a window on both sides). LM-Infinite's distance ceiling (global tokens seen at
a rotary distance of at most the training length) is not applied: the policy receives
keys already rotated; combine with ``position_interpolation`` to keep positions inside the
trained range.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import embplex
from embplex.components import Attention
from embplex.errors import OptionError


class LambdaMask(Attention):
    def __init__(
        self,
        n_global: int = 4,
        window: int = 256,
    ) -> None:
        super().__init__()
        if window < 1:
            raise OptionError(
                f"option window={window} lets a token see no neighbour; give the local window "
                "a size of at least 1 token (LM-Infinite uses the training length, e.g. 256)."
            )
        if n_global < 0:
            raise OptionError(f"option n_global={n_global} must be 0 or more start tokens.")
        self.n_global, self.window = n_global, window

    def pattern(self, padding_mask: Tensor) -> Tensor:
        """``[batch, 1, q, k]``: True inside the Λ (global start keys or local keys)."""
        length = padding_mask.shape[-1]
        index = torch.arange(length, device=padding_mask.device)
        distance = (index[:, None] - index[None, :]).abs()
        local = distance < self.window
        # a key's rank among its text's real tokens: the first n_global are global
        rank = padding_mask.long().cumsum(dim=-1) - 1
        start = (rank < self.n_global) & padding_mask.bool()
        return local[None, None] | start[:, None, None, :]

    def mask(self, padding_mask: Tensor) -> Tensor:
        return super().mask(padding_mask) & self.pattern(padding_mask)


@embplex.hookimpl
def register_attentions(register: Any) -> None:
    register(
        "lambda_mask",
        LambdaMask,
        paper="LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language Models (2023), arXiv:2308.16137",
    )
