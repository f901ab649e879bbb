"""Experiment 3 of issue 9: what embedding one long text costs, in tokens/s and peak
memory, against its length, for the plain and the extended all-MiniLM-L6-v2.

Configurations (the names of ``benchmarks/long_context.py``; recipe
``conf/experiment/long_context.yaml``, precision ``fast``):

* ``truncation``: the plain model, ``hf_encoder`` at its 512 positions (lengths <= 512);
* ``pi``: ``position_interpolation`` (linear), the fused attention kernel;
* ``pi+temp+lambda``: with ``[lambda_mask, temp_scale]``, still the fused kernel, with a
  boolean mask of ``length x length``;
* ``pi+temp+lambda+sink``: with ``[lambda_mask, temp_scale, sink_calibration]``, which
  reads the attention probabilities, so every layer holds ``heads x length x length``
  score tensors (the explicit path).

Every (configuration, length) cell runs in a fresh process (its peak RSS is its own) with
an address-space ceiling (``--memory-gib``, default 20 of the machine's 24 GiB): a cell
that needs more fails with an out-of-memory error instead of swapping or waking the
kernel's OOM killer, and the table reports it as "out of memory". ``position_interpolation``'s
target is the longest length measured, so one table serves every length.

    python benchmarks/run.py long_context_cost            # about 5 minutes on 2 cores
    python benchmarks/run.py long_context_cost --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import common

NAME = "long_context_cost"
CONFIGURATIONS: dict[str, list[str]] = {
    "truncation": ["backbone=hf_encoder", "~backbone.inner",
                   "backbone.max_length=512", "backbone.precision=fast"],
    "pi": [],
    "pi+temp+lambda": ["attention=[lambda_mask,temp_scale]"],
    "pi+temp+lambda+sink": ["attention=[lambda_mask,temp_scale,sink_calibration]"],
}
PLAIN_MAX = 512


def cell_overrides(configuration: str, max_length: int) -> list[str]:
    if configuration == "truncation":
        return CONFIGURATIONS[configuration]
    return [*CONFIGURATIONS[configuration], f"backbone.target_length={max_length}"]


def cell(configuration: str, length: int, max_length: int, texts: int, memory_gib: float) -> dict[str, Any]:
    """Encode ``texts`` texts of ``length`` tokens one at a time; runs in its own process."""
    import torch
    from transformers import AutoTokenizer

    import embplex
    from bench_length import texts_of_length
    from embplex.app import build_model
    from embplex.config import compose_config

    registry = embplex.load_registry()
    cfg = compose_config(["experiment=long_context", *cell_overrides(configuration, max_length)], registry=registry)
    model = build_model(cfg, registry)
    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())
    chosen = texts_of_length(tokenizer, length, texts)
    # warm-up on a short text (kernels, the position table), so the cell's own length is
    # what first asks for its large buffers and the memory ceiling sees them
    model.encode([chosen[0][:200]], batch_size=1, show_progress=False)
    loaded = common.current_rss_mib()
    answer: dict[str, Any] = {"threads": torch.get_num_threads(), "rss_after_load_mib": loaded}
    # the short warm-up ran the same code without the ceiling: a failure now is memory
    answer.update(common.run_under_ceiling(memory_gib, lambda: model.encode(chosen, batch_size=1, show_progress=False)))
    if not answer["out_of_memory"]:
        answer["tokens_per_second"] = texts * length / answer["seconds"]
        answer["peak_rss_over_loaded_mib"] = answer["peak_rss_mib"] - loaded
    return answer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    parse.add_argument("--texts", type=int, default=4, help="texts encoded per cell (one at a time)")
    parse.add_argument("--memory-gib", type=float, default=20.0, help="address-space ceiling of each cell")
    parse.add_argument("--only", help="comma-separated configurations (default: all)")
    parse.add_argument("--cell", nargs=2, metavar=("CONFIGURATION", "LENGTH"), help=argparse.SUPPRESS)
    args = parse.parse_args(argv)
    if args.smoke:
        args.lengths, args.texts = [256, 1024], 1
    max_length = max(args.lengths)
    if args.cell:
        print(json.dumps(cell(args.cell[0], int(args.cell[1]), max_length, args.texts, args.memory_gib)))
        return {}
    only = common.chosen(args.only, list(CONFIGURATIONS), "configuration(s)")
    machine = common.machine_info()
    rows = common.memory_grid(
        __file__, only, args.lengths,
        lambda configuration, length: [
            "--lengths", *map(str, args.lengths), "--texts", str(args.texts), "--memory-gib", str(args.memory_gib)],
        lambda row: f"{row['tokens_per_second']:.0f} tokens/s, peak {row['peak_rss_mib']:.0f} MiB",
        names=("configuration", "length"),
        # the plain model stops at its own positions
        applies=lambda configuration, length: configuration != "truncation" or length <= PLAIN_MAX,
    )
    for row in rows:
        row["texts"] = args.texts

    result = {
        "benchmark": NAME,
        "command": "python benchmarks/run.py long_context_cost --json" + (" --smoke" if args.smoke else ""),
        "smoke": args.smoke,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            "model": common.MODEL_NAME, "precision": "fast", "batch_size": 1, "texts_per_cell": args.texts,
            "target_length": max_length, "memory_ceiling_gib": args.memory_gib, "one_process_per_cell": True,
        },
        "rows": rows,
    }
    plot(rows, common.output_path(args, NAME).with_suffix(".png"))
    return common.finish(result, args, NAME)


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    """Tokens/s and peak memory against length, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for configuration in dict.fromkeys(row["configuration"] for row in rows):
        done = [r for r in rows if r["configuration"] == configuration and not r["out_of_memory"]]
        lengths = [r["length"] for r in done]
        speed.plot(lengths, [r["tokens_per_second"] for r in done], marker="o", label=configuration)
        memory.plot(lengths, [r["peak_rss_mib"] / 1024 for r in done], marker="o", label=configuration)
    for axis, label in ((speed, "tokens/s (batch 1)"), (memory, "peak RSS, GiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("input length, tokens")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    memory.axhline(24, color="grey", linestyle="--", linewidth=1, label="machine RAM (24 GiB)")
    memory.legend(fontsize=8)
    figure.suptitle("all-MiniLM-L6-v2, one long text at a time")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
