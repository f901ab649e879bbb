"""Sampler ``refresh_mining``: hard negatives re-mined with the current model every N steps.

No paper: none of the embedding libraries or papers we follow re-mines during training
(NV-Embed and LG-ANNA, arXiv:2405.17428 and arXiv:2506.07438, mine once, offline; ANCE,
"Approximate Nearest Neighbor Negative Contrastive Learning for Dense Text Retrieval",
Xiong et al., 2020, arXiv:2007.00808, refreshes an asynchronous index, which is the idea
here). Negatives mined by the starting model go stale as it learns: what was hard becomes
easy. This sampler mines as ``hard_negatives`` does (with ``margin`` as ``adaptive_margin``
does when set) and mines again, with the weights of that moment, whenever the optimizer
step crosses a multiple of ``every``; the batches already planned keep their examples and
take the new negatives. What it mined and when is its checkpointed state, so a resumed run
re-mines at exactly the steps, and with exactly the weights, of an uninterrupted one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import embplex
from embplex.errors import OptionError
from embplex.mining import MiningSampler

if TYPE_CHECKING:
    from embplex.registry import Registry


class RefreshMining(MiningSampler):
    def __init__(
        self,
        every: int = 100,
        negatives: int = 4,
        skip: int = 0,
        pool: int = 0,
        margin: float | None = None,
        corpus: str | None = None,
        batching: str | Mapping[str, Any] = "no_duplicates",
        encode_batch_size: int = 64,
        *,
        registry: "Registry",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OptionError(f"every must be a number of optimizer steps of at least 1, not {every!r}.")
        self.every = every
        super().__init__(
            negatives=negatives, skip=skip, pool=pool, corpus=corpus, batching=batching, margin=margin,
            refresh_every=every, encode_batch_size=encode_batch_size, registry=registry,
        )


@embplex.hookimpl
def register_samplers(register: Any) -> None:
    register("refresh_mining", RefreshMining)
