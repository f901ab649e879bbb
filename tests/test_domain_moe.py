"""Backbone ``domain_moe`` and the domain label's path to it: ``Example.task`` through
``make_training_batch`` and ``encode(..., domain=)`` into ``Features.domain``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import embplex
from embplex.components import Example
from embplex.errors import InputError, OptionError
from embplex.training import TrainSettings, make_training_batch, train

TEXTS = ["a cat sat on the mat", "what is the capital of france ?", "the quick brown fox"]


def compose(path: str, domains=("scifact", "stsb"), pooling="mean") -> embplex.EmbeddingModel:
    return embplex.compose({"name": "domain_moe", "path": path, "domains": list(domains)}, pooling=pooling)


def record_rows(model) -> dict[tuple[str, int], list[int]]:
    """Which batch rows (by their first token id) each expert of each block received."""
    seen: dict[tuple[str, int], list[int]] = {}
    for name, module in model.backbone.model.named_modules():
        if type(module).__name__ == "_Experts":
            for index, expert in enumerate(module.experts):
                def hook(mod, args, key=(name, index)):
                    seen.setdefault(key, []).append(args[0].shape[0])
                expert.register_forward_pre_hook(hook)
    return seen


def test_untrained_every_expert_is_the_original_network(tiny_bert_path):
    plain = embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling="mean").encode(TEXTS)
    for domain in ("scifact", "stsb", 0, 1):
        np.testing.assert_allclose(compose(tiny_bert_path).encode(TEXTS, domain=domain), plain, atol=1e-5)


def test_tokens_of_domain_d_pass_only_expert_d(tiny_bert_path):
    model = compose(tiny_bert_path, domains=("a", "b", "c"))
    with torch.no_grad():  # make the experts differ, so a wrong route would show
        for name, module in model.backbone.model.named_modules():
            if type(module).__name__ == "_Experts":
                for index, expert in enumerate(module.experts):
                    for parameter in expert.parameters():
                        parameter.add_(0.05 * index * torch.randn_like(parameter))
    seen = record_rows(model)
    features = model.backbone.tokenize(TEXTS)
    features.domain = ["c", "a", "c"]
    model.backbone(features)
    blocks = {name for name, _ in seen}
    assert len(blocks) == 2 * model.backbone.num_layers  # intermediate and output of each block
    for block in blocks:
        assert seen[(block, 0)] == [1] and seen[(block, 2)] == [2] and (block, 1) not in seen
    # each text gets exactly what its own expert alone gives it
    mixed = model.encode(TEXTS, domain=["c", "a", "c"])
    for row, domain in enumerate(["c", "a", "c"]):
        np.testing.assert_allclose(mixed[row], model.encode([TEXTS[row]], domain=domain)[0], atol=1e-5)
    assert abs(model.encode(TEXTS[:1], domain="a") - model.encode(TEXTS[:1], domain="c")).max() > 1e-3


def test_training_batches_carry_the_example_task_as_domain(tiny_bert_path):
    model = compose(tiny_bert_path)
    examples = [
        Example("a cat", "a dog", negatives=["a fish", "a bird"], task="stsb"),
        Example("the quick fox", "a brown fox", negatives=["a log", "a pond"], task="scifact"),
    ]
    batch = make_training_batch(model.backbone, examples)
    assert batch.anchors.domain == batch.positives.domain == ["stsb", "scifact"]
    assert batch.negatives.domain == ["stsb", "stsb", "scifact", "scifact"]
    embeddings = model.embed_roles(batch)  # runs in length groups: labels follow their rows
    assert embeddings["negatives"][None].shape[0] == 4


def test_a_two_domain_fine_tune_trains_both_experts(tiny_bert_path, tmp_path):
    registry = embplex.load_registry()
    model = compose(tiny_bert_path)
    before = {k: v.clone() for k, v in model.backbone.model.state_dict().items() if ".experts." in k}
    words = "cat dog bird fish mat log tree pond river city book story".split()
    examples = [
        Example(f"{words[i]} {words[(i + 1) % 12]}", f"{words[(i + 1) % 12]} {words[i]}", task=("scifact", "stsb")[i % 2])
        for i in range(12)
    ]
    settings = TrainSettings(batch_size=4, max_steps=3, lr=1e-3, progress_bar=False, log_every=1)
    train(model, examples, registry.create("loss", "infonce"), registry.create("sampler", "random"), settings, tmp_path / "run")
    after = model.backbone.model.state_dict()
    for expert in (0, 1):
        moved = [k for k in before if f".experts.{expert}." in k and not torch.equal(before[k], after[k])]
        assert moved, f"expert {expert} did not train"
    # saved and loaded: every expert comes back
    loaded = embplex.load(tmp_path / "run" / "model")
    for domain in ("scifact", "stsb"):
        np.testing.assert_allclose(loaded.encode(TEXTS, domain=domain), model.encode(TEXTS, domain=domain), atol=1e-6)
    assert abs(model.encode(TEXTS, domain="scifact") - model.encode(TEXTS, domain="stsb")).max() > 1e-5


@pytest.mark.parametrize(
    ("domain", "message"),
    [(None, "needs a domain label"), ("medicine", "not one of"), (2, "not one of"), (-1, "not one of"), ([0], "1 labels for 3 texts")],
)
def test_a_missing_or_unknown_domain_is_refused(tiny_bert_path, domain, message):
    model = compose(tiny_bert_path)
    with pytest.raises(InputError, match=message):
        model.encode(TEXTS, domain=domain)


def test_a_training_example_without_task_is_refused(tiny_bert_path):
    model = compose(tiny_bert_path)
    batch = make_training_batch(model.backbone, [Example("a cat", "a dog"), Example("a fox", "a log")])
    assert batch.anchors.domain is None
    with pytest.raises(InputError, match="needs a domain label"):
        model.embed_roles(batch)


@pytest.mark.parametrize("domains", [["only"], ["a", "a"]])
def test_fewer_than_two_distinct_domains_are_refused(tiny_bert_path, domains):
    with pytest.raises(OptionError, match="at least two distinct domains"):
        compose(tiny_bert_path, domains=domains)


def test_a_decoder_is_refused(decoders):
    with pytest.raises(OptionError, match="BERT-style blocks"):
        compose(decoders["llama"])


def test_other_backbones_refuse_a_domain_they_would_ignore(tiny_model):
    with pytest.raises(InputError, match=r"domain='anything' was given, but backbone '\w+' does not route by domain"):
        tiny_model.encode(TEXTS, domain="anything")
    tiny_model.encode(TEXTS, domain=None)  # no label: nothing to refuse


# -- from the command line: eval.domain -----------------------------------------------------


def saved_with_a_distinct_second_expert(path: str, folder):
    """A domain_moe model whose expert 1 is nudged away from expert 0 (so domains differ), saved to ``folder``."""
    model = compose(path)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.backbone.model.modules():
            if type(module).__name__ == "_Experts":
                for parameter in module.experts[1].parameters():
                    parameter.add_(0.05 * torch.randn_like(parameter))
    model.save(folder)
    return model


def _cli(capsys, *args):
    from embplex.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_domain_routes_every_evaluated_text_from_the_command_line(capsys, tmp_path, tiny_bert_path, data_dir):
    """``embplex eval ... eval.domain=<label>`` reaches encode for every text: on a saved
    model whose second expert differs, domains 0 and 1 score differently, each exactly as
    ``encode(..., domain=)`` from Python does."""
    from embplex.data import load_sts
    from embplex.evaluation import evaluate_sts

    pairs = tmp_path / "stsb.tsv"
    pairs.write_text("\n".join((data_dir / "sts" / "stsb" / "test.tsv").read_text(encoding="utf-8").splitlines()[:41]) + "\n")
    model = saved_with_a_distinct_second_expert(tiny_bert_path, tmp_path / "model")
    common = [f"model.load={tmp_path / 'model'}", "data=stsb", f"data.eval.path={pairs}", "eval.bootstrap=20"]
    scores = {}
    for label in ("0", "stsb"):
        out_dir = tmp_path / f"run-{label}"
        code, _, err = _cli(capsys, "eval", *common, f"output_dir={out_dir}", f"eval.domain={label}")
        assert code == 0, err
        scores[label] = json.loads((out_dir / "results.json").read_text())["results"]["spearman"]
    s1, s2, gold = load_sts(pairs)
    by_hand = {label: evaluate_sts(model, s1, s2, gold, bootstrap=20, encode_options={"domain": label})["spearman"] for label in ("scifact", "stsb")}
    assert scores["0"] == pytest.approx(by_hand["scifact"], abs=1e-6)
    assert scores["stsb"] == pytest.approx(by_hand["stsb"], abs=1e-6)
    assert scores["0"] != pytest.approx(scores["stsb"], abs=1e-4)
    # composed on the command line too: backbone=domain_moe ... eval.domain=1
    code, _, err = _cli(capsys, "eval", "backbone=domain_moe", f"backbone.path={tiny_bert_path}", "data=stsb",
                        f"data.eval.path={pairs}", "eval.bootstrap=20", f"output_dir={tmp_path / 'composed'}", "eval.domain=1")
    assert code == 0, err


def test_eval_domain_is_refused_where_it_would_be_ignored_or_is_missing(capsys, tmp_path, tiny_bert_path, data_dir):
    pairs = tmp_path / "stsb.tsv"
    pairs.write_text("\n".join((data_dir / "sts" / "stsb" / "test.tsv").read_text(encoding="utf-8").splitlines()[:11]) + "\n")
    common = ["data=stsb", f"data.eval.path={pairs}", "eval.bootstrap=20", f"output_dir={tmp_path}"]
    code, _, err = _cli(capsys, "eval", f"backbone.path={tiny_bert_path}", *common, "eval.domain=1")
    assert code == 2 and "eval.domain=1 was given, but backbone 'hf_encoder' does not route by domain" in err
    code, _, err = _cli(capsys, "eval", "backbone=domain_moe", f"backbone.path={tiny_bert_path}", *common)
    assert code == 2 and "domain_moe needs a domain label" in err
    code, _, err = _cli(capsys, "eval", "backbone=domain_moe", f"backbone.path={tiny_bert_path}", *common, "eval.domain=7")
    assert code == 2 and "domain 7 is not one of domain_moe's domains" in err


def test_the_saved_folder_is_a_plain_model_plus_the_experts(tiny_bert_path, tmp_path):
    model = compose(tiny_bert_path)
    model.save(tmp_path / "model")
    assert (tmp_path / "model" / "domain_experts.safetensors").is_file()
    assert "domain_experts.safetensors" in json.loads((tmp_path / "model" / "embplex.json").read_text())["sha256"]
    first = embplex.compose({"name": "hf_encoder", "path": str(tmp_path / "model")}, pooling="mean")
    np.testing.assert_allclose(first.encode(TEXTS), model.encode(TEXTS, domain=0), atol=1e-5)


def test_encode_domain_reaches_every_shard_of_a_sharded_encode(capsys, tmp_path, tiny_bert_path):
    """``embplex encode encode.output=<folder> encode.domain=<label>``: the Parquet shards
    hold what ``encode(..., domain=)`` gives, and the label is part of the manifest."""
    from embplex.bulk import read_shards

    model = saved_with_a_distinct_second_expert(tiny_bert_path, tmp_path / "model")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    common = ["encode", f"model.load={tmp_path / 'model'}", f"encode.input={texts}", "encode.shard_size=2"]
    code, _, err = _cli(capsys, *common, f"output_dir={tmp_path / 'run'}", "encode.output=shards", "encode.domain=stsb")
    assert code == 0, err
    ids, vectors = read_shards(tmp_path / "run" / "shards")[:2]
    np.testing.assert_allclose(vectors, model.encode(TEXTS, domain="stsb"), atol=1e-5)
    assert not np.allclose(vectors, model.encode(TEXTS, domain="scifact"), atol=1e-4)
    manifest = json.loads((tmp_path / "run" / "shards" / "manifest.json").read_text())
    assert manifest["settings"]["domain"] == "stsb"
    code, _, err = _cli(capsys, *common, f"output_dir={tmp_path / 'plain'}", "encode.output=shards", f"model.load=null",
                        f"backbone.path={tiny_bert_path}", "encode.domain=1")
    assert code == 2 and "does not route by domain" in err
