"""Loss ``progressive``: InfoNCE whose per-sample weights move from easy to hard over training.

From "Towards Robust Text Retrieval with Progressive Learning" (PEG, Wu et al., 2023,
arXiv:2311.11691), which modulates the attention the model pays to each sample over the
whole training run instead of treating easy and difficult samples equally. Our schedule:
with ``p_i`` the (detached) softmax probability of anchor ``i``'s own positive among the
batch's candidates (as ``infonce``), ``t`` the training progress in [0, 1], each anchor's
cross-entropy is weighted by ``(1 − t)·p_i + t·(1 − p_i)``, normalised to mean 1 over the
batch: early on the samples the model already ranks well (easy) count most, at the
midpoint all count alike, at the end the hard ones count most. PEG gives no closed form
for its modulation; this linear (or cosine) interpolation is ours.

``t = batches / steps``, where ``batches`` counts the calls to ``compute`` in training
mode. It is a buffer of the loss, so every checkpoint saves it and a resumed run goes on
from exactly where it was.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.contrastive import contrastive_logits
from embplex.distributed import all_reduce_sum, is_distributed
from embplex.errors import OptionError


class Progressive(Loss):
    distributed_correct = True  # weights normalised over the global batch (see weights)

    def __init__(
        self,
        steps: int = 1000,
        schedule: Literal["linear", "cosine"] = "linear",
        temperature: float = 0.05,
        gather_across_processes: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise OptionError(
                f"steps must be the number of training batches over which the weighting goes from easy to "
                f"hard (usually train.max_steps x train.grad_accumulation), at least 1, not {steps!r}."
            )
        if schedule not in ("linear", "cosine"):
            raise OptionError(f"schedule must be 'linear' or 'cosine', not {schedule!r}.")
        if not temperature > 0:
            raise OptionError(f"temperature must be positive, not {temperature}.")
        self.steps = steps
        self.schedule = schedule
        self.temperature = float(temperature)
        self.gather_across_processes = bool(gather_across_processes)
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    def progress(self) -> float:
        """``t`` in [0, 1] for the batch about to be computed."""
        t = min(1.0, int(self.batches) / self.steps)
        return t if self.schedule == "linear" else (1 - math.cos(math.pi * t)) / 2

    def weights(self, p: Tensor) -> Tensor:
        """Per-anchor weights for positive-probabilities ``p`` at the current progress."""
        t = self.progress()
        raw = (1 - t) * p + t * (1 - p)
        # normalised by the mean over the global batch, every process's anchors, so that
        # data-parallel training weighs them as one process does
        mean = raw.mean()
        if is_distributed():
            mean = (all_reduce_sum(raw.sum(), raw.device) / all_reduce_sum(raw.numel(), raw.device)).to(raw.dtype)
        return raw / mean.clamp_min(1e-12)

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        logits, labels = contrastive_logits(embeddings, self.temperature, self.gather_across_processes)
        losses = functional.cross_entropy(logits, labels, reduction="none")
        weight = self.weights((-losses).exp().detach())
        if self.training:
            self.batches += 1
        return (weight * losses).mean()


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "progressive",
        Progressive,
        paper="Towards Robust Text Retrieval with Progressive Learning (2023), arXiv:2311.11691",
    )
