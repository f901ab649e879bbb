"""Training speed and memory: embplex's trainer against sentence-transformers'.

Both fine-tune all-MiniLM-L6-v2 on the same (anchor, positive) pairs of the SNLI dev
triplets with in-batch negatives at the same batch size, float32, AdamW at 2e-5 with
weight decay 0.01, linear warm-up, gradient clipping at 1.0:

* ``ours``: ``embplex.training.train`` with the ``infonce`` loss (temperature 0.05) and
  the ``random`` sampler;
* ``st``: ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` (scale 20,
  the same loss). It needs ``pip install 'sentence-transformers[train]'`` (datasets,
  accelerate); without them the benchmark falls back to a minimal loop over the same
  model, loss and optimizer and says so in the result (``st_trainer``).

Each run is its own process (so its peak RSS, from ``getrusage``, is its own), ours and
theirs take turns, ``--repetitions`` times. Steps per second are timed from the end of
the warm-up steps to the end of the last step.

    python benchmarks/bench_train.py            # about 3-4 minutes on 2 cores
    python benchmarks/bench_train.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

NAME = "train"
LR = 2e-5
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.1
MAX_GRAD_NORM = 1.0


SEED = 42


def _pairs(batch_size: int, steps: int) -> list[tuple[str, str]]:
    return common.snli_pairs(batch_size * steps)


def _pairs_in_batch_order(batch_size: int, steps: int) -> list[tuple[str, str]]:
    """The pairs in the order our ``random`` sampler visits them (epoch 0, ``SEED``).

    sentence-transformers' trainer gets the pairs in this order without shuffling, so both
    trainers compute the very same batches: a step's cost depends on its longest text
    (every text is padded to it), and with different shuffles one trainer can draw the
    costlier batches (a 2x slower step in a 12-step run was seen)."""
    from embplex.components import Example, TrainingContext
    from embplex.plugins.sampler.random import RandomSampler

    pairs = _pairs(batch_size, steps)
    examples = [Example(anchor=a, positive=p) for a, p in pairs]
    batches = RandomSampler().batches(examples, batch_size, SEED, 0, TrainingContext())
    return [pairs[i] for batch in batches for i in batch]


class _StepLog:
    """When each optimizer step ended, and the peak RSS by then; called after every step."""

    def start(self) -> None:
        self.rss_before = common.current_rss_mib()
        self.started = time.perf_counter()
        self.ends: list[float] = []
        self.peaks: list[float] = []

    def __call__(self, *_: Any, **__: Any) -> None:
        self.ends.append(time.perf_counter())
        self.peaks.append(common.peak_rss_mib())

    def figures(self, trainer: str) -> dict[str, Any]:
        return {"step_ends": [t - self.started for t in self.ends], "peak_rss_at_step_end_mib": self.peaks,
                "rss_before_training_mib": self.rss_before, "trainer": trainer}


def run_ours(
    path: str, batch_size: int, steps: int, warmup: int, output: Path, device: str = "cpu", bf16: bool = False
) -> dict[str, Any]:
    import embplex
    from embplex.components import Example
    from embplex.training import TrainSettings, train

    registry = embplex.load_registry()
    model = embplex.compose({"name": "hf_encoder", "path": path}, pooling="mean", registry=registry, device=device)
    examples = [Example(anchor=a, positive=p) for a, p in _pairs(batch_size, steps)]
    loss = registry.create("loss", "infonce", temperature=0.05)
    sampler = registry.create("sampler", "random")
    settings = TrainSettings(
        seed=SEED,
        batch_size=batch_size,
        max_steps=steps,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        warmup_ratio=WARMUP_RATIO,
        max_grad_norm=MAX_GRAD_NORM,
        bf16=bf16,
        tensorboard=False,
        progress_bar=False,
        log_every=steps,
        resume=False,
    )
    log = _StepLog()
    log.start()
    train(model, examples, loss, sampler, settings, output, registry=registry, callbacks=[log])
    return log.figures("embplex.training.train")


def run_st(
    path: str, batch_size: int, steps: int, warmup: int, output: Path, device: str = "cpu", bf16: bool = False
) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # older layout
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    torch.manual_seed(SEED)
    model = SentenceTransformer(path, device=device)
    loss = MultipleNegativesRankingLoss(model, scale=20.0)
    pairs = _pairs_in_batch_order(batch_size, steps)
    log = _StepLog()
    try:
        import accelerate  # noqa: F401  (the trainer needs both)
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.base.sampler import DefaultBatchSampler
        from torch.utils.data import SequentialSampler
        from transformers import TrainerCallback

        def in_given_order(dataset: Any, **options: Any) -> DefaultBatchSampler:
            return DefaultBatchSampler(SequentialSampler(dataset), **options)

        class StepTimer(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                log()

        dataset = datasets.Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
        arguments = SentenceTransformerTrainingArguments(
            output_dir=str(output),
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=LR,
            weight_decay=WEIGHT_DECAY,
            warmup_ratio=WARMUP_RATIO,
            max_grad_norm=MAX_GRAD_NORM,
            save_strategy="no",
            logging_steps=steps,
            report_to="none",
            disable_tqdm=True,
            use_cpu=device == "cpu",
            bf16=bf16,
            seed=SEED,
            dataloader_drop_last=True,
            batch_sampler=in_given_order,
        )
        log.start()
        SentenceTransformerTrainer(
            model=model, args=arguments, train_dataset=dataset, loss=loss, callbacks=[StepTimer()]
        ).train()
        trainer = "SentenceTransformerTrainer"
    else:
        trainer = "minimal loop over SentenceTransformer + MultipleNegativesRankingLoss (datasets/accelerate missing)"
        decay = [p for n, p in model.named_parameters() if not any(k in n for k in ("bias", "LayerNorm"))]
        rest = [p for n, p in model.named_parameters() if any(k in n for k in ("bias", "LayerNorm"))]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}], lr=LR
        )
        warm = max(1, int(WARMUP_RATIO * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
        )
        model.train()
        log.start()
        for step in range(steps):
            rows = pairs[step * batch_size : (step + 1) * batch_size]
            features = [
                {k: v.to(device) if hasattr(v, "to") else v for k, v in model.tokenize([r[column] for r in rows]).items()}
                for column in (0, 1)
            ]
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                value = loss(features, labels=None)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            log()
    return log.figures(trainer)


def tokens_computed(batch_size: int, steps: int) -> dict[str, int]:
    """Token positions the transformer computes over the run: the real tokens, each role
    of a batch padded to its longest text (sentence-transformers), and our length groups
    (``embplex.model.length_groups``, as ``EmbeddingModel.embed`` runs them on a CPU)."""
    import embplex
    from embplex.model import _group_overhead_tokens, length_groups

    backbone = embplex.compose({"name": "hf_encoder", "path": common.minilm_path()}, pooling="mean").backbone
    pairs = _pairs_in_batch_order(batch_size, steps)
    overhead = _group_overhead_tokens(backbone.model.device)
    real = padded = grouped = 0
    for start in range(0, len(pairs), batch_size):
        for column in (0, 1):
            lengths = backbone.tokenize([p[column] for p in pairs[start : start + batch_size]]).attention_mask.sum(dim=1)
            real += int(lengths.sum())
            padded += len(lengths) * int(lengths.max())
            grouped += sum(len(rows) * int(lengths[rows].max()) for rows in length_groups(lengths, overhead))
    return {"real": real, "padded_per_batch": padded, "length_groups": grouped}


def worker(which: str, batch_size: int, steps: int, warmup: int) -> None:
    """One training run in this process; prints its figures as one JSON line."""
    path = common.minilm_path()
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{which}-") as folder:
        figures = (run_ours if which == "ours" else run_st)(path, batch_size, steps, warmup, Path(folder))
    ends = figures["step_ends"]
    if len(ends) != steps:
        raise SystemExit(f"{which}: expected {steps} step timestamps, got {len(ends)}")
    timed = steps - warmup
    seconds = ends[-1] - ends[warmup - 1] if warmup else ends[-1]
    figures.update(
        steps=steps,
        timed_steps=timed,
        timed_seconds=seconds,
        steps_per_second=timed / seconds,
        peak_rss_mib=common.peak_rss_mib(),
    )
    print(json.dumps(figures))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--batch-size", type=int, default=64)
    parse.add_argument("--steps", type=int, default=12, help="optimizer steps per run, warm-up included")
    parse.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the timing")
    parse.add_argument("--repetitions", type=int, default=5, help="runs of each trainer, taking turns")
    parse.add_argument("--quiet-wait", type=float, default=90.0, help="seconds to wait for a quiet machine per run")
    parse.add_argument("--worker", choices=("ours", "st"), help=argparse.SUPPRESS)
    args = parse.parse_args(argv)
    if args.smoke:
        args.batch_size, args.steps, args.warmup_steps, args.repetitions, args.quiet_wait = 4, 3, 1, 1, 0.0
    if args.worker:
        worker(args.worker, args.batch_size, args.steps, args.warmup_steps)
        return {}

    machine = common.machine_info()
    script = str(Path(__file__).resolve())
    shared = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "st": []}
    for repetition in range(args.repetitions):
        for which in ("ours", "st") if repetition % 2 == 0 else ("st", "ours"):
            if args.quiet_wait:
                common.wait_for_quiet(args.quiet_wait)
            with common.ForeignLoad() as load:
                figures = common.run_json_subprocess([script, "--worker", which, *shared])
            figures["foreign_cpu_share"] = load.share
            runs[which].append(figures)

    def summary(which: str) -> dict[str, Any]:
        figures = runs[which]
        return {
            "trainer": figures[0]["trainer"],
            "steps_per_second_median": statistics.median(f["steps_per_second"] for f in figures),
            "steps_per_second": [f["steps_per_second"] for f in figures],
            "examples_per_second_median": args.batch_size * statistics.median(f["steps_per_second"] for f in figures),
            "peak_rss_mib_median": statistics.median(f["peak_rss_mib"] for f in figures),
            "peak_rss_mib": [f["peak_rss_mib"] for f in figures],
            "foreign_cpu_share": [f["foreign_cpu_share"] for f in figures],
            "rss_before_training_mib_median": statistics.median(f["rss_before_training_mib"] for f in figures),
            "training_rss_increase_mib_median": statistics.median(
                f["peak_rss_mib"] - f["rss_before_training_mib"] for f in figures
            ),
            "peak_rss_at_step_end_mib_first_run": figures[0].get("peak_rss_at_step_end_mib"),
        }

    ours, st = summary("ours"), summary("st")
    speed = common.ratio(
        [1 / f["steps_per_second"] for f in runs["st"]],
        [1 / f["steps_per_second"] for f in runs["ours"]],
        st["foreign_cpu_share"],
        ours["foreign_cpu_share"],
    )
    memory_ratio = ours["peak_rss_mib_median"] / st["peak_rss_mib_median"]
    result = {
        "benchmark": NAME,
        "command": f"{Path(sys.executable).name} benchmarks/run.py train --json" + (" --smoke" if args.smoke else ""),
        "smoke": args.smoke,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            "model": common.MODEL_NAME,
            "data": "SNLI dev triplets (shared/data/pairs/snli), (anchor, positive) pairs; both trainers "
            f"get the same batches (the order of our random sampler, seed {SEED})",
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup_steps_untimed": args.warmup_steps,
            "repetitions": args.repetitions,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "max_grad_norm": MAX_GRAD_NORM,
            "precision": "float32",
            "loss": "ours: infonce (temperature 0.05); st: MultipleNegativesRankingLoss (scale 20)",
            "interleaved": True,
            "quiet_wait_seconds": args.quiet_wait,
            "quiet_share": common.QUIET_SHARE,
            "one_process_per_run": True,
        },
        "tokens": tokens_computed(args.batch_size, args.steps),
        "ours": ours,
        "st": st,
        "ratios": {
            "steps_per_second_ours_vs_st": speed,
            "peak_rss_ours_over_st": memory_ratio,
        },
        "targets": {
            "speed_vs_st": {"target": 1.0, "measured": speed["median_of_paired"], "met": speed["median_of_paired"] >= 1.0},
            "peak_memory_vs_st": {"target": 1.0, "measured": memory_ratio, "met": memory_ratio <= 1.0},
        },
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return common.finish(result, args, NAME)


if __name__ == "__main__":
    main()
