"""Backbone ``position_interpolation``: a 512-position model embeds 4096 tokens in one pass;
texts that fit run through the untouched model; each method looks positions up as defined."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import embplex
from embplex.components import Features
from embplex.errors import InputError, OptionError

ESSAY = "/work/shared/data/long/paul-graham-essays/addiction.txt"
SHORT = ["the cat sat on the mat", "what is the capital of france ? paris"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def extended(inner: dict, target: int, method: str = "linear", pooling: str = "mean") -> embplex.EmbeddingModel:
    return embplex.compose(
        {"name": "position_interpolation", "inner": inner, "target_length": target, "method": method},
        pooling=pooling,
    )


def same_token(count: int, token: int = 2000) -> Features:
    ids = torch.full((1, count), token)
    return Features(input_ids=ids, attention_mask=torch.ones_like(ids), extra={"token_type_ids": torch.zeros_like(ids)})


def test_minilm_embeds_4096_tokens_in_one_pass(minilm_path, data_dir):
    text = (data_dir / "long" / "paul-graham-essays" / "addiction.txt").read_text() * 4
    model = extended({"name": "hf_encoder", "path": minilm_path}, 4096)
    assert model.backbone.max_length == 4096
    features = model.backbone.tokenize([text])
    assert features.input_ids.shape[1] == 4096  # truncated at the new maximum, not at 256/512
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vector = model.encode([text], truncation="warn")
    assert np.isfinite(vector).all() and vector.shape == (1, 384)
    assert any("longer than 4096 tokens" in str(w.message) for w in caught)  # encode.truncation honours it
    with pytest.raises(InputError, match="maximum of 4096 tokens"):
        model.encode([text], truncation="error")


@pytest.mark.parametrize("method", ["linear", "grouped", "recurrent", "parallel"])
def test_texts_that_fit_run_through_the_untouched_model(tiny_bert_path, method):
    plain = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling="mean")
    model = extended({"name": "hf_encoder", "path": tiny_bert_path}, 256, method)
    table = model.backbone.inner.model.embeddings.position_embeddings
    before = table.weight.clone()
    np.testing.assert_array_equal(plain.encode(SHORT), model.encode(SHORT))
    model.backbone(same_token(200))  # a long pass leaves the original table in place
    assert model.backbone.inner.model.embeddings.position_embeddings is table
    assert torch.equal(table.weight, before)


def embedding_output(model: embplex.EmbeddingModel, count: int) -> torch.Tensor:
    return model.backbone(same_token(count)).hidden_states[0][0]


def test_recurrent_and_grouped_positions(tiny_bert_path):
    inner = {"name": "hf_encoder", "path": tiny_bert_path}  # 64 positions
    recurrent = embedding_output(extended(inner, 256, "recurrent"), 200)
    torch.testing.assert_close(recurrent[:64], recurrent[64:128])  # p and p + 64 share a row
    assert not torch.allclose(recurrent[0], recurrent[1])
    grouped = embedding_output(extended(inner, 256, "grouped"), 200)
    group = math.ceil(256 / 64)
    torch.testing.assert_close(grouped[0:4], grouped[0:1].expand(4, -1))  # p // 4
    assert not torch.allclose(grouped[3], grouped[4])
    assert group == 4


def test_linear_interpolation_keeps_the_ends_and_blends_between(tiny_bert_path):
    model = extended({"name": "hf_encoder", "path": tiny_bert_path}, 127 * 2 + 1)  # 64 rows -> 255
    weight = model.backbone.inner.model.embeddings.position_embeddings.weight
    table = model.backbone.table(weight)
    assert table.shape == (255, weight.shape[1])
    ratio = 63 / 254
    torch.testing.assert_close(table[0], weight[0])
    torch.testing.assert_close(table[-1], weight[-1])
    for p in (1, 77, 200):
        x = p * ratio
        low = int(math.floor(x))
        expected = weight[low] * (1 - (x - low)) + weight[min(low + 1, 63)] * (x - low)
        torch.testing.assert_close(table[p], expected)


def test_parallel_windows_each_start_at_position_zero(tiny_bert_path):
    inner = {"name": "hf_encoder", "path": tiny_bert_path}
    model = extended(inner, 256, "parallel")
    ids = torch.randint(5, 290, (1, 150))
    features = Features(input_ids=ids, attention_mask=torch.ones_like(ids), extra={"token_type_ids": torch.zeros_like(ids)})
    out = model.backbone(features).hidden_states[-1][0]
    plain = embplex.compose(inner, pooling="mean").backbone
    for start in (0, 64, 128):
        window = ids[:, start : start + 64]
        alone = plain(Features(input_ids=window, attention_mask=torch.ones_like(window),
                               extra={"token_type_ids": torch.zeros_like(window)})).hidden_states[-1][0]
        torch.testing.assert_close(out[start : start + window.shape[1]], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["linear", "ntk"])
def test_rotary_scaling_on_a_tiny_decoder(decoders, method):
    inner = {"name": "hf_decoder", "path": decoders["llama"]}  # 128 positions
    model = extended(inner, 512, method, pooling="last_token")
    plain = embplex.compose(inner, pooling="last_token")
    np.testing.assert_array_equal(plain.encode(SHORT), model.encode(SHORT))
    rotary = model.backbone._rotary[0]
    original = rotary.inv_freq.clone()
    scaled = model.backbone._scaled_frequencies(original)
    if method == "linear":
        torch.testing.assert_close(scaled, original / 4)
    else:  # NTK: the highest frequency is kept, the lowest scaled by about 1/4
        dim = 2 * original.shape[0]
        torch.testing.assert_close(scaled[0], original[0])
        torch.testing.assert_close(scaled[-1], original[-1] * 4 ** (-(dim - 2) / (dim - 2)))
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 25)
    features = model.backbone.tokenize([long_text])
    assert 128 < features.input_ids.shape[1] <= 512
    vector = model.encode([long_text])
    assert np.isfinite(vector).all()
    assert torch.equal(rotary.inv_freq, original)  # restored after the pass
    # the long pass used exactly the scaled frequencies: the plain model given them by hand agrees
    out = model.backbone(features).hidden_states[-1]
    plain_rotary = plain.backbone.model.rotary_emb
    unscaled = plain.backbone(features).hidden_states[-1]
    plain_rotary.inv_freq = scaled
    by_hand = plain.backbone(features).hidden_states[-1]
    torch.testing.assert_close(out, by_hand)
    assert (out - unscaled).abs().max() > 1e-4


def test_save_and_load_give_the_same_vectors(tiny_bert_path, tmp_path):
    model = extended({"name": "hf_encoder", "path": tiny_bert_path}, 256, "grouped")
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    with pytest.warns(UserWarning, match="no sentence-transformers module"):
        model.save(tmp_path / "m")
    loaded = embplex.load(tmp_path / "m")
    assert loaded.backbone.max_length == 256 and loaded.backbone.method == "grouped"
    np.testing.assert_array_equal(model.encode([text, *SHORT]), loaded.encode([text, *SHORT]))


def test_bad_options_are_refused(tiny_bert_path, decoders):
    bert = {"name": "hf_encoder", "path": tiny_bert_path}
    with pytest.raises(OptionError, match="target_length=32 is below the model's own maximum of 64"):
        extended(bert, 32)
    with pytest.raises(OptionError, match="method='ntk' rescales rotary"):
        extended(bert, 256, "ntk")
    with pytest.raises(OptionError, match="method='grouped' rescales an absolute"):
        extended({"name": "hf_decoder", "path": decoders["llama"]}, 512, "grouped")
    with pytest.raises(Exception, match="backbone.inner"):
        extended({"name": "hf_encodr", "path": tiny_bert_path}, 256)


def test_a_saved_inner_backbone_that_trusts_remote_code_needs_consent_to_load(tiny_bert_path, tmp_path):
    from embplex.errors import UnsafeConfigError

    model = extended({"name": "hf_encoder", "path": tiny_bert_path, "trust_remote_code": True}, 256)
    with pytest.warns(UserWarning):
        model.save(tmp_path / "m")
    with pytest.raises(UnsafeConfigError, match="trust_remote_code"):
        embplex.load(tmp_path / "m")
    assert embplex.load(tmp_path / "m", trust_remote_code=True).backbone.max_length == 256
