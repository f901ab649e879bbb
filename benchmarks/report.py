"""Markdown tables from the latest results: ``python benchmarks/report.py``;
``--plot`` draws the input-length results to ``docs/benchmarks-length.png``.

Reads ``benchmarks/results/{encode,train,length}.json`` (whichever exist) and prints the
tables that ``docs/benchmarks.md`` quotes, so the document never drifts from the numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def machine(result: dict[str, Any]) -> str:
    m = result["machine"]
    flags = ", ".join(f for f, present in m["cpu_flags"].items() if present) or "none"
    return (
        f"{m['cpu_model']} ({m['cpu_vendor']}), {m['usable_cpus']} cores at {m['cpu_mhz']:.0f} MHz nominal, "
        f"flags: {flags}; torch {m['torch']}, transformers {m['transformers']}, "
        f"sentence-transformers {m['sentence_transformers']}, {m['torch_threads']} torch threads; "
        f"load average before/after: {', '.join(f'{x:.2f}' for x in m['load_average'])} / "
        f"{', '.join(f'{x:.2f}' for x in result.get('load_average_after') or [])}"
    )


def encode_tables(result: dict[str, Any]) -> str:
    speed, quality = result["throughput"], result["quality"]
    lines = [
        "| encoder | sentences/s (median) | best | min cosine to ours_fp32 | STS-B Spearman |",
        "|---|---|---|---|---|",
    ]
    for name, figures in speed.items():
        lines.append(
            f"| `{name}` | {figures['items_per_second']:.1f} | {figures['best_items_per_second']:.1f} | "
            f"{quality['min_cosine_to_ours_fp32'][name]:.6f} | {quality['stsb_spearman'][name]:.2f} |"
        )
    lines += ["", "| ratio (interleaved) | median of paired runs | ratio of medians | target | met |", "|---|---|---|---|---|"]
    targets = {"ours_fp32_vs_st_fp32": 1.0, "ours_fast_vs_st_bf16": 1.25}
    for name, value in result["ratios"].items():
        target = targets.get(name)
        met = "" if target is None else ("yes" if value["median_of_paired"] >= target else "**no**")
        lines.append(
            f"| {name.replace('_vs_', ' / ')} | {value['median_of_paired']:.2f}× | {value['of_medians']:.2f}× | "
            f"{'' if target is None else f'≥ {target}×'} | {met} |"
        )
    roof = result["roofline"]
    peak, theory = roof["measured_peak"], roof["theoretical_peak"]
    pad = result["padding"]
    lines += [
        "",
        f"Max abs difference ours_fp32 vs st_fp32: {quality['ours_fp32_vs_st_fp32_max_abs_diff']:.2e} "
        f"over {result['inputs']['sentences']} sentences; STS-B on {quality['stsb_pairs']} test pairs.",
        "",
        f"Padding: {pad['real_tokens']} real tokens; sentence-transformers' batching computes "
        f"{pad['padded_tokens_text_count_batches']} (+{100 * pad['waste_text_count']:.0f}%), the token budget "
        f"{pad['padded_tokens_token_budget_batches']} (+{100 * pad['waste_token_budget']:.0f}%).",
        "",
        "| roofline | value |",
        "|---|---|",
        f"| matmul FLOPs per token (6 × 2 × (4H² + 2HI)) | {roof['matmul_flops_per_token'] / 1e6:.2f} M |",
        f"| useful FLOPs per token incl. attention (mean) | {roof['useful_flops_per_token_mean'] / 1e6:.2f} M |",
        f"| measured peak fp32 ({peak['gemm_size']}³ matmul) | {peak['fp32_flops'] / 1e9:.0f} GFLOP/s |",
        f"| measured peak bf16 ({peak['gemm_size']}³ matmul) | {peak['bf16_flops'] / 1e9:.0f} GFLOP/s |",
        f"| theoretical fp32 / bf16 | {theory['fp32_flops'] / 1e9:.0f} / {theory['bf16_flops'] / 1e9:.0f} GFLOP/s |",
    ]
    for name, flops in roof["achieved_useful_flops"].items():
        lines.append(f"| achieved by `{name}` | {flops / 1e9:.0f} GFLOP/s |")
    lines += [
        f"| fast path ({roof['fast_path_matmul_dtype']} matmuls): fraction of measured peak | "
        f"{100 * roof['fast_fraction_of_measured_peak']:.0f}% |",
        f"| fast path: fraction of theoretical {roof['fast_path_matmul_dtype']} peak | "
        f"{100 * (roof['fast_fraction_of_theoretical_peak'] or 0):.0f}% |",
    ]
    return "\n".join(lines)


def train_table(result: dict[str, Any]) -> str:
    ours, st = result["ours"], result["st"]
    speed = result["ratios"]["steps_per_second_ours_vs_st"]
    return "\n".join([
        "| trainer | steps/s (median) | examples/s | peak RSS MiB (median) | RSS growth in training MiB |",
        "|---|---|---|---|---|",
        f"| ours: `{ours['trainer']}` + infonce | {ours['steps_per_second_median']:.3f} | "
        f"{ours['examples_per_second_median']:.1f} | {ours['peak_rss_mib_median']:.0f} | "
        f"{ours['training_rss_increase_mib_median']:.0f} |",
        f"| sentence-transformers: `{st['trainer']}` + MNRL | {st['steps_per_second_median']:.3f} | "
        f"{st['examples_per_second_median']:.1f} | {st['peak_rss_mib_median']:.0f} | "
        f"{st['training_rss_increase_mib_median']:.0f} |",
        "",
        f"Steps/s ours / theirs: {speed['median_of_paired']:.2f}× (median of paired runs; "
        f"{speed['of_medians']:.2f}× ratio of medians; runs: "
        f"{', '.join(f'{x:.2f}' for x in speed['paired'])}). Peak RSS ours / theirs: "
        f"{result['ratios']['peak_rss_ours_over_st']:.2f}.",
        *(
            [
                "",
                f"Token positions computed over the run: {tokens['real']} real; one padded pass per role "
                f"{tokens['padded_per_batch']} ({tokens['padded_per_batch'] / tokens['real']:.2f}×); "
                f"length groups {tokens['length_groups']} ({tokens['length_groups'] / tokens['real']:.2f}×).",
            ]
            if (tokens := result.get("tokens"))
            else []
        ),
    ])


def length_table(result: dict[str, Any]) -> str:
    lines = [
        "| tokens | texts | st_fp32 tok/s | ours_fp32 tok/s | ours_fast tok/s | fp32 / st | fast / st "
        "| peak RSS MiB st / ours_fp32 / ours_fast |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["lengths"]:
        lines.append(
            f"| {row['length']} | {row['texts']} | {row['st_fp32']['tokens_per_second']:.0f} | "
            f"{row['ours_fp32']['tokens_per_second']:.0f} | {row['ours_fast']['tokens_per_second']:.0f} | "
            f"{row['ratios']['ours_fp32_vs_st_fp32']['median_of_paired']:.2f}× | "
            f"{row['ratios']['ours_fast_vs_st_fp32']['median_of_paired']:.2f}× | "
            f"{row['st_fp32']['peak_rss_mib']:.0f} / {row['ours_fp32']['peak_rss_mib']:.0f} / "
            f"{row['ours_fast']['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def plot_length(result: dict[str, Any], path: Path) -> Path:
    """Throughput and peak memory against input length, one line per encoder."""
    from matplotlib.figure import Figure

    rows = result["lengths"]
    lengths = [row["length"] for row in rows]
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    speed, memory = figure.subplots(1, 2)
    for name, style in (("st_fp32", "o--"), ("ours_fp32", "s-"), ("ours_fast", "^-")):
        speed.plot(lengths, [row[name]["tokens_per_second"] for row in rows], style, label=name)
        memory.plot(lengths, [row[name]["peak_rss_mib"] for row in rows], style, label=name)
    for axes, label in ((speed, "tokens/s (median)"), (memory, "peak RSS (MiB)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(lengths, [str(n) for n in lengths])
        axes.set_xlabel("tokens per text")
        axes.set_ylabel(label)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    speed.legend()
    figure.suptitle(f"all-MiniLM-L6-v2, batch 64, {result['machine']['usable_cpus']} CPU cores ({result['finished'][:10]})")
    figure.savefig(path, dpi=110)
    return path


def main() -> int:
    if "--plot" in sys.argv[1:]:
        result = _load("length")
        if result is None:
            print(f"no length result in {RESULTS}; run python benchmarks/run.py length first", file=sys.stderr)
            return 1
        target = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-length.png"
        print(f"wrote {plot_length(result, target)}")
        return 0
    found = False
    for name, render in (("encode", encode_tables), ("train", train_table), ("length", length_table)):
        result = _load(name)
        if result is None:
            continue
        found = True
        print(f"## {name} ({result['finished']})\n\nMachine: {machine(result)}\n\n{render(result)}\n")
    if not found:
        print(f"no results in {RESULTS}; run python benchmarks/run.py encode first", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
