"""`causal` / `bidirectional` on every decoder family, one matrix.

family (Llama, Mistral, Qwen2, Gemma, GPT-2) × the model's own attention implementation
(`sdpa`, `eager`) × policy (none, `causal`, `bidirectional`) × layout (one unpadded text
— the silent-causal case where transformers sees no padding and may fall back to its
causal kernel —, a right-padded batch, a left-padded batch). Each case proves:

* changing a text's last token changes its first token's states only under
  `bidirectional` (the model's own attention and `causal` keep it unchanged);
* every row of a padded batch has the states of the same text alone.
"""

from __future__ import annotations

import functools

import pytest
import torch

import embplex
from embplex.components import Features
from embplex.errors import OptionError
from tiny_decoders import FAMILIES

TEXTS = ["the quick brown fox jumps over the lazy dog", "a cat sat", "what is the capital of france"]
LAYOUTS = {"one-unpadded": None, "padded-right": "right", "padded-left": "left"}
POLICIES = [None, "causal", "bidirectional"]
IMPLEMENTATIONS = ["sdpa", "eager"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@functools.lru_cache(maxsize=None)
def model(path: str, implementation: str, side: str, policy: str | None) -> embplex.EmbeddingModel:
    backbone = {"name": "hf_decoder", "path": path, "padding_side": side, "attn_implementation": implementation}
    return embplex.compose(backbone, pooling="last_token", attention=policy)


def states(model: embplex.EmbeddingModel, features: Features) -> tuple[torch.Tensor, ...]:
    return model.backbone(features, attention=model.attention).hidden_states[1:]  # every layer's output


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p or "own")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_first_token_reads_the_last_only_under_bidirectional(decoders, family, implementation, policy, layout):
    side = LAYOUTS[layout] or "right"
    embedder = model(decoders[family], implementation, side, policy)
    texts = TEXTS[1:2] if LAYOUTS[layout] is None else TEXTS
    features = embedder.backbone.tokenize(texts)
    row = 1 if len(texts) > 1 else 0  # the short text: padding lies next to it
    real = features.attention_mask[row].nonzero().flatten()
    if LAYOUTS[layout] is None:
        assert bool(features.attention_mask.all()), "the unpadded case must have no padding at all"
    else:
        assert not bool(features.attention_mask.all())
    first, last = int(real[0]), int(real[-1])
    changed = features.input_ids.clone()
    changed[row, last] = (changed[row, last] + 7) % embedder.backbone.tokenizer.vocab_size
    before = states(embedder, features)
    after = states(embedder, Features(input_ids=changed, attention_mask=features.attention_mask, padding_side=side))
    assert (before[-1][row, last] - after[-1][row, last]).abs().max() > 1e-4, "the changed token itself moves"
    moved = max((b[row, first] - a[row, first]).abs().max().item() for b, a in zip(before, after))
    if policy == "bidirectional":
        assert moved > 1e-4, f"{family}/{implementation}/{layout}: bidirectional attention stayed causal"
    else:
        assert moved < 1e-6, f"{family}/{implementation}/{layout}/{policy}: the first token read a later one"
    if len(texts) > 1:  # padded rows equal their unpadded selves, every layer, every real token
        for index, text in enumerate(texts):
            alone = states(embedder, embedder.backbone.tokenize([text]))
            mask = features.attention_mask[index].bool()
            for batched, single in zip(before, alone):
                torch.testing.assert_close(batched[index][mask], single[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p or "own")
@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_and_eager_give_the_same_states(decoders, family, policy):
    sdpa, eager = (model(decoders[family], implementation, "left", policy) for implementation in IMPLEMENTATIONS)
    assert eager.backbone.model.config._attn_implementation == "eager"
    features = sdpa.backbone.tokenize(TEXTS)
    real = features.attention_mask.bool()
    for ours, theirs in zip(states(sdpa, features), states(eager, features)):
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_an_unknown_attention_implementation_is_refused(decoders):
    with pytest.raises(OptionError, match="attn_implementation"):
        embplex.compose({"name": "hf_decoder", "path": decoders["llama"], "attn_implementation": "flash"})


def test_an_encoder_given_to_hf_decoder_is_refused(tiny_bert_path):
    with pytest.raises(OptionError, match="not a decoder-only"):
        embplex.compose({"name": "hf_decoder", "path": tiny_bert_path})
