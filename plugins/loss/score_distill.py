"""Loss ``score_distill``: the student reproduces a teacher's score for each pair.

From "Scalable Attentive Sentence-Pair Modeling via Distilled Sentence Embedding" (Barkan
et al., 2019, arXiv:1908.05161): a sentence-embedding student is trained to reconstruct
the pair scores of a cross-attentive teacher, so pairs are then scored by cheap vector
products. Here the student's score of a pair is the cosine of its two embeddings, fitted
by mean squared error to the teacher's score times ``target_scale``; DSE fed the two
vectors to a small trained head and fitted the teacher's logits. The teacher is whatever
the ``teacher`` config names (``docs/concepts.md``, "Teachers"): the training file's
scores or any embplex model; ``in_batch`` also fits every other pair of the batch.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.errors import OptionError
from embplex.teachers import own_columns, student_matrix, teacher_targets


class ScoreDistill(Loss):
    def __init__(self, target_scale: float = 1.0, in_batch: bool = False) -> None:
        super().__init__()
        if not target_scale > 0:
            raise OptionError(f"target_scale must be positive, not {target_scale}.")
        self.target_scale = float(target_scale)
        self.in_batch = bool(in_batch)
        self.teacher_scores = "matrix" if self.in_batch else "pairs"

    def distributed_problem(self) -> str | None:
        if self.in_batch:  # the teacher scores each process's own slice of the batch
            return "with in_batch=true it ranks only this process's slice of the batch; use in_batch=false"
        return None  # a mean over local anchors of their own rows

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        student = student_matrix(embeddings)
        target = teacher_targets(batch, self.in_batch, "score_distill") * self.target_scale
        if not self.in_batch:
            student = student.gather(1, own_columns(student.shape[0], batch.negatives_per_anchor, student.device))
        return functional.mse_loss(student, target.to(student.device))


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "score_distill",
        ScoreDistill,
        paper="Scalable Attentive Sentence-Pair Modeling via Distilled Sentence Embedding (2019), arXiv:1908.05161",
    )
