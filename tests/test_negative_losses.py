"""The losses focal_infonce, hard_negative_mixing and progressive."""

from __future__ import annotations

import math

import pytest
import torch

import embplex
from embplex.components import Example
from embplex.errors import OptionError
from embplex.testing import LossContract
from embplex.training import TrainSettings, latest_checkpoint, train


class TestFocalContract(LossContract):
    @pytest.fixture
    def loss(self, registry):
        return registry.create("loss", "focal_infonce", gamma=2.0)


class TestMixingContract(LossContract):
    @pytest.fixture
    def loss(self, registry):
        return registry.create("loss", "hard_negative_mixing", mixed=3, hardest=4)


class TestProgressiveContract(LossContract):
    @pytest.fixture
    def loss(self, registry):
        return registry.create("loss", "progressive", steps=10)


def _batch(negatives: int, seed: int):
    contract = LossContract()
    contract.batch_size = 6
    embeddings, leaves, batch = contract.batch(negatives, seed)
    return embeddings, leaves, batch


def _value_and_grads(loss, embeddings, leaves, batch):
    for leaf in leaves:
        leaf.grad = None
    with torch.enable_grad():
        value = loss.compute(embeddings, batch)
        value.backward(retain_graph=True)
    return value.detach(), [leaf.grad.clone() for leaf in leaves]


# -- focal_infonce --------------------------------------------------------------------


@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("seed", range(3))
def test_focal_with_gamma_zero_is_infonce_exactly(registry, negatives, seed):
    embeddings, leaves, batch = _batch(negatives, seed)
    for options in ({}, {"temperature": 0.1}):
        focal = _value_and_grads(registry.create("loss", "focal_infonce", gamma=0.0, **options), embeddings, leaves, batch)
        plain = _value_and_grads(registry.create("loss", "infonce", **options), embeddings, leaves, batch)
        assert torch.equal(focal[0], plain[0])
        assert all(torch.equal(a, b) for a, b in zip(focal[1], plain[1]))


def test_focal_weights_follow_one_minus_p_to_the_gamma(registry):
    embeddings, _, batch = _batch(2, 0)
    gamma, temperature = 1.5, 0.07
    value = registry.create("loss", "focal_infonce", gamma=gamma, temperature=temperature).compute(embeddings, batch)
    a, p = embeddings["anchors"].detach(), embeddings["positives"].detach()
    candidates = torch.cat([p, embeddings["negatives"].detach()])
    probs = torch.softmax(a @ candidates.T / temperature, dim=1).diagonal()
    expected = (-(1 - probs) ** gamma * probs.log()).mean()
    assert torch.allclose(value, expected, atol=1e-6)
    assert value < registry.create("loss", "infonce", temperature=temperature).compute(embeddings, batch)


def test_focal_refuses_a_negative_gamma(registry):
    with pytest.raises(OptionError, match="gamma must be 0"):
        registry.create("loss", "focal_infonce", gamma=-1.0)


# -- hard_negative_mixing --------------------------------------------------------------


@pytest.mark.parametrize("negatives", [0, 2])
def test_mixing_nothing_is_infonce_exactly(registry, negatives):
    embeddings, leaves, batch = _batch(negatives, 1)
    mixed = _value_and_grads(registry.create("loss", "hard_negative_mixing", mixed=0), embeddings, leaves, batch)
    plain = _value_and_grads(registry.create("loss", "infonce"), embeddings, leaves, batch)
    assert torch.equal(mixed[0], plain[0]) and all(torch.equal(a, b) for a, b in zip(mixed[1], plain[1]))


@pytest.mark.parametrize("negatives", [0, 2])
def test_mixing_adds_the_configured_synthetic_negatives_from_the_hardest(registry, negatives):
    from embplex.contrastive import contrastive_candidates

    embeddings, _, batch = _batch(negatives, 2)
    loss = registry.create("loss", "hard_negative_mixing", mixed=5, hardest=3, gather_across_processes=False)
    anchors, candidates, labels = contrastive_candidates(embeddings, gather=False)
    logits = anchors @ candidates.T / loss.temperature
    torch.manual_seed(0)
    synthetic = loss.synthesise(anchors, candidates, logits, labels)
    assert synthetic.shape == (len(anchors), 5, anchors.shape[1])  # `mixed` per anchor
    assert torch.allclose(synthetic.norm(dim=-1), torch.ones(len(anchors), 5), atol=1e-5)
    for i in range(len(anchors)):
        order = [int(c) for c in logits[i].argsort(descending=True) if int(c) != int(labels[i])]
        hardest = candidates[order[:3]]
        for vector in synthetic[i]:
            # the vector is a renormalised mix a*h + (1-a)*h' of two of the three hardest negatives
            assert any(
                _is_mix(vector, hardest[j], hardest[k]) for j in range(3) for k in range(3) if j != k
            ), f"anchor {i}: a synthetic negative is not a mix of two of its hardest negatives"
    # extra negatives can only make the task harder
    torch.manual_seed(0)
    mixed = loss.compute(embeddings, batch)
    assert mixed > registry.create("loss", "infonce").compute(embeddings, batch)


