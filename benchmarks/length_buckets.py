"""The length-buckets study of issue 11: padding, speed and quality at equal tokens seen.

For SNLI (evaluated on STS-B test) and SciFact train (evaluated on SciFact test), with
all-MiniLM-L6-v2 (``conf/experiment/length_buckets.yaml``):

* padding: the share of padding in the training batches as built (each role padded to
  its longest text), what the model computes after the core's length groups, batches and
  mean padded tokens per batch, for ``no_duplicates`` (``train.batch_size`` examples) and
  ``length_buckets`` (``sampler.max_tokens``);
* training: ``no_duplicates`` runs ``train.max_steps`` steps; ``length_buckets`` runs as
  many of its own batches as it takes to see as many real (non-padding) tokens; steps/s,
  real tokens/s and the evaluation after training.

    python benchmarks/length_buckets.py                 # the study (docs/results/training.md)
    python benchmarks/length_buckets.py --padding-only  # the padding table, no training
    python benchmarks/length_buckets.py --smoke         # seconds: tiny data, tiny encoder
    python benchmarks/length_buckets.py --datasets scifact --output runs/length_buckets/scifact   # one data set
    python benchmarks/length_buckets.py --padding-only --resample 200000  # SNLI at a training set's size

``--resample N`` draws N SNLI dev triplets with replacement (seeded): a training set's
count of examples with dev's length distribution (``length_buckets`` only; SciFact as is).

Results go to ``<output>/length_buckets.json`` (default ``runs/length_buckets``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

SAMPLERS = ("no_duplicates", "length_buckets")
DATA = ("snli", "scifact")


def padding(model: Any, examples: list, batches: list[list[int]]) -> dict[str, Any]:
    """Padding of the batches as built and as the model computes them, and token counts."""
    from embplex.model import length_groups
    from embplex.training import make_training_batch

    real = built = computed = 0
    per_batch_real, per_batch_padded = [], []
    for batch in batches:
        training = make_training_batch(model.backbone, [examples[i] for i in batch])
        roles = [f for f in (training.anchors, training.positives, training.negatives) if f is not None]
        tokens = sum(int(f.attention_mask.sum()) for f in roles)
        padded = sum(f.attention_mask.numel() for f in roles)
        for features in roles:
            lengths = features.attention_mask.sum(dim=1)
            computed += sum(len(rows) * int(lengths[rows].max()) for rows in length_groups(lengths, 256))
        real, built = real + tokens, built + padded
        per_batch_real.append(tokens)
        per_batch_padded.append(padded)
    return {
        "batches": len(batches),
        "waste": 1 - real / built,
        "computed_waste": 1 - real / computed,
        "mean_padded_tokens": built / len(batches),
        "batch_sizes": [min(map(len, batches)), max(map(len, batches))],
        "real_tokens": per_batch_real,
    }


def epoch_padding(model: Any, examples: list, sampler: Any, cfg: dict[str, Any], epoch: int) -> dict[str, Any]:
    """``padding`` of one epoch's batches, drawn as the trainer draws them."""
    from embplex.components import TrainingContext

    batches = list(sampler.batches(examples, cfg["train"]["batch_size"], cfg["seed"], epoch, TrainingContext(model=model)))
    return padding(model, examples, batches)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data and a tiny encoder: seconds")
    parser.add_argument("--padding-only", action="store_true", help="the padding table alone, no training")
    parser.add_argument("--resample", type=int, default=0, help="padding-only: SNLI drawn with replacement to this many triplets")
    parser.add_argument("--output", type=Path, default=Path("runs/length_buckets"))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--datasets", default=",".join(DATA), help="comma-separated: snli, scifact (default both)")
    args = parser.parse_args(argv)
    datasets = args.datasets.split(",")
    if set(datasets) - set(DATA):
        parser.error(f"unknown data set(s) {', '.join(sorted(set(datasets) - set(DATA)))}; choose from {', '.join(DATA)}")
    if args.resample and not args.padding_only:
        parser.error("--resample measures padding only: add --padding-only (the study trains on the real sets)")

    import embplex
    from embplex.app import build_model, run_eval, run_train
    from embplex.config import compose_config
    from embplex.data import load_training_data

    registry = embplex.load_registry()
    extra = [f"data.root={args.data}"]
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from negatives import smoke_overrides

        # 4 steps: SciFact's smoke set has 3 batches, so the runs cross into a second epoch
        extra = smoke_overrides(args.output, args.data) + ["data.train.limit=40", "train.max_steps=4"]
        stsb = args.output / "data" / "sts" / "stsb"
        stsb.mkdir(parents=True, exist_ok=True)
        lines = (args.data / "sts" / "stsb" / "test.tsv").read_text(encoding="utf-8").splitlines()[:41]
        (stsb / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        snli = args.output / "data" / "pairs" / "snli"
        snli.mkdir(parents=True, exist_ok=True)
        (snli / "dev_triplets.tsv").write_bytes((args.data / "pairs" / "snli" / "dev_triplets.tsv").read_bytes())
    budget = [f"sampler.max_tokens={1024 if args.smoke else 4096}"]
    report: dict[str, Any] = {"smoke": args.smoke}
    for data in datasets:
        for name in SAMPLERS:
            cfg = compose_config(
                ["experiment=length_buckets", f"data={data}", f"sampler={name}", f"output_dir={args.output / data / name}", *extra,
                 *(budget if name == "length_buckets" else [])],
                registry=registry,
            )
            model = build_model(cfg, registry)
            examples = load_training_data(cfg["data"]["train"])
            if args.resample and data == "snli":
                if name != "length_buckets":
                    continue  # no_duplicates' duplicate check is quadratic in the examples
                import numpy as np

                draw = np.random.default_rng(cfg["seed"]).integers(len(examples), size=args.resample)
                examples = [examples[i] for i in draw]
            sampler = registry.create("sampler", name, **{k: v for k, v in cfg["sampler"].items() if k != "name"})
            row = epoch_padding(model, examples, sampler, cfg, 0)
            print(f"{data:8} {name:14} batches {row['batches']:4}  waste {100 * row['waste']:5.1f}%  computed "
                  f"{100 * row['computed_waste']:5.1f}%  mean padded tokens {row['mean_padded_tokens']:8.0f}  "
                  f"examples per batch {row['batch_sizes']}", flush=True)
            report[f"{data}/{name}"] = row
            if args.padding_only:
                continue
            steps = cfg["train"]["max_steps"]
            # the real tokens of every batch the run will train on: more epochs than the
            # first when the run is longer than one (the trainer asks the sampler for epoch
            # 1, 2, ... in turn)
            tokens, epoch = list(row["real_tokens"]), 0
            if name == "length_buckets":  # as many real tokens as no_duplicates' run saw
                target = report[f"{data}/no_duplicates"]["trained_real_tokens"]
                while sum(tokens) < target:
                    epoch += 1
                    tokens += epoch_padding(model, examples, sampler, cfg, epoch)["real_tokens"]
                seen, steps = 0, 0
                for count in tokens:
                    if seen >= target:
                        break
                    seen, steps = seen + count, steps + 1
            while len(tokens) < steps:
                epoch += 1
                tokens += epoch_padding(model, examples, sampler, cfg, epoch)["real_tokens"]
            row["trained_real_tokens"] = sum(tokens[:steps])
            cfg["train"]["max_steps"] = steps
            started = time.perf_counter()
            run_train(cfg, registry, model=model)
            elapsed = time.perf_counter() - started
            row.update(steps=steps, seconds=elapsed, steps_per_s=steps / elapsed,
                       real_tokens_per_s=row["trained_real_tokens"] / elapsed, eval=run_eval(cfg, registry, model=model))
            print(f"         trained {steps} steps in {elapsed:.1f}s, eval {json.dumps({k: v for k, v in row['eval'].items() if isinstance(v, float)})}", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "length_buckets.json").write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
