"""Sampler ``hard_negatives``: negatives mined with the model being trained.

From "NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models"
(Lee et al., 2024, arXiv:2405.17428), which trains on curated hard negatives mined with an
embedding model, and "UniME-V2: MLLM-as-a-Judge for Universal Multimodal Embedding
Learning" (Gu et al., 2025, arXiv:2510.13515), whose candidate negatives come from a global
retrieval over the whole corpus. We encode the corpus (every training positive, plus an
optional corpus file) with the model about to be trained, index it with the configured
index, and give each example the texts at ranks ``[skip, skip + negatives)`` of its
anchor's search, every known positive of that anchor (and the anchor itself) left out.
NV-Embed mines once, offline, with a separate teacher; we mine with the student at the
start of training (``refresh_mining`` mines again as it learns), and the batches come
from an inner batching sampler (``no_duplicates`` by default). The machinery is
:class:`embplex.mining.MiningSampler`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import embplex
from embplex.mining import MiningSampler

if TYPE_CHECKING:
    from embplex.registry import Registry


class HardNegatives(MiningSampler):
    def __init__(
        self,
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
            negatives=negatives, skip=skip, pool=pool, corpus=corpus, batching=batching,
            encode_batch_size=encode_batch_size, registry=registry,
        )


@embplex.hookimpl
def register_samplers(register: Any) -> None:
    register(
        "hard_negatives",
        HardNegatives,
        paper="NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models (2024), arXiv:2405.17428",
    )
