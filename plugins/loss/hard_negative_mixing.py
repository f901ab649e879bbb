"""Loss ``hard_negative_mixing``: InfoNCE with synthetic negatives mixed from the hardest ones.

From "KaLM-Embedding-V2: Superior Training Techniques and Data Inspire A Versatile
Embedding Model" (Zhao et al., 2025, arXiv:2506.20923), whose online hard-negative mixing
enriches each query's hard negatives during training without offline mining; the mixing
itself is that of MoCHi, "Hard Negative Mixing for Contrastive Learning" (Kalantidis et
al., 2020, arXiv:2010.01028). Inside ``compute``, each anchor ranks its candidates (every
other positive and every hard negative of the batch, as ``infonce``), takes its
``hardest`` ones, and synthesises ``mixed`` new negatives, each the renormalised convex
combination ``a·h_i + (1 − a)·h_j`` of two of them with ``a ~ U(0, 1)``; they join that
anchor's candidates only. As in MoCHi the synthetic negatives carry no gradient (they are
targets, not representations of any text); the draw uses torch's generator, which the
trainer seeds and checkpoints, so runs and resumes are reproducible.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.contrastive import contrastive_candidates
from embplex.errors import OptionError


class HardNegativeMixing(Loss):
    # A mean over local anchors against the gathered candidates, as infonce. The mixing
    # weights and picks are random draws made per process, so the run equals one process
    # in distribution, not draw for draw.
    distributed_correct = True

    def __init__(
        self, mixed: int = 4, hardest: int = 8, temperature: float = 0.05, gather_across_processes: bool = True
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise OptionError(f"temperature must be positive, not {temperature}.")
        if isinstance(mixed, bool) or not isinstance(mixed, int) or mixed < 0:
            raise OptionError(f"mixed must be a number of synthetic negatives per anchor, 0 or more, not {mixed!r}.")
        if isinstance(hardest, bool) or not isinstance(hardest, int) or hardest < 2:
            raise OptionError(f"hardest must be at least 2 (each synthetic negative mixes two of them), not {hardest!r}.")
        self.mixed = mixed
        self.hardest = hardest
        self.temperature = float(temperature)
        self.gather_across_processes = bool(gather_across_processes)

    def synthesise(self, anchors: Tensor, candidates: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
        """``[anchors, mixed, dim]`` unit vectors, each mixing two of the anchor's hardest
        negatives (the own positive's column is never one of them)."""
        masked = logits.detach().clone()
        masked[torch.arange(len(labels)), labels] = float("-inf")
        hardest = min(self.hardest, candidates.shape[0] - 1)
        top = masked.topk(hardest, dim=1).indices  # [anchors, hardest]
        rows = len(labels)
        first = torch.randint(hardest, (rows, self.mixed), device=anchors.device)
        # a second index different from the first, uniform over the others
        second = (first + torch.randint(1, hardest, (rows, self.mixed), device=anchors.device)) % hardest
        weight = torch.rand(rows, self.mixed, 1, device=anchors.device)
        pick = lambda which: candidates[top.gather(1, which)]  # noqa: E731  [anchors, mixed, dim]
        return functional.normalize(weight * pick(first) + (1 - weight) * pick(second), dim=-1).detach()

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        anchors, candidates, labels = contrastive_candidates(embeddings, self.gather_across_processes)
        logits = anchors @ candidates.T / self.temperature
        if self.mixed and candidates.shape[0] >= 3:  # mixing needs two negatives besides the positive
            synthetic = self.synthesise(anchors, candidates, logits, labels)
            extra = torch.einsum("ad,amd->am", anchors, synthetic) / self.temperature
            logits = torch.cat([logits, extra], dim=1)
        return functional.cross_entropy(logits, labels)


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "hard_negative_mixing",
        HardNegativeMixing,
        paper="KaLM-Embedding-V2: Superior Training Techniques and Data Inspire A Versatile Embedding Model (2025), arXiv:2506.20923",
    )
