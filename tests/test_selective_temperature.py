"""Attention ``selective_temperature``: a learnable, bounded inverse temperature per query
and position, under 0.5% extra parameters, that trains, saves and loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embplex
from embplex.errors import OptionError

TEXTS = ["the the the the the the cat sat", "a dog"]


def compose(path: str, attention="selective_temperature", name: str = "hf_encoder") -> embplex.EmbeddingModel:
    return embplex.compose({"name": name, "path": path}, pooling="mean", attention=attention)


@pytest.mark.parametrize("backbone", ["encoder", "llama"])
def test_extra_parameters_stay_under_half_a_percent(minilm_path, decoders, backbone):
    path, name = (minilm_path, "hf_encoder") if backbone == "encoder" else (decoders["llama"], "hf_decoder")
    model = compose(path, name=name)
    extra = sum(p.numel() for p in model.attention.parameters())
    assert extra == 3 * model.backbone.num_layers
    assert extra < 0.005 * sum(p.numel() for p in model.backbone.parameters())


def test_untrained_it_is_the_backbone_own_attention(tiny_bert_path):
    ours, plain = compose(tiny_bert_path), compose(tiny_bert_path, attention=None)
    np.testing.assert_allclose(ours.encode(TEXTS), plain.encode(TEXTS), atol=1e-5)


def test_the_temperature_is_bounded_and_depends_on_query_and_position(tiny_bert_path):
    model = compose(tiny_bert_path)
    policy = model.attention
    query = torch.randn(2, 4, 5, 8)
    positions = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        policy.coefficients.copy_(torch.tensor([[30.0, 30.0, 30.0]] * 3))
        huge = policy.inverse_temperature(query, positions, 1)
        assert huge.max() <= np.exp(policy.max_log_scale) + 1e-5 and huge.min() >= np.exp(-policy.max_log_scale) - 1e-5
        policy.coefficients.copy_(torch.tensor([[0.0, 0.0, 0.5]] * 3))
        same_query = query[:, :, :1].expand(-1, -1, 5, -1)  # one query, five positions
        by_position = policy.inverse_temperature(same_query, positions, 2)
        assert (by_position.diff(dim=-1) > 0).all(), "later positions get a different (here higher) inverse temperature"
        policy.coefficients.copy_(torch.tensor([[0.8, 0.0, 0.0]] * 3))
        by_query = policy.inverse_temperature(query, torch.zeros(2, 5, dtype=torch.long), 3)
        assert by_query.std() > 1e-3, "queries at the same position get their own temperature"


def test_positions_count_real_tokens_on_either_padding_side(decoders):
    for side in ("left", "right"):
        model = embplex.compose(
            {"name": "hf_decoder", "path": decoders["llama"], "padding_side": side}, pooling="mean",
            attention="selective_temperature",
        )
        features = model.backbone.tokenize(TEXTS)
        model.backbone(features, attention=model.attention)
        real = features.attention_mask.bool()
        short = model.attention.positions[1][real[1]]
        assert short.tolist() == list(range(int(real[1].sum())))


def test_gradients_reach_every_layer_temperature_and_a_step_changes_the_vectors(minilm_path):
    # real weights: a tiny random model attends almost uniformly, so temperature barely matters
    model = compose(minilm_path)
    model.train()
    features = model.backbone.tokenize(TEXTS)
    embeddings = model(features)
    (embeddings[0] * embeddings[1]).sum().backward()
    grad = model.attention.coefficients.grad
    assert grad is not None and (grad.abs().sum(dim=1) > 0).all(), f"every layer's parameters get gradient: {grad}"
    before = model.encode(TEXTS)
    with torch.no_grad():
        model.attention.coefficients -= 2.0 * grad / grad.abs().max()  # a step of at most 2 per coefficient
    assert abs(model.encode(TEXTS) - before).max() > 1e-4


def test_saves_and_loads(tiny_bert_path, tmp_path):
    model = compose(tiny_bert_path)
    with torch.no_grad():
        model.attention.coefficients.copy_(torch.randn(3, 3))
    model.save(tmp_path / "model")
    loaded = embplex.load(tmp_path / "model")
    torch.testing.assert_close(loaded.attention.coefficients, model.attention.coefficients)
    np.testing.assert_allclose(loaded.encode(TEXTS), model.encode(TEXTS), atol=1e-6)


def test_a_decoder_stays_causal(decoders):
    model = compose(decoders["gpt2"], name="hf_decoder")
    with torch.no_grad():
        model.attention.coefficients.copy_(torch.randn(2, 3))
        ids = torch.tensor([[5, 40, 41, 42, 43]])
        changed = ids.clone()
        changed[0, -1] = 44
        states = [
            model.backbone(embplex.Features(input_ids=x, attention_mask=torch.ones_like(x)), attention=model.attention).hidden_states
            for x in (ids, changed)
        ]
    assert max((a[0, 0] - b[0, 0]).abs().max().item() for a, b in zip(*states)) < 1e-6


@pytest.mark.parametrize("value", [0.0, -1.0, 11.0])
def test_a_bad_bound_is_refused(value):
    with pytest.raises(OptionError, match="max_log_scale"):
        embplex.load_registry().create("attention", "selective_temperature", max_log_scale=value)
