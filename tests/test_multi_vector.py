"""Pooling ``multi_vector``: one projected, normalised vector per token, punctuation and
padding left out as ColBERT does."""

from __future__ import annotations

import inspect
import string
from importlib.resources import files
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import embplex
from embplex.errors import InputError, OptionError
from embplex.testing import PoolingContract

TEXTS = ["The cat sat, then slept.", "Stocks fell sharply!", "what is an embedding?", "a b c d e f g"]


def compose(path: str, **options):
    return embplex.compose({"name": "hf_encoder", "path": path}, pooling={"name": "multi_vector", **options})


class TestMultiVectorFollowsThePoolingContract(PoolingContract):
    @pytest.fixture(params=[None, 4, 12], ids=lambda d: f"dim={d}")
    def pooling(self, request):
        pooling = embplex.load_registry().create("pooling", "multi_vector", dim=request.param, skip_punctuation=False)
        pooling.bind(SimpleNamespace(hidden_size=self.hidden, tokenizer=None))
        return pooling


def test_one_unit_vector_per_kept_token_and_punctuation_left_out(tiny_bert_path):
    model = compose(tiny_bert_path, dim=16)
    sets = model.encode(TEXTS, batch_size=3)
    tokenizer = model.backbone.tokenizer
    for text, vectors in zip(TEXTS, sets):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
        kept = [t for t in tokens if t not in string.punctuation]
        assert vectors.shape == (len(kept), 16), (text, tokens)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # the same text alone (no padding, another batch) gives the same set
    np.testing.assert_allclose(model.encode(TEXTS[0]), sets[0], atol=1e-5)
    # "," "." "!" "?" are left out; [CLS] and [SEP] stay, as in ColBERT's documents
    assert "," in tokenizer.convert_ids_to_tokens(model.pooling.skip_ids.tolist())


def test_each_vector_is_the_projected_normalised_token_state(tiny_bert_path):
    model = compose(tiny_bert_path, dim=8, skip_punctuation=False)
    features = model.backbone.tokenize(TEXTS[:2])
    with torch.no_grad():
        states = model.backbone(features).hidden_states[-1]
        out = model.embed(features)[None]
    weight = model.pooling.projection.weight
    for row in range(2):
        real = features.attention_mask[row].bool()
        by_hand = torch.nn.functional.normalize(states[row, real] @ weight.T, dim=-1)
        torch.testing.assert_close(out[row, real], by_hand, atol=1e-5, rtol=1e-5)
        assert (out[row, ~real] == 0).all(), "left-out positions are zero vectors"


def test_the_untrained_projection_is_seeded_and_keeps_inner_products(tiny_bert_path):
    model = compose(tiny_bert_path, dim=24)
    again = compose(tiny_bert_path, dim=24)
    torch.testing.assert_close(model.pooling.projection.weight, again.pooling.projection.weight)
    other = compose(tiny_bert_path, dim=24, seed=1)
    assert not torch.allclose(model.pooling.projection.weight, other.pooling.projection.weight)
    weight = model.pooling.projection.weight  # [24, 32]: orthonormal rows
    torch.testing.assert_close(weight @ weight.T, torch.eye(24), atol=1e-5, rtol=0)


def test_save_and_load_give_the_same_sets(tiny_bert_path, tmp_path):
    model = compose(tiny_bert_path, dim=8)
    with torch.no_grad():
        model.pooling.projection.weight.mul_(2).add_(0.1)  # "trained": not the seeded start
    before = model.encode(TEXTS)
    with pytest.warns(UserWarning):  # no sentence-transformers equivalent: loads through embplex
        model.save(tmp_path / "model")
    loaded = embplex.load(tmp_path / "model")
    after = loaded.encode(TEXTS)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_an_unbound_pooling_refuses_to_pool_rather_than_keep_punctuation():
    pooling = embplex.load_registry().create("pooling", "multi_vector", dim=None)
    features = embplex.testing.tiny_features()
    with pytest.raises(InputError, match="tokenizer"):
        pooling(features)
    projected = embplex.load_registry().create("pooling", "multi_vector", dim=4, skip_punctuation=False)
    with pytest.raises(InputError, match="projection"):
        projected(features)


def test_bad_options_are_refused():
    with pytest.raises(OptionError, match="dim"):
        embplex.load_registry().create("pooling", "multi_vector", dim=0)
    pooling = embplex.load_registry().create("pooling", "multi_vector")
    with pytest.raises(OptionError, match="skip_punctuation"):
        pooling.bind(SimpleNamespace(hidden_size=8))


def test_config_file_lists_every_option_with_its_default():
    from omegaconf import OmegaConf

    config = OmegaConf.load(str(files("embplex.conf") / "pooling" / "multi_vector.yaml"))
    parameters = inspect.signature(embplex.load_registry().get("pooling", "multi_vector").factory).parameters
    assert list(config)[0] == "name" and config.name == "multi_vector"
    assert set(config) - {"name"} == set(parameters)
    assert all(config[key] == parameter.default for key, parameter in parameters.items())
