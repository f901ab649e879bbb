"""Loss ``focal_infonce``: InfoNCE reweighted toward the anchors the model gets wrong.

From "KaLM-Embedding-V2: Superior Training Techniques and Data Inspire A Versatile
Embedding Model" (Zhao et al., 2025, arXiv:2506.20923), which applies a focal-style
reweighting to the contrastive loss so that learning concentrates on difficult samples;
the form is that of the focal loss, "Focal Loss for Dense Object Detection" (Lin et al.,
2017, arXiv:1708.02002). With ``p`` the softmax probability of an anchor's own positive
among the candidates (every positive and every hard negative of the batch, as
``infonce``), each anchor's loss is ``-(1 - p)^gamma * log p``: an anchor already solved
(p near 1) contributes little. ``gamma = 0`` is ``infonce`` exactly. We keep the weight in
the gradient (as the focal loss does) and average over anchors.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.contrastive import contrastive_logits
from embplex.errors import OptionError


class FocalInfoNCE(Loss):
    distributed_correct = True  # a mean over local anchors; candidates gathered with gradient

    def __init__(self, gamma: float = 2.0, temperature: float = 0.05, gather_across_processes: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise OptionError(f"temperature must be positive, not {temperature}.")
        if not gamma >= 0:
            raise OptionError(f"gamma must be 0 (plain infonce) or more, not {gamma}.")
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.gather_across_processes = bool(gather_across_processes)

    def weights(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Each anchor's ``log p`` and its focal weight ``(1 - p)^gamma``."""
        log_p = functional.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
        # clamped: the gradient of (1 - p)^gamma is infinite at p = 1 when gamma < 1
        return log_p, (1 - log_p.exp()).clamp_min(1e-12) ** self.gamma

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        logits, labels = contrastive_logits(embeddings, self.temperature, self.gather_across_processes)
        if self.gamma == 0:  # every weight is 1: the very cross-entropy infonce computes
            return functional.cross_entropy(logits, labels)
        log_p, weight = self.weights(logits, labels)
        return -(weight * log_p).mean()


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "focal_infonce",
        FocalInfoNCE,
        paper="KaLM-Embedding-V2: Superior Training Techniques and Data Inspire A Versatile Embedding Model (2025), arXiv:2506.20923",
    )
