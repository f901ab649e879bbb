"""``embplex.testing``: the helpers and conformance suites shipped for plugin authors.

The suites run on the first-party plugins (here for ``infonce``; tests/test_index.py and
tests/test_pooling.py run the index and pooling suites), and each suite is shown to
catch a plugin that breaks its contract: a suite that passes everything proves nothing.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import embplex
from embplex.components import Example, Pooling
from embplex.plugins.index.exact import ExactIndex
from embplex.testing import (
    IndexContract,
    LossContract,
    PoolingContract,
    isolated_registry,
    make_training_batch,
    tiny_examples,
    tiny_features,
)

CONTRACT_FAILED = (AssertionError, pytest.fail.Exception)


class TestInfoNCEFollowsTheLossContract(LossContract):
    @pytest.fixture(params=[False, True], ids=["one-way", "symmetric"])
    def loss(self, request):
        return embplex.load_registry().create("loss", "infonce", symmetric=request.param)


# -- each suite catches a broken plugin --------------------------------------------------


class MeanOverPadding(Pooling):
    """Broken on purpose: averages every position, padding included."""

    def forward(self, features):
        return features.last_hidden_state.mean(dim=1)


def test_pooling_contract_catches_a_pooling_that_reads_padding():
    contract = PoolingContract()
    contract.test_output_shape_and_values(MeanOverPadding())  # the shape is right...
    with pytest.raises(CONTRACT_FAILED):
        contract.test_padding_never_changes_the_output(MeanOverPadding(), "right", 0)
    with pytest.raises(CONTRACT_FAILED):
        contract.test_no_gradient_reaches_padding(MeanOverPadding(), "left")


class AcceptsAnything(ExactIndex):
    """Broken on purpose: keeps non-finite vectors and a second copy of an id."""

    def _as_matrix(self, vectors, what):
        return torch.from_numpy(np.nan_to_num(np.asarray(vectors, dtype=np.float32)))

    def add(self, ids, vectors, metadata=None):
        self._items.row_of.clear()
        super().add(ids, vectors, metadata)


@pytest.mark.parametrize(
    "check",
    ["test_non_finite_vectors_are_refused_and_change_nothing", "test_an_id_added_twice_is_refused"],
)
def test_index_contract_catches_an_index_that_accepts_bad_input(check):
    contract = IndexContract()
    make = lambda dim: AcceptsAnything(dim=dim)  # noqa: E731
    contract.test_search_result_shapes_and_types(make)  # ...while its results look fine
    arguments = (make, float("nan")) if "non_finite" in check else (make,)
    with pytest.raises(CONTRACT_FAILED):
        getattr(contract, check)(*arguments)


class IgnoresPositives(embplex.Loss):
    """Broken on purpose: a loss no gradient flows through to the positives."""

    def compute(self, embeddings, batch):
        return embeddings["anchors"].pow(2).sum()


def test_loss_contract_catches_a_loss_without_gradient_to_the_positives():
    with pytest.raises(CONTRACT_FAILED):
        LossContract().test_compute_returns_a_finite_scalar_with_gradients(IgnoresPositives(), 0)


class LabelsOnTheCpu(embplex.Loss):
    """Broken on purpose: its labels are made on the CPU, whatever the embeddings' device
    (on a GPU, cross-entropy then fails)."""

    def compute(self, embeddings, batch):
        scores = embeddings["anchors"] @ embeddings["positives"].T
        return torch.nn.functional.cross_entropy(scores, torch.arange(scores.shape[0]))


class WeightsOnTheCpu(embplex.Pooling):
    """Broken on purpose: position weights made without ``device=``."""

    def forward(self, features):
        states = features.hidden_states[-1]
        weights = torch.linspace(0, 1, states.shape[1])[None, :, None]
        return (states * weights).sum(dim=1)


def test_the_contracts_catch_a_tensor_made_on_the_cpu_without_a_gpu():
    with pytest.raises(CONTRACT_FAILED, match="made a tensor on another device than its inputs"):
        LossContract().test_tensors_are_made_on_the_inputs_device(LabelsOnTheCpu())
    with pytest.raises(CONTRACT_FAILED, match="made a tensor on another device than its inputs"):
        PoolingContract().test_tensors_are_made_on_the_inputs_device(WeightsOnTheCpu())


# -- the helpers ---------------------------------------------------------------------------


def test_isolated_registry_holds_only_what_it_is_given():
    plugin = types.SimpleNamespace(
        register_poolings=embplex.hookimpl(lambda register: register("in_process", MeanOverPadding))
    )
    registry = isolated_registry(plugin, include=["pooling.mean"])
    assert registry.names("pooling") == ["in_process", "mean"]
    assert all(registry.names(kind) == [] for kind in embplex.KINDS if kind != "pooling")
    assert registry.get("pooling", "mean").distribution.name == "embplex"
    with pytest.raises(LookupError, match="pooling.nope"):
        isolated_registry(include=["pooling.nope"])


def test_embplex_registry_fixture_is_the_same_helper(embplex_registry):
    names = embplex_registry(include=["embplex"]).names("index")
    assert "exact" in names and names == isolated_registry(include=["embplex"]).names("index")


@pytest.mark.parametrize("side", ["right", "left"])
def test_tiny_features_pad_on_the_side_asked_and_flag_the_prompt(side):
    features = tiny_features(lengths=(3, 1), hidden=4, padding_side=side, prompt_tokens=1, layers=2)
    expected_mask = [[1, 1, 1], [1, 0, 0]] if side == "right" else [[1, 1, 1], [0, 0, 1]]
    assert features.attention_mask.tolist() == expected_mask
    assert features.instruction_mask.tolist() == ([[1, 0, 0], [1, 0, 0]] if side == "right" else [[1, 0, 0], [0, 0, 1]])
    assert len(features.hidden_states) == 3 and features.hidden_states[0].shape == (2, 3, 4)
    padding = ~features.attention_mask.bool()
    assert (features.hidden_states[-1][padding] == 1e4).all()


def test_training_batch_from_examples_on_the_tiny_encoder(tiny_encoder):
    examples = tiny_examples(3, negatives=2, scores=True, prompt="query: ")
    assert len({e.anchor for e in examples}) == 3 and all(len(e.negatives) == 2 for e in examples)
    batch = make_training_batch(tiny_encoder.backbone, examples)
    assert batch.examples == examples and batch.negatives_per_anchor == 2
    assert batch.negatives.input_ids.shape[0] == 6 and batch.scores.shape == (3, 3)
    assert batch.anchors.instruction_mask.sum() > 0, "the anchors carry their prompt"
    unscored = make_training_batch(tiny_encoder.backbone, [Example("a cat", "a dog")])
    assert unscored.negatives is None and unscored.scores is None
    assert tiny_encoder.encode(["the cat sat"]).shape == (1, 32)


# -- what docs/writing-plugins.md says about training from Python --------------------------


class StopAt(Exception):
    """Raised by a callback to end a run at a chosen step (its checkpoint is already written)."""


def _train(tiny_encoder_path, output, callbacks=(), max_steps=4, **settings):
    from embplex.training import TrainSettings, train

    registry = isolated_registry(include=["embplex"])
    model = embplex.compose({"name": "hf_encoder", "path": tiny_encoder_path}, pooling="mean", registry=registry)
    return train(
        model,
        tiny_examples(8),
        loss=registry.create("loss", "infonce"),
        sampler=registry.create("sampler", "random"),
        settings=TrainSettings(batch_size=4, max_steps=max_steps, tensorboard=False, progress_bar=False, **settings),
        output_dir=output,
        registry=registry,
        callbacks=callbacks,
    )


def test_a_callback_stops_a_run_at_a_step_and_train_resumes_it(tiny_encoder_path, tmp_path):
    seen = []

    def stop_after_step_2(info):
        seen.append(info)
        if info.step == 2:
            raise StopAt

    with pytest.raises(StopAt):
        _train(tiny_encoder_path, tmp_path / "run", [stop_after_step_2], checkpoint_every=2)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    assert [(info.step, info.checkpoint) for info in seen] == [(1, None), (2, checkpoint)]
    resumed = _train(tiny_encoder_path, tmp_path / "run", checkpoint_every=2)
    assert resumed.resumed_from == checkpoint and resumed.step == 4
    # (that the resumed weights equal an uninterrupted run's is tests/test_training.py's job)
    # The default warm-up (10% of 4 steps, rounded up: one step) starts from zero...
    assert seen[0].lr == 0.0 and seen[1].lr == pytest.approx(2e-5)
    # ...and warmup_steps=0 turns it off.
    no_warm_up = []
    _train(tiny_encoder_path, tmp_path / "no-warm-up", [no_warm_up.append], max_steps=1, warmup_steps=0)
    assert no_warm_up[0].lr == pytest.approx(2e-5)
