"""Throughput and peak memory against input length: embplex against sentence-transformers.

Texts of exactly 32, 64, 128, 256 and 512 tokens (special tokens included) are cut from
the Paul Graham essays; each length gets about 16k tokens of text (512 texts of 32
tokens ... 32 of 512). All encoders use batch size 64 and a 512-token limit:

* ``st_fp32``: sentence-transformers, float32 (``max_seq_length = 512``);
* ``ours_fp32``: hf_encoder + mean pooling, the default;
* ``ours_fast``: the same with ``precision=fast``.

Each encoder lives in its own worker process, so its peak RSS (``getrusage``) is its
own; the parent hands the workers the same job in turns (interleaved), lengths in
increasing order, so a worker's peak RSS after a length is its peak at that length.

    python benchmarks/bench_length.py            # about 5 minutes on 2 cores
    python benchmarks/bench_length.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

NAME = "length"
ENCODERS = ("st_fp32", "ours_fp32", "ours_fast")
MAX_LENGTH = 512


def texts_of_length(tokenizer: Any, length: int, count: int) -> list[str]:
    """``count`` texts that tokenize to ``length`` tokens with special tokens, cut from
    consecutive, non-overlapping stretches of the essays (each starting at a whole word)."""
    ids = tokenizer(" ".join(common.essay_text()), add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    body = length - 2
    texts: list[str] = []
    start = 0
    while len(texts) < count:
        while tokens[start].startswith("##"):
            start += 1
        end = start + body
        if end >= len(ids):
            raise SystemExit(f"the essays are too short for {count} texts of {length} tokens")
        text = tokenizer.decode(ids[start:end])
        # decoding can merge or split a piece; trim or skip until the count is exact
        while len(tokenizer(text)["input_ids"]) > length:
            text = text.rsplit(" ", 1)[0]
        if len(tokenizer(text)["input_ids"]) == length:
            texts.append(text)
        start = end
    return texts


def worker(which: str) -> None:
    """Serve jobs from stdin (one JSON line each), answer with one JSON line each."""
    import torch
    from transformers import AutoTokenizer

    path = common.minilm_path()
    if which == "st_fp32":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device="cpu")
        model.max_seq_length = MAX_LENGTH

        def encode(texts: list[str], batch_size: int) -> Any:
            return model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    else:
        import embplex

        precision = "fast" if which == "ours_fast" else "fp32"
        model = embplex.compose(
            {"name": "hf_encoder", "path": path, "precision": precision, "max_length": MAX_LENGTH}, pooling="mean"
        )

        def encode(texts: list[str], batch_size: int) -> Any:
            return model.encode(texts, batch_size=batch_size, show_progress=False)

    tokenizer = AutoTokenizer.from_pretrained(path)
    cache: dict[tuple[int, int], list[str]] = {}
    loaded_rss = common.current_rss_mib()
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "rss_after_load_mib": loaded_rss}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        key = (job["length"], job["count"])
        if key not in cache:
            cache[key] = texts_of_length(tokenizer, *key)
        cpu_before = common.own_cpu_seconds()
        started = time.perf_counter()
        encode(cache[key], job["batch_size"])
        seconds = time.perf_counter() - started
        print(json.dumps({
            "seconds": seconds,
            "cpu_seconds": common.own_cpu_seconds() - cpu_before,
            "peak_rss_mib": common.peak_rss_mib(),
            "rss_after_load_mib": loaded_rss,
        }), flush=True)


class Worker:
    def __init__(self, which: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", which],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=common.REPO,
        )
        self.hello = self._answer()

    def _answer(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.process.wait()}")
        return json.loads(line)

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parse.add_argument("--tokens-per-length", type=int, default=16384, help="text tokens encoded per length")
    parse.add_argument("--batch-size", type=int, default=64)
    parse.add_argument("--repetitions", type=int, default=5)
    parse.add_argument("--quiet-wait", type=float, default=30.0, help="seconds to wait for a quiet machine per repetition")
    parse.add_argument("--worker", choices=ENCODERS, help=argparse.SUPPRESS)
    args = parse.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    if args.smoke:
        args.lengths, args.tokens_per_length, args.repetitions, args.quiet_wait = [32, 64], 256, 1, 0.0
    if any(not 3 <= length <= MAX_LENGTH for length in args.lengths):
        raise SystemExit(f"lengths must be between 3 and {MAX_LENGTH}")

    machine = common.machine_info()
    workers = {which: Worker(which) for which in ENCODERS}
    per_length: list[dict[str, Any]] = []
    try:
        for length in sorted(args.lengths):
            count = max(4, args.tokens_per_length // length)
            job = {"length": length, "count": count, "batch_size": args.batch_size}
            for which in ENCODERS:  # warm-up (and building the texts)
                workers[which].run(job)
            answers: dict[str, list[dict[str, Any]]] = {which: [] for which in ENCODERS}
            for repetition in range(args.repetitions):
                if args.quiet_wait:
                    common.wait_for_quiet(args.quiet_wait)
                for which in ENCODERS if repetition % 2 == 0 else tuple(reversed(ENCODERS)):
                    with common.ForeignLoad() as load:
                        answer = workers[which].run(job)
                        load.extra_own = answer["cpu_seconds"]
                    answer["foreign_cpu_share"] = load.share
                    answers[which].append(answer)
            row: dict[str, Any] = {"length": length, "texts": count, "tokens": count * length}
            for which, replies in answers.items():
                seconds = [r["seconds"] for r in replies]
                median = statistics.median(seconds)
                row[which] = {
                    "median_seconds": median,
                    "texts_per_second": count / median,
                    "tokens_per_second": count * length / median,
                    "seconds": seconds,
                    "foreign_cpu_share": [r["foreign_cpu_share"] for r in replies],
                    "peak_rss_mib": replies[-1]["peak_rss_mib"],
                    "peak_rss_over_loaded_mib": replies[-1]["peak_rss_mib"] - replies[-1]["rss_after_load_mib"],
                }
            def versus(ours_name: str) -> dict[str, Any]:
                return common.ratio(
                    row["st_fp32"]["seconds"], row[ours_name]["seconds"],
                    row["st_fp32"]["foreign_cpu_share"], row[ours_name]["foreign_cpu_share"],
                )

            row["ratios"] = {
                "ours_fp32_vs_st_fp32": versus("ours_fp32"),
                "ours_fast_vs_st_fp32": versus("ours_fast"),
                "peak_rss_ours_fp32_over_st": row["ours_fp32"]["peak_rss_mib"] / row["st_fp32"]["peak_rss_mib"],
                "peak_rss_ours_fast_over_st": row["ours_fast"]["peak_rss_mib"] / row["st_fp32"]["peak_rss_mib"],
            }
            per_length.append(row)
    finally:
        for process in workers.values():
            process.close()

    result = {
        "benchmark": NAME,
        "command": "python benchmarks/run.py length --json" + (" --smoke" if args.smoke else ""),
        "smoke": args.smoke,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            "model": common.MODEL_NAME,
            "max_length": MAX_LENGTH,
            "batch_size": args.batch_size,
            "repetitions": args.repetitions,
            "warmup_runs": 1,
            "tokens_per_length": args.tokens_per_length,
            "interleaved": True,
            "quiet_wait_seconds": args.quiet_wait,
            "quiet_share": common.QUIET_SHARE,
            "one_process_per_encoder": True,
            "worker_threads": {which: w.hello["threads"] for which, w in workers.items()},
        },
        "rss_after_load_mib": {which: w.hello["rss_after_load_mib"] for which, w in workers.items()},
        "lengths": per_length,
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return common.finish(result, args, NAME)


if __name__ == "__main__":
    main()
