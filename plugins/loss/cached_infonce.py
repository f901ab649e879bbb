"""Loss ``cached_infonce``: InfoNCE over a large batch with memory flat in the batch size.

From "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (Gao et
al., 2021, arXiv:2101.06983), GradCache; sentence-transformers calls it
CachedMultipleNegativesRankingLoss. The batch's texts are embedded in mini-batches
without a graph, the loss (``infonce``, built by name) is computed on all of them at once,
and each mini-batch is embedded again with a graph when gradients flow back, receiving
its slice of the loss's gradient. Only one mini-batch's activations are alive at a time.

Where ours differs: the replay happens inside autograd (a custom function whose backward
re-embeds), so the value returned is an ordinary loss. A loss wrapping this one
(``matryoshka``, ``matryoshka_2d``, ``starbucks``) gets cached embeddings of every layer it
asks for through :meth:`Loss.embed` and back-propagates through them; the replay then
re-embeds each mini-batch once for all layers. The random state (dropout) is saved before
each mini-batch's first pass and restored for its replay, so both passes see the same
dropout masks and the gradients are those of the uncached loss on the same forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

import embplex
from embplex.components import Features, Loss, TrainingBatch
from embplex.errors import OptionError


def _rows(features: Features, start: int, stop: int) -> Features:
    """Rows ``start:stop`` of a tokenized batch (every per-row tensor, ``extra`` included)."""
    count = features.input_ids.shape[0]

    def take(value: Any) -> Any:
        return value[start:stop] if isinstance(value, Tensor) and value.dim() and value.shape[0] == count else value

    return dataclasses.replace(
        features,
        input_ids=take(features.input_ids),
        attention_mask=take(features.attention_mask),
        instruction_mask=take(features.instruction_mask),
        hidden_states=None,
        extra={key: take(value) for key, value in features.extra.items()},
    )


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replaying(state: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
    """Run with the random state ``state``, then put back the state found on entry, so
    the replay neither repeats nor shifts the random stream of the rest of training."""
    saved = _rng_state(device)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        if saved[1] is not None:
            torch.cuda.set_rng_state(saved[1], device)


class _Replay(torch.autograd.Function):
    """Identity on the cached embeddings; its backward hands their gradients to
    ``replay``, which re-embeds with a graph and back-propagates into the model."""

    @staticmethod
    def forward(ctx: Any, replay: Callable[[Sequence[Tensor | None]], None], anchor: Tensor, *cached: Tensor):
        ctx.replay = replay
        return tuple(t.clone() for t in cached)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None):
        ctx.replay(grads)
        return (None, None) + (None,) * len(grads)


class CachedInfoNCE(Loss):
    def __init__(
        self,
        mini_batch_size: int = 32,
        temperature: float = 0.05,
        symmetric: bool = False,
        gather_across_processes: bool = True,
        *,
        registry: embplex.Registry,
    ) -> None:
        super().__init__()
        if mini_batch_size < 1:
            raise OptionError(
                f"mini_batch_size must be at least 1 (texts embedded at once), not {mini_batch_size}."
            )
        self.mini_batch_size = int(mini_batch_size)
        options = {"temperature": temperature, "symmetric": symmetric, "gather_across_processes": gather_across_processes}
        self.inner = registry.create_part("loss", {"name": "infonce", **options}, option="loss")

    def distributed_problem(self) -> str | None:
        return self.inner.distributed_problem()  # its own part only weighs the inner loss's terms

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        return self.inner.compute(embeddings, batch)

    def embed(
        self, model: "embplex.EmbeddingModel", batch: TrainingBatch, layers: Sequence[int | None] = (None,)
    ) -> dict[str, dict[int | None, Tensor]]:
        layers = list(dict.fromkeys(layers))
        for layer in layers:
            model.check_layer(layer, "layers")
        device = model.device
        chunks: list[tuple[str, int, Features, tuple[Tensor, Tensor | None]]] = []
        pieces: dict[tuple[str, int | None], list[Tensor]] = {}
        with torch.no_grad():
            for role, features in batch.roles().items():
                count = features.input_ids.shape[0]
                for start in range(0, count, self.mini_batch_size):
                    part = _rows(features, start, min(count, start + self.mini_batch_size))
                    state = _rng_state(device)
                    embedded = model.embed(part, layers)
                    chunks.append((role, start, part, state))
                    for layer in layers:
                        pieces.setdefault((role, layer), []).append(embedded[layer])
        keys = list(pieces)
        cached = [torch.cat(pieces[key]) for key in keys]
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            autocast = (
                torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type))
                if torch.is_autocast_enabled(device.type)
                else contextlib.nullcontext()
            )

            def replay(grads: Sequence[Tensor | None]) -> None:
                by_key = dict(zip(keys, grads))
                with torch.enable_grad(), autocast:
                    for role, start, part, state in chunks:
                        with _replaying(state, device):
                            embedded = model.embed(part, layers)
                        outputs, upstream = [], []
                        for layer in layers:
                            grad = by_key[(role, layer)]
                            if grad is not None:
                                rows = embedded[layer].shape[0]
                                outputs.append(embedded[layer])
                                upstream.append(grad[start : start + rows])
                        if outputs:
                            torch.autograd.backward(outputs, upstream)

            # an empty leaf that asks for a gradient: it makes autograd call the backward
            anchor = torch.empty(0, device=device, requires_grad=True)
            cached = list(_Replay.apply(replay, anchor, *cached))
        out: dict[str, dict[int | None, Tensor]] = {}
        for (role, layer), tensor in zip(keys, cached):
            out.setdefault(role, {})[layer] = tensor
        return out


@embplex.hookimpl
def register_losses(register: Any) -> None:
    register(
        "cached_infonce",
        CachedInfoNCE,
        paper="Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (2021), arXiv:2101.06983",
    )
