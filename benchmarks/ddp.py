"""Data parallelism on one machine: 1 against 2 processes, training and bulk encoding.

Both are launched with ``torchrun --nproc_per_node N`` (gloo on the CPU, NCCL on GPUs),
as a user would launch them; only N changes:

* **training**: all-MiniLM-L6-v2, ``infonce`` (in-batch negatives gathered across the
  processes) and the ``random`` sampler on (anchor, positive) pairs of the SNLI dev
  triplets, the same global batch for 1 and 2 processes. Reported: optimizer steps per
  second (timed from the end of the warm-up steps to the last step, on rank 0) and each
  process's peak resident memory.
* **encoding**: ``embplex.bulk.encode_to_shards`` over the SciFact corpus
  (``shared/data/retrieval/scifact/corpus.jsonl``, 5,183 documents), shards of
  ``--shard-size``; texts per second from the first shard to the last process done
  (model loading left out), and whether the 2-process shards are byte-identical to the
  1-process ones (they must be, with the same threads per process).

The CPU threads are split evenly: 1 process gets every usable core, 2 processes half each
(``OMP_NUM_THREADS``), so both runs use the same cores.

    python benchmarks/run.py ddp            # a few minutes on 2 cores
    python benchmarks/run.py ddp --smoke    # seconds: tiny counts, for CI
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

NAME = "ddp"
SEED = 42


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------
# the workers (one per process, started by torchrun)
# ---------------------------------------------------------------------------


def worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    import embplex
    from embplex import distributed
    from embplex.components import Example
    from embplex.training import TrainSettings, train

    registry = embplex.load_registry()
    model = embplex.compose({"name": "hf_encoder", "path": spec["model"]}, pooling="mean", registry=registry, device="cpu")
    examples = [Example(anchor=a, positive=p) for a, p in common.snli_pairs(spec["batch_size"] * spec["steps"])]
    settings = TrainSettings(
        batch_size=spec["batch_size"], max_steps=spec["steps"], lr=2e-5, seed=SEED, log_every=1,
        progress_bar=False, tensorboard=False, warmup_ratio=0.1,
    )
    stamps: list[float] = []
    before = common.current_rss_mib()
    train(
        model, examples, registry.create("loss", "infonce"), registry.create("sampler", "random"), settings,
        output_dir=spec["output"], registry=registry, callbacks=[lambda info: stamps.append(time.perf_counter())],
    )
    memory = distributed.gather_object({"peak_rss_mib": common.peak_rss_mib(), "rss_before_training_mib": before})
    timed = stamps[spec["warmup_steps"] - 1 :] if stamps else []
    steps_per_second = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else None
    return {"steps_per_second": steps_per_second, "processes": memory}


def worker_encode(spec: dict[str, Any]) -> dict[str, Any]:
    import embplex
    from embplex import bulk, distributed
    from embplex.app import model_fingerprint

    model = embplex.compose({"name": "hf_encoder", "path": spec["model"]}, pooling="mean", device="cpu")
    distributed.setup(3600)
    fingerprint = model_fingerprint(model)
    distributed.barrier()  # every process has its model: time the encoding alone
    started = time.perf_counter()
    job = bulk.EncodeJob(batch_size=spec["batch_size"], shard_size=spec["shard_size"])
    manifest = bulk.encode_to_shards(model, spec["input"], spec["output"], job, fingerprint, show_progress=False)
    seconds = time.perf_counter() - started  # encode_to_shards ends on a barrier: the slowest process
    # no memory figure: the process trained first, so its peak is the training's
    return {"seconds": seconds, "texts": manifest["input"]["rows"]}


def worker_main(spec_path: str) -> None:
    """Train, then encode, in one launch (the start-up, a few seconds, is paid once)."""
    from embplex import distributed

    spec = json.loads(Path(spec_path).read_text())
    result = {"train": worker_train(spec["train"]), "encode": worker_encode(spec["encode"])}
    if distributed.rank() == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    distributed.shutdown()


# ---------------------------------------------------------------------------
# the launcher
# ---------------------------------------------------------------------------


def launch(processes: int, spec: dict[str, Any], folder: Path, threads: int) -> dict[str, Any]:
    spec = dict(spec, result=str(folder / f"result-{processes}.json"))
    spec_path = folder / f"spec-{processes}.json"
    spec_path.write_text(json.dumps(spec))
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--nproc_per_node", str(processes), "--master_port", str(_free_port()),
        str(Path(__file__).resolve()), "--worker", str(spec_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    for part in result.values():
        part["omp_threads_per_process"] = threads
    result["wall_seconds_with_start_up"] = time.perf_counter() - started
    return result


def _corpus(folder: Path, limit: int | None) -> Path:
    source = common.DATA / "retrieval" / "scifact" / "corpus.jsonl"
    if limit is None:
        return source
    subset = folder / "corpus.jsonl"
    with source.open(encoding="utf-8") as handle:
        subset.write_text("".join(line for _, line in zip(range(limit), handle)), encoding="utf-8")
    return subset


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--batch-size", type=int, default=64, help="global training batch (split over the processes)")
    parse.add_argument("--steps", type=int, default=20, help="optimizer steps per run, warm-up included")
    parse.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    parse.add_argument("--shard-size", type=int, default=256, help="rows per encoding shard")
    parse.add_argument("--encode-batch-size", type=int, default=64)
    parse.add_argument("--corpus-limit", type=int, default=None, help="encode only the first N documents")
    parse.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2)")
    args = parse.parse_args(argv)
    if args.smoke:
        args.batch_size, args.steps, args.warmup_steps = 8, 4, 1
        args.shard_size, args.corpus_limit = 16, args.corpus_limit or 48
    model = args.model or common.minilm_path()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    result: dict[str, Any] = {
        "benchmark": NAME,
        "command": f"{Path(sys.executable).name} benchmarks/run.py {NAME} --json" + (" --smoke" if args.smoke else ""),
        "smoke": args.smoke,
        "finished": None,
        "machine": common.machine_info(),
        "settings": {
            "model": args.model or common.MODEL_NAME,
            "launcher": "torchrun --nproc_per_node N (gloo on the CPU)",
            "train": {"global_batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
                      "loss": "infonce (gathered across processes)", "sampler": "random",
                      "data": "SNLI dev triplets, (anchor, positive) pairs"},
            "encode": {"data": "SciFact corpus.jsonl" + (f", first {args.corpus_limit} documents" if args.corpus_limit else ""),
                       "shard_size": args.shard_size, "batch_size": args.encode_batch_size},
            "usable_cores": cores,
        },
        "train": {},
        "encode": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = _corpus(folder, args.corpus_limit)
        for processes in (1, 2):
            threads = max(1, cores // processes)
            spec = {
                "train": {"model": model, "batch_size": args.batch_size, "steps": args.steps,
                          "warmup_steps": args.warmup_steps, "output": str(folder / f"train-{processes}")},
                "encode": {"model": model, "input": str(corpus), "output": str(folder / f"encode-{processes}"),
                           "shard_size": args.shard_size, "batch_size": args.encode_batch_size},
            }
            figures = launch(processes, spec, folder, threads)
            figures["encode"]["texts_per_second"] = figures["encode"]["texts"] / figures["encode"]["seconds"]
            result["train"][str(processes)] = figures["train"]
            result["encode"][str(processes)] = figures["encode"]
            result.setdefault("wall_seconds_with_start_up", {})[str(processes)] = figures["wall_seconds_with_start_up"]
        shards = {p: {f.name: f.read_bytes() for f in sorted((folder / f"encode-{p}").glob("shard-*.parquet"))} for p in (1, 2)}
        # equal only with equal threads per process; noted, not required, when they differ
        result["encode"]["shards_identical_1_vs_2"] = shards[1] == shards[2]
    one, two = result["train"]["1"], result["train"]["2"]
    result["ratios"] = {
        "train_steps_per_second_2_over_1": (two["steps_per_second"] / one["steps_per_second"])
        if one["steps_per_second"] and two["steps_per_second"] else None,
        "train_peak_rss_per_process_2_over_1": max(p["peak_rss_mib"] for p in two["processes"])
        / max(p["peak_rss_mib"] for p in one["processes"]),
        "encode_texts_per_second_2_over_1": result["encode"]["2"]["texts_per_second"] / result["encode"]["1"]["texts_per_second"],
    }
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return common.finish(result, args, NAME)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
    else:
        main()
