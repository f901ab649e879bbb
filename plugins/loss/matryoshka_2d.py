"""Loss ``matryoshka_2d``: Matryoshka prefixes at the last layer and at a random earlier one.

From "2D Matryoshka Sentence Embeddings" (Li et al., 2024, arXiv:2402.14776), renamed
"ESE: Espresso Sentence Embeddings"; sentence-transformers' Matryoshka2dLoss. Each step
scores the last layer and one earlier layer, drawn at random, at every configured prefix
(a ``matryoshka`` loss built by name around the inner loss), and aligns the earlier
layer's embedding with the last layer's: the KL divergence between their softmaxes over
the embedding's coordinates at temperature 0.3, the last layer detached as the teacher.

The defaults are sentence-transformers': the earlier layer's loss weighted ``1/(1+k)`` for
layer ``k`` (its ``layer_weighting="linear"``), the KL term multiplied by the temperature.
Where ours differs: every prefix is scored each step (sentence-transformers samples one:
``n_dims_per_step=1``); the earlier layer is drawn from 1..depth-1 (transformer blocks,
never the embedding output), by a generator seeded with ``seed`` and a draw counter kept in
the loss's state, so a resumed run draws the same layers; the inner loss computes the
embeddings (``Loss.embed``), so ``inner=cached_infonce`` caches both layers at once.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.errors import OptionError


class Matryoshka2d(Loss):
    def __init__(
        self,
        dims: list[int] = (384, 256, 128, 64, 32),
        weights: list[float] | None = None,
        inner: Any = "infonce",
        last_layer_weight: float = 1.0,
        prior_layers_weight: float = 1.0,
        layer_weighting: Literal["linear", "uniform"] = "linear",
        kl_weight: float = 1.0,
        kl_temperature: float = 0.3,
        seed: int = 0,
        *,
        registry: embplex.Registry,
    ) -> None:
        super().__init__()
        for name, value in [("last_layer_weight", last_layer_weight), ("prior_layers_weight", prior_layers_weight), ("kl_weight", kl_weight), ("kl_temperature", kl_temperature)]:
            if not value >= 0:
                raise OptionError(f"{name} must be a non-negative number, not {value}.")
        self.prefixes = registry.create_part(
            "loss", {"name": "matryoshka", "dims": list(dims), "weights": weights, "inner": inner}, option="loss"
        )
        self.last_layer_weight = float(last_layer_weight)
        self.prior_layers_weight = float(prior_layers_weight)
        self.layer_weighting = layer_weighting
        self.kl_weight = float(kl_weight)
        self.kl_temperature = float(kl_temperature)
        self.seed = int(seed)
        # how many layers were drawn so far: checkpointed with the loss, so a resumed run
        # continues the same sequence of layers
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def distributed_problem(self) -> str | None:
        # the layer drawn is a function of (seed, draws), the same on every process; the
        # alignment term is a mean over rows
        return self.prefixes.distributed_problem()

    def embed(self, model, batch, layers=(None,)):
        return self.prefixes.embed(model, batch, layers)

    def bind(self, model: "embplex.EmbeddingModel") -> None:
        self.prefixes.bind(model)

    def sample_layer(self, depth: int) -> int | None:
        """This step's earlier layer, 1..depth-1 (``None`` for a one-layer model)."""
        draw = int(self.draws)
        self.draws += 1
        if depth < 2:
            return None
        return int(np.random.default_rng([self.seed, draw]).integers(1, depth))

    def layer_weight(self, layer: int) -> float:
        return 1.0 / (1 + layer) if self.layer_weighting == "linear" else 1.0

    def forward(self, model: "embplex.EmbeddingModel", batch: TrainingBatch) -> Tensor:
        layer = self.sample_layer(model.backbone.num_layers)
        layers = [None] if layer is None else [None, layer]
        embeddings = self.prefixes.embed(model, batch, layers)
        last = {role: by_layer[None] for role, by_layer in embeddings.items()}
        loss = self.last_layer_weight * self.prefixes.compute(last, batch)
        if layer is None:
            return loss
        shallow = {role: by_layer[layer] for role, by_layer in embeddings.items()}
        weight = self.prior_layers_weight * self.layer_weight(layer)
        loss = loss + weight * self.prefixes.compute(shallow, batch)
        if self.kl_temperature > 0 and self.kl_weight > 0:
            loss = loss + self.kl_weight * self.alignment(shallow, last)
        return loss

    def alignment(self, shallow: dict[str, Tensor], last: dict[str, Tensor]) -> Tensor:
        """KL(last ‖ shallow) of the softmaxes over coordinates, every role's rows
        together, mean over rows, times the temperature; the last layer is the teacher."""
        t = self.kl_temperature
        teacher = functional.softmax(torch.cat(list(last.values())).float() / t, dim=-1).detach()
        student = functional.log_softmax(torch.cat(list(shallow.values())).float() / t, dim=-1)
        return functional.kl_div(student, teacher, reduction="batchmean") * t

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        """The last layer's part alone (what a wrapper feeding final embeddings gets)."""
        return self.last_layer_weight * self.prefixes.compute(embeddings, batch)

    def recommended_sizes(self, model: "embplex.EmbeddingModel") -> list[tuple[int, int]]:
        return [(layer, dim) for layer in range(1, model.backbone.num_layers + 1) for dim in sorted(self.prefixes.dims)]


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register("matryoshka_2d", Matryoshka2d, paper="2D Matryoshka Sentence Embeddings (2024), arXiv:2402.14776")
