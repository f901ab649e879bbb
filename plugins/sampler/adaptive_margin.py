"""Sampler ``adaptive_margin``: mined negatives, minus those almost as close as the positive.

From "LG-ANNA-Embedding technical report" (LG AI Research, 2025, arXiv:2506.07438), whose
adaptive margin-based hard-negative mining filters out negatives that are semantically
ambiguous given the positive: a candidate whose similarity to the anchor reaches a margin
of the positive's is likely an unlabelled positive (a false negative), and training
would push it away. We mine as ``hard_negatives`` does (the model being trained, the
configured index, ranks from ``skip``) and keep a candidate only when
``sim(anchor, candidate) < margin × sim(anchor, positive)``, searching deeper until
``negatives`` candidates pass, as NV-Embed's "TopK-PercPos" (margin 0.95) does. The paper
does not give its exact margin rule; this relative form is ours. Similarities are cosine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import embplex
from embplex.mining import MiningSampler

if TYPE_CHECKING:
    from embplex.registry import Registry


class AdaptiveMargin(MiningSampler):
    def __init__(
        self,
        margin: float = 0.95,
        negatives: int = 4,
        skip: int = 0,
        pool: int = 0,
        corpus: str | None = None,
        batching: str | Mapping[str, Any] = "no_duplicates",
        encode_batch_size: int = 64,
        *,
        registry: "Registry",
    ) -> None:
        super().__init__(
            negatives=negatives, skip=skip, pool=pool, corpus=corpus, batching=batching, margin=margin,
            encode_batch_size=encode_batch_size, registry=registry,
        )


@embplex.hookimpl
def register_samplers(register: Any) -> None:
    register("adaptive_margin", AdaptiveMargin, paper="LG-ANNA-Embedding technical report (2025), arXiv:2506.07438")
