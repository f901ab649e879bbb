"""The index comparison (``benchmarks/bench_indexes.py``, recipe
``conf/experiment/indexes.yaml``) runs end to end in smoke mode and reports what its docs
promise: every setting, with quality, speed, build time and bytes per vector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the comparison includes index 'faiss': pip install 'embplex[faiss]'")
pytest.importorskip("pymilvus", reason="the comparison includes index 'milvus': pip install 'embplex[milvus]'")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_indexes  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir) -> dict:
    output = tmp_path_factory.mktemp("indexes") / "indexes.json"
    environment = {**os.environ, "EMBPLEX_DATA": str(data_dir), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", "indexes", "--smoke", "--output", str(output)],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text(encoding="utf-8"))


def test_every_setting_is_measured_in_each_part(smoke):
    assert smoke["benchmark"] == "indexes" and smoke["smoke"] is True
    for part in ("scifact", "synthetic"):
        expected = [label for label, _, options, parts in bench_indexes.SETTINGS if part in parts]
        rows = smoke[part]["settings"]
        assert [row["setting"] for row in rows] == expected
        for row in rows:
            assert row["build_seconds"] >= 0 and row["queries_per_second"] > 0 and row["bytes_per_vector"] > 0
            assert 0 <= row["recall@10_vs_exact"] <= 1
    by = {part: {row["setting"]: row for row in smoke[part]["settings"]} for part in ("scifact", "synthetic")}
    for part in by:
        assert by[part]["exact"]["recall@10_vs_exact"] == 1.0
        assert by[part]["faiss flat"]["recall@10_vs_exact"] == 1.0
        assert by[part]["exact"]["bytes_per_vector"] == 384 * 4
        assert by[part]["binary 1-bit"]["bytes_per_vector"] == 384 / 8  # codes only: float32 / 32
        assert by[part]["binary 1-bit rescored"]["bytes_per_vector"] == 384 / 8  # the floats are on disk
    scifact = by["scifact"]
    assert 0 < scifact["exact"]["ndcg@10"] <= 100
    assert scifact["faiss flat"]["ndcg@10"] == pytest.approx(scifact["exact"]["ndcg@10"], abs=0.01)
    assert by["synthetic"]["exact"]["recall@10_planted"] == 1.0, "the planted neighbours are the true top 10"


def test_scifact_reports_intervals_and_paired_changes_against_exact(smoke):
    part = smoke["scifact"]
    for row in part["settings"]:
        low, high = row["ndcg@10_ci"]
        assert low <= row["ndcg@10"] <= high
        assert len(row["ndcg@10_per_query"]) == part["queries"] == len(part["query_ids"])
        assert row["ndcg@10"] == pytest.approx(100 * np.mean(row["ndcg@10_per_query"]), abs=0.01)
        change_low, change_high = row["ndcg@10_change_vs_exact_ci"]
        assert change_low <= row["ndcg@10_change_vs_exact"] <= change_high
    exact = part["settings"][0]
    assert exact["setting"] == "exact"
    assert exact["ndcg@10_change_vs_exact"] == 0 and exact["ndcg@10_change_vs_exact_ci"] == [0, 0]
    for row in part["settings"]:  # the change is exactly the difference of the two means
        assert row["ndcg@10_change_vs_exact"] == pytest.approx(row["ndcg@10"] - exact["ndcg@10"], abs=0.02)


def test_planted_vectors_drawn_in_chunks_are_the_same_as_in_one_draw():
    whole, asked = bench_indexes.planted(2000, 5, 64, chunk=10_000)
    chunked, asked_chunked = bench_indexes.planted(2000, 5, 64, chunk=300)  # a ragged last chunk
    np.testing.assert_array_equal(whole, chunked)
    np.testing.assert_array_equal(asked, asked_chunked)
    np.testing.assert_allclose(np.linalg.norm(chunked, axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("arguments, message", [
    (["--parts", "synthetic,lexical"], "--parts"),
    (["--synthetic-settings", "exact,faiss hnsw,faiss hsnw"], "faiss hsnw"),
    (["--synthetic-settings", "milvus lite"], "milvus lite"),  # a setting of the SciFact part only
    (["--items", "500", "--queries", "100"], "at least 10 x --queries"),
])
def test_bad_arguments_are_refused_before_any_work(arguments, message, capsys):
    with pytest.raises(SystemExit):
        bench_indexes.main(arguments)
    assert message in capsys.readouterr().err


def test_the_synthetic_part_runs_only_the_settings_asked_for():
    import embplex

    part = bench_indexes.synthetic_part(embplex.load_registry(), 300, 5, 32, 1, only=["faiss hnsw", "binary 2-bit"],
                                        ef_construction=16)
    rows = part["settings"]
    assert [row["setting"] for row in rows] == ["exact", "faiss hnsw", "binary 2-bit"]
    assert rows[1]["options"]["ef_construction"] == 16
    assert all(row["build_cpu_seconds"] >= 0 and row["search_cpu_seconds_per_query"] > 0 for row in rows)


def test_pareto_plots_are_written(smoke):
    assert len(smoke["plots"]) == 2 and all(Path(p).stat().st_size > 0 for p in smoke["plots"])


def test_the_script_documents_its_smoke_mode():
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_indexes.py", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert completed.returncode == 0 and "--smoke" in completed.stdout


def test_planted_queries_have_their_neighbours_nearest():
    data, queries = bench_indexes.planted(2000, 5, 64)
    scores = queries @ data.T
    top = scores.argsort(axis=1)[:, ::-1][:, :10]
    assert all(sorted(row) == list(range(10 * q, 10 * q + 10)) for q, row in enumerate(top.tolist()))
