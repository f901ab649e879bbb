"""Attention policies on every decoder family: `causal`, `bidirectional`, and the contract any policy gets."""

from __future__ import annotations

import inspect
from importlib.resources import files

import numpy as np
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


# -- the policy contract: composing with the backbone's own mask ---------------------------
# Policies a third-party package could write. Each one below changes nothing on a causal
# decoder, each in its own way: they must leave its outputs as they are.


class RewritesNothing(embplex.Attention):
    """Overrides ``scores`` (so the explicit path runs) and returns them as they are."""

    def scores(self, scores, layer):
        return scores + 0.0


class AllowsEverything(embplex.Attention):
    """A ``mask`` built from scratch that lets every token see every other one."""

    def mask(self, padding_mask):
        width = padding_mask.shape[-1]
        return torch.ones(padding_mask.shape[0], 1, width, width, dtype=torch.bool)


class BoostsTheFuture(embplex.Attention):
    """Raises the scores of later tokens, which the backbone's causal mask hides."""

    def scores(self, scores, layer):
        width = scores.shape[-1]
        return scores + 1e4 * torch.ones(width, width).triu(diagonal=1)


class MovesMassToTheFuture(embplex.Attention):
    """Puts probability on later tokens after the softmax."""

    def probs(self, probs, layer):
        return probs + torch.ones_like(probs).triu(diagonal=1)


def favour_the_first_key(scores):
    # Tiny random models attend almost uniformly, so scaling scores changes little; a
    # bias towards one key (an attention sink) moves every output clearly.
    return scores + torch.nn.functional.pad(torch.full((1,), 5.0), (0, scores.shape[-1] - 1))


class FavoursTheFirstToken(embplex.Attention):
    """A score-rewriting policy that changes the outputs, on ``layers`` (all when None)."""

    def __init__(self, layers: list[int] | None = None) -> None:
        super().__init__()
        self.layers = layers

    def scores(self, scores, layer):
        return favour_the_first_key(scores)


class FavoursTheFirstTokenByArgument(embplex.Attention):
    """Restricts itself by the ``layer`` argument, not through ``layers``; records it."""

    def __init__(self, only: list[int]) -> None:
        super().__init__()
        self.only, self.seen = only, []

    def scores(self, scores, layer):
        self.seen.append(layer)
        return favour_the_first_key(scores) if layer in self.only else scores


# padding on both sides for one policy, on the left (the harder case) for the others
UNCHANGING = [(RewritesNothing, "right")] + [
    (policy, "left") for policy in (RewritesNothing, AllowsEverything, BoostsTheFuture, MovesMassToTheFuture)
]


def compose_with(path: str, policy, **backbone_options) -> embplex.EmbeddingModel:
    return embplex.compose({"name": "hf_decoder", "path": path, **backbone_options}, pooling="last_token", attention=policy)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("policy", "side"), UNCHANGING, ids=[f"{p.__name__}-{side}" for p, side in UNCHANGING])
def test_a_policy_that_changes_nothing_leaves_a_decoder_as_it_is(decoders, family, side, policy):
    plain = compose(decoders[family], None, padding_side=side)
    with_policy = compose_with(decoders[family], policy(), padding_side=side)
    features = plain.backbone.tokenize(TEXTS)
    real = features.attention_mask.bool()
    for ours, theirs in zip(run(with_policy, features), run(plain, features)):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", [RewritesNothing, AllowsEverything], ids=lambda cls: cls.__name__)
