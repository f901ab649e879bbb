"""The baseline poolings ``cls``, ``last_token``, ``max`` and ``weighted_mean``."""

from __future__ import annotations

import inspect
from importlib.resources import files

import numpy as np
import pytest
import torch

import embplex
from embplex.components import Features
from embplex.testing import PoolingContract
from tiny_decoders import FAMILIES

POOLINGS = ["cls", "last_token", "max", "weighted_mean"]
TEXTS = [
    "the quick brown fox jumps over the lazy dog in the old city",
    "a cat sat",
    "what is the capital of france ? paris",
]
SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome, I loved every minute of it!",
    "Paris is the capital of France.",
]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def pooling(name: str, **options):
    return embplex.load_registry().create("pooling", name, **options)


def padded(rows: list[torch.Tensor], side: str, prompt_tokens: int = 0) -> Features:
    """Features holding ``rows`` (each ``[tokens, hidden]``) as the last hidden state,
    padded with large junk values so that any leak shows; the first ``prompt_tokens``
    tokens of each row are flagged as instruction."""
    width, hidden = max(len(r) for r in rows), rows[0].shape[1]
    states = torch.full((len(rows), width, hidden), 1e4)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    instruction = torch.zeros_like(mask)
    for i, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        states[i, start : start + len(row)] = row
        mask[i, start : start + len(row)] = 1
        instruction[i, start : start + prompt_tokens] = 1
    return Features(
        input_ids=torch.zeros_like(mask),
        attention_mask=mask,
        instruction_mask=instruction,
        padding_side=side,
        hidden_states=(states,),
    )


