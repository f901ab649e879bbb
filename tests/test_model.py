"""The composed model: encode, elastic depth, prompts, save/load, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import embplex
from embplex import model as embplex_model
from embplex.errors import (
    InputError,
    MissingPluginError,
    ModelFileError,
    OptionError,
    UnknownComponentError,
)

TEXTS = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Short.",
    "Embeddings map text to vectors so that similar meanings lie close together.",
]


def test_encode_returns_one_normalised_row_per_text_in_input_order(tiny_model):
    batched = tiny_model.encode(TEXTS, batch_size=3)
    one_by_one = np.stack([tiny_model.encode(text) for text in TEXTS])
    assert batched.shape == (len(TEXTS), tiny_model.dim)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    # length-sorted batching must give back the caller's order
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_encode_can_return_torch_and_skip_normalisation(tiny_model):
    raw = tiny_model.encode(TEXTS, normalize=False, convert_to="torch")
    assert isinstance(raw, torch.Tensor)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(len(TEXTS)))


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "no texts"),
        (None, "not NoneType"),
        (["fine", None], "text 1 is NoneType"),
        (["fine", 3], "text 1 is int"),
        (["fine", "   "], "text 1 is empty"),
        ({"a": 1}, "not dict"),
    ],
)
def test_bad_texts_are_refused_with_the_position(tiny_model, bad, message):
    with pytest.raises(InputError, match=message):
        tiny_model.encode(bad)


def test_too_long_texts_are_truncated_with_a_warning_or_refused(tiny_model):
    long_text = "word " * 500
    with pytest.warns(UserWarning, match="truncated"):
        vector = tiny_model.encode([long_text])
    assert vector.shape == (1, tiny_model.dim)
    with pytest.raises(InputError, match="exceed the model's maximum"):
        tiny_model.encode([long_text], truncation="error")


def test_unknown_plugin_name_lists_the_available_ones(registry):
    with pytest.raises(UnknownComponentError, match="Available pooling plugins: .*mean"):
        registry.create("pooling", "meen")
    with pytest.raises(UnknownComponentError, match="Did you mean 'mean'"):
        registry.create("pooling", "meen")


def test_mistyped_option_is_refused_with_a_suggestion(registry, tiny_bert_path):
    with pytest.raises(OptionError, match="Did you mean 'exclude_instruction'"):
        embplex.compose(
            {"name": "hf_encoder", "path": tiny_bert_path},
            pooling={"name": "mean", "exclude_instructions": True},
            registry=registry,
        )


def test_layer_k_equals_a_model_cut_to_k_layers(tiny_bert_path, tiny_model):
    cut = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path, "num_layers": 2}, pooling="mean")
    assert cut.backbone.num_layers == 2
    np.testing.assert_allclose(tiny_model.encode(TEXTS, layer=2), cut.encode(TEXTS), atol=1e-6)
    features = tiny_model.backbone.tokenize(TEXTS)
    with torch.no_grad():
        full = tiny_model.backbone(features)
        short = cut.backbone(features)
    torch.testing.assert_close(short.hidden_states[-1], full.hidden_states[2])
    assert not torch.allclose(full.hidden_states[3], full.hidden_states[2])


def test_embed_several_layers_in_one_pass_matches_separate_passes(tiny_model):
    features = tiny_model.backbone.tokenize(TEXTS)
    with torch.no_grad():
        both = tiny_model.embed(features, layers=[1, None])
        only_first = tiny_model.embed(features, layers=[1])
    torch.testing.assert_close(both[1], only_first[1])
    torch.testing.assert_close(both[None], tiny_model(features))


def test_prompt_tokens_are_flagged_as_instruction(tiny_model):
    features = tiny_model.backbone.tokenize(["a b c", "d"], prompt="query: ")
    prompt_len = len(tiny_model.backbone.tokenizer("query: ", add_special_tokens=False)["input_ids"])
    flagged = features.instruction_mask.sum(dim=1).tolist()
    assert flagged == [prompt_len, prompt_len]
    # [CLS] comes first and is not part of the instruction
    assert features.instruction_mask[:, 0].sum() == 0
    with_prompt = tiny_model.encode(["a b c"], prompt="query: ")
    assert not np.allclose(with_prompt, tiny_model.encode(["query: a b c"]))


def test_save_and_load_round_trip(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    loaded = embplex.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.encode(TEXTS), tiny_model.encode(TEXTS), atol=1e-6)
    config = json.loads((tmp_path / "m" / "embplex.json").read_text())
    assert config["components"]["pooling"]["name"] == "mean"
    assert config["components"]["backbone"]["distribution"] == "embplex"
    assert config["components"]["backbone"]["version"] == embplex.__version__


def test_standard_model_loads_in_sentence_transformers(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    tiny_model.save(tmp_path / "m")
    theirs = SentenceTransformer(str(tmp_path / "m"), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(theirs, tiny_model.encode(TEXTS), atol=1e-5)


def test_save_is_atomic_and_keeps_the_previous_model(tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "m"
    tiny_model.save(target)
    before = sorted(p.name for p in target.iterdir())

    def broken(directory):
        raise OSError("disk full")

    monkeypatch.setattr(tiny_model.pooling, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny_model.save(target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left behind
    embplex.load(target)


def test_missing_model_folder_is_reported(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        embplex.load(tmp_path / "nowhere")


def test_corrupt_config_is_reported(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    (tmp_path / "m" / "embplex.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="corrupt"):
        embplex.load(tmp_path / "m")


def test_corrupt_weights_are_reported(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError):
        embplex.load(tmp_path / "m")


def test_missing_plugin_names_the_distribution_to_install(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    path = tmp_path / "m" / "embplex.json"
    config = json.loads(path.read_text())
    config["components"]["pooling"].update(name="fancy", distribution="embplex-fancy", version="1.2.3")
    path.write_text(json.dumps(config))
    with pytest.raises(MissingPluginError, match=r"pip install 'embplex-fancy==1.2.3'"):
        embplex.load(tmp_path / "m")


class Sharpen(embplex.Attention):
    """A softmax temperature inside attention, to exercise the score hook."""

    def __init__(self, temperature=0.05):
        super().__init__()
        self.temperature = temperature
        self.seen = []

    def scores(self, scores, layer):
        return scores / self.temperature

    def probs(self, probs, layer):
        self.seen.append(probs.detach())
        return probs


def test_attention_score_hooks_reach_every_layer(tiny_model):
    features = tiny_model.backbone.tokenize(TEXTS)
    policy, neutral = Sharpen(0.05), Sharpen(1.0)
    with torch.no_grad():
        outputs = []
        for attention in (neutral, policy):
            tiny_model.attention = attention
            try:
                outputs.append(tiny_model(features).numpy())
            finally:
                tiny_model.attention = None
    baseline, sharpened = outputs
    assert len(policy.seen) == tiny_model.backbone.num_layers
    probs = policy.seen[0]
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    padding = ~features.attention_mask.bool()
    # no probability mass on padding keys, for every real query
    real_queries = features.attention_mask.bool()[:, None, :, None]
    leaked = probs.masked_fill(~real_queries, 0) * padding[:, None, None, :]
    assert leaked.abs().max() == 0
    assert not np.allclose(baseline, sharpened, atol=1e-6)

    def entropy(p):
        return -(p * p.clamp_min(1e-12).log()).sum(-1)[features.attention_mask.bool()[:, None, :].expand_as(p[..., 0])].mean()

    assert entropy(probs) < entropy(neutral.seen[0]) - 0.01  # sharper attention
    np.testing.assert_allclose(baseline, tiny_model(features).detach().numpy(), atol=1e-5)


def test_identity_attention_policy_equals_the_native_path(tiny_model):
    class Identity(embplex.Attention):
        def scores(self, scores, layer):
            return scores

    native = tiny_model.encode(TEXTS)
    for policy in (embplex.Attention(), Identity()):
        tiny_model.attention = policy
        try:
            np.testing.assert_allclose(tiny_model.encode(TEXTS), native, atol=1e-5)
        finally:
            tiny_model.attention = None


def test_missing_backbone_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        embplex.compose({"name": "hf_encoder", "path": str(tmp_path / "absent")})
    shutil.rmtree(tmp_path, ignore_errors=True)


class TokenVectors(embplex.Pooling):
    """Every real token's state: the shape of a multi-vector (late interaction) pooling."""

    def forward(self, features):
        return features.last_hidden_state


