"""Loss ``infonce``: contrastive loss over in-batch and hard negatives.

From "Representation Learning with Contrastive Predictive Coding" (van den Oord et al.,
2018, arXiv:1807.03748); as used for sentence embeddings it is sentence-transformers'
MultipleNegativesRankingLoss. Each anchor must pick its own positive among every positive
and every hard negative of the batch: cross-entropy over cosine similarities divided by
a temperature. Our version gathers candidates from all processes (with gradient for the
local ones), and ``symmetric`` adds the positive -> anchor direction, averaged with the
anchor -> positive one as in MultipleNegativesSymmetricRankingLoss. ``temperature=0.05``
equals sentence-transformers' ``scale=20``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.distributed import gather_with_offset
from embplex.errors import OptionError


class InfoNCE(Loss):
    distributed_correct = True  # a mean over local anchors; candidates gathered with gradient

    def __init__(
        self,
        temperature: float = 0.05,
        symmetric: bool = False,
        gather_across_processes: bool = True,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise OptionError(f"temperature must be positive, not {temperature}.")
        self.temperature = float(temperature)
        self.symmetric = bool(symmetric)
        self.gather_across_processes = bool(gather_across_processes)

    def _gather(self, tensor: Tensor) -> tuple[Tensor, int]:
        if not self.gather_across_processes:
            return tensor, 0
        return gather_with_offset(tensor)

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        # Similarities in float32 even under bf16 autocast: the softmax over a large
        # candidate set is where low precision hurts.
        anchors = functional.normalize(embeddings["anchors"].float(), dim=-1)
        positives = functional.normalize(embeddings["positives"].float(), dim=-1)
        all_positives, offset = self._gather(positives)
        candidates = [all_positives]
        negatives = embeddings.get("negatives")
        if negatives is not None and negatives.shape[0] > 0:
            candidates.append(self._gather(functional.normalize(negatives.float(), dim=-1))[0])
        labels = torch.arange(anchors.shape[0], device=anchors.device) + offset

        logits = anchors @ torch.cat(candidates).T / self.temperature
        loss = functional.cross_entropy(logits, labels)
        if self.symmetric:
            all_anchors, _ = self._gather(anchors)
            backward_logits = positives @ all_anchors.T / self.temperature
            loss = (loss + functional.cross_entropy(backward_logits, labels)) / 2
        return loss


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "infonce",
        InfoNCE,
        paper="Representation Learning with Contrastive Predictive Coding (2018), arXiv:1807.03748",
    )
