"""Composite plugins build their parts from the registry that built them.

The plugins here play a third-party package: a loss that wraps other losses by name, and
a pooling that wraps another pooling by name (so a saved model rebuilds its part on
load). Their inner plugins exist only in-process (``load_registry(extra_plugins=...)``),
which no fresh global lookup could find.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import embplex
from embplex.components import Loss, Pooling
from embplex.errors import OptionError, UnknownComponentError


class WeightedSum(Loss):
    """Sums inner losses, each given by name or by ``{"name": ..., **options}``."""

    def __init__(self, inner: list = ("infonce",), *, registry: embplex.Registry) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(
            registry.create_part("loss", spec, option=f"loss.inner.{i}") for i, spec in enumerate(inner)
        )

    def compute(self, embeddings, batch):
        return sum(part.compute(embeddings, batch) for part in self.parts)


class Constant(Loss):
    """The in-process inner loss."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.value = value

    def compute(self, embeddings, batch):
        return torch.tensor(self.value)


class Scaled(Pooling):
    """Another pooling, by name, times ``scale``."""

    def __init__(self, inner: str = "mean", scale: float = 2.0, *, registry: embplex.Registry) -> None:
        super().__init__()
        self.inner = registry.create_part("pooling", inner, option="pooling.inner")
        self.scale = scale

    def forward(self, features):
        return self.inner(features) * self.scale


class Last(Pooling):
    """The in-process inner pooling: the last real token (right padding)."""

    def forward(self, features):
        last = features.attention_mask.sum(dim=1) - 1
        states = features.last_hidden_state
        return states[torch.arange(states.shape[0]), last]


def plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: embplex.hookimpl(hook) for name, hook in hooks.items()})


WRAPPERS = plugin(
    register_losses=lambda register: register("weighted_sum", WeightedSum),
    register_poolings=lambda register: register("scaled", Scaled),
)
INNER = plugin(
    register_losses=lambda register: register("constant", Constant),
    register_poolings=lambda register: register("last", Last),
)


@pytest.fixture
def in_process():
    """Installed plugins plus the wrappers and their inner plugins, registered in-process."""
    return embplex.load_registry(extra_plugins=[("wrappers", WRAPPERS), ("inner", INNER)])


def test_a_wrapper_builds_an_inner_plugin_that_exists_only_in_process(in_process):
    loss = in_process.create(
        "loss", "weighted_sum", inner=["constant", {"name": "constant", "value": 2.5}, {"name": "infonce", "temperature": 0.1}]
    )
    assert [type(part) for part in loss.parts] == [Constant, Constant, type(in_process.create("loss", "infonce"))]
    assert [loss.parts[0].value, loss.parts[1].value, loss.parts[2].temperature] == [1.0, 2.5, 0.1]
    assert in_process.get("loss", "weighted_sum").option_names() == ["inner"]  # the registry is no option


def test_a_saved_model_rebuilds_its_in_process_part_on_load(in_process, tiny_bert_path, tmp_path):
    model = embplex.compose(
        {"name": "hf_encoder", "path": tiny_bert_path},
        pooling={"name": "scaled", "inner": "last", "scale": 3.0},
        normalize=False,
        registry=in_process,
    )
    assert isinstance(model.pooling.inner, Last)
    texts = ["a cat sat on the mat", "hello"]
    model.save(tmp_path / "model")
    loaded = embplex.load(tmp_path / "model", registry=in_process)
    assert isinstance(loaded.pooling.inner, Last) and loaded.pooling.scale == 3.0
    np.testing.assert_allclose(loaded.encode(texts), model.encode(texts), atol=1e-6)


@pytest.mark.parametrize("inner", ["no_such_loss", ["constant", "no_such_loss"], [{"name": "no_such_loss"}]])
def test_an_unknown_inner_name_is_refused_naming_the_option(in_process, inner):
    with pytest.raises(UnknownComponentError, match=r"loss\.inner\.\d: No loss plugin named 'n") as error:
        in_process.create("loss", "weighted_sum", inner=[inner] if isinstance(inner, str) else inner)
    assert "constant" in str(error.value)  # the in-process plugins are among those listed


def test_an_inner_plugin_disabled_in_the_building_registry_is_unreachable(monkeypatch):
    monkeypatch.setenv("EMBPLEX_DISABLE_PLUGINS", "loss.infonce")
    registry = embplex.load_registry(extra_plugins=[("wrappers", WRAPPERS)])
    with pytest.raises(UnknownComponentError, match=r"loss\.inner\.0: No loss plugin named 'infonce'"):
        registry.create("loss", "weighted_sum", inner=["infonce"])


def test_a_bad_inner_option_or_spec_is_refused_naming_the_option(in_process):
    with pytest.raises(OptionError, match=r"Unknown key loss\.inner\.0\.valeu: loss 'constant' has no option 'valeu'"):
        in_process.create("loss", "weighted_sum", inner=[{"name": "constant", "valeu": 2}])
    with pytest.raises(OptionError, match=r"loss\.inner\.0 must be a loss plugin name or a config"):
        in_process.create("loss", "weighted_sum", inner=[{"value": 2}])


def test_the_registry_cannot_be_set_as_an_option(in_process):
    with pytest.raises(OptionError, match="has no option 'registry'"):
        in_process.create("loss", "weighted_sum", inner=["constant"], registry=embplex.load_registry())
