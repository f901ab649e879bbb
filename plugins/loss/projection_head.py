"""Loss ``projection_head``: the inner loss on projected embeddings; the head is discarded.

From "Investigating the Benefits of Projection Head for Representation Learning" (Xue et
al., 2024, arXiv:2403.11391), after SimCLR's head (Chen et al., 2020, arXiv:2002.05709).
The inner loss (built by name, ``infonce`` by default) scores the embeddings after a small
MLP (linear, ReLU, linear); the encoder below it learns more general features, and the
model keeps producing the **pre-head** embeddings: the head belongs to the loss, which
training checkpoints but the saved model never contains.

Where ours differs: the head's input width is the model's embedding width, read when the
trainer binds the loss to the model (before the optimizer is built, so the head trains);
``hidden_dim`` and ``output_dim`` default to that width.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

import embplex
from embplex.components import Loss, TrainingBatch
from embplex.errors import OptionError


class ProjectionHead(Loss):
    def __init__(
        self,
        hidden_dim: int | None = None,
        output_dim: int | None = None,
        inner: Any = "infonce",
        seed: int = 0,
        *,
        registry: embplex.Registry,
    ) -> None:
        super().__init__()
        for name, value in [("hidden_dim", hidden_dim), ("output_dim", output_dim)]:
            if value is not None and value < 1:
                raise OptionError(f"{name} must be a positive width or null (the model's width), not {value}.")
        self.hidden_dim, self.output_dim, self.seed = hidden_dim, output_dim, int(seed)
        self.inner = registry.create_part("loss", inner, option="loss.inner")
        self.head: nn.Sequential | None = None

    def build(self, width: int, device: "torch.device | None" = None) -> None:
        """Create the head for embeddings ``width`` wide (once), from ``seed``, on ``device``."""
        if self.head is not None:
            if self.head[0].in_features != width:
                raise OptionError(f"the projection head takes {self.head[0].in_features}-wide embeddings, not {width}.")
            return
        import torch

        hidden = self.hidden_dim or width
        with torch.random.fork_rng(devices=[]):  # the head's init leaves training's random stream alone
            torch.manual_seed(self.seed)
            self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, self.output_dim or width))
        if device is not None:
            self.head.to(device)

    def bind(self, model: "embplex.EmbeddingModel") -> None:
        self.inner.bind(model)
        self.build(model.dim)
        self.head.to(model.device)

    def distributed_problem(self) -> str | None:
        return self.inner.distributed_problem()  # its own part only weighs the inner loss's terms

    def embed(self, model, batch, layers=(None,)):
        return self.inner.embed(model, batch, layers)

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        first = next(iter(embeddings.values()))
        self.build(first.shape[-1], first.device)  # built here only when no model bound it
        return self.inner.compute({role: self.head(e) for role, e in embeddings.items()}, batch)


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "projection_head",
        ProjectionHead,
        paper="Investigating the Benefits of Projection Head for Representation Learning (2024), arXiv:2403.11391",
    )