def _is_mix(vector, first, second) -> bool:
    """Whether ``vector`` is ``normalize(a*first + (1-a)*second)`` for some a in [0, 1]."""
    basis = torch.stack([first, second]).T
    coefficients = torch.linalg.lstsq(basis, vector[:, None]).solution.squeeze(1)
    back = basis @ coefficients
    return bool(torch.allclose(back, vector, atol=1e-4) and (coefficients >= -1e-5).all())


def test_mixing_options_are_checked(registry):
    with pytest.raises(OptionError, match="hardest must be at least 2"):
        registry.create("loss", "hard_negative_mixing", hardest=1)
    with pytest.raises(OptionError, match="mixed must be"):
        registry.create("loss", "hard_negative_mixing", mixed=-1)


# -- progressive ----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_progressive_weights_follow_the_schedule(registry, schedule):
    loss = registry.create("loss", "progressive", steps=8, schedule=schedule)
    p = torch.tensor([0.9, 0.5, 0.1])  # easy, medium, hard
    for batches in (0, 2, 4, 6, 8, 12):
        loss.batches.fill_(batches)
        t = min(1.0, batches / 8)
        t = t if schedule == "linear" else (1 - math.cos(math.pi * t)) / 2
        raw = (1 - t) * p + t * (1 - p)
        assert torch.allclose(loss.weights(p), raw / raw.mean())
    loss.batches.fill_(0)
    assert loss.weights(p).argmax() == 0  # at the start the easy sample counts most
    loss.batches.fill_(8)
    assert loss.weights(p).argmax() == 2  # at the end the hard one


def test_progressive_counts_training_batches_only(registry):
    embeddings, _, batch = _batch(0, 0)
    loss = registry.create("loss", "progressive", steps=4)
    loss.eval()
    loss.compute(embeddings, batch)
    assert int(loss.batches) == 0
    loss.train()
    for _ in range(3):
        loss.compute(embeddings, batch)
    assert int(loss.batches) == 3
    assert "batches" in loss.state_dict()  # checkpointed with the loss


def test_progressive_refuses_bad_steps(registry):
    with pytest.raises(OptionError, match="steps must be the number of training batches"):
        registry.create("loss", "progressive", steps=0)


class Killed(Exception):
    pass


def _progressive_run(path, registry, output, kill_at=None):
    def kill(info):
        if info.step == kill_at:
            raise Killed

    examples = [Example(f"what is the {w} of a cat", f"the {w} of a cat is small") for w in "size color age name eye tail".split()]
    model = embplex.compose({"name": "hf_encoder", "path": path}, pooling="mean")
    settings = TrainSettings(
        batch_size=2, max_steps=6, checkpoint_every=2, lr=5e-3, log_every=1, progress_bar=False,
        tensorboard=False, seed=1, grad_accumulation=1, warmup_steps=0,
    )
    loss = registry.create("loss", "progressive", steps=6)
    result = train(model, examples, loss, registry.create("sampler", "random"), settings, output, registry=registry, callbacks=[kill])
    return result, loss


def test_progressive_resumes_its_step_counter_exactly(tiny_encoder_path, registry, tmp_path):
    straight, straight_loss = _progressive_run(tiny_encoder_path, registry, tmp_path / "straight")
    assert int(straight_loss.batches) == 6
    with pytest.raises(Killed):
        _progressive_run(tiny_encoder_path, registry, tmp_path / "resumed", kill_at=3)
    checkpoint = latest_checkpoint(tmp_path / "resumed")
    saved = embplex.storage.load_torch_state(checkpoint / "training_state.pt")["loss"]
    assert checkpoint.name == "step-2" and int(saved["batches"]) == 2
    resumed, resumed_loss = _progressive_run(tiny_encoder_path, registry, tmp_path / "resumed")
    assert resumed.resumed_from == checkpoint and int(resumed_loss.batches) == 6
    expected = embplex.load(straight.model_path, registry=registry).state_dict()
    for name, tensor in embplex.load(resumed.model_path, registry=registry).state_dict().items():
        assert torch.equal(tensor, expected[name]), name
