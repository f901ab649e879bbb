"""LongEmbed-style passkey / needle tasks (embplex.long_context), `embplex eval data=passkey`,
and the smoke mode of the long-context experiment."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import numpy as np
import pytest

import embplex
from embplex import long_context
from embplex.app import run_eval
from embplex.config import compose_config
from embplex.errors import InputError

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backbone(tiny_bert_path):
    return embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling="mean").backbone


@pytest.fixture
def essays_dir(data_dir):
    return data_dir / "long" / "paul-graham-essays"


def count(backbone, text: str) -> int:
    return long_context._token_count(backbone, text)


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_documents_have_the_length_asked_in_the_models_tokens(backbone, essays_dir, task):
    corpus, queries, qrels = long_context.generate(task, backbone, essays_dir, 256, queries=50, candidates=100)
    assert len(corpus) == 100 and len(queries) == 50 and len(qrels) == 50
    lengths = [count(backbone, text) for text in corpus.values()]
    assert max(lengths) <= 256 and min(lengths) >= 246
    for qid, judged in qrels.items():
        (doc,) = judged
        name = re.search(r"for (\w+)\?|does (\w+) keep", queries[qid]).group(1 if task == "passkey" else 2)
        assert corpus[doc].count(name) >= (2 if task == "passkey" else 1)  # its person is in it
        others = [d for d in corpus if d != doc and f" {name} " in f" {corpus[d]} "]
        assert not others  # ...and in no other candidate
    if task == "passkey":
        key = re.search(r"pass key is (\d+)\.", corpus[next(iter(qrels[next(iter(qrels))]))])
        assert key and len(key.group(1)) == 5


def test_generation_is_deterministic_from_the_seed(backbone, essays_dir):
    one = long_context.generate("passkey", backbone, essays_dir, 128, queries=5, candidates=8, seed=3)
    again = long_context.generate("passkey", backbone, essays_dir, 128, queries=5, candidates=8, seed=3)
    other = long_context.generate("passkey", backbone, essays_dir, 128, queries=5, candidates=8, seed=4)
    assert one == again and one != other
    repeated, _, _ = long_context.generate("passkey", backbone, essays_dir, 128, 5, 8, 3, filler="repeat")
    assert all("The grass is green. The sky is blue." in text for text in repeated.values())


def test_bad_task_settings_are_refused(backbone, essays_dir, tmp_path):
    with pytest.raises(InputError, match="queries"):
        long_context.generate("passkey", backbone, essays_dir, 128, queries=10, candidates=5)
    with pytest.raises(InputError, match="filler"):
        long_context.generate("passkey", backbone, essays_dir, 128, 2, 4, filler="lorem")
    with pytest.raises(InputError, match="no essays"):
        long_context.generate("needle", backbone, tmp_path, 128, 2, 4)


def test_eval_data_passkey_writes_scores_per_length_and_a_plot(tiny_bert_path, registry, tmp_path):
    cfg = compose_config(
        ["data=passkey", f"backbone.path={tiny_bert_path}", f"output_dir={tmp_path}",
         "data.eval.lengths=[64,128]", "data.eval.queries=4", "data.eval.candidates=6", "eval.bootstrap=50"],
        registry=registry,
    )
    results = run_eval(cfg, registry)
    assert list(results["lengths"]) == ["64", "128"] and results["metric"] == "ndcg@1"
    for entry in results["lengths"].values():
        assert entry["queries"] == 4 and entry["candidates"] == 6
        for k in (1, 10):
            low, high = entry[f"ndcg@{k}_ci"]
            assert 0 <= low <= entry[f"ndcg@{k}"] <= high <= 100
    assert results["lengths"]["128"]["truncated_to"] == 64  # the tiny model has 64 positions
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert saved["lengths"] == results["lengths"]
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_long_context_experiment_smoke(tiny_bert_path, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("long_context_experiment", REPO / "benchmarks" / "long_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # two of the five configurations (the plain one and the longest list) keep it short
    only = ["truncation", "pi+temp+lambda+sink"]
    assert module.main(["--smoke", "--model", tiny_bert_path, "--only", ",".join(only), f"output_dir={tmp_path}"]) == 0
    for task in ("passkey", "needle"):
        saved = json.loads((tmp_path / f"{task}.json").read_text())
        assert saved["smoke"] is True and sorted(saved["runs"]) == sorted(only)
        for run in saved["runs"].values():
            assert list(run["lengths"]) == ["256", "512"]
            assert all(np.isfinite(entry["ndcg@10"]) for entry in run["lengths"].values())
        names = [s["name"] for s in saved["runs"]["pi+temp+lambda+sink"]["model"]["components"]["attention"]]
        assert names == ["lambda_mask", "temp_scale", "sink_calibration"]
        assert (tmp_path / f"{task}.png").read_bytes()[:4] == b"\x89PNG"
    # a progress line per configuration and per length, with the elapsed time
    printed = capsys.readouterr().out
    assert re.search(r"\[\d\d:\d\d\] needle pi\+temp\+lambda\+sink: starting", printed)
    assert len(re.findall(r"passkey (256|512) tokens: 4 documents and 3 queries, .* s so far", printed)) == 4


def test_long_context_baseline_is_the_recipes_inner_encoder():
    """Truncation runs the same model folder and precision as the extended configurations."""
    spec = importlib.util.spec_from_file_location("long_context_experiment", REPO / "benchmarks" / "long_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    registry = embplex.load_registry()
    recipe = compose_config(["experiment=long_context", "backbone.inner.precision=bf16"], registry=registry)
    inner = dict(recipe["backbone"]["inner"])
    baseline = compose_config(
        ["experiment=long_context", "data=needle", *module.CONFIGURATIONS["truncation"], *module.truncation_overrides(inner)],
        registry=registry,
    )["backbone"]
    assert (baseline["name"], baseline["max_length"]) == ("hf_encoder", 512)
    assert (baseline["path"], baseline["precision"]) == (inner["path"], "bf16")


def test_embplex_eval_prints_the_score_at_every_length(capsys, tiny_bert_path, tmp_path):
    from embplex.cli import main

    code = main(["eval", "data=needle", f"backbone.path={tiny_bert_path}", f"output_dir={tmp_path}",
                 "data.eval.lengths=[64,128]", "data.eval.queries=3", "data.eval.candidates=5", "eval.bootstrap=20"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"ndcg@10@64: [\d.]+  \(95% CI", out) and re.search(r"ndcg@10@128: [\d.]+  \(95% CI", out)
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.png").exists()


def test_length_collapse_interval_resamples_excerpts_not_pairs():
    spec = importlib.util.spec_from_file_location("length_collapse", REPO / "benchmarks" / "length_collapse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # orthogonal texts: every pair of two texts has cosine 0; a resample that drew one
    # excerpt twice would add cosine-1 "pairs" if it counted a text with itself
    assert module.bootstrap_interval(np.eye(6)) == [0.0, 0.0]
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(40, 8))
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    low, high = module.bootstrap_interval(spread)
    assert low < module.mean_pairwise_cosine(spread) < high


def test_length_collapse_experiment_smoke(tiny_bert_path, tmp_path):
    spec = importlib.util.spec_from_file_location("length_collapse", REPO / "benchmarks" / "length_collapse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--model", tiny_bert_path, "--output", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "length_collapse.json").read_text())
    assert saved["excerpts"] == 4 and sorted(saved["mean_pairwise_cosine"]) == ["plain", "temp_scale 0.9"]
    for curve in saved["mean_pairwise_cosine"].values():
        assert sorted(curve) == ["128", "256"] and all(-1 <= v <= 1 for v in curve.values())
    for name, curve in saved["mean_pairwise_cosine"].items():
        for length, (low, high) in saved["mean_pairwise_cosine_ci"][name].items():
            assert low <= high  # the point estimate can sit outside a percentile interval of 4 excerpts
    assert (tmp_path / "length_collapse.png").read_bytes()[:4] == b"\x89PNG"
