"""Loss ``matryoshka``: the inner loss summed over nested prefixes of the embedding.

From "Matryoshka Representation Learning" (Kusupati et al., 2022, arXiv:2205.13147);
sentence-transformers' MatryoshkaLoss. Each configured width ``d`` takes the first ``d``
coordinates of every embedding, L2-normalises them and scores them with the inner loss
(built by name, ``infonce`` by default); the weighted sum trains every prefix to be an
embedding of its own, so ``encode(dim=d)`` serves a shorter vector.

Where ours differs: every prefix is scored at every step (sentence-transformers can sample
some of them); the inner loss computes the embeddings (``Loss.embed``), so a cached inner
loss (``cached_infonce``) keeps memory flat; a width beyond the model's is refused before
training starts (``bind``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.errors import OptionError


def checked_dims(dims: Sequence[int], weights: Sequence[float] | None) -> tuple[list[int], list[float]]:
    """The widths, largest first, with their weights (1 each by default), refused when
    empty, not positive, repeated, or paired with the wrong number of finite weights."""
    dims = [int(d) for d in dims]
    if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
        raise OptionError(f"dims must be distinct positive widths, at least one, not {dims}.")
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dims) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise OptionError(f"weights must be {len(dims)} finite non-negative numbers, one per dim; got {weights}.")
    ordered = sorted(zip(dims, weights), reverse=True)
    return [d for d, _ in ordered], [w for _, w in ordered]


class Matryoshka(Loss):
    def __init__(
        self,
        dims: list[int] = (384, 256, 128, 64, 32),
        weights: list[float] | None = None,
        inner: Any = "infonce",
        *,
        registry: embplex.Registry,
    ) -> None:
        super().__init__()
        self.dims, self.weights = checked_dims(dims, weights)
        self.inner = registry.create_part("loss", inner, option="loss.inner")

    def bind(self, model: "embplex.EmbeddingModel") -> None:
        self.inner.bind(model)
        if self.dims[0] > model.dim:
            raise OptionError(
                f"dims={self.dims} asks for a prefix of {self.dims[0]}, but the model's embeddings are "
                f"{model.dim} wide; use widths up to {model.dim}."
            )

    def distributed_problem(self) -> str | None:
        return self.inner.distributed_problem()  # its own part only weighs the inner loss's terms

    def embed(self, model, batch, layers=(None,)):
        return self.inner.embed(model, batch, layers)

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        width = embeddings["anchors"].shape[-1]
        if self.dims[0] > width:  # slicing would quietly keep the whole vector
            raise OptionError(f"dims={self.dims} asks for a prefix of {self.dims[0]} of {width}-wide embeddings.")
        total = 0.0
        for dim, weight in zip(self.dims, self.weights):
            prefix = {role: functional.normalize(e[..., :dim], dim=-1) for role, e in embeddings.items()}
            total = total + weight * self.inner.compute(prefix, batch)
        return total

    def recommended_sizes(self, model: "embplex.EmbeddingModel") -> list[tuple[int, int]]:
        return [(model.backbone.num_layers, dim) for dim in sorted(self.dims)]


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register("matryoshka", Matryoshka, paper="Matryoshka Representation Learning (2022), arXiv:2205.13147")
