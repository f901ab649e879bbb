"""Attention policies for long texts (`temp_scale`, `lambda_mask`, `sink_calibration`) and
attention lists (`attention=[a, b]`): each proves what defines it on real probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import embplex
from embplex.components import Attention, AttentionChain, Features
from embplex.config import ConfigError, compose_config
from embplex.errors import OptionError, UnknownComponentError
from embplex.plugins.attention.lambda_mask import LambdaMask
from tiny_decoders import WORDS

ESSAYS = "long/paul-graham-essays"


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


class Recorder(Attention):
    """Keeps each layer's probabilities (and values) as the policies before it left them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def probs_with_values(self, probs, value, layer):
        self.seen.append((layer, probs.clone(), value.clone()))
        return probs


def compose(path: str, attention, backbone: str = "hf_encoder", pooling: str = "mean") -> embplex.EmbeddingModel:
    return embplex.compose({"name": backbone, "path": path}, pooling=pooling, attention=attention)


def tokens(model: embplex.EmbeddingModel, texts: list[str]) -> Features:
    return model.backbone.tokenize(texts)


def essay_excerpts(data_dir, count: int, words: int) -> list[str]:
    files = [f for f in sorted((data_dir / ESSAYS).glob("*.txt")) if f.name != "LICENSE.txt"][:count]
    return [" ".join(f.read_text().split()[100 : 100 + words]) for f in files]


def entropy(probs: torch.Tensor, real: torch.Tensor) -> float:
    """Mean entropy of the real queries' attention rows."""
    rows = -(probs.float().clamp_min(1e-30).log() * probs.float()).sum(dim=-1)  # [b, h, q]
    weights = real[:, None, :].float().expand_as(rows)
    return float((rows * weights).sum() / weights.sum())


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    sims = vectors @ vectors.T
    count = len(vectors)
    return float((sims.sum() - np.trace(sims)) / (count * (count - 1)))


# -- temp_scale ---------------------------------------------------------------------------


def test_temp_scale_lowers_attention_entropy(minilm_path, data_dir):
    texts = essay_excerpts(data_dir, 1, 200)
    plain, sharp = Recorder(), Recorder()
    plain_model = compose(minilm_path, [plain])
    sharp_model = compose(minilm_path, [{"name": "temp_scale", "temperature": 0.7}, sharp])
    features = tokens(plain_model, texts)
    plain_model.backbone(features, attention=plain_model.attention)
    sharp_model.backbone(features, attention=sharp_model.attention)
    real = features.attention_mask.bool()
    for (layer, before, _), (_, after, _) in zip(plain.seen, sharp.seen):
        assert entropy(after, real) < entropy(before, real) - 0.05, f"layer {layer}"


def test_temp_scale_spreads_the_embeddings_of_long_texts(minilm_path, data_dir):
    """Length collapse: ~450-token excerpts of six unrelated essays have a mean pairwise
    cosine of 0.2155; temperature 0.9 spreads them (0.2110; measured 2026-12-02, see the
    docs page, where 0.8 does not)."""
    texts = essay_excerpts(data_dir, 6, 350)
    backbone = {"name": "hf_encoder", "path": minilm_path, "max_length": 512}
    plain = embplex.compose(backbone, pooling="mean").encode(texts, truncation="error")
    sharp = embplex.compose(backbone, pooling="mean", attention={"name": "temp_scale", "temperature": 0.9})
    assert mean_pairwise_cosine(sharp.encode(texts, truncation="error")) < mean_pairwise_cosine(plain)


def test_temp_scale_min_length_leaves_short_texts_alone(tiny_bert_path):
    short, long = "the cat sat", " ".join(WORDS[:40])
    plain = compose(tiny_bert_path, None).encode([short, long])
    gated = compose(tiny_bert_path, {"name": "temp_scale", "temperature": 0.05, "min_length": 10}).encode([short, long])
    every = compose(tiny_bert_path, {"name": "temp_scale", "temperature": 0.05}).encode([short, long])
    np.testing.assert_allclose(gated[0], plain[0], atol=1e-7)  # 3 real tokens: left alone
    np.testing.assert_allclose(gated[1], every[1], atol=1e-7)  # 40: rescaled
    assert np.abs(every - plain).max(axis=1).min() > 1e-4  # (the random tiny model reacts little)


