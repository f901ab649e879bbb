"""The ``causal`` and ``bidirectional`` attention policies on every decoder family."""

from __future__ import annotations

import inspect
from importlib.resources import files

import pytest
import torch

import embplex
from embplex.components import Features
from tiny_decoders import FAMILIES

TEXTS = [
    "the quick brown fox jumps over the lazy dog in the old city",
    "a cat sat",
    "what is the capital of france ? paris",
]
POLICIES = ["causal", "bidirectional"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def compose(path: str, attention: str | None, **backbone_options) -> embplex.EmbeddingModel:
    return embplex.compose(
        {"name": "hf_decoder", "path": path, **backbone_options}, pooling="last_token", attention=attention
    )


def run(model: embplex.EmbeddingModel, features: Features) -> tuple[torch.Tensor, ...]:
    return model.backbone(features, attention=model.attention).hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_only_bidirectional_lets_the_first_token_see_the_last(decoders, family):
    """Unpadded batch (mask all ones): the two inputs differ only in their last token."""
    ids = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])
    changed = ids.clone()
    changed[0, -1] = 47
    first_token_moved = {}
    for policy in [None, *POLICIES]:
        model = compose(decoders[family], policy)
        states = [
            run(model, Features(input_ids=batch, attention_mask=torch.ones_like(batch)))
            for batch in (ids, changed)
        ]
        assert (states[0][-1][0, -1] - states[1][-1][0, -1]).abs().max() > 1e-3  # the change is seen
        first_token_moved[policy] = max(
            (a[0, 0] - b[0, 0]).abs().max().item() for a, b in zip(states[0][1:], states[1][1:])
        )
    assert first_token_moved["bidirectional"] > 1e-3
    assert first_token_moved["causal"] < 1e-6
    assert first_token_moved[None] < 1e-6  # the model's own attention is causal


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_text_gets_the_same_states_alone_and_in_a_padded_batch(decoders, family, side, policy):
    model = compose(decoders[family], policy, padding_side=side)
    batch = model.backbone.tokenize(TEXTS)
    assert (batch.attention_mask == 0).any()
    batched = run(model, batch)
    for row, text in enumerate(TEXTS):
        alone = run(model, model.backbone.tokenize([text]))
        real = batch.attention_mask[row].bool()
        for layer in range(len(batched)):
            torch.testing.assert_close(batched[layer][row][real], alone[layer][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_reproduces_the_model_own_attention(decoders, family, side):
    plain = compose(decoders[family], None, padding_side=side)
    causal = compose(decoders[family], "causal", padding_side=side)
    features = plain.backbone.tokenize(TEXTS)
    real = features.attention_mask.bool()
    for ours, theirs in zip(run(causal, features), run(plain, features)):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_use_the_fused_kernel_and_stay_finite_under_left_padding(decoders, policy):
    model = compose(decoders["gpt2"], policy, padding_side="left")
    assert not model.attention.rewrites_scores
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        states = run(model, model.backbone.tokenize(TEXTS))
    assert len(calls) == model.backbone.num_layers
    assert all(mask is not None and mask.dtype == torch.bool for mask in calls)
    assert all(torch.isfinite(layer).all() for layer in states)


def test_mask_shapes_who_sees_whom():
    padding = torch.tensor([[0, 1, 1]])
    registry = embplex.load_registry()
    causal = registry.create("attention", "causal").mask(padding)[0, 0]
    bidirectional = registry.create("attention", "bidirectional").mask(padding)[0, 0]
    assert bidirectional.tolist() == [[True, True, True], [False, True, True], [False, True, True]]
    assert causal.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_on_an_encoder_bidirectional_is_its_own_attention_and_causal_is_not(minilm_path):
    texts = ["a short one", "a somewhat longer sentence about cats and dogs"]
    plain, bidirectional, causal = (
        embplex.compose({"name": "hf_encoder", "path": minilm_path}, attention=policy).encode(texts)
        for policy in (None, "bidirectional", "causal")
    )
    torch.testing.assert_close(torch.from_numpy(bidirectional), torch.from_numpy(plain), atol=1e-5, rtol=1e-5)
    assert abs(causal - plain).max() > 1e-2


@pytest.mark.parametrize("name", POLICIES)
def test_config_file_has_the_name_and_no_options(name):
    from omegaconf import OmegaConf

    config = OmegaConf.load(str(files("embplex.conf") / "attention" / f"{name}.yaml"))
    factory = embplex.load_registry().get("attention", name).factory
    assert list(config) == ["name"] and config.name == name
    assert not inspect.signature(factory).parameters


def test_options_are_refused_with_a_clear_message():
    from embplex.errors import OptionError

    with pytest.raises(OptionError, match="has no option 'temperature'"):
        embplex.load_registry().create("attention", "bidirectional", temperature=0.5)
