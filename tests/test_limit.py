"""The LIMIT-style task (data=limit) and the free-embedding experiment's search."""

from __future__ import annotations

import itertools
import json
import math

import pytest

import embplex
from embplex.errors import OptionError
from embplex.limit import generate


def _liked(text: str) -> set[str]:
    return {item.strip(" .") for item in text.split(" likes ", 1)[1].split(",")}


def test_the_small_variant_has_the_papers_shape_and_exactly_k_answers_per_query():
    corpus, queries, qrels = generate()
    assert len(corpus) == 46 and len(queries) == 1000 and len(qrels) == 1000
    assert all(len(relevant) == 2 for relevant in qrels.values())
    assert len({frozenset(r) for r in qrels.values()}) == 1000  # distinct pairs
    assert len({len(_liked(t)) for t in corpus.values()}) == 1  # the same number of items each
    for qid, text in queries.items():
        item = text.removeprefix("Who likes ").removesuffix("?")
        assert {d for d, t in corpus.items() if item in _liked(t)} == set(qrels[qid]), qid


def test_every_pair_is_asked_when_the_queries_allow_and_the_generator_is_deterministic():
    corpus, queries, qrels = generate(documents=10, queries=45, seed=3)
    assert {frozenset(r) for r in qrels.values()} == {frozenset(f"d{i}" for i in c) for c in itertools.combinations(range(10), 2)}
    assert generate(documents=10, queries=45, seed=3) == (corpus, queries, qrels)
    assert generate(documents=10, queries=45, seed=4)[0] != corpus


def test_the_large_variant_adds_distractors_that_answer_no_query():
    corpus, queries, qrels = generate(documents=12, queries=30, distractors=50)
    assert len(corpus) == 62
    asked = {q.removeprefix("Who likes ").removesuffix("?") for q in queries.values()}
    for doc in (f"d{i}" for i in range(12, 62)):
        assert not _liked(corpus[doc]) & asked


@pytest.mark.parametrize(
    "options, match",
    [
        ({"queries": 1036}, "more than the 1035 distinct sets"),
        ({"relevant": 50}, "exceeds"),
        ({"documents": 0}, "documents must be at least 1"),
        ({"items_per_document": 3}, "fewer than the"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(OptionError, match=match):
        generate(**options)


def test_eval_data_limit_reports_recall_at_2_10_and_100(capsys, tmp_path, tiny_bert_path):
    from embplex.cli import main

    code = main(["eval", f"backbone.path={tiny_bert_path}", "data=limit", "data.eval.documents=8", "data.eval.queries=20", f"output_dir={tmp_path}", "eval.bootstrap=10"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results["queries"] == 20 and results["corpus"] == 8
    for name in ("recall@2", "recall@10", "recall@100"):
        assert 0 <= results[name] <= 100
    assert results["recall@10"] == results["recall@100"] == 100  # 8 documents: all of them are in the top 10
    assert results["recall@2"] <= results["recall@10"]
    assert math.isfinite(results["ndcg@10"])


def test_the_free_embedding_search_finds_the_largest_solved_n(monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("free_embedding", Path(__file__).parents[1] / "benchmarks" / "free_embedding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the search alone, against a known threshold: solved exactly when n <= 13
    monkeypatch.setattr(module, "solve", lambda n, d, k=2, **_: {"n": n, "solved": n <= 13})
    n, runs = module.critical_n(4)
    assert n == 13 and [r["n"] for r in runs][:3] == [5, 10, 20]
    # and one real optimisation: 3 points on a circle, every pair a query's top 2
    assert module.solve(3, 2, steps=300)["solved"]


def _benchmark(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bm25_over_phrases_solves_the_limit_task_that_bags_of_words_cannot():
    """The paper's point: LIMIT is easy lexically. Our items are three-word phrases of
    shared words ("huge amber bicycles"), so BM25 needs the phrases (word n-grams); plain
    BM25 over single words cannot tell "huge amber bicycles" from "huge violet bicycles"."""
    elastic = _benchmark("elastic")
    small, large = generate(), generate(distractors=1000)
    phrases = elastic.bm25_limit(*small, elastic.BM25_NGRAMS["bm25_phrases"], bootstrap=20)
    assert phrases["limit_recall@10"]["value"] == 1.0 and phrases["limit_recall@100"]["value"] == 1.0
    assert phrases["limit_recall@2"]["value"] >= 0.9
    low, high = phrases["limit_recall@2"]["ci"]
    assert low <= phrases["limit_recall@2"]["value"] <= high
    assert elastic.bm25_limit(*large, elastic.BM25_NGRAMS["bm25_phrases"], bootstrap=20)["limit_recall@10"]["value"] == 1.0
    words = elastic.bm25_limit(*small, elastic.BM25_NGRAMS["bm25_words"], bootstrap=20)
    assert words["limit_recall@2"]["value"] < 0.5


def test_lexical_tokens_never_join_two_items():
    elastic = _benchmark("elastic")
    tokens = elastic.lexical_tokens("Ada Chen likes tiny red apples, huge blue owls.", (3,))
    assert "tiny red apples" in tokens and "huge blue owls" in tokens
    assert not any("apples" in t and "huge" in t for t in tokens)


def test_the_elastic_study_runs_in_smoke_mode(tmp_path, tiny_bert_path, data_dir):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[1]
    output = tmp_path / "elastic.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/elastic.py", "--smoke", "--losses", "matryoshka_2d", "--output", str(output),
         f"backbone.path={tiny_bert_path}", f"output_dir={tmp_path / 'runs'}", f"data.root={data_dir}"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["smoke"] is True and set(result["grids"]) == {"untrained", "matryoshka_2d"}
    for grid in result["grids"].values():
        assert set(grid) == {"stsb_spearman", "limit_recall@2", "limit_recall@10", "limit_recall@100"}
        assert set(grid["stsb_spearman"]) == {"1,32", "3,32"}  # layers 1 and 3, the tiny model is 32 wide
        assert all(math.isfinite(cell["value"]) and len(cell["ci"]) == 2 for cell in grid["limit_recall@2"].values())
    assert set(result["lexical"]) == {"bm25_words/small", "bm25_phrases/small"}
    assert result["lexical"]["bm25_phrases/small"]["limit_recall@10"]["value"] == 1.0
    trained = embplex.load(tmp_path / "runs" / "matryoshka_2d" / "model")
    assert trained.recommended_sizes == [(1, 32), (2, 32), (3, 32)]