class DividesTheScores(Attention):
    """temp_scale written as a scores rewrite: the explicit computation it replaced."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def scores(self, scores, layer):
        return scores / self.temperature


def test_temp_scale_keeps_the_fused_kernel_and_equals_dividing_the_scores(tiny_bert_path):
    """score_scale is folded into the queries: same embeddings as dividing the scores,
    alone (fused kernel) and in a list that computes attention explicitly."""
    texts = ["the cat sat", " ".join(WORDS[:40]), " ".join(WORDS[5:25])]  # padded rows too
    sharp = compose(tiny_bert_path, {"name": "temp_scale", "temperature": 0.05})
    assert not sharp.attention.rewrites_scores and sharp.attention.rewrites_attention
    reference = compose(tiny_bert_path, [DividesTheScores(0.05)]).encode(texts)
    np.testing.assert_allclose(sharp.encode(texts), reference, atol=1e-6)
    assert np.abs(reference - compose(tiny_bert_path, None).encode(texts)).max() > 1e-4
    listed = compose(tiny_bert_path, [{"name": "temp_scale", "temperature": 0.05}, Recorder()]).encode(texts)
    np.testing.assert_allclose(listed, reference, atol=1e-6)
    # beside a member that rewrites the scores, the factor applies in list order
    interleaved = compose(tiny_bert_path, [{"name": "temp_scale", "temperature": 0.05}, DividesTheScores(1.0)])
    np.testing.assert_allclose(interleaved.encode(texts), reference, atol=1e-6)


@pytest.mark.parametrize("temperature", [0, -0.5])
def test_temp_scale_refuses_a_non_positive_temperature(tiny_bert_path, temperature):
    with pytest.raises(OptionError, match=f"temperature={temperature} must be positive"):
        compose(tiny_bert_path, {"name": "temp_scale", "temperature": temperature})


# -- lambda_mask --------------------------------------------------------------------------


def test_lambda_mask_probabilities_are_exactly_zero_outside_the_lambda(tiny_bert_path):
    recorder = Recorder()
    model = compose(tiny_bert_path, [{"name": "lambda_mask", "n_global": 2, "window": 4}, recorder])
    features = tokens(model, [" ".join(WORDS[:30]), "a cat sat on the mat"])
    model.backbone(features, attention=model.attention)
    real = features.attention_mask.bool()
    width = real.shape[1]
    index = torch.arange(width)
    inside = ((index[:, None] - index[None, :]).abs() < 4) | (index[None, :] < 2)  # right padding
    inside = inside[None, None] & real[:, None, None, :]
    queries = real[:, None, :, None]  # the rows of real tokens (a padding row sees itself only)
    for _, probs, _ in recorder.seen:
        assert torch.all(probs[(~inside & queries).expand_as(probs)] == 0)
        assert torch.all(probs[(inside & queries).expand_as(probs)] > 0)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_lambda_mask_changes_nothing_below_the_window(tiny_bert_path):
    texts = ["the quick brown fox jumps over the lazy dog", "a cat sat"]
    plain = compose(tiny_bert_path, None).encode(texts)
    masked = compose(tiny_bert_path, {"name": "lambda_mask", "n_global": 1, "window": 64}).encode(texts)
    np.testing.assert_allclose(masked, plain, atol=1e-6)
    narrow = compose(tiny_bert_path, {"name": "lambda_mask", "n_global": 1, "window": 2}).encode(texts)
    assert np.abs(narrow - plain).max() > 1e-3


def test_lambda_mask_refuses_window_zero(tiny_bert_path):
    with pytest.raises(OptionError, match="window=0"):
        compose(tiny_bert_path, {"name": "lambda_mask", "window": 0})


def _capped(cap: int | None, n_global: int = 1, window: int = 64) -> dict:
    return {"name": "lambda_mask", "n_global": n_global, "window": window, "distance_cap": cap}


def test_lambda_mask_distance_cap_scores_far_pairs_at_the_cap_on_a_rotary_decoder(decoders):
    """LM-Infinite's distance ceiling on RoPE: with the same query and key vector at every
    position, a score depends only on the distance; beyond the cap it equals the score at
    exactly the cap, within it the rotary model's own score."""
    cap, length = 3, 12
    model = compose(decoders["llama"], _capped(cap), "hf_decoder", "last_token")
    model.encode(["one two three four five six seven eight nine ten eleven"])
    positions = model.attention._positions  # what the backbone reported for that pass
    assert positions.kind == "rotary"
    ids = torch.arange(length)[None]
    positions = type(positions)(ids=ids, kind="rotary", rotate=positions.rotate)
    model.attention.feed_positions(positions)
    head_dim = model.backbone.model.config.hidden_size // model.backbone.model.config.num_attention_heads
    torch.manual_seed(0)
    query = positions.rotate(torch.randn(head_dim).expand(1, 2, length, head_dim), ids[:, None, :])
    key = positions.rotate(torch.randn(head_dim).expand(1, 2, length, head_dim), ids[:, None, :])
    capped = model.attention.qk_scores(query, key, 0.5, 1)[0, 0]
    plain = (query @ key.transpose(-1, -2) * 0.5)[0, 0]
    for i in range(length):
        for j in range(length):
            distance = j - i
            if abs(distance) <= cap:
                assert torch.allclose(capped[i, j], plain[i, j], atol=1e-5)
            else:  # scored as if exactly cap apart, on the same side
                at_cap = plain[cap, 0] if distance < 0 else plain[0, cap]
                assert torch.allclose(capped[i, j], at_cap, atol=1e-5), (i, j)
    assert (plain[cap + 2 :, 0] - plain[cap, 0]).abs().max() > 1e-3  # the cap did change far pairs


