"""The contracts let catalog techniques be written as plugins, without core changes.

Each test here is a miniature of a technique from TECHNIQUES.md written only against the
public contracts: a loss wrapping another loss over layers and prefixes (2D Matryoshka),
and a sampler that re-mines negatives with the current model and an index.
"""

from __future__ import annotations

import numpy as np
import torch

from embplex.components import Example, Loss, Sampler, TrainingContext
from embplex.training import TrainSettings, make_training_batch, train


class LayerPrefixLoss(Loss):
    """Sums an inner loss over (layer, prefix) pairs from one backbone pass."""

    def __init__(self, inner: Loss, pairs: list[tuple[int | None, int]]):
        super().__init__()
        self.inner = inner
        self.pairs = pairs

    def forward(self, model, batch):
        layers = sorted({layer for layer, _ in self.pairs}, key=lambda x: (x is None, x or 0))
        by_role = model.embed_roles(batch, layers=layers)
        total = 0
        for layer, dim in self.pairs:
            sliced = {role: torch.nn.functional.normalize(emb[layer][:, :dim], dim=-1) for role, emb in by_role.items()}
            total = total + self.inner.compute(sliced, batch)
        return total


EXAMPLES = [
    Example(anchor=f"question number {i} about topic {i % 5}", positive=f"answer {i} on topic {i % 5} in detail")
    for i in range(24)
]


def test_a_loss_can_wrap_another_over_layers_and_prefixes_in_one_pass(tiny_model, registry):
    calls = []
    tiny_model.backbone.register_forward_hook(lambda module, args, output: calls.append(1))
    infonce = registry.create("loss", "infonce")
    wrapper = LayerPrefixLoss(infonce, [(1, 8), (2, 16), (None, 32)])
    batch = make_training_batch(tiny_model.backbone, EXAMPLES[:8])
    tiny_model.train()
    value = wrapper(tiny_model, batch)
    # anchors and positives: one backbone pass per role, whatever the number of pairs
    assert len(calls) == 2
    value.backward()
    first_layer = tiny_model.backbone.model.encoder.layer[0].attention.self.query.weight
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0
    # the wrapped value equals the inner loss computed separately per pair
    tiny_model.eval()  # no dropout, so separate passes are comparable
    with torch.no_grad():
        expected = 0
        for layer, dim in wrapper.pairs:
            emb = tiny_model.embed_roles(batch, layers=[layer])
            sliced = {r: torch.nn.functional.normalize(e[layer][:, :dim], dim=-1) for r, e in emb.items()}
            expected += infonce.compute(sliced, batch)
        torch.testing.assert_close(wrapper(tiny_model, batch), expected)


class NearestNegativeSampler(Sampler):
    """Re-mines each anchor's hardest negative with the current model every epoch."""

    def __init__(self):
        self.mined_at: list[int] = []
        self.negatives: dict[int, list[str]] = {}

    def batches(self, examples, batch_size, seed, epoch, context: TrainingContext):
        assert context.model is not None and context.make_index is not None
        model = context.model
        vectors = model.encode([e.positive for e in examples], show_progress=False)
        index = context.make_index(vectors.shape[1])
        index.add([str(i) for i in range(len(examples))], vectors)
        hits = index.search(model.encode([e.anchor for e in examples], show_progress=False), 3)
        for i, (example, ids) in enumerate(zip(examples, hits.ids)):
            hardest = next(int(j) for j in ids if int(j) != i)
            example.negatives = [examples[hardest].positive]
            self.negatives.setdefault(i, []).append(examples[hardest].positive)
        self.mined_at.append(context.step)
        order = np.random.default_rng(seed + epoch).permutation(len(examples)).tolist()
        yield from (order[i : i + batch_size] for i in range(0, len(order), batch_size))


def test_a_sampler_gets_the_model_and_an_index_during_training(tiny_model, registry, tmp_path):
    examples = [Example(e.anchor, e.positive) for e in EXAMPLES]
    sampler = NearestNegativeSampler()
    train(
        tiny_model,
        examples,
        registry.create("loss", "infonce"),
        sampler,
        TrainSettings(batch_size=8, epochs=2, lr=1e-3, progress_bar=False, tensorboard=False),
        output_dir=tmp_path,
        make_index=lambda dim: registry.create("index", "exact", dim=dim),
    )
    assert sampler.mined_at == [0, 3]  # once per epoch, at the step the epoch starts
    for i, mined in sampler.negatives.items():
        assert EXAMPLES[i].positive not in mined  # never the anchor's own positive
