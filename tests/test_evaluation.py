"""Evaluation: Spearman, bootstrap intervals, retrieval metrics checked by hand, the two
benchmarks on a model whose embeddings we choose, and the results file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from embplex import evaluation
from embplex.errors import InputError, NonFiniteError
from embplex.evaluation import (
    bootstrap_ci,
    evaluate_retrieval,
    evaluate_sts,
    mrr_at_k,
    ndcg_at_k,
    rank,
    recall_at_k,
    spearman,
    write_results,
)
from embplex.plugins.index.exact import ExactIndex


class TableModel:
    """A stand-in model whose embedding of each text is looked up in a table, so every
    similarity (and therefore every metric) is known in advance."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = {text: np.asarray(vector, dtype=np.float32) for text, vector in table.items()}
        self.dim = len(next(iter(self.table.values())))
        self.specs = {"backbone": {"name": "table"}}
        self.normalize = True
        self.calls: list[list[str]] = []

    def encode(self, texts, batch_size=32, normalize=True, prompt=None, **_):
        self.calls.append(list(texts))
        vectors = np.stack([self.table[(prompt or "") + text] for text in texts])
        if normalize:
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors


# -- statistics ---------------------------------------------------------------------------


def test_rank_averages_ties():
    np.testing.assert_array_equal(rank([10, 20, 20, 5, 20]), [2, 4, 4, 1, 4])


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=300)
    b = a + rng.normal(size=300)
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
    tied_a = rng.integers(0, 5, 300)  # many ties on both sides
    tied_b = rng.integers(0, 3, 300) + (tied_a > 2)
    assert spearman(tied_a, tied_b) == pytest.approx(scipy.stats.spearmanr(tied_a, tied_b).statistic, abs=1e-12)


def test_spearman_extremes_and_errors():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(InputError, match="equal length"):
        spearman([1, 2, 3], [1, 2])


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(5.0, 2.0, 40), rng.normal(5.0, 2.0, 4000)
    small_low, small_high = bootstrap_ci(small, np.mean)
    large_low, large_high = bootstrap_ci(large, np.mean)
    assert small_low < small.mean() < small_high
    assert large_low < large.mean() < large_high
    assert (large_high - large_low) < (small_high - small_low) / 5  # width ~ 1/sqrt(n)
    # 95% of a normal mean's sampling spread: about 2 * 1.96 * sigma / sqrt(n)
    assert large_high - large_low == pytest.approx(2 * 1.96 * 2.0 / math.sqrt(4000), rel=0.15)


def test_bootstrap_ci_resamples_pairs_together_and_is_reproducible():
    rng = np.random.default_rng(1)
    gold = rng.normal(size=200)
    predicted = gold + 0.5 * rng.normal(size=200)
    interval = bootstrap_ci((predicted, gold), spearman, n=300, seed=7)
    assert interval == bootstrap_ci((predicted, gold), spearman, n=300, seed=7)
    assert interval != bootstrap_ci((predicted, gold), spearman, n=300, seed=8)
    assert interval[0] < spearman(predicted, gold) < interval[1] <= 1.0
    # perfectly aligned pairs stay perfectly aligned in every resample
    assert bootstrap_ci((gold, 3 * gold), spearman, n=50) == pytest.approx((1.0, 1.0))
    with pytest.raises(InputError, match="different lengths"):
        bootstrap_ci((gold, gold[:-1]), spearman)


# -- retrieval metrics, computed by hand --------------------------------------------------

RANKED = ["d1", "d2", "d3", "d4"]


