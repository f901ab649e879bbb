"""The distillation study (conf/experiment/distillation.yaml, benchmarks/distillation.py)
runs end to end in smoke mode: its five sweeps, every loss on both data sets, the floor and
the ceiling. Nothing here asserts a quality: the smoke run trains a tiny random BERT."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from embplex.config import compose_config

REPO = Path(__file__).resolve().parents[1]


def test_the_recipe_distils_the_six_layer_model_into_its_first_two_blocks(registry):
    cfg = compose_config(["experiment=distillation"], registry=registry)
    assert cfg["backbone"]["num_layers"] == 2 and cfg["backbone"]["path"] == "all-MiniLM-L6-v2"
    assert cfg["teacher"]["backbone"] == "hf_encoder" and cfg["teacher"]["load"] is None
    assert cfg["teacher"]["cache"]
    swept = compose_config(["experiment=distillation", "loss=soft_label", "++loss.in_batch=true"], registry=registry)
    assert swept["loss"]["in_batch"] is True


def test_the_smoke_mode_runs_every_sweep(tmp_path, data_dir):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "benchmarks/distillation.py", "--smoke", "--output", str(tmp_path), "--data", str(data_dir)],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "distillation.json").read_text(encoding="utf-8"))
    rows = results["rows"]
    assert set(rows) == {
        "student, untrained (floor)", "infonce", "score_distill", "listwise_distill", "soft_label", "teacher (ceiling)"
    }
    for name, by_data in rows.items():
        assert set(by_data) == {"stsb", "scifact"}, name
        for metrics in by_data.values():
            assert all(math.isfinite(v) for key, v in metrics.items() if not key.endswith("_ci")), name
            for key in [k for k in metrics if not k.endswith("_ci")]:
                low, high = metrics[f"{key}_ci"]  # every metric carries its 95% interval
                assert low <= metrics[key] <= high, (name, key)
        assert "spearman" in by_data["stsb"] and "ndcg@10" in by_data["scifact"], name
    assert (tmp_path / "teacher-cache.safetensors").exists()  # the teacher ran, and its vectors were kept
    for job in json.loads((tmp_path / "train-distill" / "multirun_summary.json").read_text())["jobs"]:
        assert "++loss.in_batch=true" in [o.lower() for o in job["overrides"]] and job["metrics"]["loss"] > 0
    assert "| teacher (ceiling) |" in completed.stdout