def test_multi_vector_pooling_gives_one_set_of_vectors_per_text(tiny_model):
    tiny_model.pooling = TokenVectors()
    sets = tiny_model.encode(TEXTS, batch_size=3)
    lengths = tiny_model.backbone.tokenize(TEXTS).attention_mask.sum(dim=1).tolist()
    assert [s.shape for s in sets] == [(n, 32) for n in lengths]
    np.testing.assert_allclose(np.linalg.norm(sets[1], axis=1), 1.0, atol=1e-5)
    alone = tiny_model.encode(TEXTS[1])
    np.testing.assert_allclose(alone, sets[1], atol=1e-5)


# -- embed splits a batch into groups of similar length ------------------------------------

UNEVEN = ["short one", "a much longer sentence " * 12, "tiny", "a medium length sentence about cats and dogs"] * 4


def _brute_force_cost(lengths: list[int], overhead: int) -> int:
    """The cheapest split of the sorted lengths into contiguous groups, by trying them all."""
    ordered = sorted(lengths, reverse=True)
    best = None
    for mask in range(2 ** (len(ordered) - 1)):
        cuts = [0] + [i + 1 for i in range(len(ordered) - 1) if mask >> i & 1] + [len(ordered)]
        cost = sum((b - a) * ordered[a] + overhead for a, b in zip(cuts, cuts[1:]))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("overhead", [0, 5, 40, 1000])
