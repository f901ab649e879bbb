"""Loss ``starbucks``: a fixed ladder of (layer, width) pairs, every pair every step.

From "Starbucks: Improved Training for 2D Matryoshka Embeddings" (Zhuang et al., 2024,
arXiv:2410.13230). Instead of drawing a random layer and width each step (2D
Matryoshka), the loss sums the inner loss (built by name, ``infonce`` by default) over a
fixed list of (layer, width) pairs from small to large, weight 1 each, plus the
alignment of each pair to the full model. The reference code pairs (2,32), (4,64),
(6,128), (8,256), (10,512), (12,768) on 12-layer BERT; our default scales it to 6-layer
all-MiniLM-L6-v2: (1,32), (2,64), (3,128), (4,192), (5,256), (6,384).

Where ours differs: the alignment of a pair is the KL divergence between the softmaxes,
at temperature ``kl_temperature``, of the full model's and the pair's embeddings over the
pair's ``width`` leading coordinates (each prefix renormalised), the full model detached as
the teacher, times the temperature (2D Matryoshka's term, made to fit a pair narrower
than the model). The paper's masked-autoencoder pre-training stage (SMAE) is not
implemented: this is the fine-tuning loss only.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.errors import OptionError

MINILM_PAIRS = [[1, 32], [2, 64], [3, 128], [4, 192], [5, 256], [6, 384]]


class Starbucks(Loss):
    def __init__(
        self,
        pairs: list[list[int]] = MINILM_PAIRS,
        inner: Any = "infonce",
        kl_weight: float = 1.0,
        kl_temperature: float = 0.3,
        *,
        registry: embplex.Registry,
    ) -> None:
        super().__init__()
        pairs = [list(pair) for pair in pairs]
        if not pairs:
            raise OptionError("pairs is empty; list (layer, dim) pairs such as [[1, 32], [2, 64], [3, 128]].")
        for pair in pairs:
            if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in pair):
                raise OptionError(f"pairs entry {pair} is not a (layer, dim) pair of positive integers.")
        if len({tuple(p) for p in pairs}) != len(pairs):
            raise OptionError(f"pairs {pairs} names a pair twice.")
        if not kl_weight >= 0 or not kl_temperature >= 0:
            raise OptionError(f"kl_weight and kl_temperature must be non-negative, not {kl_weight} and {kl_temperature}.")
        self.pairs = [(int(layer), int(dim)) for layer, dim in pairs]
        self.inner = registry.create_part("loss", inner, option="loss.inner")
        self.kl_weight = float(kl_weight)
        self.kl_temperature = float(kl_temperature)

    def distributed_problem(self) -> str | None:
        return self.inner.distributed_problem()  # its own part only weighs the inner loss's terms

    def embed(self, model, batch, layers=(None,)):
        return self.inner.embed(model, batch, layers)

    def bind(self, model: "embplex.EmbeddingModel") -> None:
        self.inner.bind(model)
        depth, width = model.backbone.num_layers, model.dim
        for layer, dim in self.pairs:
            if layer > depth or dim > width:
                raise OptionError(
                    f"pairs entry ({layer}, {dim}) does not fit the model: it has {depth} layers and "
                    f"{width}-wide embeddings; use layers 1..{depth} and dims up to {width}."
                )

    def forward(self, model: "embplex.EmbeddingModel", batch: TrainingBatch) -> Tensor:
        depth = model.backbone.num_layers
        self.bind(model)  # a pair beyond this model would otherwise fail deep inside embed
        layers = sorted({layer for layer, _ in self.pairs if layer < depth}) + [None]
        embeddings = self.inner.embed(model, batch, layers)
        full = {role: by_layer[None] for role, by_layer in embeddings.items()}
        loss = 0.0
        for layer, dim in self.pairs:
            at = None if layer >= depth else layer
            pair = {role: functional.normalize(by_layer[at][..., :dim], dim=-1) for role, by_layer in embeddings.items()}
            loss = loss + self.inner.compute(pair, batch)
            if at is not None and self.kl_weight > 0 and self.kl_temperature > 0:
                loss = loss + self.kl_weight * self.alignment(pair, full, dim)
        return loss

    def alignment(self, pair: dict[str, Tensor], full: dict[str, Tensor], dim: int) -> Tensor:
        t = self.kl_temperature
        teacher = torch.cat([functional.normalize(e[..., :dim], dim=-1) for e in full.values()]).float()
        student = torch.cat(list(pair.values())).float()
        return t * functional.kl_div(
            functional.log_softmax(student / t, dim=-1), functional.softmax(teacher / t, dim=-1).detach(), reduction="batchmean"
        )

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        """The pairs at the last layer only (what a wrapper feeding final embeddings gets):
        the inner loss on each pair's prefix."""
        return sum(
            self.inner.compute({r: functional.normalize(e[..., :dim], dim=-1) for r, e in embeddings.items()}, batch)
            for _, dim in self.pairs
        )

    def recommended_sizes(self, model: "embplex.EmbeddingModel") -> list[tuple[int, int]]:
        return list(self.pairs)


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "starbucks",
        Starbucks,
        paper="Starbucks: Improved Training for 2D Matryoshka Embeddings (2024), arXiv:2410.13230",
    )