def test_ndcg_graded_by_hand():
    relevance = {"d2": 1, "d3": 2, "d9": 0}
    # DCG@3 = 0/log2(2) + 1/log2(3) + 2/log2(4); ideal order (2, 1): 2/log2(2) + 1/log2(3)
    dcg = 1 / math.log2(3) + 2 / 2
    ideal = 2 / 1 + 1 / math.log2(3)
    assert ndcg_at_k(RANKED, relevance, 3) == pytest.approx(dcg / ideal)
    # cut at 1: nothing relevant at rank 1
    assert ndcg_at_k(RANKED, relevance, 1) == 0.0
    # ideal DCG counts judged documents the run never returned
    assert ndcg_at_k(["d3"], {"d3": 1, "d7": 1}, 10) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(["d3", "d2"], {"d3": 2, "d2": 1}, 10) == pytest.approx(1.0)
    assert ndcg_at_k(RANKED, {"d9": 0}, 10) == 0.0


def test_recall_and_mrr_by_hand():
    relevance = {"d2": 1, "d4": 1, "d8": 1, "d1": 0}
    assert recall_at_k(RANKED, relevance, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, relevance, 4) == pytest.approx(2 / 3)
    assert mrr_at_k(RANKED, relevance, 10) == pytest.approx(1 / 2)
    assert mrr_at_k(RANKED, relevance, 1) == 0.0
    assert mrr_at_k(RANKED, {"d4": 3}, 10) == pytest.approx(1 / 4)
    with pytest.raises(InputError):
        recall_at_k(RANKED, relevance, 0)


# -- the benchmarks on a model with chosen embeddings ---------------------------------------


def unit(angle_degrees: float) -> list[float]:
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


def test_evaluate_sts_ranks_cosine_against_gold():
    # pair i has cosine cos(angle_i); gold follows the same order except pairs 3 and 4 swap
    angles = [80, 60, 40, 20, 10, 0]
    gold = [0.0, 1.0, 2.0, 4.0, 3.0, 5.0]
    table = {"anchor": unit(0)} | {f"s{i}": unit(a) for i, a in enumerate(angles)}
    model = TableModel(table)
    results = evaluate_sts(model, ["anchor"] * 6, [f"s{i}" for i in range(6)], gold, bootstrap=200)
    cosine = [math.cos(math.radians(a)) for a in angles]
    assert results["spearman"] == pytest.approx(100 * scipy.stats.spearmanr(cosine, gold).statistic)
    assert results["spearman"] == pytest.approx(100 * (1 - 6 * 2 / (6 * 35)))  # one swap: d^2 sum 2
    low, high = results["spearman_ci"]
    assert low <= results["spearman"] <= high <= 100
    assert results["pairs"] == 6
    assert results["model"]["components"] == {"backbone": {"name": "table"}}
    # each distinct sentence is embedded once
    assert sorted(model.calls[0]) == sorted(set(table))


def test_evaluate_sts_refuses_misaligned_data():
    model = TableModel({"a": [1, 0], "b": [0, 1]})
    with pytest.raises(InputError, match="aligned"):
        evaluate_sts(model, ["a", "b"], ["b"], [1.0, 2.0])


def test_evaluate_sts_refuses_an_undefined_spearman_instead_of_reporting_nan():
    # a model that gives every text the same vector (cls pooling under causal attention did,
    # in the pooling x attention study): every cosine is 1, Spearman is NaN
    same = TableModel({"a": [1, 0], "b": [1, 0], "c": [1, 0]})
    with pytest.raises(NonFiniteError, match="same cosine similarity.*undefined"):
        evaluate_sts(same, ["a", "b"], ["b", "c"], [1.0, 2.0])
    varied = TableModel({"a": unit(0), "b": unit(30), "c": unit(80)})
    with pytest.raises(InputError, match="same gold score"):
        evaluate_sts(varied, ["a", "b"], ["b", "c"], [3.0, 3.0])
    assert evaluate_sts(varied, ["a", "b", "a"], ["b", "c", "c"], [3.0, 2.0, 1.0], bootstrap=20)["spearman"] == pytest.approx(100)


