"""The trainable poolings of issue 10: latent_attention, multi_layer, attentive_stats,
dupmae, lexsembridge. Each runs the pooling contract, proves what defines it (the
"proof" column of the technique catalog) and saves and loads its weights in a model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import embplex
from embplex.errors import DimensionError, OptionError
from embplex.testing import PoolingContract, tiny_features

HIDDEN, DEPTH, VOCAB = 8, 3, 40
TRAINABLE = ["latent_attention", "multi_layer", "attentive_stats", "dupmae", "lexsembridge"]


def fake_backbone(hidden: int = HIDDEN, depth: int = DEPTH) -> SimpleNamespace:
    """What ``Pooling.bind`` reads of a backbone: its width, depth and (for dupmae) a
    transformers-like model with word embeddings."""
    torch.manual_seed(0)
    embeddings = nn.Embedding(VOCAB, hidden)
    model = SimpleNamespace(get_input_embeddings=lambda: embeddings, config=SimpleNamespace(model_type="fake"))
    return SimpleNamespace(hidden_size=hidden, num_layers=depth, model=model)


def bound(name: str, **options) -> embplex.Pooling:
    pooling = embplex.load_registry().create("pooling", name, **options)
    pooling.bind(fake_backbone())
    return pooling


class TestLatentAttentionContract(PoolingContract):
    @pytest.fixture
    def pooling(self):
        return bound("latent_attention", latents=4, heads=2, mlp_ratio=2)


class TestMultiLayerContract(PoolingContract):
    reads_one_layer = False

    @pytest.fixture
    def pooling(self):
        return bound("multi_layer", heads=2)


class TestAttentiveStatsContract(PoolingContract):
    @pytest.fixture
    def pooling(self):
        return bound("attentive_stats", bottleneck=4)


class TestDupMAEContract(PoolingContract):
    @pytest.fixture
    def pooling(self):
        return bound("dupmae", lexical_dim=5, head="embeddings")


@pytest.mark.parametrize("mode", ["statistical", "learned", "contextual"])
class TestLexSemBridgeContract(PoolingContract):
    @pytest.fixture
    def pooling(self, mode):
        pooling = bound("lexsembridge", mode=mode, buckets=64)
        if mode == "learned":  # away from the all-equal start, so token weights differ
            torch.nn.init.normal_(pooling.token_weights)
        return pooling


# -- latent_attention ---------------------------------------------------------------------


@pytest.mark.parametrize(("hidden", "latents", "heads", "ratio"), [(8, 4, 2, 2), (32, 512, 8, 4), (48, 16, 3, 1)])
def test_latent_attention_has_the_documented_parameter_count(hidden, latents, heads, ratio):
    pooling = embplex.load_registry().create("pooling", "latent_attention", latents=latents, heads=heads, mlp_ratio=ratio)
    pooling.bind(fake_backbone(hidden))
    d, r, m = hidden, latents, ratio
    assert sum(p.numel() for p in pooling.parameters()) == r * d + (4 + 2 * m) * d * d + (m + 8) * d
    assert pooling.parameter_count(hidden, latents, ratio) == r * d + (4 + 2 * m) * d * d + (m + 8) * d
    assert pooling.latents.shape == (latents, hidden)


def test_gradients_reach_the_latents():
    pooling = bound("latent_attention", latents=4, heads=2)
    pooling(tiny_features(hidden=HIDDEN)).pow(2).sum().backward()
    assert pooling.latents.grad is not None and pooling.latents.grad.abs().sum() > 0


def test_latent_attention_heads_must_divide_the_width():
    pooling = embplex.load_registry().create("pooling", "latent_attention", heads=3)
    with pytest.raises(OptionError, match="heads=3"):
        pooling.bind(fake_backbone(8))


# -- multi_layer --------------------------------------------------------------------------


def test_gradients_reach_every_layer():
    pooling = bound("multi_layer", heads=2)
    features = tiny_features(hidden=HIDDEN, layers=DEPTH, padding_value=0.0)
    leaves = [state.clone().requires_grad_(True) for state in features.hidden_states]
    features.hidden_states = tuple(leaves)
    pooling(features).pow(2).sum().backward()
    assert leaves[0].grad is None  # the embedding output is not a layer
    for layer, leaf in enumerate(leaves[1:], 1):
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, f"no gradient reaches layer {layer}"
    assert pooling.layer_logits.grad.abs().sum() > 0


def test_multi_layer_at_layer_k_reads_layers_1_to_k():
    pooling = bound("multi_layer", heads=2)
    features = tiny_features(hidden=HIDDEN, layers=DEPTH)
    changed = tiny_features(hidden=HIDDEN, layers=DEPTH)
    changed.hidden_states = (*changed.hidden_states[:3], changed.hidden_states[3] + 1.0)
    with torch.no_grad():
        torch.testing.assert_close(pooling(features.at_layer(2)), pooling(changed.at_layer(2)))
        assert not torch.allclose(pooling(features), pooling(changed))


# -- attentive_stats ----------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_attentive_stats_weights_sum_to_one_per_channel(side):
    pooling = bound("attentive_stats", bottleneck=4)
    features = tiny_features(lengths=(5, 2, 4), hidden=HIDDEN, padding_side=side, prompt_tokens=1)
    with torch.no_grad():
        weights = pooling.channel_weights(features)
        out = pooling(features)
    assert weights.shape == (3, 5, HIDDEN)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, HIDDEN))
    assert (weights[~features.pooling_mask(True)] == 0).all()
    assert weights.std(dim=-1).max() > 0, "channels get their own weights"
    assert out.shape == (3, 2 * HIDDEN) and pooling.output_dim(HIDDEN) == 2 * HIDDEN
    # the second half is a standard deviation under those weights
    mask = features.pooling_mask(True)[..., None]
    states = features.last_hidden_state.masked_fill(~mask, 0.0)
    mean = (weights * states).sum(dim=1)
    std = ((weights * (states - mean[:, None]).pow(2)).sum(dim=1)).clamp(min=1e-6).sqrt()
    torch.testing.assert_close(out, torch.cat([mean, std], dim=-1), atol=1e-5, rtol=1e-4)


# -- dupmae -------------------------------------------------------------------------------


def test_dupmae_output_is_cls_then_the_reduced_lexical_vector():
    pooling = bound("dupmae", lexical_dim=5, head="embeddings")
    features = tiny_features(hidden=HIDDEN)
    with torch.no_grad():
        out = pooling(features)
        vocabulary = pooling.vocabulary_vector(features)
    assert out.shape == (3, HIDDEN + 5) and pooling.output_dim(HIDDEN) == HIDDEN + 5
    torch.testing.assert_close(out[:, :HIDDEN], features.last_hidden_state[:, 0])  # [CLS]: first token
    assert vocabulary.shape == (3, VOCAB) and (vocabulary >= 0).all()
    torch.testing.assert_close(out[:, HIDDEN:], vocabulary.view(3, 5, VOCAB // 5).amax(dim=-1))


def test_dupmae_lexical_half_puts_its_mass_on_the_input_tokens(minilm_path):
    model = embplex.compose({"name": "hf_encoder", "path": minilm_path}, pooling={"name": "dupmae", "lexical_dim": 64})
    texts = ["the mitochondria produce energy for the cell", "a vaccine against measles was tested in children"]
    features = model.backbone.tokenize(texts)
    with torch.no_grad():
        vocabulary = model.pooling.vocabulary_vector(model.backbone(features))
    for row in range(len(texts)):
        ids = set(features.input_ids[row][features.attention_mask[row].bool()].tolist()[1:-1])
        own = torch.zeros(vocabulary.shape[1], dtype=torch.bool)
        own[sorted(ids)] = True
        ratio = vocabulary[row, own].mean() / vocabulary[row, ~own].mean()
        top = set(vocabulary[row].topk(len(ids)).indices.tolist())
        assert ratio > 2, f"text {row}: its own tokens weigh only {ratio:.1f}x the other words"
        # by chance about 0.003 of the top words would be the text's own
        assert len(top & ids) >= len(ids) // 3, f"text {row}: its top words are {top}, its tokens {ids}"


def test_dupmae_uses_the_folder_mlm_head_when_there_is_one(tmp_path, minilm_path):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path / "mlm")
    model = embplex.compose({"name": "hf_encoder", "path": str(tmp_path / "mlm")}, pooling={"name": "dupmae", "head": "mlm", "lexical_dim": 16})
    saved = BertForMaskedLM.from_pretrained(tmp_path / "mlm").cls.predictions.transform.dense.weight
    torch.testing.assert_close(model.pooling.mlm_head.predictions.transform.dense.weight, saved)
    model.save(tmp_path / "saved")
    again = embplex.load(tmp_path / "saved")
    np.testing.assert_allclose(again.encode(["a cat sat"]), model.encode(["a cat sat"]), atol=1e-6)


def test_dupmae_head_mlm_is_refused_without_one(tiny_bert_path):
    with pytest.raises(OptionError, match="no masked-language-model head"):
        embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling={"name": "dupmae", "head": "mlm"})


# -- lexsembridge -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["statistical", "learned", "contextual"])
def test_lexsembridge_keeps_the_direction_and_amplifies_the_token_dimensions(mode):
    pooling = bound("lexsembridge", mode=mode, strength=0.5, buckets=64)
    features = tiny_features(lengths=(5, 2, 4), hidden=HIDDEN)
    with torch.no_grad():
        out, dense = pooling(features), pooling.dense(features)
    ratio = out / dense
    assert torch.nn.functional.cosine_similarity(out, dense).min() > 0.9
    for row in range(3):
        ids = features.input_ids[row][features.attention_mask[row].bool()]
        chosen = torch.zeros(HIDDEN, dtype=torch.bool)
        chosen[ids % HIDDEN] = True
        assert (ratio[row, chosen] > 1.0 + 1e-4).all(), f"{mode}: a dimension of the text's tokens is not amplified"
        torch.testing.assert_close(ratio[row, ~chosen], torch.ones(int((~chosen).sum())))


def test_lexsembridge_statistical_weighs_tokens_by_their_frequency():
    pooling = bound("lexsembridge", mode="statistical")
    features = tiny_features(lengths=(4,), hidden=HIDDEN)
    features.input_ids = torch.tensor([[3, 3, 3, 5]])  # token 3 three times, token 5 once
    enhancement = pooling.enhancement(features)[0]
    assert enhancement[3] == 1.0 and enhancement[5] == pytest.approx(1 / 3)


@pytest.mark.parametrize(("mode", "parameter"), [("learned", "token_weights"), ("contextual", "token_scorer.weight")])
def test_lexsembridge_learned_and_contextual_weights_train(mode, parameter):
    pooling = bound("lexsembridge", mode=mode, buckets=64)
    pooling(tiny_features(hidden=HIDDEN)).pow(2).sum().backward()
    assert dict(pooling.named_parameters())[parameter].grad.abs().sum() > 0


@pytest.mark.parametrize("options", [{"mode": "tfidf"}, {"strength": -1.0}, {"base": "max"}])
def test_lexsembridge_bad_options_are_refused(options):
    with pytest.raises(OptionError):
        embplex.load_registry().create("pooling", "lexsembridge", **options)


# -- every trainable pooling: in a model, saved and loaded ----------------------------------


SMALL = {
    "latent_attention": {"latents": 8, "heads": 4},
    "multi_layer": {"heads": 2},
    "attentive_stats": {"bottleneck": 8},
    "dupmae": {"lexical_dim": 16},
    "lexsembridge": {"mode": "learned", "buckets": 512},
}


@pytest.mark.parametrize("name", TRAINABLE)
def test_a_model_with_the_pooling_trains_saves_and_loads(tiny_bert_path, tmp_path, name):
    texts = ["a cat sat on the mat", "what is the capital of france ?"]
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling={"name": name, **SMALL[name]})
    assert model.dim == model.pooling.output_dim(32)
    before = {key: value.clone() for key, value in model.pooling.state_dict().items()}
    optimizer = torch.optim.Adam(model.pooling.parameters(), lr=0.05)
    model.train()
    for _ in range(2):  # pull the two texts together
        optimizer.zero_grad()
        embeddings = model(model.backbone.tokenize(texts))
        (-(embeddings[0] * embeddings[1]).sum()).backward()
        optimizer.step()
    model.eval()
    moved = [key for key, value in model.pooling.state_dict().items() if not torch.equal(value, before[key])]
    assert moved, "training changes the pooling's weights"
    model.save(tmp_path / "model")
    loaded = embplex.load(tmp_path / "model")
    for key, value in model.pooling.state_dict().items():
        torch.testing.assert_close(loaded.pooling.state_dict()[key], value)
    np.testing.assert_allclose(loaded.encode(texts), model.encode(texts), atol=1e-6)
    if name == "multi_layer":  # the learned layer shares, read back from the saved model
        torch.testing.assert_close(loaded.pooling.layer_weights(), model.pooling.layer_weights())
        assert loaded.pooling.layer_weights().shape == (3,)
        assert (loaded.pooling.layer_weights() - 1 / 3).abs().max() > 1e-3


def test_an_index_of_another_width_is_refused_for_a_wider_pooling(tiny_bert_path, tmp_path):
    from embplex.app import load_index

    registry = embplex.load_registry()
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling="attentive_stats", registry=registry)
    index = registry.create("index", "exact", dim=32)
    index.add(["a"], np.ones((1, 32), dtype=np.float32))
    index.save(tmp_path / "index")
    with pytest.raises(DimensionError):
        load_index(tmp_path / "index", registry, dim=model.dim)
