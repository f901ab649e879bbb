"""The LIMIT-style task (data=limit) and the free-embedding experiment's search."""

from __future__ import annotations

import itertools
import json
import math

import pytest

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