def toy_retrieval():
    """Three queries; documents at known angles so the ranking of each query is fixed."""
    corpus = {"d0": "doc0", "d1": "doc1", "d2": "doc2", "d3": "doc3"}
    table = {"doc0": unit(0), "doc1": unit(30), "doc2": unit(60), "doc3": unit(90)}
    # q_a at 5 degrees ranks d0, d1, d2, d3; q_b at 85 ranks d3, d2, d1, d0; q_c at 40 ranks d1, d2, d0, d3
    table |= {"qa": unit(5), "qb": unit(85), "qc": unit(40), "unjudged": unit(50)}
    queries = {"a": "qa", "b": "qb", "c": "qc", "x": "unjudged"}
    qrels = {"a": {"d1": 1, "d3": 2}, "b": {"d3": 1}, "c": {"d3": 1, "d0": 0}}
    return TableModel(table), corpus, queries, qrels


def test_evaluate_retrieval_on_a_toy_computed_by_hand():
    model, corpus, queries, qrels = toy_retrieval()
    made = []

    def factory(dim):
        made.append(dim)
        return ExactIndex(dim=dim)

    results = evaluate_retrieval(model, corpus, queries, qrels, factory, k=2, bootstrap=200)
    log = math.log2
    # a: ranking d0 d1 d2 d3, gains 0 1 0 2; ideal 2 1
    ndcg_a = (1 / log(3) + 2 / log(5)) / (2 + 1 / log(3))
    ndcg_b = 1.0  # d3 first
    ndcg_c = (1 / log(5)) / 1.0  # ranking d1 d2 d0 d3: d3 at rank 4
    assert results["ndcg@10"] == pytest.approx(100 * (ndcg_a + ndcg_b + ndcg_c) / 3)
    # recall@2: a finds d1 of {d1, d3}; b finds d3; c finds nothing
    assert results["recall@2"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    # MRR@10: a first relevant at 2, b at 1, c at 4
    assert results["mrr@10"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 4) / 3)
    for name in ("ndcg@10", "recall@2", "mrr@10"):
        low, high = results[f"{name}_ci"]
        assert low <= results[name] <= high
    assert (results["queries"], results["corpus"], results["k"]) == (3, 4, 2)
    assert made == [2]
    # only judged queries are embedded
    assert sorted(model.calls[1]) == ["qa", "qb", "qc"]


def test_evaluate_retrieval_embeds_queries_with_the_query_prompt():
    model, corpus, queries, qrels = toy_retrieval()
    # with the prompt every query points at d3, which each query judges relevant
    model.table |= {"query: " + text: np.asarray(unit(90), np.float32) for text in queries.values()}
    results = evaluate_retrieval(
        model, corpus, queries, qrels, lambda dim: ExactIndex(dim=dim), query_prompt="query: ", bootstrap=10
    )
    assert results["mrr@10"] == pytest.approx(100.0)


def test_evaluate_retrieval_refuses_judged_queries_without_text():
    model, corpus, queries, qrels = toy_retrieval()
    del queries["b"]
    with pytest.raises(InputError, match="judged queries have no text"):
        evaluate_retrieval(model, corpus, queries, qrels, lambda dim: ExactIndex(dim=dim))


def test_write_results_is_json_with_model_specs(tmp_path):
    model, corpus, queries, qrels = toy_retrieval()
    results = evaluate_retrieval(model, corpus, queries, qrels, lambda dim: ExactIndex(dim=dim), bootstrap=10)
    path = tmp_path / "out" / "results.json"
    write_results(path, results, model=model)
    written = json.loads(path.read_text())
    assert written["results"]["ndcg@10"] == pytest.approx(results["ndcg@10"])
    assert written["model"]["components"] == model.specs
    assert written["results"]["model"]["dim"] == 2
    assert "embplex_version" in written and written["format"] == evaluation.RESULTS_FORMAT
    assert [p.name for p in path.parent.iterdir()] == ["results.json"], "no temporary files left"