def test_lambda_mask_distance_cap_on_a_decoder_changes_nothing_within_the_cap(decoders):
    texts = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat"]
    path = decoders["llama"]
    plain = compose(path, _capped(None), "hf_decoder", "last_token").encode(texts)
    wide = compose(path, _capped(64), "hf_decoder", "last_token").encode(texts)  # longer than the texts
    np.testing.assert_allclose(wide, plain, atol=1e-5)
    narrow = compose(path, _capped(2), "hf_decoder", "last_token").encode(texts)
    assert np.abs(narrow - plain).max() > 1e-3


def test_lambda_mask_distance_cap_clips_the_positions_fed_to_an_absolute_position_model(tiny_bert_path):
    fed = []
    for cap in (None, 5):
        model = compose(tiny_bert_path, _capped(cap))
        table = model.backbone.model.embeddings.position_embeddings
        hook = table.register_forward_hook(lambda module, args, out: fed.append(args[0].clone()))
        model.encode(["one two three four five six seven eight nine ten eleven twelve"])
        hook.remove()
    width = fed[0].shape[-1]
    assert width > 7 and torch.equal(fed[0][0], torch.arange(width))
    assert torch.equal(fed[1][0], torch.arange(width).clamp(max=5))


def test_lambda_mask_distance_cap_is_checked(tiny_bert_path):
    from embplex.components import Positions

    for bad in (0, -4, 2.5, True):
        with pytest.raises(OptionError, match="distance_cap"):
            LambdaMask(distance_cap=bad)
    with pytest.raises(OptionError, match="distance_cap=8 needs a backbone with an absolute position table or Llama-style rotary"):
        LambdaMask(distance_cap=8).feed_positions(Positions(ids=torch.arange(4)[None], kind="other"))
    assert LambdaMask(distance_cap=None).feed_positions(Positions(ids=torch.arange(4)[None], kind="other")).tolist() == [[0, 1, 2, 3]]
    with pytest.raises(OptionError, match="both compute the scores from queries and keys"):
        compose(tiny_bert_path, [_capped(4), _capped(8)]).encode(["a b c"])


