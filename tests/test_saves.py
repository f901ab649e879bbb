"""Saved models that cannot lie: checksums verified on load, non-finite vectors refused,
and ``SentenceTransformer(path)`` either gives embplex's vectors or refuses the folder."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import embplex
from embplex import evaluation
from embplex import model as embplex_model
from embplex.errors import ModelFileError, NonFiniteError, UnsafeConfigError
from embplex.integrations.sentence_transformers import EmbplexModule
from embplex.storage import sha256_file
from tiny_decoders import FAMILIES

TEXTS = [
    "the quick brown fox jumps over the lazy dog in the old city",
    "a cat sat",
    "what is the capital of france ? paris",
]
PROMPT = "query: "
POOLINGS = ("mean", "cls", "max", "weighted_mean", "last_token")
DELEGATE = "embplex.integrations.sentence_transformers.EmbplexModule"


def save_quietly(model: embplex.EmbeddingModel, path: Path) -> list[str]:
    """Save and return the warnings the save gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save(path)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# ---------------------------------------------------------------------------
# checksums
# ---------------------------------------------------------------------------


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 5000)  # more than one 1 MiB read
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_records_the_checksum_of_every_file(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "embplex.json").read_text())
    recorded = config["sha256"]
    assert config["format"] == 2
    assert "model.safetensors" in recorded and "tokenizer.json" in recorded and "config.json" in recorded
    for name, digest in recorded.items():
        assert sha256_file(tmp_path / "m" / name) == digest
    written = {p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*") if p.is_file()}
    assert written - set(recorded) == {"embplex.json", "modules.json", "config_sentence_transformers.json"}


def flip_a_weight_byte(path: Path) -> None:
    """Change one byte of the tensor data (the header still parses: the file loads)."""
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_weight_byte_is_refused_naming_the_file(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    flip_a_weight_byte(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"model\.safetensors is corrupt.*save the model again"):
        embplex.load(tmp_path / "m")


def test_an_edited_file_and_a_missing_file_are_refused(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    (tmp_path / "m" / "tokenizer_config.json").unlink()
    with pytest.raises(ModelFileError, match=r"tokenizer_config\.json is missing"):
        embplex.load(tmp_path / "m")
    tiny_model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["num_hidden_layers"] = 2  # a plausible edit that would load and give other vectors
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"config\.json is corrupt"):
        embplex.load(tmp_path / "m")


def rewrite_config(path: Path, **changes) -> None:
    config = json.loads((path / "embplex.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "embplex.json").write_text(json.dumps(config))


def test_a_folder_saved_before_checksums_loads_with_a_warning(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    rewrite_config(tmp_path / "m", format=1, sha256=None)
    with pytest.warns(UserWarning, match="without checksums.*save it again"):
        loaded = embplex.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.encode(TEXTS), tiny_model.encode(TEXTS), atol=1e-6)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sha256": None}, "lists no valid checksums"),
        ({"sha256": ["model.safetensors"]}, "lists no valid checksums"),
        ({"sha256": {"../outside": "00"}}, "outside"),
        ({"format": 99}, "newer than this embplex reads"),
    ],
)
def test_a_config_that_cannot_be_verified_is_refused(tiny_model, tmp_path, changes, message):
    tiny_model.save(tmp_path / "m")
    rewrite_config(tmp_path / "m", **changes)
    with pytest.raises(ModelFileError, match=message):
        embplex.load(tmp_path / "m")


def test_a_folder_asking_to_run_its_own_code_needs_consent(tiny_bert_path, tmp_path):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path, "trust_remote_code": True}, pooling="mean")
    save_quietly(model, tmp_path / "m")
    with pytest.raises(UnsafeConfigError, match=r"backbone\.trust_remote_code=true.*pass trust_remote_code=True"):
        embplex.load(tmp_path / "m")
    loaded = embplex.load(tmp_path / "m", trust_remote_code=True)
    np.testing.assert_allclose(loaded.encode(TEXTS), model.encode(TEXTS), atol=1e-6)


# ---------------------------------------------------------------------------
# non-finite embeddings
# ---------------------------------------------------------------------------


def poison_token(model: embplex.EmbeddingModel, word: str) -> None:
    """Make the input embedding of ``word`` NaN: every text containing it turns NaN."""
    token = model.backbone.tokenizer(word, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.backbone.model.get_input_embeddings().weight[token] = float("nan")


def test_encode_refuses_a_nan_embedding_naming_the_text_and_the_model(tiny_bert_path, tmp_path):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling="mean")
    model.save(tmp_path / "m")
    loaded = embplex.load(tmp_path / "m")
    poison_token(loaded, "capital")
    with pytest.raises(NonFiniteError, match=rf"model at {tmp_path / 'm'}.*text 2 \('what is the capital"):
        loaded.encode(TEXTS, batch_size=1)
    poison_token(model, "capital")
    with pytest.raises(NonFiniteError, match=r"backbone 'hf_encoder', pooling 'mean'.*text 2"):
        model.encode(TEXTS)  # all three in one batch: only text 2 is named
    assert model.encode(TEXTS[:2]).shape == (2, 32)  # the others still embed


