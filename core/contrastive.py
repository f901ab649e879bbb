"""What contrastive losses share: the anchor-to-candidate logits of an InfoNCE batch.

A library for loss plugins (``focal_infonce``, ``hard_negative_mixing``, ``progressive``),
which may not import each other; the core never uses it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

from .distributed import gather_with_offset

__all__ = ["contrastive_candidates", "contrastive_logits"]


def contrastive_candidates(embeddings: dict[str, Tensor], gather: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The unit anchors, the unit candidates and each anchor's label.

    The candidates are every positive, then every hard negative, of the batch (of every
    process when ``gather``, with gradient for the local ones), as ``infonce`` builds them,
    in float32. ``labels[i]`` is the row of anchor ``i``'s own positive among them.
    """
    anchors = functional.normalize(embeddings["anchors"].float(), dim=-1)
    positives = functional.normalize(embeddings["positives"].float(), dim=-1)

    def collect(tensor: Tensor) -> tuple[Tensor, int]:
        return gather_with_offset(tensor) if gather else (tensor, 0)

    all_positives, offset = collect(positives)
    candidates = [all_positives]
    negatives = embeddings.get("negatives")
    if negatives is not None and negatives.shape[0] > 0:
        candidates.append(collect(functional.normalize(negatives.float(), dim=-1))[0])
    labels = torch.arange(anchors.shape[0], device=anchors.device) + offset
    return anchors, torch.cat(candidates), labels


def contrastive_logits(embeddings: dict[str, Tensor], temperature: float, gather: bool = True) -> tuple[Tensor, Tensor]:
    """Anchor-to-candidate cosine similarities over ``temperature`` (``[anchors,
    candidates]``) and each anchor's label (see :func:`contrastive_candidates`)."""
    anchors, candidates, labels = contrastive_candidates(embeddings, gather)
    return anchors @ candidates.T / temperature, labels
