"""The ``hf_decoder`` backbone on tiny random models of every supported family."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import embplex
from embplex.errors import InputError, OptionError
from tiny_decoders import FAMILIES, build_decoder, build_tokenizer

TEXTS = [
    "the quick brown fox jumps over the lazy dog in the old city",
    "a cat sat",
    "what is the capital of france ? paris",
]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def backbone(path: str, **options):
    return embplex.load_registry().create("backbone", "hf_decoder", path=path, **options).eval()


def real_rows(features):
    """Each row's real token ids, in order."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(features.input_ids, features.attention_mask)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_every_text_ends_with_eos_and_padding_is_on_the_asked_side(decoders, family, side):
    model = backbone(decoders[family], padding_side=side)
    eos = model.tokenizer.eos_token_id
    features = model.tokenize(TEXTS)
    for ids in real_rows(features):
        assert ids[-1] == eos and eos not in ids[:-1]
    plain = model.tokenizer(TEXTS, add_special_tokens=True)["input_ids"]
    assert [ids[:-1] for ids in real_rows(features)] == plain  # nothing else changed
    short = features.attention_mask[1]
    padded_end = short[0] if side == "left" else short[-1]
    assert padded_end == 0 and features.padding_side == side


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_tokenizers_without_pad_token_pad_with_eos(decoders, family):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(decoders[family]).pad_token is None
    model = backbone(decoders[family])
    assert model.tokenizer.pad_token_id == model.tokenizer.eos_token_id
    features = model.tokenize(TEXTS)
    assert (features.input_ids[features.attention_mask == 0] == model.tokenizer.eos_token_id).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_keeps_bos_and_eos(decoders, family, side):
    model = backbone(decoders[family], max_length=8, padding_side=side)
    features = model.tokenize(TEXTS)
    assert features.input_ids.shape[1] == 8
    assert features.extra["truncated"] == sum(
        len(ids) + 1 > 8 for ids in model.tokenizer(TEXTS)["input_ids"]
    )
    full = model.tokenizer(TEXTS[0], add_special_tokens=True)["input_ids"]
    first = real_rows(features)[0]
    assert first == full[:7] + [model.tokenizer.eos_token_id]
    if family == "llama":
        assert first[0] == model.tokenizer.bos_token_id


def test_encode_refuses_too_long_texts_when_asked(decoders):
    model = embplex.compose({"name": "hf_decoder", "path": decoders["qwen2"], "max_length": 6}, pooling="last_token")
    with pytest.raises(InputError, match="6 tokens"):
        model.encode(TEXTS, truncation="error")
    with pytest.warns(UserWarning, match="truncated"):
        model.encode(TEXTS)


def test_a_tokenizer_that_appends_eos_itself_gets_no_second_one(tmp_path):
    from tokenizers import processors

    path = build_decoder("llama", tmp_path / "eos")
    tokenizer, _ = build_tokenizer("llama")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tokenizer.save_pretrained(path)
    model = backbone(path, max_length=6)
    ids = real_rows(model.tokenize(TEXTS))
    assert all(row[0] == bos and row[-1] == eos and eos not in row[:-1] for row in ids)
    assert len(ids[0]) == 6


def test_append_eos_off_leaves_the_tokenizer_output_alone(decoders):
    model = backbone(decoders["gpt2"], append_eos=False)
    assert real_rows(model.tokenize(TEXTS)) == model.tokenizer(TEXTS)["input_ids"]


def test_position_ids_count_real_tokens():
    from embplex.components import Features
    from embplex.plugins.backbone.hf_decoder import HFDecoder

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    features = Features(input_ids=torch.zeros_like(mask), attention_mask=mask)
    positions = HFDecoder._model_inputs(None, features)["position_ids"]
    assert positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 1, 1, 1]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_text_embeds_the_same_alone_and_in_a_padded_batch(decoders, family, side):
    model = backbone(decoders[family], padding_side=side)
    batch = model(model.tokenize(TEXTS))
    for row, text in enumerate(TEXTS):
        alone = model(model.tokenize([text]))
        real = batch.attention_mask[row].bool()
        for layer, states in enumerate(batch.hidden_states):
            torch.testing.assert_close(states[row][real], alone.hidden_states[layer][0], atol=1e-5, rtol=1e-5)