def test_a_policy_that_changes_nothing_leaves_an_encoder_as_it_is(tiny_bert_path, policy):
    texts = ["a short one", "a somewhat longer sentence about cats and dogs"]
    plain, ours = (
        embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, attention=attention).encode(texts)
        for attention in (None, policy())
    )
    torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(plain), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_score_rewriting_policy_keeps_a_decoder_causal(decoders, family):
    ids = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])
    changed = ids.clone()
    changed[0, -1] = 47
    model = compose_with(decoders[family], FavoursTheFirstToken())
    plain = compose(decoders[family], None)
    inputs = [Features(input_ids=batch, attention_mask=torch.ones_like(batch)) for batch in (ids, changed)]
    before, after = (run(model, features) for features in inputs)
    for layer in range(1, len(before)):
        torch.testing.assert_close(before[layer][0, :-1], after[layer][0, :-1], atol=1e-6, rtol=0)
    assert (before[-1][0, -1] - after[-1][0, -1]).abs().max() > 1e-3  # the change is seen
    assert (before[-1] - run(plain, inputs[0])[-1]).abs().max() > 1e-3  # the policy acts


# -- one layer numbering: 1..depth everywhere -----------------------------------------------


def test_a_policy_sees_layers_numbered_from_one(tiny_bert_path):
    policy = FavoursTheFirstTokenByArgument(only=[])
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, attention=policy)
    model.encode(["a cat sat"])
    assert policy.seen == [1, 2, 3] == list(range(1, model.backbone.num_layers + 1))


@pytest.mark.parametrize("restricted_by", ["layers option", "layer argument"])
@pytest.mark.parametrize("backbone", ["encoder", "llama", "gpt2"])
def test_a_policy_on_layer_k_changes_layer_k_and_not_before(tiny_bert_path, decoders, backbone, restricted_by):
    texts = ["the quick brown fox jumps over the lazy dog", "a cat sat"]
    if backbone == "encoder":
        spec, pooling = {"name": "hf_encoder", "path": tiny_bert_path}, "mean"
    else:
        spec, pooling = {"name": "hf_decoder", "path": decoders[backbone]}, "last_token"
    plain = embplex.compose(spec, pooling=pooling)
    depth = plain.backbone.num_layers
    for k in range(2, depth + 1):
        policy = FavoursTheFirstToken(layers=[k]) if restricted_by == "layers option" else FavoursTheFirstTokenByArgument([k])
        model = embplex.compose(spec, pooling=pooling, attention=policy)
        np.testing.assert_allclose(model.encode(texts, layer=k - 1), plain.encode(texts, layer=k - 1), atol=1e-5)
        assert abs(model.encode(texts, layer=k) - plain.encode(texts, layer=k)).max() > 1e-3
        # the whole depth: layers after k run plain attention but read what layer k changed
        assert abs(model.encode(texts) - plain.encode(texts)).max() > 1e-3


# -- layers the backbone does not have ------------------------------------------------------


@pytest.mark.parametrize("layers", [[7], [0], [2, 4], []])
def test_a_policy_naming_a_missing_layer_is_refused_when_composed(tiny_bert_path, layers):
    from embplex.errors import OptionError

    with pytest.raises(OptionError, match=r"layers=\[") as error:
        embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, attention=FavoursTheFirstToken(layers=layers))
    assert "3" in str(error.value)  # the depth


def test_encode_refuses_a_layer_the_model_lacks_before_running_any(tiny_model, monkeypatch):
    from embplex.errors import EmbplexError

    ran = []
    monkeypatch.setattr(tiny_model.backbone, "forward", lambda *a, **k: ran.append(1))
    for layer in (0, 4, -1, 7):
        with pytest.raises(EmbplexError, match=rf"layer={layer} .*3 layers"):
            tiny_model.encode(["a cat sat"], layer=layer)
    assert not ran


def test_embed_roles_refuses_a_layer_the_model_lacks_before_running_any(tiny_model, monkeypatch):
    from embplex.components import Example
    from embplex.errors import EmbplexError
    from embplex.training import make_training_batch

    batch = make_training_batch(tiny_model.backbone, [Example("a cat", "a dog")])
    ran = []
    monkeypatch.setattr(tiny_model.backbone, "forward", lambda *a, **k: ran.append(1))
    for layers in ([2, 7], [0], [None, 4]):
        with pytest.raises(EmbplexError, match=r"layers=\d+ .*3 layers"):
            tiny_model.embed_roles(batch, layers=layers)
    assert not ran
