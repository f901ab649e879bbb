"""The plots of ``docs/results/training.md`` (issue 11), drawn from the studies' JSON:

* ``negatives.json`` (``benchmarks/negatives.py``): nDCG@10 per arm with its 95% interval,
  and the paired change against in-batch negatives with its paired interval;
* ``distillation.json`` (``benchmarks/distillation.py``): each model's STS-B and SciFact
  score between the untrained student (floor) and the teacher (ceiling);
* ``length_buckets.json`` (``benchmarks/length_buckets.py``): padding waste and real
  tokens/s of each sampler, per data set.

    python benchmarks/training_plots.py --runs runs --output docs/results

Each plot is drawn only when its JSON exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _interval_bars(axis: Any, labels: list[str], values: list[float], intervals: list[list[float]]) -> None:
    """Horizontal points with 95% interval whiskers, first label on top."""
    positions = list(range(len(labels)))[::-1]
    low = [v - ci[0] for v, ci in zip(values, intervals)]
    high = [ci[1] - v for v, ci in zip(values, intervals)]
    axis.errorbar(values, positions, xerr=[low, high], fmt="o", capsize=3)
    axis.set_yticks(positions)
    axis.set_yticklabels(labels)
    axis.grid(axis="x", alpha=0.3)


def plot_negatives(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    arms = result["arms"]
    figure, (score, change) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=False)
    names = list(arms)
    _interval_bars(score, names, [arms[n]["ndcg@10"] for n in names], [arms[n]["ndcg@10_ci"] for n in names])
    score.set_xlabel("SciFact test nDCG@10 (95% CI)")
    others = [n for n in names if "change_vs_in_batch" in arms[n]]
    _interval_bars(change, others, [arms[n]["change_vs_in_batch"] for n in others], [arms[n]["change_ci"] for n in others])
    change.axvline(0, color="grey", linewidth=1)
    change.set_xlabel("paired change vs in-batch (95% CI)")
    figure.suptitle("Negatives: all-MiniLM-L6-v2 fine-tuned on SciFact train, same steps and seed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_distillation(rows: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """``rows[model][data_set]`` holds ``value`` and ``ci`` (the data set's headline metric)."""
    plt = _pyplot()
    data_sets = sorted({d for row in rows.values() for d in row})
    figure, axes = plt.subplots(1, len(data_sets), figsize=(5.5 * len(data_sets), 3.8))
    for axis, data_set in zip(axes if len(data_sets) > 1 else [axes], data_sets):
        names = [n for n in rows if data_set in rows[n]]
        _interval_bars(axis, names, [rows[n][data_set]["value"] for n in names], [rows[n][data_set]["ci"] for n in names])
        axis.set_xlabel(f"{data_set} test {rows[names[0]][data_set]['metric']} (95% CI)")
    figure.suptitle("Distillation: 2-layer student of all-MiniLM-L6-v2, teacher the 6-layer model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_length_buckets(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    keys = [k for k in report if "/" in k]
    figure, (waste, speed) = plt.subplots(1, 2, figsize=(11, 3.8))
    positions = list(range(len(keys)))[::-1]
    waste.barh(positions, [100 * report[k]["waste"] for k in keys])
    waste.set_xlabel("padding in the batches as built, %")
    trained = [k for k in keys if "real_tokens_per_s" in report[k]]
    speed.barh(list(range(len(trained)))[::-1], [report[k]["real_tokens_per_s"] for k in trained])
    speed.set_xlabel("real (non-padding) tokens trained per second")
    for axis, labels in ((waste, keys), (speed, trained)):
        axis.set_yticks(list(range(len(labels)))[::-1])
        axis.set_yticklabels(labels)
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle("Length buckets against no_duplicates at equal real tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="the folder holding each study's output folder")
    parser.add_argument("--output", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    negatives = args.runs / "negatives" / "negatives.json"
    if negatives.exists():
        plot_negatives(json.loads(negatives.read_text()), args.output / "training-negatives.png")
    distillation = args.runs / "distillation" / "distillation.json"
    if distillation.exists():
        rows = json.loads(distillation.read_text())["rows"]
        # floor first, ceiling last, the trained students between
        rows = dict(sorted(rows.items(), key=lambda item: ("floor" not in item[0]) + 2 * ("ceiling" in item[0])))
        headline = {"stsb": "spearman", "scifact": "ndcg@10"}
        plot_distillation(
            {
                model: {
                    data_set: {"metric": headline[data_set], "value": metrics[headline[data_set]],
                               "ci": metrics[f"{headline[data_set]}_ci"]}
                    for data_set, metrics in by_data.items()
                }
                for model, by_data in rows.items()
            },
            args.output / "training-distillation.png",
        )
    # length_buckets.py writes one JSON per run; --datasets runs each data set apart
    reports = sorted((args.runs / "length_buckets").glob("**/length_buckets.json"))
    if reports:
        merged: dict[str, Any] = {}
        for report in reports:
            merged.update({k: v for k, v in json.loads(report.read_text()).items() if "/" in k})
        plot_length_buckets(merged, args.output / "training-length-buckets.png")


if __name__ == "__main__":
    main()
