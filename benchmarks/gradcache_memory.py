"""Peak training memory against batch size: ``infonce`` against ``cached_infonce``
(GradCache), alone and as the inner loss of ``matryoshka_2d`` (issue 16).

Each cell trains all-MiniLM-L6-v2 for ``--steps`` optimizer steps on SNLI dev triplets
(anchor, positive, hard negative: three texts per example), float32, with the project's
trainer (``embplex.app.run_train``), in a fresh process whose peak RSS (``getrusage``) is
its own. Reported per cell: peak RSS, the same minus the RSS after loading the model (what
the step itself adds: activations, gradients, AdamW's state), and seconds per step.

* ``infonce``: activations for the whole batch are held for the backward pass;
* ``cached_infonce``: mini-batches of ``mini_batch_size`` (32) texts, embedded twice;
* ``matryoshka_2d+infonce`` and ``matryoshka_2d+cached_infonce``: the same with
  ``matryoshka_2d`` (its default prefixes; last layer plus one drawn earlier layer).

A cell over ``--memory-gib`` (default 20 of the machine's 24 GiB) is refused its
allocation and reported as out of memory (``common.cap_address_space``).

    python benchmarks/run.py gradcache_memory            # about 5 minutes on 2 cores
    python benchmarks/run.py gradcache_memory --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import common

NAME = "gradcache_memory"
LOSSES: dict[str, list[str]] = {
    "infonce": ["loss=infonce"],
    "cached_infonce": ["loss=cached_infonce", "loss.mini_batch_size=32"],
    "matryoshka_2d+infonce": ["loss=matryoshka_2d", "loss.inner=infonce"],
    "matryoshka_2d+cached_infonce": [
        "loss=matryoshka_2d", "loss.inner={name: cached_infonce, mini_batch_size: 32}",
    ],
}


def cell(loss: str, batch_size: int, steps: int, memory_gib: float, model: str | None) -> dict[str, Any]:
    """Train ``steps`` steps at ``batch_size``; runs in its own process."""
    import torch

    import embplex
    from embplex.app import build_model, run_train
    from embplex.config import compose_config

    registry = embplex.load_registry()
    with tempfile.TemporaryDirectory() as folder:
        overrides = [
            "data=snli", *LOSSES[loss], "sampler=random", f"train.batch_size={batch_size}",
            f"train.max_steps={steps}", "train.warmup_ratio=0", "train.progress_bar=false",
            f"train.log_every={steps}", f"output_dir={folder}", *([f"backbone.path={model}"] if model else []),
        ]
        cfg = compose_config(overrides, registry=registry)
        built = build_model(cfg, registry)
        loaded = common.current_rss_mib()
        answer: dict[str, Any] = {"threads": torch.get_num_threads(), "rss_after_load_mib": loaded}
        # nothing else differs between cells of one loss: a refused allocation is the cause of a failure
        answer.update(common.run_under_ceiling(memory_gib, lambda: run_train(cfg, registry, model=built)))
    if not answer["out_of_memory"]:
        answer["seconds_per_step"] = answer.pop("seconds") / steps  # includes saving the model once at the end
        answer["peak_rss_over_loaded_mib"] = answer["peak_rss_mib"] - loaded
    return answer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    parse.add_argument("--steps", type=int, default=2, help="optimizer steps per cell")
    parse.add_argument("--memory-gib", type=float, default=20.0, help="address-space ceiling of each cell")
    parse.add_argument("--model", help="another hf_encoder model folder (tests use a tiny one)")
    parse.add_argument("--only", help="comma-separated losses (default: all)")
    parse.add_argument("--cell", nargs=2, metavar=("LOSS", "BATCH_SIZE"), help=argparse.SUPPRESS)
    args = parse.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.steps = [8, 32], 1
    if args.cell:
        print(json.dumps(cell(args.cell[0], int(args.cell[1]), args.steps, args.memory_gib, args.model)))
        return {}

    only = common.chosen(args.only, list(LOSSES), "loss(es)")
    machine = common.machine_info()
    rows = common.memory_grid(
        __file__, only, args.batch_sizes,
        lambda loss, batch_size: [
            "--steps", str(args.steps), "--memory-gib", str(args.memory_gib),
            *(["--model", args.model] if args.model else [])],
        lambda row: (f"peak {row['peak_rss_mib']:.0f} MiB (+{row['peak_rss_over_loaded_mib']:.0f} over the loaded "
                     f"model), {row['seconds_per_step']:.1f} s/step"),
        names=("loss", "batch_size"),
    )

    result = {
        "benchmark": NAME,
        "command": "python benchmarks/run.py gradcache_memory --json" + (" --smoke" if args.smoke else ""),
        "smoke": args.smoke,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            "model": args.model or common.MODEL_NAME, "data": "SNLI dev triplets (3 texts per example)",
            "precision": "fp32", "steps": args.steps, "mini_batch_size": 32,
            "memory_ceiling_gib": args.memory_gib, "one_process_per_cell": True,
        },
        "rows": rows,
    }
    plot(rows, common.output_path(args, NAME).with_suffix(".png"))
    return common.finish(result, args, NAME)


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    """What a training step adds to memory against batch size, one line per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for loss in dict.fromkeys(row["loss"] for row in rows):
        done = [r for r in rows if r["loss"] == loss and not r["out_of_memory"]]
        axis.plot([r["batch_size"] for r in done], [r["peak_rss_over_loaded_mib"] / 1024 for r in done],
                  marker="o", label=loss)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("train.batch_size (examples of 3 texts)")
    axis.set_ylabel("peak RSS over the loaded model, GiB")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.suptitle("all-MiniLM-L6-v2 training step, float32")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