def test_length_groups_cover_every_row_once_at_the_least_padding_cost(overhead):
    generator = torch.Generator().manual_seed(overhead)
    for _ in range(20):
        lengths = torch.randint(1, 30, (int(torch.randint(1, 11, (1,), generator=generator)),), generator=generator)
        groups = embplex_model.length_groups(lengths, overhead)
        assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
        cost = sum(len(g) * int(lengths[g].max()) + overhead for g in groups)
        assert cost == _brute_force_cost(lengths.tolist(), overhead)


def test_length_groups_keep_an_even_batch_whole_and_split_an_outlier_off():
    assert len(embplex_model.length_groups(torch.full((64,), 20), 256)) == 1
    outlier = torch.tensor([200] + [10] * 63)
    groups = embplex_model.length_groups(outlier, 256)
    assert [g.tolist() for g in groups] == [[0], list(range(1, 64))]


def test_embed_of_an_uneven_batch_equals_one_padded_pass_in_values_and_gradients(tiny_model):
    features = tiny_model.backbone.tokenize(UNEVEN)
    lengths = features.attention_mask.sum(dim=1)
    assert len(embplex_model.length_groups(lengths, embplex_model._group_overhead_tokens(torch.device("cpu")))) > 1
    tiny_model.eval()  # dropout off, so both computations are deterministic

    def embeddings_and_gradients(embed):
        tiny_model.zero_grad()
        out = embed(features, (2, None))
        ((out[None] * torch.linspace(-1, 1, out[None].shape[1])).sum() + (out[2] ** 2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.items()}, grads

    split, split_grads = embeddings_and_gradients(tiny_model.embed)
    whole, whole_grads = embeddings_and_gradients(tiny_model._embed_rows)
    for layer in (2, None):
        torch.testing.assert_close(split[layer], whole[layer], atol=1e-6, rtol=1e-5)
    assert split_grads.keys() == whole_grads.keys() and split_grads
    for name in whole_grads:
        torch.testing.assert_close(split_grads[name], whole_grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_embed_split_keeps_per_token_vectors_at_their_positions(decoders, padding_side):
    model = embplex.compose(
        {"name": "hf_decoder", "path": decoders["llama"], "padding_side": padding_side}, pooling="last_token"
    )
    model.pooling = TokenVectors()
    model.eval()
    features = model.backbone.tokenize(UNEVEN)
    assert features.padding_side == padding_side
    assert len(embplex_model.length_groups(features.attention_mask.sum(dim=1), 256)) > 1
    with torch.no_grad():
        split = model.embed(features)[None]
        whole = model._embed_rows(features, (None,))[None]
    assert split.shape == whole.shape
    real = features.attention_mask.bool()
    torch.testing.assert_close(split[real], whole[real], atol=1e-5, rtol=1e-5)


# -- compose takes components already built -------------------------------------------------


@pytest.mark.parametrize("kind", embplex_model.MODEL_KINDS)
def test_compose_takes_a_built_component_of_every_kind(tiny_bert_path, registry, kind, tmp_path):
    by_name = {
        "backbone": {"name": "hf_encoder", "path": tiny_bert_path},
        "attention": "causal",
        "pooling": {"name": "max"},
    }
    spec = embplex_model.component_spec(by_name[kind])
    built = {**by_name, kind: registry.create(kind, spec["name"], **spec["options"])}
    model = embplex.compose(**built, registry=registry)
    assert getattr(model, kind) is built[kind]
    assert model.specs[kind]["name"] == spec["name"]
    np.testing.assert_allclose(model.encode(TEXTS), embplex.compose(**by_name, registry=registry).encode(TEXTS), atol=1e-6)
    # embplex does not know the options it was built with: saving is refused, naming the part
    with pytest.raises(InputError, match=rf"{kind} was passed to compose\(\) already built.*'name': '{spec['name']}'"):
        model.save(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_compose_takes_a_policy_no_plugin_registered(tiny_bert_path):
    class FirstTokenSink(embplex.Attention):
        def scores(self, scores, layer):
            return scores + torch.nn.functional.pad(torch.full((1,), 5.0), (0, scores.shape[-1] - 1))

    backbone = {"name": "hf_encoder", "path": tiny_bert_path}
    model = embplex.compose(backbone, attention=FirstTokenSink())
    assert model.specs["attention"]["name"] is None
    assert abs(model.encode(TEXTS) - embplex.compose(backbone).encode(TEXTS)).max() > 1e-3


def test_compose_refuses_a_component_of_another_kind(tiny_bert_path, registry):
    with pytest.raises(InputError, match="attention must be a plugin name, a config .* or a built Attention, not MeanPooling"):
        embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, attention=registry.create("pooling", "mean"))


def test_training_a_model_with_a_built_part_is_refused_before_any_step(tiny_bert_path, registry, tmp_path):
    from embplex.components import Example
    from embplex.training import TrainSettings, train

    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling=registry.create("pooling", "mean"))
    with pytest.raises(InputError, match="pooling was passed to compose"):
        train(
            model,
            [Example("a cat", "a dog")] * 4,
            registry.create("loss", "infonce"),
            registry.create("sampler", "random"),
            TrainSettings(batch_size=2, max_steps=1),
            output_dir=tmp_path / "run",
        )
    assert not (tmp_path / "run").exists()
