"""The index comparison (``benchmarks/bench_indexes.py``, recipe
``conf/experiment/indexes.yaml``) runs end to end in smoke mode and reports what its docs
promise: every setting, with quality, speed, build time and bytes per vector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
