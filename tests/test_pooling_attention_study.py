"""The pooling x attention study (conf/experiment/pooling_attention.yaml and
benchmarks/pooling_attention.py) in smoke mode: the Hydra sweep trains every cell, each
model is evaluated on SciFact and STS-B with bootstrap intervals, and every cell is
compared with mean + bidirectional by a paired bootstrap."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def study():
    spec = importlib.util.spec_from_file_location("pooling_attention", REPO / "benchmarks" / "pooling_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipe_sweeps_every_pooling_under_both_attentions():
    recipe = OmegaConf.load(REPO / "conf" / "experiment" / "pooling_attention.yaml")
    grid = recipe.hydra.sweeper.params
    assert grid.pooling.split(",") == [
        "mean", "cls", "last_token", "max", "weighted_mean",
        "latent_attention", "multi_layer", "attentive_stats", "dupmae", "lexsembridge",
    ]
    assert grid.attention.split(",") == ["bidirectional", "causal"]
    assert recipe.backbone.path == "all-MiniLM-L6-v2" and recipe.train.max_steps


def test_smoke_mode_trains_evaluates_and_compares(tmp_path, tiny_encoder_path, data_dir, monkeypatch):
    monkeypatch.setenv("EMBPLEX_DATA", str(data_dir))
    out = tmp_path / "study"
    status = study().main(["--smoke", "--out", str(out), "--set", f"backbone.path={tiny_encoder_path}", "--bootstrap", "100"])
    assert status == 0
    report = json.loads((out / "results.json").read_text())
    cells = {(c["pooling"], c["attention"]): c for c in report["cells"]}
    assert set(cells) == {(p, a) for p in ("mean", "latent_attention") for a in ("bidirectional", "causal")}
    for cell in cells.values():
        scifact, stsb = cell["results"]["scifact"], cell["results"]["stsb"]
        assert scifact["queries"] == 10 and stsb["pairs"] == 60
        for result, metric in ((scifact, "ndcg@10"), (stsb, "spearman")):
            low, high = result[f"{metric}_ci"]
            assert low <= result[metric] <= high
        for data, metric in (("scifact", "ndcg@10"), ("stsb", "spearman")):
            change = cell["vs_baseline"][data]
            expected = cell["results"][data][metric] - cells[("mean", "bidirectional")]["results"][data][metric]
            assert abs(change["change"] - expected) < 1e-6
    assert cells[("mean", "bidirectional")]["vs_baseline"]["stsb"]["change"] == 0
    # the causal cells really ran under another attention than the baseline
    assert cells[("mean", "causal")]["results"]["stsb"]["spearman"] != cells[("mean", "bidirectional")]["results"]["stsb"]["spearman"]
    table = (out / "pooling-attention.md").read_text()
    assert "baseline" in table and "latent_attention" in table and "--smoke" in table
    assert (out / "pooling-attention.png").stat().st_size > 1000
