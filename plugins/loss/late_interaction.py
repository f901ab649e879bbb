"""Loss ``late_interaction``: ColBERT's MaxSim (Chamfer) score inside InfoNCE.

Paper: ColBERT: Efficient and Effective Passage Search via Contextualized Late Interaction
over BERT (Khattab & Zaharia, 2020, arXiv:2004.12832); the score is the Chamfer
similarity MUVERA approximates (Dhulipala et al., 2024, arXiv:2405.19504). A query's
score against a document is the sum, over the query's vectors, of each one's best inner
product with the document's vectors; each anchor must pick its own positive among every
positive and every hard negative of the batch (cross-entropy over scores divided by a
temperature). ColBERT trains with one hard negative per query and no temperature
(``temperature=1``, our default); ours also takes in-batch negatives, any number of hard
negatives, and the candidates of this process only (sets of vectors differ in length
across processes, so they are not gathered).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.errors import InputError, OptionError

#: Candidates scored at once: bounds the ``[anchors, candidates, query, document]`` block.
CHUNK = 16


def chamfer_scores(
    queries: Tensor, query_mask: Tensor, documents: Tensor, document_mask: Tensor, chunk: int = CHUNK
) -> Tensor:
    """``[q, d]`` Chamfer (MaxSim) scores: ``sum_i max_j <query_i, document_j>`` over the
    vectors each mask keeps. ``queries`` is ``[q, Lq, dim]``, ``documents`` ``[d, Ld, dim]``."""
    query_mask = query_mask.to(queries.dtype)
    rows = []
    for start in range(0, documents.shape[0], chunk):
        block, keep = documents[start : start + chunk], document_mask[start : start + chunk]
        similarity = torch.einsum("aqh,cth->acqt", queries, block)
        similarity = similarity.masked_fill(~keep[None, :, None, :], float("-inf"))
        best = similarity.amax(dim=-1)  # [q, c, Lq]: each query vector's best document vector
        rows.append((best.masked_fill(query_mask[:, None, :] == 0, 0.0)).sum(dim=-1))
    return torch.cat(rows, dim=1)


class LateInteraction(Loss):
    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise OptionError(f"temperature must be positive, not {temperature}.")
        self.temperature = float(temperature)

    def distributed_problem(self) -> str | None:
        return (
            "its in-batch candidates are only this process's (token-vector sets are not gathered "
            "across processes), so each process would train on a smaller batch than one process does"
        )

    def forward(self, model: Any, batch: TrainingBatch) -> Tensor:
        embeddings = {role: by_layer[None] for role, by_layer in model.embed_roles(batch).items()}
        roles = batch.roles()
        masks = {
            role: model.pooling.vector_mask(roles[role]).to(vectors.device)
            for role, vectors in embeddings.items()
            if vectors.dim() == 3
        }
        return self.compute(embeddings, batch, masks=masks)

    def compute(
        self, embeddings: dict[str, Tensor], batch: TrainingBatch, masks: dict[str, Tensor] | None = None
    ) -> Tensor:
        """``embeddings`` per role are sets ``[rows, vectors, dim]`` (or ``[rows, dim]``,
        one vector per text, where the score is the inner product). ``masks`` say which
        vectors belong to each text (``[rows, vectors]``); without them a vector counts
        unless it is all zeros (the positions ``multi_vector`` leaves out are)."""
        sets = {role: self._as_set(role, vectors, (masks or {}).get(role)) for role, vectors in embeddings.items()}
        anchors, anchor_mask = sets["anchors"]
        candidates = [sets["positives"]]
        if "negatives" in sets and sets["negatives"][0].shape[0] > 0:
            candidates.append(sets["negatives"])
        width = max(vectors.shape[1] for vectors, _ in candidates)
        documents = torch.cat([functional.pad(v, (0, 0, 0, width - v.shape[1])) for v, _ in candidates])
        document_mask = torch.cat([functional.pad(m, (0, width - m.shape[1])) for _, m in candidates])
        scores = chamfer_scores(anchors, anchor_mask, documents, document_mask)
        labels = torch.arange(anchors.shape[0], device=anchors.device)
        return functional.cross_entropy(scores / self.temperature, labels)

    @staticmethod
    def _as_set(role: str, vectors: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        # Scores in float32 even under bf16 autocast, as infonce: the softmax is where
        # low precision hurts.
        vectors = vectors.float()
        if vectors.dim() == 2:
            vectors = vectors[:, None, :]
        if vectors.dim() != 3:
            raise InputError(f"{role} must be [rows, vectors, dim] sets or [rows, dim] vectors, not {tuple(vectors.shape)}.")
        if mask is None:
            mask = vectors.detach().abs().amax(dim=-1) > 0
        mask = mask.bool()
        if mask.shape != vectors.shape[:2]:
            raise InputError(f"the {role}' vector mask has shape {tuple(mask.shape)}, its sets {tuple(vectors.shape[:2])}.")
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise InputError(
                f"{role} row {empty[0]} has no vector (a text whose every token the pooling leaves out, "
                "e.g. only punctuation): it cannot be scored. Drop such texts from the training data."
            )
        return vectors, mask


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "late_interaction",
        LateInteraction,
        paper="ColBERT: Efficient and Effective Passage Search via Contextualized Late Interaction over BERT (2020), arXiv:2004.12832",
    )