def reference(name: str, row: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """The pooling written out by hand for one unpadded row, leaving out its first
    ``skip`` tokens (weighted_mean keeps the remaining tokens' positions 1..n as weights)."""
    kept = row[skip:]
    if name == "cls":
        return kept[0]
    if name == "last_token":
        return kept[-1]
    if name == "max":
        return kept.max(dim=0).values
    weights = torch.arange(skip + 1, len(row) + 1, dtype=row.dtype)
    return (kept * weights[:, None]).sum(dim=0) / weights.sum()


@pytest.mark.parametrize("name", POOLINGS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("exclude_instruction", [True, False])
def test_pooling_equals_the_hand_computation_under_either_padding(name, side, exclude_instruction):
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(length, 6, generator=generator) for length in (5, 2, 4)]
    prompt_tokens = 1
    pooled = pooling(name, exclude_instruction=exclude_instruction)(padded(rows, side, prompt_tokens))
    skip = prompt_tokens if exclude_instruction else 0
    expected = torch.stack([reference(name, row, skip) for row in rows])
    torch.testing.assert_close(pooled, expected)


def test_weighted_mean_weights_grow_with_position():
    """SGPT: the i-th token weighs i; one token changed at the end moves the mean by
    n/sum(1..n) of its change, at the start by 1/sum(1..n)."""
    row = torch.zeros(4, 1)
    base = pooling("weighted_mean")(padded([row], "right"))
    for position, weight in ((0, 1), (3, 4)):
        bumped = row.clone()
        bumped[position] = 1.0
        moved = pooling("weighted_mean")(padded([bumped], "right")) - base
        assert moved.item() == pytest.approx(weight / 10)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_is_the_final_real_token_of_the_text_alone(decoders, family, side):
    model = embplex.compose(
        {"name": "hf_decoder", "path": decoders[family], "padding_side": side},
        pooling="last_token",
        normalize=False,
    )
    pooled = model(model.backbone.tokenize(TEXTS))
    for row, text in enumerate(TEXTS):
        alone = model.backbone(model.backbone.tokenize([text]))
        eos_state = alone.hidden_states[-1][0, -1]
        assert alone.input_ids[0, -1] == model.backbone.tokenizer.eos_token_id
        torch.testing.assert_close(pooled[row], eos_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, options",
    [
        ("cls", {}),
        ("max", {"exclude_instruction": False}),
        ("last_token", {}),
        ("weighted_mean", {"exclude_instruction": False}),
    ],
)
def test_sentence_transformers_loads_the_same_model(minilm_path, tmp_path, name, options):
    from sentence_transformers import SentenceTransformer

    model = embplex.compose({"name": "hf_encoder", "path": minilm_path}, pooling={"name": name, **options})
    model.save(tmp_path / "saved")
    theirs = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    np.testing.assert_allclose(theirs.encode(SENTENCES), model.encode(SENTENCES), atol=1e-5)
    if name in ("cls", "last_token"):  # the prompt never moves [CLS] or [SEP]
        np.testing.assert_allclose(
            theirs.encode(SENTENCES, prompt="query: "), model.encode(SENTENCES, prompt="query: "), atol=1e-5
        )


@pytest.mark.parametrize("name", ["max", "weighted_mean"])
def test_sentence_transformers_loads_the_default_options_too(minilm_path, tmp_path, name):
    # exclude_instruction=True (the default) changes nothing without a prompt, so the
    # sentence-transformers layout gives the same vectors (it once fell back to mean: 0.38 off)
    from sentence_transformers import SentenceTransformer

    model = embplex.compose({"name": "hf_encoder", "path": minilm_path}, pooling={"name": name, "exclude_instruction": True})
    model.save(tmp_path / "saved")
    theirs = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    np.testing.assert_allclose(theirs.encode(SENTENCES), model.encode(SENTENCES), atol=1e-5)


@pytest.mark.parametrize("name", ["max", "weighted_mean"])
def test_exclude_instruction_leaves_the_prompt_out(minilm_path, name):
    from transformers import AutoModel, AutoTokenizer

    prompt = "query: "
    results = {
        exclude: embplex.compose(
            {"name": "hf_encoder", "path": minilm_path},
            pooling={"name": name, "exclude_instruction": exclude},
            normalize=False,
        ).encode(SENTENCES, prompt=prompt)
        for exclude in (True, False)
    }
    assert np.abs(results[True] - results[False]).max() > 1e-3

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    network = AutoModel.from_pretrained(minilm_path).eval()
    prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for row, sentence in enumerate(SENTENCES):
        encoded = tokenizer(prompt + sentence, return_tensors="pt")
        states = network(**encoded).last_hidden_state[0]
        # [CLS], then the prompt's tokens, then the sentence and [SEP]
        keep = torch.ones(len(states), dtype=torch.bool)
        keep[1 : 1 + prompt_length] = False
        if name == "max":
            expected = states[keep].max(dim=0).values
        else:
            weights = torch.arange(1, len(states) + 1, dtype=states.dtype)[keep]
            expected = (states[keep] * weights[:, None]).sum(dim=0) / weights.sum()
        np.testing.assert_allclose(results[True][row], expected.numpy(), atol=1e-5)


def test_cls_with_exclude_instruction_takes_the_first_text_token_on_a_decoder_without_bos(decoders):
    def first_token_state(exclude: bool) -> torch.Tensor:
        model = embplex.compose(
            {"name": "hf_decoder", "path": decoders["qwen2"], "padding_side": "left"},
            pooling={"name": "cls", "exclude_instruction": exclude},
            attention="bidirectional",
            normalize=False,
        )
        features = model.backbone.tokenize(TEXTS, prompt="query: ")
        return model(features), model.backbone(features, attention=model.attention)

    excluded, features = first_token_state(True)
    included, _ = first_token_state(False)
    states, mask, instruction = features.last_hidden_state, features.attention_mask, features.instruction_mask
    for row in range(len(TEXTS)):
        first_real = int(mask[row].argmax())
        first_text = int((mask[row].bool() & ~instruction[row].bool()).int().argmax())
        assert instruction[row, first_real] == 1 and first_text > first_real
        torch.testing.assert_close(included[row], states[row, first_real])
        torch.testing.assert_close(excluded[row], states[row, first_text])


@pytest.mark.parametrize("name", POOLINGS)
def test_config_file_lists_every_option_with_its_default(name):
    from omegaconf import OmegaConf

    config = OmegaConf.load(str(files("embplex.conf") / "pooling" / f"{name}.yaml"))
    parameters = inspect.signature(embplex.load_registry().get("pooling", name).factory).parameters
    assert list(config)[0] == "name" and config.name == name
    assert set(config) - {"name"} == set(parameters)
    assert all(config[key] == parameter.default for key, parameter in parameters.items())


class TestFirstPartyPoolingsFollowThePoolingContract(PoolingContract):
    @pytest.fixture(
        params=[(name, exclude) for name in ["mean", *POOLINGS] for exclude in (True, False)],
        ids=lambda p: f"{p[0]}-exclude_instruction={p[1]}",
    )
    def pooling(self, request):
        name, exclude = request.param
        return pooling(name, exclude_instruction=exclude)
