"""Loss ``soft_label``: InfoNCE over the batch with continuous targets from a teacher.

From the soft supervision of "LG-ANNA-Embedding technical report" (2025,
arXiv:2506.07438), where continuous relevance scores distilled from a retriever and a
reranker replace the hard labels, and the soft matching scores of "UniME-V2:
MLLM-as-a-Judge for Universal Multimodal Embedding Learning" (Gu et al., 2025,
arXiv:2510.13515), which align the similarity matrix with a judge's score matrix. The
student's logits are exactly ``infonce``'s (each anchor against every positive and every
hard negative of the batch, cosine / ``temperature``); the target of each row is a
distribution made from the teacher's scores instead of a one-hot, and the loss is the
cross-entropy ``-Σ q log p``. With one-hot targets (``targets=normalize`` and scores 1 for
the positive, 0 for the negatives) it is ``infonce``. With ``in_batch=false`` only the
anchor's own candidates get target mass; ``in_batch=true`` spreads it over the whole row,
scored by a model teacher. UniME-V2 uses a Jensen–Shannon divergence over each query's
own candidates and LG-ANNA's exact form is not published; we keep InfoNCE's form.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.errors import InputError, OptionError
from embplex.teachers import own_columns, student_matrix, teacher_targets


class SoftLabel(Loss):
    def __init__(
        self,
        temperature: float = 0.05,
        teacher_temperature: float = 0.05,
        targets: Literal["softmax", "normalize"] = "softmax",
        in_batch: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
            if not value > 0:
                raise OptionError(f"{name} must be positive, not {value}.")
        if targets not in ("softmax", "normalize"):
            raise OptionError(f"targets must be 'softmax' or 'normalize', not {targets!r}.")
        self.temperature = float(temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.targets = targets
        self.in_batch = bool(in_batch)
        self.teacher_scores = "matrix" if self.in_batch else "pairs"

    def distributed_problem(self) -> str | None:
        if self.in_batch:  # the teacher scores each process's own slice of the batch
            return "with in_batch=true it ranks only this process's slice of the batch; use in_batch=false"
        return None  # a mean over local anchors of their own rows

    def distribution(self, scores: Tensor) -> Tensor:
        """Each row of teacher scores as a target distribution."""
        if self.targets == "softmax":
            return torch.softmax(scores / self.teacher_temperature, dim=-1)
        totals = scores.sum(dim=-1, keepdim=True)
        if bool((scores < 0).any()) or bool((totals <= 0).any()):
            raise InputError(
                "soft_label with targets=normalize reads the teacher's scores as relevance weights, which "
                "must be 0 or more with a positive sum per anchor; these are not (cosine similarities or "
                "logits can be negative): use targets=softmax."
            )
        return scores / totals

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        logits = student_matrix(embeddings) / self.temperature
        teacher = teacher_targets(batch, self.in_batch, "soft_label").to(logits.device)
        if self.in_batch:
            target = self.distribution(teacher)
        else:
            own = own_columns(logits.shape[0], batch.negatives_per_anchor, logits.device)
            target = torch.zeros_like(logits).scatter(1, own, self.distribution(teacher))
        return -(target * functional.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "soft_label",
        SoftLabel,
        paper="LG-ANNA-Embedding technical report (2025), arXiv:2506.07438; UniME-V2: MLLM-as-a-Judge for "
        "Universal Multimodal Embedding Learning (2025), arXiv:2510.13515",
    )
