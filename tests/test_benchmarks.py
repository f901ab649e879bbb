"""Every benchmark runs alone in smoke mode and writes the result its docs describe.

Benchmarks are not tests: nothing here asserts a speed. What is checked is that each
script runs end to end on the real model and data (tiny counts, one repetition) and that
its JSON carries the machine, the settings, every figure and the ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_smoke(name: str, tmp_path: Path, data_dir: Path) -> dict:
    output = tmp_path / f"{name}.json"
    environment = {**os.environ, "EMBPLEX_DATA": str(data_dir), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", name, "--smoke", "--output", str(output)],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text(encoding="utf-8"))


def check_common(result: dict, name: str) -> None:
    assert result["benchmark"] == name
    assert result["smoke"] is True
    assert f"benchmarks/run.py {name}" in result["command"]
    machine = result["machine"]
    for key in ("cpu_model", "logical_cpus", "torch", "transformers", "sentence_transformers", "torch_threads"):
        assert machine[key], key
    assert "avx512_bf16" in machine["cpu_flags"]
    assert result["settings"]["interleaved"] is True


def test_encode_benchmark_reports_speed_quality_and_roofline(tmp_path, data_dir):
    result = run_smoke("encode", tmp_path, data_dir)
    check_common(result, "encode")
    encoders = {"st_fp32", "st_bf16", "ours_fp32", "ours_fast", "ours_bf16"}
    assert set(result["throughput"]) == encoders
    for figures in result["throughput"].values():
        assert figures["items_per_second"] > 0 and len(figures["seconds"]) == result["settings"]["repetitions"]
    for pair in ("ours_fp32_vs_st_fp32", "ours_fast_vs_st_bf16", "ours_fast_vs_st_fp32"):
        assert result["ratios"][pair]["median_of_paired"] > 0
    quality = result["quality"]
    # the default path reproduces sentence-transformers even in a smoke run
    assert quality["ours_fp32_vs_st_fp32_max_abs_diff"] < 1e-5
    assert set(quality["min_cosine_to_ours_fp32"]) == encoders
    assert set(quality["stsb_spearman"]) == encoders and quality["stsb_pairs"] > 0
    roofline = result["roofline"]
    assert roofline["matmul_flops_per_token"] == 6 * 2 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert roofline["measured_peak"]["fp32_flops"] > 0 and roofline["measured_peak"]["bf16_flops"] > 0
    assert roofline["theoretical_peak"]["assumptions"]
    assert 0 < roofline["fast_fraction_of_measured_peak"]
    padding = result["padding"]
    assert padding["padded_tokens_token_budget_batches"] >= padding["real_tokens"]
    assert padding["padded_tokens_text_count_batches"] >= padding["real_tokens"]
    assert {"fp32_speed_vs_st_fp32", "fast_speed_vs_st_bf16", "fast_min_cosine"} <= set(result["targets"])


def test_train_benchmark_reports_steps_per_second_and_peak_memory(tmp_path, data_dir):
    result = run_smoke("train", tmp_path, data_dir)
    check_common(result, "train")
    for side in ("ours", "st"):
        figures = result[side]
        assert figures["steps_per_second_median"] > 0
        assert figures["peak_rss_mib_median"] > figures["rss_before_training_mib_median"] > 0
        assert len(figures["steps_per_second"]) == result["settings"]["repetitions"]
    assert result["ours"]["trainer"] == "embplex.training.train"
    assert "MultipleNegativesRankingLoss" in result["st"]["trainer"] or result["st"]["trainer"] == "SentenceTransformerTrainer"
    assert result["ratios"]["steps_per_second_ours_vs_st"]["median_of_paired"] > 0
    assert result["ratios"]["peak_rss_ours_over_st"] > 0
    tokens = result["tokens"]
    assert tokens["real"] <= tokens["length_groups"] <= tokens["padded_per_batch"]


def test_ddp_benchmark_reports_one_and_two_processes(tmp_path, data_dir):
    result = run_smoke("ddp", tmp_path, data_dir)
    assert result["benchmark"] == "ddp" and result["smoke"] is True
    assert "benchmarks/run.py ddp" in result["command"]
    for processes in ("1", "2"):
        train, encode = result["train"][processes], result["encode"][processes]
        assert train["steps_per_second"] > 0
        assert len(train["processes"]) == int(processes) and all(p["peak_rss_mib"] > 0 for p in train["processes"])
        assert encode["texts"] == 48 and encode["texts_per_second"] > 0
    assert isinstance(result["encode"]["shards_identical_1_vs_2"], bool)
    assert set(result["ratios"]) == {
        "train_steps_per_second_2_over_1", "train_peak_rss_per_process_2_over_1", "encode_texts_per_second_2_over_1"
    }


def test_length_benchmark_reports_each_length_for_each_encoder(tmp_path, data_dir):
    result = run_smoke("length", tmp_path, data_dir)
    check_common(result, "length")
    assert [row["length"] for row in result["lengths"]] == [32, 64]
    for row in result["lengths"]:
        for encoder in ("st_fp32", "ours_fp32", "ours_fast"):
            figures = row[encoder]
            assert figures["tokens_per_second"] > 0 and figures["peak_rss_mib"] > 0
        assert row["ratios"]["ours_fast_vs_st_fp32"]["median_of_paired"] > 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    picture = report.plot_length(result, tmp_path / "length.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_length_benchmark_texts_have_the_exact_token_count(minilm_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_length
    finally:
        sys.path.pop(0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    for length in (32, 128):
        texts = bench_length.texts_of_length(tokenizer, length, 5)
        assert len(set(texts)) == 5
        assert [len(tokenizer(t)["input_ids"]) for t in texts] == [length] * 5


def test_benchmark_sentences_are_deterministic_real_and_in_range(data_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setenv("EMBPLEX_DATA", str(data_dir))
    import common

    first, again = common.benchmark_sentences(200), common.benchmark_sentences(200)
    assert first == again and len(set(first)) == 200
    assert all(5 <= len(s.split()) <= 60 for s in first)


def test_run_py_refuses_an_unknown_benchmark():
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", "nonsense"], cwd=REPO, capture_output=True, text=True
    )
    assert completed.returncode == 2 and "encode" in completed.stderr


@pytest.mark.parametrize("script", ["bench_encode.py", "bench_train.py", "bench_length.py", "gpu_check.py", "ddp.py"])
def test_each_script_documents_its_smoke_mode(script):
    completed = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert completed.returncode == 0 and "--smoke" in completed.stdout


def test_the_gpu_check_runs_on_the_cpu_and_fills_every_row(tmp_path, data_dir, tiny_bert_path):
    # the script a session with a GPU runs once; here on the CPU, on a tiny model, so that
    # it is known to work before device time is spent on it
    output = tmp_path / "gpu.json"
    environment = {**os.environ, "EMBPLEX_DATA": str(data_dir), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--model", tiny_bert_path,
         "--output", str(output)],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text(encoding="utf-8"))
    assert result["machine"]["device"] == "cpu" and result["smoke"] is True
    assert result["parity"]["max_abs_difference"] <= 1e-5, "the same weights give the same fp32 vectors"
    assert abs(result["parity"]["spearman_ours"] - result["parity"]["spearman_st"]) < 0.01
    encode = result["encode"]
    assert encode["ours_fast_texts_per_second"] > 0 and encode["st_best"]["texts_per_second"] > 0
    assert encode["ours_fast_min_cosine"] > 0.99
    for side in ("ours", "st"):
        assert result["train"][side]["steps_per_second"] > 0
    lora = result["lora"]
    assert "skipped" in lora or (lora["finite"] and lora["trainable_parameters"] > 0)
    table = completed.stdout
    for row in ("parity, max abs difference", "encode, texts/s", "train, steps/s", "lora, loss"):
        assert row in table
def test_serve_benchmark_reports_throughput_and_latency_per_concurrency(tmp_path, data_dir):
    pytest.importorskip("fastapi")
    result = run_smoke("serve", tmp_path, data_dir)
    assert result["benchmark"] == "serve" and result["smoke"] is True
    assert "benchmarks/run.py serve" in result["command"]
    assert result["machine"]["torch"] and result["machine"]["logical_cpus"]
    levels = [str(c) for c in result["settings"]["clients"]]
    assert set(result["results"]) == {"embplex_batching", "embplex_no_batching", "st_fastapi"}
    for server, by_clients in result["results"].items():
        assert list(by_clients) == levels
        for figures in by_clients.values():
            assert figures["errors"] == 0 and figures["texts_per_second"] > 0
            assert 0 < figures["p50_ms"] <= figures["p99_ms"]
            # every server, the baseline included, returns the model's vectors
            assert figures["max_abs_diff_vs_encode"] < 1e-5, server
    assert all(value > 0 for value in result["ratios"].values())


def run_long_context_cost(tmp_path: Path, data_dir: Path, *arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "EMBPLEX_DATA": str(data_dir), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "benchmarks/run.py", "long_context_cost", *arguments],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600,
    )


def test_long_context_cost_reports_speed_and_memory_per_length_and_plots_them(tmp_path, data_dir):
    output = tmp_path / "cost.json"
    completed = run_long_context_cost(
        tmp_path, data_dir, "--smoke", "--only", "truncation,pi+temp+lambda+sink", "--output", str(output)
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text(encoding="utf-8"))
    assert result["benchmark"] == "long_context_cost" and result["smoke"] is True
    cells = [(row["configuration"], row["length"]) for row in result["rows"]]
    # the plain model stops at its 512 positions; the extended one goes on
    assert cells == [("truncation", 256), ("pi+temp+lambda+sink", 256), ("pi+temp+lambda+sink", 1024)]
    for row in result["rows"]:
        assert row["out_of_memory"] is False
        assert row["tokens_per_second"] > 0
        assert row["peak_rss_mib"] >= row["rss_after_load_mib"] > 0
    assert result["settings"]["target_length"] == 1024
    assert output.with_suffix(".png").stat().st_size > 0


def test_long_context_cost_reports_a_cell_beyond_its_memory_ceiling_as_out_of_memory(tmp_path, data_dir):
    # an address-space ceiling below what the loaded model already maps: the first new
    # tensor fails, and the cell says so instead of crashing the run
    completed = run_long_context_cost(
        tmp_path, data_dir, "--cell", "pi", "1024", "--lengths", "1024", "--texts", "1", "--memory-gib", "0.5"
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    assert answer["out_of_memory"] is True and "seconds" not in answer


def test_gradcache_memory_reports_peak_memory_per_loss_and_batch_size(tmp_path, data_dir, tiny_bert_path):
    output = tmp_path / "memory.json"
    environment = {**os.environ, "EMBPLEX_DATA": str(data_dir), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "benchmarks/run.py", "gradcache_memory", "--smoke", "--model", tiny_bert_path,
         "--only", "cached_infonce", "--output", str(output)],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text(encoding="utf-8"))
    assert result["benchmark"] == "gradcache_memory" and result["smoke"] is True
    cells = [(row["loss"], row["batch_size"]) for row in result["rows"]]
    assert cells == [("cached_infonce", 8), ("cached_infonce", 32)]
    for row in result["rows"]:
        assert row["out_of_memory"] is False
        assert row["seconds_per_step"] > 0
        assert row["peak_rss_mib"] >= row["rss_after_load_mib"] > 0
    assert output.with_suffix(".png").stat().st_size > 0


def test_training_plots_draw_each_study_whose_json_exists(tmp_path):
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        training_plots = importlib.import_module("training_plots")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    runs = tmp_path / "runs"
    (runs / "negatives").mkdir(parents=True)
    (runs / "negatives" / "negatives.json").write_text(json.dumps({"arms": {
        "in_batch": {"ndcg@10": 66.0, "ndcg@10_ci": [62.0, 70.0]},
        "focal_infonce": {"ndcg@10": 65.0, "ndcg@10_ci": [61.0, 69.0], "change_vs_in_batch": -1.0,
                          "change_ci": [-2.0, 0.5], "significant": False},
    }}))
    for data_set in ("snli", "scifact"):  # one JSON per --datasets run, merged into one plot
        (runs / "length_buckets" / data_set).mkdir(parents=True)
        (runs / "length_buckets" / data_set / "length_buckets.json").write_text(json.dumps({
            "smoke": False,
            f"{data_set}/length_buckets": {"waste": 0.1, "real_tokens_per_s": 1200.0},
            f"{data_set}/no_duplicates": {"waste": 0.4, "real_tokens_per_s": 800.0},
        }))
    output = tmp_path / "plots"
    output.mkdir()
    training_plots.main(["--runs", str(runs), "--output", str(output)])
    # distillation.json is absent: no plot for it, and no error
    assert sorted(p.name for p in output.iterdir()) == ["training-length-buckets.png", "training-negatives.png"]
