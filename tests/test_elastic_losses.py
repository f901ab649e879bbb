"""The elastic losses (cached_infonce, matryoshka, matryoshka_2d, starbucks,
projection_head): each against the definition that makes it what it is."""

from __future__ import annotations

import pytest
import torch

import embplex
from embplex.errors import OptionError, UnknownComponentError
from embplex.testing import LossContract, make_training_batch, tiny_examples

BATCH = 6


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    """A 3-layer random BERT (hidden 32) with dropout 0.1 everywhere."""
    from embplex.testing import build_encoder

    return build_encoder(tmp_path_factory.mktemp("elastic-encoder"), layers=3)


@pytest.fixture
def model(tiny_path):
    return embplex.compose({"name": "hf_encoder", "path": tiny_path}, pooling="mean")


@pytest.fixture
def batch(model):
    return make_training_batch(model.backbone, tiny_examples(BATCH, negatives=1))


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _run(loss, model, batch, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and every parameter's gradient, from the same random state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.enable_grad():
        value = loss(model, batch)
        value.backward()
    return float(value.detach()), _grads(model)


def _assert_same(left, right, atol: float = 1e-5) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = left, right
    assert loss_a == pytest.approx(loss_b, abs=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=0, msg=name)


# ---------------------------------------------------------------------------
# cached_infonce
# ---------------------------------------------------------------------------


def _has_dropout(model) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


@pytest.mark.parametrize("mini_batch_size", [1, 4])
def test_cached_infonce_equals_infonce_without_dropout(registry, model, batch, mini_batch_size):
    model.eval()  # no dropout: the mini-batches' forward equals the whole batch's
    cached = registry.create("loss", "cached_infonce", mini_batch_size=mini_batch_size)
    _assert_same(_run(cached, model, batch), _run(registry.create("loss", "infonce"), model, batch))


def test_cached_infonce_equals_infonce_with_dropout_on(registry, model, batch):
    """Train mode, dropout on, one mini-batch per role: the cached pass and its replay
    draw the masks infonce's single pass draws."""
    model.train()
    assert _has_dropout(model)
    cached = registry.create("loss", "cached_infonce", mini_batch_size=BATCH)
    infonce = registry.create("loss", "infonce")
    _assert_same(_run(cached, model, batch), _run(infonce, model, batch))
    # dropout really is on: another random state gives another loss
    assert _run(infonce, model, batch, seed=1)[0] != pytest.approx(_run(infonce, model, batch)[0], abs=1e-6)


def test_cached_infonce_replays_each_mini_batch_with_its_dropout_masks(registry, model, batch):
    """Train mode, mini-batches of 2: the gradients are those of infonce on the same
    mini-batched forward pass with a graph (which only restoring each mini-batch's random
    state for the replay can give)."""
    model.train()
    cached = registry.create("loss", "cached_infonce", mini_batch_size=2)
    infonce = registry.create("loss", "infonce")

    class MiniBatched(torch.nn.Module):  # the uncached reference: same chunks, same order
        def forward(self, model, batch):
            from embplex.plugins.loss.cached_infonce import _rows

            embeddings = {}
            for role, features in batch.roles().items():
                count = features.input_ids.shape[0]
                parts = [model.embed(_rows(features, s, min(count, s + 2)))[None] for s in range(0, count, 2)]
                embeddings[role] = torch.cat(parts)
            return infonce.compute(embeddings, batch)

    _assert_same(_run(cached, model, batch), _run(MiniBatched(), model, batch))
    # and training continues on the random stream it would have without the replay
    torch.manual_seed(3)
    with torch.enable_grad():
        cached(model, batch).backward()
    after_cached = torch.rand(1)
    torch.manual_seed(3)
    with torch.no_grad():
        cached(model, batch)
    assert torch.equal(torch.rand(1), after_cached)


@pytest.mark.parametrize("size", [0, -3])
def test_cached_infonce_refuses_a_mini_batch_size_below_one(registry, size):
    with pytest.raises(OptionError, match="mini_batch_size"):
        registry.create("loss", "cached_infonce", mini_batch_size=size)


class TestCachedInfoNCEContract(LossContract):
    @pytest.fixture
    def loss(self):
        return embplex.load_registry().create("loss", "cached_infonce", mini_batch_size=3)