def test_evaluate_sts_on_the_real_model(minilm):
    # paraphrases must score above unrelated pairs: a real, small end-to-end check
    s1 = ["A man is playing a guitar.", "A woman is slicing an onion.", "The cat sleeps.", "Kids play football."]
    s2 = ["A man plays the guitar.", "Someone is cutting an onion.", "A stock market crash.", "The sky is blue."]
    results = evaluate_sts(minilm, s1, s2, [5.0, 4.5, 0.0, 0.2], bootstrap=100)
    assert results["spearman"] > 50


def test_file_wrappers_read_with_embplex_data(tmp_path):
    model, corpus, queries, qrels = toy_retrieval()
    folder = tmp_path / "toy-beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": "", "text": text}) + "\n" for d, text in corpus.items())
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": text}) + "\n" for q, text in queries.items())
    )
    rows = [f"{q}\t{d}\t{s}" for q, judged in qrels.items() for d, s in judged.items()]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    from_files = evaluation.evaluate_beir(model, folder, lambda dim: ExactIndex(dim=dim), bootstrap=10)
    in_memory = evaluate_retrieval(model, corpus, queries, qrels, lambda dim: ExactIndex(dim=dim), bootstrap=10)
    assert from_files["ndcg@10"] == pytest.approx(in_memory["ndcg@10"])
    assert from_files["split"] == "test"

    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\ndoc0\tdoc1\t4.0\ndoc0\tdoc3\t1.0\ndoc0\tdoc2\t2.5\n")
    results = evaluation.evaluate_sts_file(model, sts, bootstrap=10)
    assert results["spearman"] == pytest.approx(100.0) and results["pairs"] == 3


# ---------------------------------------------------------------------------
# Paired change between two evaluations of the same items
# ---------------------------------------------------------------------------


def _retrieval_result(per_query: np.ndarray, ids: list[str]) -> dict:
    return {
        "task": "retrieval",
        "ndcg@10": 100 * float(per_query.mean()),
        "ndcg@10_ci": [0.0, 100.0],
        "per_item": {"ids": ids, "ndcg@10": per_query.tolist()},
    }


def test_paired_change_cancels_what_both_evaluations_share():
    rng = np.random.default_rng(0)
    before = rng.uniform(0, 1, 200)  # queries differ a lot in difficulty...
    after = np.clip(before + rng.normal(0.02, 0.01, 200), 0, 1)  # ...the change is small and steady
    ids = [f"q{i}" for i in range(200)]

    change = evaluation.paired_change(_retrieval_result(before, ids), _retrieval_result(after, ids), n=500)["ndcg@10"]

    assert change["change"] == pytest.approx(100 * (after.mean() - before.mean()))
    low, high = change["change_ci"]
    assert 0 < low < change["change"] < high, "a steady gain is clear of zero once paired"
    unpaired_low, _ = evaluation.bootstrap_ci(after, np.mean, n=500)
    _, unpaired_high = evaluation.bootstrap_ci(before, np.mean, n=500)
    assert unpaired_low < unpaired_high, "the separate intervals overlap: alone they could not tell"


def test_paired_change_of_spearman_resamples_pairs_together():
    gold = np.arange(50, dtype=float)
    same = {"task": "sts", "spearman": 100.0, "spearman_ci": [100.0, 100.0],
            "per_item": {"ids": list(range(50)), "cosine": (gold / 50).tolist(), "gold": gold.tolist()}}
    change = evaluation.paired_change(same, same, n=50)["spearman"]
    assert change == {"change": 0.0, "change_ci": [0.0, 0.0]}


def test_paired_change_refuses_different_items():
    a = _retrieval_result(np.array([0.1, 0.2]), ["q1", "q2"])
    b = _retrieval_result(np.array([0.1, 0.2]), ["q1", "q3"])
    with pytest.raises(InputError, match="same items"):
        evaluation.paired_change(a, b)
    with pytest.raises(InputError, match="per-item"):
        evaluation.paired_change({"task": "retrieval"}, b)