def test_eval_refuses_non_finite_embeddings_instead_of_scoring_them(tiny_model):
    poison_token(tiny_model, "cat")
    with pytest.raises(NonFiniteError, match="text 1"):
        evaluation.evaluate_sts(tiny_model, TEXTS, TEXTS[::-1], [1.0, 2.0, 3.0], bootstrap=0)


def test_the_cli_refuses_a_corrupt_folder_and_nan_vectors_with_exit_2(tiny_model, tmp_path, capsys):
    from embplex.cli import main

    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    args = [f"encode.input={tmp_path / 'texts.txt'}", f"output_dir={tmp_path / 'out'}"]
    tiny_model.save(tmp_path / "flipped")
    flip_a_weight_byte(tmp_path / "flipped" / "model.safetensors")
    assert main(["encode", f"model.load={tmp_path / 'flipped'}", *args]) == 2
    assert "model.safetensors is corrupt" in capsys.readouterr().err
    poison_token(tiny_model, "paris")
    tiny_model.save(tmp_path / "nan")  # NaN weights, honestly checksummed
    assert main(["encode", f"model.load={tmp_path / 'nan'}", *args]) == 2
    err = capsys.readouterr().err
    assert "non-finite embedding" in err and "text 2 ('what is the capital of france ? paris')" in err
    assert not (tmp_path / "out" / "embeddings.npy").exists()


# ---------------------------------------------------------------------------
# sentence-transformers: the same vectors, or a refusal
# ---------------------------------------------------------------------------


def sharing_backbone(base: embplex.EmbeddingModel, pooling, attention=None, normalize=True):
    """``base``'s backbone (already loaded) with another pooling, attention and normalize:
    what ``embplex.compose`` would build, without loading the backbone again."""
    registry = embplex.load_registry()
    specs = {"backbone": base.specs["backbone"]}
    parts = {}
    for kind, value in (("pooling", pooling), ("attention", attention)):
        if value is not None:
            specs[kind] = embplex_model.component_spec(value)
            specs[kind]["plugin"] = registry.get(kind, specs[kind]["name"]).plugin
            parts[kind] = registry.create(kind, specs[kind]["name"], **specs[kind]["options"])
    return embplex.EmbeddingModel(base.backbone, parts["pooling"], parts.get("attention"), normalize, specs)


def check_sentence_transformers(model: embplex.EmbeddingModel, path: Path, prompt_exact: bool) -> str:
    """Save ``model`` and load it with sentence-transformers: the plain layout must give
    our vectors; the delegating one must be refused without trust_remote_code and give
    our vectors with it. Returns which path the folder took."""
    from sentence_transformers import SentenceTransformer

    said = save_quietly(model, path)
    types = [m["type"] for m in json.loads((path / "modules.json").read_text())]
    if types == [DELEGATE]:
        assert any("trust_remote_code=True" in message for message in said), said
        with pytest.raises(ValueError, match=r"(?s)embplex\.integrations\.sentence_transformers\.EmbplexModule.*trust_remote_code=True"):
            SentenceTransformer(str(path), device="cpu")
        theirs = SentenceTransformer(str(path), device="cpu", trust_remote_code=True)
        route, prompt_exact = "embplex", True
    else:
        assert all(t.startswith("sentence_transformers.") for t in types) and not said
        theirs = SentenceTransformer(str(path), device="cpu")
        route = "plain"
    np.testing.assert_allclose(theirs.encode(TEXTS), model.encode(TEXTS), atol=1e-5)
    if prompt_exact:
        np.testing.assert_allclose(theirs.encode(TEXTS, prompt=PROMPT), model.encode(TEXTS, prompt=PROMPT), atol=1e-5)
    return route


def test_every_pooling_option_saves_a_folder_sentence_transformers_reads_right(tiny_model, tmp_path):
    # every pooling with each exclude_instruction; normalize (a module of its own in
    # sentence-transformers, whatever the pooling) off in half of them
    for name in POOLINGS:
        for exclude, normalize in ((True, True), (False, False)):
            model = sharing_backbone(tiny_model, {"name": name, "exclude_instruction": exclude}, normalize=normalize)
            # cls and last_token never move with a prompt; the others agree with one only
            # when they pool the prompt too (sentence-transformers' include_prompt)
            exact_with_prompt = name in ("cls", "last_token") or not exclude
            route = check_sentence_transformers(model, tmp_path / f"{name}-{exclude}", exact_with_prompt)
            assert route == "plain", (name, exclude, normalize)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_an_encoder_with_an_attention_policy_goes_through_embplex(tiny_model, tmp_path, attention):
    # sentence-transformers has no attention policies (without one: the test above)
    for name in POOLINGS:
        model = sharing_backbone(tiny_model, name, attention)
        assert check_sentence_transformers(model, tmp_path / name, True) == "embplex", name


