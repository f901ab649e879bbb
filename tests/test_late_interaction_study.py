"""The late-interaction study (conf/experiment/late_interaction.yaml and
benchmarks/late_interaction.py) runs end to end in smoke mode and reports what its
results page needs, for every arm."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def study():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("late_interaction_study", REPO / "benchmarks" / "late_interaction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(REPO / "benchmarks"))


def test_smoke_run_reports_quality_size_and_speed_of_every_arm(study, tmp_path, tiny_bert_path, data_dir, monkeypatch):
    monkeypatch.setenv("EMBPLEX_DATA", str(data_dir))
    output = tmp_path / "late_interaction.json"
    study.main([
        "--smoke", "--output", str(output), f"backbone.path={tiny_bert_path}", f"output_dir={tmp_path / 'run'}",
        "index.r_reps=4",  # muvera's options reach the multi-vector arms only
    ])
    result = json.loads(output.read_text())
    assert result["smoke"] is True and "benchmarks/run.py late_interaction" in result["command"]
    assert result["settings"]["training"]["steps"] == 2
    assert result["settings"]["pooling"]["name"] == "multi_vector" and result["settings"]["loss"]["name"] == "late_interaction"
    assert result["settings"]["index"]["r_reps"] == 4
    arms = result["arms"]
    assert set(arms) == {"single_vector", "multi_vector_untrained", "multi_vector_finetuned"}
    assert arms["single_vector"]["bytes_per_document"] == 4 * 32  # the tiny BERT's width
    for name in ("multi_vector_untrained", "multi_vector_finetuned"):
        for search in ("exact_chamfer", "muvera"):
            figures = arms[name][search]
            assert 0 <= figures["ndcg@10"] <= 100 and len(figures["ndcg@10_ci"]) == 2
            assert figures["queries_per_second"] > 0
        assert arms[name]["bytes_per_document"]["fde"] == 4 * 4 * 32 * 16
        assert arms[name]["bytes_per_document"]["vectors"] == pytest.approx(4 * 128 * arms[name]["mean_vectors_per_document"])
        # the smoke corpus is smaller than the candidates: MUVERA re-ranks everything, exactly
        assert arms[name]["muvera"]["recall@10_of_exact_chamfer_top10"] == 1.0
    assert set(result["paired_change"]) == {
        "multi_vector_untrained_vs_single_vector", "multi_vector_finetuned_vs_untrained",
        "multi_vector_finetuned_vs_single_vector", "muvera_vs_exact_chamfer_finetuned",
    }
    assert (tmp_path / "run" / "model" / "embplex.json").exists(), "the fine-tuned model is saved in the run folder"


def _tiny_beir(root: Path) -> Path:
    beir = root / "retrieval" / "scifact"
    (beir / "qrels").mkdir(parents=True)
    topics = ["vitamin d and infection", "guitar lessons", "solar panels", "coffee and sleep", "river floods", "chess openings"]
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"a document about {t}."}) + "\n" for i, t in enumerate(topics))
    )
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"what about {t}?"}) + "\n" for i, t in enumerate(topics))
    )
    header = "query-id\tcorpus-id\tscore\n"
    (beir / "qrels" / "test.tsv").write_text(header + "".join(f"q{i}\td{i}\t1\n" for i in range(6)))
    return root


def test_the_commands_evaluate_and_index_a_multi_vector_model_through_muvera(capsys, tmp_path, tiny_bert_path):
    """`embplex eval` and `embplex index` with pooling=multi_vector index=muvera: the
    evaluation takes sets of vectors, and the saved index is reused (through the core's
    checked loader) by the next `embplex index`."""
    from embplex.cli import main

    common = [
        "pooling=multi_vector", "index=muvera", "pooling.dim=16", f"backbone.path={tiny_bert_path}",
        f"data.root={_tiny_beir(tmp_path / 'data')}", "eval.bootstrap=20", f"output_dir={tmp_path / 'run'}",
    ]
    assert main(["eval", *common]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert results["index"] == "MuveraIndex" and results["queries"] == 6 and 0 <= results["ndcg@10"] <= 100
    assert main(["index", *common, "search.query=guitar lessons"]) == 0
    assert main(["index", *common, "search.query=guitar lessons"]) == 0
    out = capsys.readouterr().out
    assert "reusing the saved index" in out and "d1" in out
