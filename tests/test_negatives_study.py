"""The recipes of the negatives and length-buckets studies, in smoke mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from embplex.config import compose_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_negatives_arm_composes(registry):
    study = _script("negatives")
    for arm, overrides in study.ARMS.items():
        cfg = compose_config(["experiment=negatives", *overrides], registry=registry)
        assert cfg["data"]["name"] == "scifact" and cfg["train"]["max_steps"] == 50, arm
        chosen = dict(o.split("=") for o in overrides if "." not in o.split("=")[0])
        assert cfg["sampler"]["name"] == chosen.get("sampler", "no_duplicates"), arm
        assert cfg["loss"]["name"] == chosen.get("loss", "infonce"), arm
        for override in overrides:  # every option override reached the component
            key, value = override.split("=")
            if "." in key:
                kind, option = key.split(".")
                assert str(cfg[kind][option]) == value, override


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_negatives_study_smoke(tmp_path, data_dir):
    study = _script("negatives")
    summary = study.main(["--smoke", "--output", str(tmp_path), "--data", str(data_dir), "--arms", "in_batch", "refresh_mining", "hard_negative_mixing"])
    saved = json.loads((tmp_path / "negatives.json").read_text())
    assert saved["smoke"] is True and list(saved["arms"]) == ["in_batch", "refresh_mining", "hard_negative_mixing"]
    for arm in ("refresh_mining", "hard_negative_mixing"):
        row = summary[arm]
        low, high = row["change_ci"]
        assert low <= row["change_vs_in_batch"] <= high and isinstance(row["significant"], bool)
    # each arm trained its own model
    assert all((tmp_path / arm / "model" / "embplex.json").exists() for arm in saved["arms"])


def test_length_buckets_study_smoke(tmp_path, data_dir):
    study = _script("length_buckets")
    report = study.main(["--smoke", "--output", str(tmp_path), "--data", str(data_dir)])
    assert json.loads((tmp_path / "length_buckets.json").read_text())["smoke"] is True
    for data in ("snli", "scifact"):
        plain, buckets = report[f"{data}/no_duplicates"], report[f"{data}/length_buckets"]
        # equal tokens seen: length_buckets stops once it has seen what no_duplicates saw
        target, seen = plain["trained_real_tokens"], buckets["trained_real_tokens"]
        assert seen >= target and seen - max(buckets["real_tokens"]) < target
        if plain["steps"] > plain["batches"]:  # a run longer than one epoch counts the later epochs' tokens too
            assert target > sum(plain["real_tokens"])
        else:
            assert target == sum(plain["real_tokens"][: plain["steps"]])
        assert buckets["waste"] <= plain["waste"] and all(row["steps_per_s"] > 0 for row in (plain, buckets))