def test_left_padding_needs_the_position_ids_for_absolute_positions(decoders):
    """GPT-2 adds a learned vector per position: without our position ids a left-padded
    text would start at position 9 instead of 0."""
    model = backbone(decoders["gpt2"], padding_side="left")
    features = model.tokenize(TEXTS[:2])
    with torch.no_grad():
        ours = model(features).hidden_states[-1][1, -1]
        default = model.model(input_ids=features.input_ids, attention_mask=features.attention_mask)
    alone = model(model.tokenize(TEXTS[1:2])).hidden_states[-1][0, -1]
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)
    assert (default.last_hidden_state[1, -1] - alone).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_k_is_the_same_in_a_full_pass_a_stopped_pass_and_a_cut_model(decoders, family):
    model = backbone(decoders[family])
    features = model.tokenize(TEXTS)
    full = model(features)
    early = model(features, num_layers=1)
    assert len(early.hidden_states) == 2
    torch.testing.assert_close(early.hidden_states[1], full.hidden_states[1])
    cut = backbone(decoders[family], num_layers=1)
    owner, attribute = cut._layer_list()
    assert cut.num_layers == 1 and len(getattr(owner, attribute)) == 1
    torch.testing.assert_close(cut(features).hidden_states[-1], full.hidden_states[1])
    # every layer passes through the model's final norm, as transformers does for the last
    raw = model.model(
        input_ids=features.input_ids,
        attention_mask=features.attention_mask,
        position_ids=model._model_inputs(features)["position_ids"],
        output_hidden_states=True,
    ).hidden_states
    norm = model.model.norm if family == "llama" else model.model.ln_f
    torch.testing.assert_close(full.hidden_states[1], norm(raw[1]))
    torch.testing.assert_close(full.hidden_states[-1], raw[-1])


def test_save_and_load_round_trip(decoders, tmp_path):
    model = embplex.compose(
        {"name": "hf_decoder", "path": decoders["mistral"], "padding_side": "left", "max_length": 32},
        pooling="last_token",
        attention="bidirectional",
    )
    before = model.encode(TEXTS, prompt="query: ")
    model.save(tmp_path / "saved")
    loaded = embplex.load(tmp_path / "saved")
    assert loaded.backbone.tokenizer.padding_side == "left" and loaded.backbone.max_length == 32
    torch.testing.assert_close(torch.from_numpy(loaded.encode(TEXTS, prompt="query: ")), torch.from_numpy(before))
    # sentence-transformers' own modules would not append EOS: it may load the folder only through embplex
    modules = json.loads((tmp_path / "saved" / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["embplex.integrations.sentence_transformers.EmbplexModule"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_tokens_are_flagged_and_eos_never_is(decoders, side):
    model = backbone(decoders["llama"], padding_side=side)
    prompt = "query: "
    features = model.tokenize(TEXTS, prompt=prompt)
    prompt_ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for row in range(len(TEXTS)):
        ids = features.input_ids[row][features.attention_mask[row].bool()].tolist()
        flags = features.instruction_mask[row][features.attention_mask[row].bool()].tolist()
        flagged = [token for token, flag in zip(ids, flags) if flag]
        # everything flagged is the prompt's start, right after BOS, and EOS is text
        assert flagged and flagged == prompt_ids[: len(flagged)]
        assert flags[0] == 0 and flags[1] == 1 and flags[-1] == 0
        assert flags.index(1) == 1 and sum(flags) == len(flagged)
    assert (features.instruction_mask & (1 - features.attention_mask)).sum() == 0


def test_bad_padding_side_is_refused(decoders):
    with pytest.raises(OptionError, match="'left' or 'right'"):
        backbone(decoders["llama"], padding_side="middle")


def test_lora_without_peft_says_how_to_get_it(decoders, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes "import peft" fail
    with pytest.raises(OptionError, match=r"pip install embplex\[lora\]"):
        backbone(decoders["llama"], lora={"r": 4})


def test_config_file_lists_every_option_with_its_default():
    import inspect
    from importlib.resources import files

    from omegaconf import OmegaConf

    from embplex.plugins.backbone.hf_decoder import HFDecoder

    config = OmegaConf.load(str(files("embplex.conf") / "backbone" / "hf_decoder.yaml"))
    assert list(config)[0] == "name" and config.name == "hf_decoder"
    parameters = inspect.signature(HFDecoder).parameters
    assert set(config) - {"name"} == set(parameters)
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty:
            assert OmegaConf.is_missing(config, name)
        else:
            assert config[name] == parameter.default


def test_a_missing_path_is_asked_for():
    with pytest.raises(OptionError, match="backbone.path"):
        embplex.load_registry().create("backbone", "hf_decoder", path="???")
