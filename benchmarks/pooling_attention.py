"""The pooling × attention study: ``python benchmarks/pooling_attention.py [--smoke]``.

1. Trains the grid of ``conf/experiment/pooling_attention.yaml`` as one Hydra sweep
   (``embplex train -m experiment=pooling_attention``): every pooling × {bidirectional,
   causal} on all-MiniLM-L6-v2, same data (SciFact train pairs), seed and step budget.
2. Evaluates every trained model on SciFact test (nDCG@10) and STS-B test (Spearman),
   each with a 95% bootstrap interval, and compares each cell with ``mean`` +
   ``bidirectional`` by a paired bootstrap (the same queries / pairs resampled for both).
3. Writes ``results.json``, the table ``pooling-attention.md`` and the plot
   ``pooling-attention.png`` into ``--out``.

``--smoke`` runs a 2 × 2 grid (mean, latent_attention × both attentions) for one step and
evaluates on small subsets (what CI runs); any ``--set key=value`` is passed to every
training job (the tests point ``backbone.path`` at a tiny model). The numbers of a smoke run
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE = ("mean", "bidirectional")
SMOKE_GRID = ["pooling=mean,latent_attention", "attention=bidirectional,causal"]
SMOKE_TRAIN = ["train.max_steps=1", "train.batch_size=4", "data.train.limit=16"]
METRICS = {"scifact": "ndcg@10", "stsb": "spearman"}


def train_grid(sweep: Path, smoke: bool, extra: list[str]) -> None:
    from embplex.cli import main as embplex

    overrides = ["train", "-m", "experiment=pooling_attention", f"output_dir={sweep}"]
    if smoke:
        overrides += SMOKE_GRID + SMOKE_TRAIN
    status = embplex(overrides + extra)
    if status not in (0, 1):  # 1: some job failed; it is reported per cell below
        raise SystemExit(f"the training sweep failed to start (exit status {status})")


def cells(sweep: Path) -> list[dict[str, Any]]:
    """Every job of the sweep: its pooling, attention, folder and status."""
    found = []
    for record_path in sorted(sweep.glob("*/job.json"), key=lambda p: int(p.parent.name)):
        record = json.loads(record_path.read_text())
        chosen = dict(o.split("=", 1) for o in record["overrides"] if o.split("=", 1)[0] in ("pooling", "attention"))
        found.append(
            {
                "pooling": chosen.get("pooling"),
                "attention": chosen.get("attention"),
                "folder": str(record_path.parent),
                "status": record["status"],
                "error": record.get("error"),
            }
        )
    return found


def evaluation_data(data_root: Path, smoke: bool) -> dict[str, Any]:
    """SciFact test and STS-B test; in smoke mode 10 queries (with their relevant
    documents and 90 others) and 60 pairs."""
    from embplex.data import load_beir, load_sts

    corpus, queries, qrels = load_beir(data_root / "retrieval" / "scifact", "test")
    s1, s2, gold = load_sts(data_root / "sts" / "stsb" / "test.tsv")
    if smoke:
        qrels = dict(list(qrels.items())[:10])
        keep = {doc for judged in qrels.values() for doc in judged} | set(list(corpus)[:90])
        corpus = {doc: corpus[doc] for doc in corpus if doc in keep}
        queries = {q: queries[q] for q in qrels}
        s1, s2, gold = s1[:60], s2[:60], gold[:60]
    return {"scifact": (corpus, queries, qrels), "stsb": (s1, s2, gold)}


def evaluate(folder: Path, data: dict[str, Any], bootstrap: int) -> dict[str, Any]:
    import embplex
    from embplex import evaluation

    model = embplex.load(folder / "model")
    registry = embplex.load_registry()
    corpus, queries, qrels = data["scifact"]
    scifact = evaluation.evaluate_retrieval(
        model, corpus, queries, qrels, lambda dim: registry.create("index", "exact", dim=dim), batch_size=64, bootstrap=bootstrap
    )
    s1, s2, gold = data["stsb"]
    stsb = evaluation.evaluate_sts(model, s1, s2, gold, batch_size=64, bootstrap=bootstrap)
    return {"scifact": scifact, "stsb": stsb}


def compare(rows: list[dict[str, Any]], bootstrap: int) -> None:
    """Add to every row the paired change against the baseline cell, per data set."""
    from embplex.evaluation import paired_change

    base = next((r for r in rows if (r["pooling"], r["attention"]) == BASELINE and "results" in r), None)
    for row in rows:
        if "results" not in row or base is None:
            continue
        row["vs_baseline"] = {}
        for data, metric in METRICS.items():
            change = paired_change(base["results"][data], row["results"][data], n=bootstrap)[metric]
            low, high = change["change_ci"]
            row["vs_baseline"][data] = {**change, "separated": bool(low > 0 or high < 0)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| pooling | attention | SciFact nDCG@10 (95% CI) | Δ vs mean+bidirectional (paired 95% CI) "
        "| STS-B Spearman (95% CI) | Δ vs mean+bidirectional (paired 95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "results" not in row:
            lines.append(f"| `{row['pooling']}` | `{row['attention']}` | failed: {row.get('error')} | | | |")
            continue
        cells = [f"`{row['pooling']}`", f"`{row['attention']}`"]
        for data, metric in METRICS.items():
            result = row["results"][data]
            low, high = result[f"{metric}_ci"]
            cells.append(f"{result[metric]:.2f} ({low:.2f}–{high:.2f})")
            change = row.get("vs_baseline", {}).get(data)
            if change is None or (row["pooling"], row["attention"]) == BASELINE:
                cells.append("baseline" if change is not None else "")
            else:
                c_low, c_high = change["change_ci"]
                mark = "" if change["separated"] else " (not separated)"
                cells.append(f"{change['change']:+.2f} ({c_low:+.2f} to {c_high:+.2f}){mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "results" in r]
    figure, axes = plt.subplots(1, 2, figsize=(12, 0.4 * len(done) + 1.5), sharey=True)
    labels = [f"{r['pooling']} / {r['attention']}" for r in done]
    for axis, (data, metric) in zip(axes, METRICS.items()):
        values = [r["results"][data][metric] for r in done]
        lows = [v - r["results"][data][f"{metric}_ci"][0] for v, r in zip(values, done)]
        highs = [r["results"][data][f"{metric}_ci"][1] - v for v, r in zip(values, done)]
        colours = ["tab:blue" if r["attention"] == "bidirectional" else "tab:orange" for r in done]
        axis.barh(range(len(done)), values, xerr=[lows, highs], color=colours, capsize=3)
        axis.set_title(f"{data}: {metric} (95% bootstrap CI)")
    axes[0].set_yticks(range(len(done)), labels)
    axes[0].invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a 2 x 2 grid, 1 step, small evaluation subsets")
    parser.add_argument("--out", default="runs/pooling_attention_study", help="folder for the sweep and the report")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every training job")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--skip-training", action="store_true", help="evaluate the sweep already in --out")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    sweep = out / "sweep"
    if not args.skip_training:
        train_grid(sweep, args.smoke, args.set)
    data_root = Path(os.environ.get("EMBPLEX_DATA", REPO.parent / "shared" / "data"))
    data = evaluation_data(data_root, args.smoke)
    rows = cells(sweep)
    if not rows:
        raise SystemExit(f"no trained jobs in {sweep}")
    from embplex.errors import NonFiniteError

    for row in rows:
        if row["status"] == "completed":
            try:
                row["results"] = evaluate(Path(row["folder"]), data, args.bootstrap)
            except NonFiniteError as error:  # e.g. cls under causal attention: one vector for every text
                row["error"] = str(error)
                continue
            for result in row["results"].values():
                result.pop("model", None)
    compare(rows, args.bootstrap)
    command = "python benchmarks/pooling_attention.py" + (" --smoke" if args.smoke else "") + "".join(
        f" --set {s}" for s in args.set
    )
    report = {
        "command": command,
        "smoke": args.smoke,
        "baseline": list(BASELINE),
        "seconds": round(time.perf_counter() - started, 1),
        "cells": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "pooling-attention.md").write_text(f"Command: `{command}`\n\n{table(rows)}\n")
    plot(rows, out / "pooling-attention.png")
    print(table(rows))
    print(f"\nresults, table and plot written to {out} in {report['seconds']:.0f}s")
    return 0 if all("results" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
