"""Loss ``listwise_distill``: KL divergence from the teacher's to the student's ranking
of each query's candidates.

From "Teaching Dense Retrieval Models to Specialize with Listwise Distillation and LLM
Data Augmentation" (Tamber, Kazi, Sourabh and Lin, 2025, arXiv:2502.19712): instead of
InfoNCE's one-hot target, the retriever learns the whole distribution a cross-encoder
teacher puts over a query's candidate list, ``KL(softmax(t / τ_t) || softmax(s / τ))``.
The list is the anchor's positive and its hard negatives; ``in_batch`` adds every other
candidate of the batch, which then needs a model teacher to score them. Our teacher is any
embplex model or the training file's scores (``docs/concepts.md``, "Teachers"), not only
a cross-encoder.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.errors import InputError, OptionError
from embplex.teachers import own_columns, student_matrix, teacher_targets


class ListwiseDistill(Loss):
    def __init__(self, temperature: float = 0.05, teacher_temperature: float = 0.05, in_batch: bool = False) -> None:
        super().__init__()
        for name, value in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
            if not value > 0:
                raise OptionError(f"{name} must be positive, not {value}.")
        self.temperature = float(temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.in_batch = bool(in_batch)
        self.teacher_scores = "matrix" if self.in_batch else "pairs"

    def distributed_problem(self) -> str | None:
        if self.in_batch:  # the teacher scores each process's own slice of the batch
            return "with in_batch=true it ranks only this process's slice of the batch; use in_batch=false"
        return None  # a mean over local anchors of their own rows

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        student = student_matrix(embeddings)
        teacher = teacher_targets(batch, self.in_batch, "listwise_distill").to(student.device)
        if not self.in_batch:
            if not batch.negatives_per_anchor:
                # a list of one candidate: both softmaxes are 1 and the loss is 0 whatever
                # the model does; refuse rather than train on nothing
                raise InputError(
                    "listwise_distill: the batch's examples have no hard negatives, so each anchor's list "
                    "holds only its positive and the loss is always 0; give the examples negatives, or set "
                    "loss.in_batch=true (with a model teacher) to rank the batch's other candidates too."
                )
            student = student.gather(1, own_columns(student.shape[0], batch.negatives_per_anchor, student.device))
        log_student = functional.log_softmax(student / self.temperature, dim=-1)
        log_teacher = functional.log_softmax(teacher / self.teacher_temperature, dim=-1)
        return functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "listwise_distill",
        ListwiseDistill,
        paper="Teaching Dense Retrieval Models to Specialize with Listwise Distillation and LLM Data "
        "Augmentation (2025), arXiv:2502.19712",
    )
