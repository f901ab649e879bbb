"""Loss ``late_interaction``: ColBERT's MaxSim (Chamfer) score inside InfoNCE."""

from __future__ import annotations

import inspect
import math
from importlib.resources import files

import pytest
import torch

import embplex
from embplex.errors import InputError, OptionError
from embplex.testing import LossContract, make_training_batch, tiny_examples


def loss(**options):
    return embplex.load_registry().create("loss", "late_interaction", **options)


class TestLateInteractionFollowsTheLossContract(LossContract):
    """On ``[rows, dim]`` vectors (sets of one vector) and a mean-pooled model."""

    @pytest.fixture(params=[1.0, 0.05], ids=lambda t: f"temperature={t}")
    def loss(self, request):
        return loss(temperature=request.param)


def _reference(anchors, positives, negatives, temperature):
    """The loss written out with Python loops: each set a list of vectors."""

    def maxsim(query, document):
        return sum(max(float(q @ d) for d in document) for q in query)

    candidates = positives + negatives
    total = 0.0
    for i, query in enumerate(anchors):
        logits = [maxsim(query, doc) / temperature for doc in candidates]
        top = max(logits)
        total += -(logits[i] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(anchors)


def _sets(generator, lengths, width, dim=6):
    """Padded unit vectors ``[rows, width, dim]`` with a mask keeping ``lengths`` of them
    (not always the first ones: a hole in the middle, as punctuation leaves)."""
    vectors = torch.nn.functional.normalize(torch.randn(len(lengths), width, dim, generator=generator), dim=-1)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        positions = torch.randperm(width, generator=generator)[:length]
        mask[row, positions] = True
    return vectors, mask


@pytest.mark.parametrize("temperature", [1.0, 0.1])
@pytest.mark.parametrize("negatives", [0, 2])
def test_equals_a_hand_written_reference_on_a_fixed_batch(temperature, negatives):
    generator = torch.Generator().manual_seed(3)
    anchors, anchor_mask = _sets(generator, [3, 1, 4], width=5)
    positives, positive_mask = _sets(generator, [2, 6, 5], width=7)
    embeddings = {"anchors": anchors, "positives": positives}
    masks = {"anchors": anchor_mask, "positives": positive_mask}
    negative_sets = []
    if negatives:
        negative_vectors, negative_mask = _sets(generator, [1, 4, 2, 3, 5, 2], width=6)
        embeddings["negatives"], masks["negatives"] = negative_vectors, negative_mask
        negative_sets = [v[m] for v, m in zip(negative_vectors, negative_mask)]
    batch = None  # compute reads no field of the batch
    value = loss(temperature=temperature).compute(embeddings, batch, masks=masks)
    expected = _reference(
        [v[m] for v, m in zip(anchors, anchor_mask)],
        [v[m] for v, m in zip(positives, positive_mask)],
        negative_sets,
        temperature,
    )
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # without masks, the zero vectors of left-out positions are what is left out
    zeroed = {role: vectors * masks[role][..., None] for role, vectors in embeddings.items()}
    assert loss(temperature=temperature).compute(zeroed, batch).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_on_one_vector_per_text_it_is_infonce():
    generator = torch.Generator().manual_seed(0)
    embeddings = {
        role: torch.nn.functional.normalize(torch.randn(rows, 8, generator=generator), dim=-1)
        for role, rows in (("anchors", 4), ("positives", 4), ("negatives", 8))
    }
    infonce = embplex.load_registry().create("loss", "infonce", temperature=0.05, gather_across_processes=False)
    torch.testing.assert_close(loss(temperature=0.05).compute(embeddings, None), infonce.compute(embeddings, None))


@pytest.fixture
def multi_vector_model(tiny_bert_path):
    return embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling={"name": "multi_vector", "dim": 16})


def test_forward_uses_the_poolings_vector_mask(multi_vector_model):
    """forward scores exactly the sets ``encode`` gives (punctuation and padding out)."""
    examples = tiny_examples(3, negatives=1)
    examples[0].positive += " , . !"  # punctuation: not part of the set
    batch = make_training_batch(multi_vector_model.backbone, examples)
    with torch.no_grad():
        value = loss()(multi_vector_model, batch)
    sets = {
        role: [torch.from_numpy(s) for s in multi_vector_model.encode(texts)]
        for role, texts in (
            ("anchors", [e.anchor for e in examples]),
            ("positives", [e.positive for e in examples]),
            ("negatives", [e.negatives[0] for e in examples]),
        )
    }
    expected = _reference(sets["anchors"], sets["positives"], sets["negatives"], 1.0)
    assert value.item() == pytest.approx(expected, rel=1e-4)


def test_a_multi_vector_model_fine_tunes_with_it(multi_vector_model):
    examples = tiny_examples(4, negatives=1)
    batch = make_training_batch(multi_vector_model.backbone, examples)
    objective = loss(temperature=0.1)
    optimizer = torch.optim.AdamW(multi_vector_model.parameters(), lr=1e-2)
    multi_vector_model.train()
    values = []
    for _ in range(6):
        optimizer.zero_grad()
        value = objective(multi_vector_model, batch)
        value.backward()
        assert multi_vector_model.pooling.projection.weight.grad.abs().sum() > 0, "the projection trains"
        optimizer.step()
        values.append(value.item())
    assert values[-1] < 0.5 * values[0], values


def test_the_trainer_trains_a_multi_vector_model(multi_vector_model, tmp_path):
    from embplex.training import TrainSettings, train

    registry = embplex.load_registry()
    result = train(
        multi_vector_model,
        tiny_examples(8, negatives=1),
        loss(),
        registry.create("sampler", "random"),
        TrainSettings(batch_size=4, max_steps=2, lr=1e-3, tensorboard=False, progress_bar=False, log_every=1),
        output_dir=tmp_path / "run",
    )
    assert result.step == 2 and math.isfinite(result.loss)
    saved = embplex.load(result.model_path)
    assert [s.shape[1] for s in saved.encode(["a cat sat"])] == [16]


def test_an_empty_set_is_refused_naming_the_row():
    vectors = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(InputError, match="positives row 1 has no vector"):
        loss().compute({"anchors": vectors, "positives": vectors}, None, masks={"anchors": mask, "positives": empty})


def test_bad_options_are_refused():
    with pytest.raises(OptionError, match="temperature"):
        loss(temperature=0.0)


def test_config_file_lists_every_option_with_its_default():
    from omegaconf import OmegaConf

    config = OmegaConf.load(str(files("embplex.conf") / "loss" / "late_interaction.yaml"))
    parameters = inspect.signature(embplex.load_registry().get("loss", "late_interaction").factory).parameters
    assert list(config)[0] == "name" and config.name == "late_interaction"
    assert set(config) - {"name"} == set(parameters)
    assert all(config[key] == parameter.default for key, parameter in parameters.items())