def test_a_model_that_bypasses_the_attention_hooks_is_refused(tiny_bert_path, monkeypatch):
    """A model whose attention code does not go through transformers' AttentionInterface
    would silently ignore the mask: the backbone refuses it instead."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import embplex.hf

    model = compose(tiny_bert_path, {"name": "lambda_mask", "window": 2})
    monkeypatch.setattr(
        embplex.hf, "_register_interface",
        lambda: AttentionInterface.register(embplex.hf.ATTENTION_IMPLEMENTATION, sdpa_attention_forward),
    )
    try:
        with pytest.raises(OptionError, match="without transformers' attention interface.*LambdaMask"):
            model.encode(["the cat sat on the mat"])
    finally:
        monkeypatch.undo()
        embplex.hf._register_interface()


# -- sink_calibration ---------------------------------------------------------------------


def test_sink_calibration_cuts_the_mass_on_detected_sinks_by_the_factor(minilm_path, data_dir):
    before, after = Recorder(), Recorder()
    policy = {"name": "sink_calibration", "factor": 0.25}
    model = compose(minilm_path, [before, policy, after])
    sink = model.attention.policies[1]
    features = tokens(model, essay_excerpts(data_dir, 2, 120))
    model.backbone(features, attention=model.attention)
    found = 0
    for (layer, probs, value), (_, calibrated, _) in zip(before.seen, after.seen):
        sinks = sink.sinks(probs, value)[:, :, None, :].expand_as(probs)
        found += int(sinks.any(dim=2).sum())
        mass_before = (probs * sinks).sum(-1)
        mass_after = (calibrated * sinks).sum(-1)
        torch.testing.assert_close(mass_after, 0.25 * mass_before, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(calibrated.sum(-1), probs.sum(-1), atol=1e-5, rtol=1e-5)
        # never the first token (the initial sink), never padding
        assert not sinks[..., 0].any()
        assert not (sinks & ~features.attention_mask.bool()[:, None, None, :]).any()
    assert found > 0, "all-MiniLM-L6-v2 has separator sinks; none was detected"


def test_sink_calibration_rescales_rows_as_the_plain_formula(tiny_bert_path):
    """The lean rewrite (products, one full-size tensor) against the formula written out:
    sinks keep ``factor`` of their mass, the other keys share the rest in proportion."""
    from embplex.plugins.attention.sink_calibration import SinkCalibration

    generator = torch.Generator().manual_seed(0)
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, 9:] = 0
    scores = torch.randn(2, 3, 12, 12, generator=generator)
    scores[..., 4] += 4.0  # key 4 draws the attention of every query
    scores = scores.masked_fill(~padding.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    value = torch.randn(2, 3, 12, 8, generator=generator)
    value[:, :, 4] *= 0.01  # and carries a small value: a sink
    policy = SinkCalibration(factor=0.25)
    policy.bind(1, causal=False)
    policy.mask(padding)
    sinks = policy.sinks(probs, value)
    assert sinks[:, :, 4].all() and not sinks[:, :, 0].any()
    on_sinks = (probs * sinks[:, :, None, :]).sum(dim=-1, keepdim=True)
    expected = torch.where(sinks[:, :, None, :], probs * 0.25, probs * (1 - 0.25 * on_sinks) / (1 - on_sinks))
    calibrated = policy.probs_with_values(probs, value, 1)
    torch.testing.assert_close(calibrated, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(calibrated.sum(dim=-1), torch.ones(2, 3, 12), atol=1e-5, rtol=0)


def test_sink_calibration_changes_nothing_where_no_sink_is_found(tiny_bert_path):
    texts = ["the quick brown fox jumps over the lazy dog", "a cat sat"]
    plain = compose(tiny_bert_path, None).encode(texts)
    none_found = compose(tiny_bert_path, {"name": "sink_calibration", "threshold": 1e6}).encode(texts)
    np.testing.assert_allclose(none_found, plain, atol=1e-6)
    probs = torch.softmax(torch.randn(1, 2, 5, 5), dim=-1)
    policy = embplex.load_registry().create("attention", "sink_calibration", threshold=1e6)
    policy.bind(3, False)
    policy.mask(torch.ones(1, 5))
    assert torch.equal(policy.probs_with_values(probs, torch.randn(1, 2, 5, 4), 1), probs)


# -- attention lists ----------------------------------------------------------------------


class _BidirectionalTempScale(Attention):
    causal = False

    def scores(self, scores, layer):
        return scores / 0.5


def test_a_list_on_a_tiny_decoder_applies_every_policy_in_order(decoders):
    path = decoders["llama"]
    texts = ["the quick brown fox jumps over the lazy dog", "a cat sat on the mat"]
    listed = compose(path, ["bidirectional", {"name": "temp_scale", "temperature": 0.5}], "hf_decoder", "last_token")
    assert isinstance(listed.attention, AttentionChain) and listed.attention.is_causal is False
    by_hand = compose(path, _BidirectionalTempScale(), "hf_decoder", "last_token")
    np.testing.assert_allclose(listed.encode(texts), by_hand.encode(texts), atol=1e-5)
    bidirectional = compose(path, "bidirectional", "hf_decoder", "last_token").encode(texts)
    assert np.abs(listed.encode(texts) - bidirectional).max() > 1e-3  # the temperature applied too


class _LambdaTemp(LambdaMask):
    def scores(self, scores, layer):
        return scores / 0.8


def test_lambda_mask_and_temp_scale_compose_on_minilm(minilm_path, data_dir):
    texts = essay_excerpts(data_dir, 2, 150)
    listed = compose(minilm_path, [{"name": "lambda_mask", "n_global": 2, "window": 32},
                                   {"name": "temp_scale", "temperature": 0.8}])
    by_hand = compose(minilm_path, _LambdaTemp(n_global=2, window=32))
    np.testing.assert_allclose(listed.encode(texts), by_hand.encode(texts), atol=1e-5)
    masked_only = compose(minilm_path, {"name": "lambda_mask", "n_global": 2, "window": 32}).encode(texts)
    assert np.abs(listed.encode(texts) - masked_only).max() > 1e-3


def test_a_saved_list_loads_back_identically(tiny_bert_path, tmp_path):
    spec = [{"name": "lambda_mask", "n_global": 1, "window": 3}, {"name": "temp_scale", "temperature": 0.7}]
    model = compose(tiny_bert_path, spec)
    texts = [" ".join(WORDS[:20]), "a cat sat"]
    with pytest.warns(UserWarning, match="no sentence-transformers module"):
        model.save(tmp_path / "m")
    loaded = embplex.load(tmp_path / "m")
    assert [type(p).__name__ for p in loaded.attention.policies] == ["LambdaMask", "TempScale"]
    assert [s["name"] for s in loaded.specs["attention"]] == ["lambda_mask", "temp_scale"]
    assert loaded.attention.policies[1].temperature == 0.7 and loaded.attention.policies[0].window == 3
    np.testing.assert_array_equal(model.encode(texts), loaded.encode(texts))
    assert "attention[1] 'temp_scale'" in model.describe()


def test_the_command_line_list_form(registry):
    cfg = compose_config(
        ["attention=[lambda_mask,temp_scale]", "attention.temp_scale.temperature=0.5", "attention.lambda_mask.window=8"],
        registry=registry,
    )
    assert [m["name"] for m in cfg["attention"]] == ["lambda_mask", "temp_scale"]
    assert cfg["attention"][1]["temperature"] == 0.5 and cfg["attention"][0]["window"] == 8
    single = compose_config(["attention=temp_scale", "attention.temperature=0.5"], registry=registry)
    assert single["attention"] == {"name": "temp_scale", "temperature": 0.5, "min_length": 0, "layers": None}
    with pytest.raises(ConfigError, match="No attention plugin named 'temp_scal'"):
        compose_config(["attention=[bidirectional,temp_scal]"], registry=registry)
    with pytest.raises(ConfigError, match="more than once"):
        compose_config(["attention=[temp_scale,temp_scale]"], registry=registry)


def test_the_list_form_on_the_command_line_and_in_a_defaults_list(capsys, registry):
    from embplex.cli import main

    assert main(["config", "attention=[lambda_mask,temp_scale]", "attention.temp_scale.temperature=0.5"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in cfg["attention"]] == ["lambda_mask", "temp_scale"]
    assert cfg["attention"][1]["temperature"] == 0.5
    assert main(["config", "attention=[bidirectional,temp_scal]"]) == 2
    assert "No attention plugin named 'temp_scal'" in capsys.readouterr().err
    # what a recipe's defaults list says: `- /attention@attention.<name>: <name>` per policy
    placed = compose_config(
        ["+attention@attention.sink_calibration=sink_calibration", "+attention@attention.temp_scale=temp_scale"],
        registry=registry,
    )
    assert [m["name"] for m in placed["attention"]] == ["sink_calibration", "temp_scale"]
    with pytest.raises(ConfigError, match="mixes a list of plugins"):
        compose_config(["attention=causal", "+attention@attention.temp_scale=temp_scale"], registry=registry)


def test_bad_lists_are_refused(tiny_bert_path):
    with pytest.raises(UnknownComponentError, match=r"attention\[1\]: No attention plugin named 'temp_scal'"):
        compose(tiny_bert_path, ["bidirectional", "temp_scal"])
    with pytest.raises(OptionError, match="opposite causality"):
        compose(tiny_bert_path, ["causal", "bidirectional"])

    class OwnAttend(Attention):
        def attend(self, query, key, value, mask, scaling, layer, dropout=0.0):
            return super().attend(query, key, value, mask, scaling, layer, dropout)

    with pytest.raises(OptionError, match="computes attention itself"):
        compose(tiny_bert_path, [OwnAttend(), {"name": "temp_scale"}])


def test_a_recipe_lists_policies_in_its_defaults_list(tmp_path):
    """The documented recipe form: one `/attention@attention.<name>: <name>` entry each."""
    from test_config import ConfigFolder

    recipe = tmp_path / "conf" / "experiment" / "listed.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(
        "# @package _global_\n"
        "defaults:\n"
        "  - /attention@attention.lambda_mask: lambda_mask\n"
        "  - /attention@attention.temp_scale: temp_scale\n"
        "attention:\n"
        "  temp_scale:\n"
        "    temperature: 0.8\n"
    )
    registry = embplex.load_registry(extra_plugins=[("test-configs", ConfigFolder(tmp_path / "conf"))])
    cfg = compose_config(["experiment=listed", "attention.lambda_mask.window=16"], registry=registry)
    assert [(m["name"], m.get("temperature", m.get("window"))) for m in cfg["attention"]] == [
        ("lambda_mask", 16), ("temp_scale", 0.8)
    ]


def test_a_list_that_hydra_would_merge_is_refused(registry):
    with pytest.raises(ConfigError, match="lists cannot be swept"):
        compose_config(["attention=[lambda_mask,temp_scale],causal"], registry=registry)