@pytest.mark.parametrize("precision", ["bf16"])
def test_an_encoder_at_another_precision_goes_through_embplex(tiny_bert_path, tmp_path, precision):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path, "precision": precision}, pooling="mean")
    assert check_sentence_transformers(model, tmp_path / "m", True) == "embplex"


@pytest.mark.parametrize("attention", [None, "causal", "bidirectional"])
def test_every_decoder_combination_goes_through_embplex(decoders, tmp_path, attention):
    base = embplex.compose({"name": "hf_decoder", "path": decoders["llama"]}, pooling="mean")
    for name in POOLINGS:
        model = sharing_backbone(base, name, attention)
        assert check_sentence_transformers(model, tmp_path / name, True) == "embplex"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_every_decoder_family_goes_through_embplex(decoders, tmp_path, family):
    model = embplex.compose({"name": "hf_decoder", "path": decoders[family], "padding_side": "left"}, pooling="last_token")
    assert check_sentence_transformers(model, tmp_path / "m", True) == "embplex"


# A third-party package's pooling and attention, registered in-process: one that declares
# a sentence-transformers export, one that does not, and a score-rewriting policy.


class ThirdPartyPower(embplex.Pooling):
    """Mean of signed square roots: sentence-transformers has no such pooling."""

    def forward(self, features):
        mask = features.pooling_mask(True).unsqueeze(-1).to(features.last_hidden_state.dtype)
        states = features.last_hidden_state
        rooted = states.sign() * states.abs().sqrt()
        return (rooted * mask).sum(dim=1) / mask.sum(dim=1)


class ThirdPartyFirst(embplex.Pooling):
    """The first real token, declared as sentence-transformers' cls pooling."""

    def forward(self, features):
        first = features.attention_mask.int().argmax(dim=1)
        states = features.last_hidden_state
        return states[torch.arange(states.shape[0]), first]

    def sentence_transformers_export(self, hidden_size):
        return embplex.sentence_transformers_pooling("cls", hidden_size)


class ThirdPartySharpen(embplex.Attention):
    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.temperature = temperature

    def scores(self, scores, layer):
        return scores / self.temperature


class ThirdPartyPlugin:
    @embplex.hookimpl
    def register_poolings(self, register):
        register("tp_power", ThirdPartyPower)
        register("tp_first", ThirdPartyFirst)

    @embplex.hookimpl
    def register_attentions(self, register):
        register("tp_sharpen", ThirdPartySharpen)


@pytest.fixture
def third_party(monkeypatch):
    """The registry every load builds (sentence-transformers' included) has the plugin."""
    real = embplex_model.load_registry
    monkeypatch.setattr(embplex_model, "load_registry", lambda: real(extra_plugins=[("third_party", ThirdPartyPlugin())]))
    return embplex_model.load_registry()


@pytest.mark.parametrize(
    "pooling, attention, route",
    [("tp_power", None, "embplex"), ("tp_first", None, "plain"), ("mean", "tp_sharpen", "embplex"), ("tp_power", "tp_sharpen", "embplex")],
)
def test_third_party_plugins_load_the_same_or_not_at_all(third_party, tiny_bert_path, tmp_path, pooling, attention, route):
    model = embplex.compose(
        {"name": "hf_encoder", "path": tiny_bert_path}, pooling=pooling, attention=attention, registry=third_party
    )
    assert check_sentence_transformers(model, tmp_path / "m", pooling != "tp_first") == route


def test_a_declared_export_must_be_a_sentence_transformers_class(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(
        type(tiny_model.pooling), "sentence_transformers_export",
        lambda self, hidden: embplex.SentenceTransformersModule(type="mypackage.Pooling"),
    )
    with pytest.raises(TypeError, match="pooling plugin 'mean'.*only sentence_transformers"):
        tiny_model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_loading_through_embplex_runs_no_file_of_the_folder(decoders, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = embplex.compose({"name": "hf_decoder", "path": decoders["qwen2"]}, pooling="mean")
    save_quietly(model, tmp_path / "m")
    trap = "raise RuntimeError('code from the model folder ran')\n"
    for name in ("embplex.py", "integrations.py", "sentence_transformers.py", "EmbplexModule.py"):
        (tmp_path / "m" / name).write_text(trap)
    theirs = SentenceTransformer(str(tmp_path / "m"), device="cpu", trust_remote_code=True)
    assert isinstance(theirs[0], EmbplexModule)
    np.testing.assert_allclose(theirs.encode(TEXTS), model.encode(TEXTS), atol=1e-5)
    # saved again by sentence-transformers: still a verified embplex folder
    save_quietly(theirs, tmp_path / "again")
    np.testing.assert_allclose(embplex.load(tmp_path / "again").encode(TEXTS), model.encode(TEXTS), atol=1e-6)


def test_sentence_transformers_checks_the_checksums_too(decoders, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = embplex.compose({"name": "hf_decoder", "path": decoders["gpt2"]}, pooling="mean")
    save_quietly(model, tmp_path / "m")
    flip_a_weight_byte(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelFileError, match="model.safetensors is corrupt"):
        SentenceTransformer(str(tmp_path / "m"), device="cpu", trust_remote_code=True)
