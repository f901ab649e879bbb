"""The inference fast path: hf_encoder ``precision`` and token-budget batching in encode.

The quality guard runs the real all-MiniLM-L6-v2 on real STS-B sentences: whatever the
fast path does on this machine, and bf16 forced, must stay within cosine 0.9999 of the
float32 embeddings. The rest uses a tiny random BERT.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embplex
from embplex import hf
from embplex import model as embplex_model
from embplex.errors import OptionError


@pytest.fixture(scope="module")
def stsb_sentences(data_dir) -> list[str]:
    from embplex.data import load_sts

    first, second, _ = load_sts(data_dir / "sts" / "stsb" / "test.tsv")
    return list(dict.fromkeys(s for pair in zip(first, second) for s in pair))[:200]


def _compose(path: str, precision: str, **options):
    return embplex.compose({"name": "hf_encoder", "path": path, "precision": precision, **options}, pooling="mean")


@pytest.mark.parametrize("precision", ["fast", "bf16"])
def test_fast_path_stays_within_cosine_0_9999_of_fp32_on_real_sentences(
    minilm, minilm_path, stsb_sentences, precision
):
    assert len(stsb_sentences) == 200
    reference = minilm.encode(stsb_sentences, batch_size=64)
    fast = _compose(minilm_path, precision).encode(stsb_sentences, batch_size=64)
    cosines = (reference * fast).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines.min()
    # not the same computation: bf16 really ran when asked for
    if precision == "bf16":
        assert np.abs(reference - fast).max() > 1e-5


def test_pure_bf16_weights_fall_below_the_quality_bar_mixed_precision_clears(minilm, minilm_path, stsb_sentences):
    """Why bf16 keeps norms and sums in float32: casting the whole model loses more."""
    reference = minilm.encode(stsb_sentences, batch_size=64)
    pure = embplex.compose({"name": "hf_encoder", "path": minilm_path, "dtype": "bfloat16"}, pooling="mean")
    mixed = _compose(minilm_path, "bf16")
    pure_cosine = (reference * pure.encode(stsb_sentences, batch_size=64)).sum(axis=1).min()
    mixed_cosine = (reference * mixed.encode(stsb_sentences, batch_size=64)).sum(axis=1).min()
    assert mixed_cosine > pure_cosine


def test_default_precision_leaves_the_model_untouched(tiny_bert_path):
    model = _compose(tiny_bert_path, "fp32")
    assert not any(isinstance(m, hf.InferenceLinear) for m in model.backbone.model.modules())


def test_unknown_precision_is_refused_with_the_choices(tiny_bert_path):
    with pytest.raises(OptionError, match="fp32, bf16, fast"):
        _compose(tiny_bert_path, "int4")


def test_token_budget_batches_cover_every_text_once_within_the_budget(tiny_bert_path):
    model = _compose(tiny_bert_path, "fast")
    words = "the cat sat on a mat while dogs ran around the big red house".split()
    texts = [" ".join(words[: 1 + (i * 7) % len(words)]) for i in range(50)]
    order = np.argsort([-len(t) for t in texts], kind="stable")
    batch_size = 8
    budget = batch_size * embplex_model.TOKENS_PER_TEXT
    seen = []
    for rows, features, _ in embplex_model._token_budget_batches(model.backbone, texts, order, batch_size, None):
        lengths = features.attention_mask.sum(dim=1)
        assert len(rows) <= batch_size
        assert features.input_ids.numel() <= max(budget, int(lengths.max()))
        assert features.input_ids.shape[1] == int(lengths.max())  # no all-padding columns
        # each row is exactly what tokenizing the text alone gives
        for row, text in zip(range(len(rows)), [texts[i] for i in rows]):
            alone = model.backbone.tokenize([text])
            n = int(lengths[row])
            assert features.input_ids[row, :n].tolist() == alone.input_ids[0].tolist()
            assert features.extra["token_type_ids"].shape == features.input_ids.shape
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(texts)))


def test_token_budget_batches_give_each_text_its_unbatched_embedding(tiny_bert_path):
    texts = [("word " * n).strip() + f" {n}" for n in (3, 40, 1, 17, 8, 25, 2, 60)]
    model = _compose(tiny_bert_path, "fp32")
    alone = np.stack([model.encode(text) for text in texts])  # no padding at all
    batched = model.encode(texts, batch_size=3)
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_fast_uses_bf16_exactly_where_the_hardware_runs_it_faster(tiny_bert_path, monkeypatch):
    texts = ["a cat sat on the mat", "dogs run", "the big red house is on the hill"]
    fp32 = _compose(tiny_bert_path, "fp32").encode(texts)
    bf16 = _compose(tiny_bert_path, "bf16").encode(texts)
    fast = _compose(tiny_bert_path, "fast")
    monkeypatch.setattr(hf, "bf16_matmul_is_fast", lambda device="cpu": True)
    np.testing.assert_allclose(fast.encode(texts), bf16, atol=1e-6)
    monkeypatch.setattr(hf, "bf16_matmul_is_fast", lambda device="cpu": False)
    np.testing.assert_allclose(fast.encode(texts), fp32, atol=1e-6)


def test_bf16_matmul_is_fast_follows_the_cpu_flags(monkeypatch):
    cases = [
        (("GenuineIntel", {"avx512f", "avx512_bf16"}), False),  # no AMX: bf16 at half rate
        (("GenuineIntel", {"avx512_bf16", "amx_bf16", "amx_tile"}), True),
        (("AuthenticAMD", {"avx512f", "avx512_bf16"}), True),  # Zen 4
        (("AuthenticAMD", {"avx2"}), False),
    ]
    for (vendor, flags), expected in cases:
        monkeypatch.setattr(hf, "_cpu_flags", lambda vendor=vendor, flags=flags: (vendor, frozenset(flags)))
        assert hf.bf16_matmul_is_fast("cpu") is expected


def test_training_is_untouched_and_the_bf16_copy_follows_the_weights(tiny_bert_path):
    model = _compose(tiny_bert_path, "bf16")
    texts = ["a cat sat on the mat", "dogs run fast"]
    before = model.encode(texts)
    features = model.backbone.tokenize(texts)
    model.train()
    loss = model(features).sum()
    loss.backward()  # autograd on: plain float32 linear layers, gradients on the weights
    linear = next(m for m in model.backbone.model.modules() if isinstance(m, hf.InferenceLinear))
    assert linear.weight.grad is not None and linear.weight.dtype == torch.float32
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    after = model.encode(texts)
    reference = _compose(tiny_bert_path, "fp32")
    reference.load_state_dict(model.state_dict())
    # the cached bf16 weights were refreshed: the encodings follow the new weights
    assert np.abs(after - before).max() > 1e-3
    assert ((after * reference.encode(texts)).sum(axis=1) > 0.999).all()


def test_saved_fast_model_keeps_float32_weights_and_its_precision(tiny_bert_path, tmp_path):
    from safetensors import safe_open

    model = _compose(tiny_bert_path, "fast")
    texts = ["a cat sat on the mat", "dogs run fast"]
    model.save(tmp_path / "saved")
    loaded = embplex.EmbeddingModel.load(tmp_path / "saved")
    assert loaded.backbone.precision == "fast"
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float32}
    np.testing.assert_allclose(loaded.encode(texts), model.encode(texts), atol=1e-6)
