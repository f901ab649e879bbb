"""The distillation study of issue 11: a 2-layer student of all-MiniLM-L6-v2 trained with
``infonce`` alone and with ``score_distill``, ``listwise_distill`` and ``soft_label`` from
the 6-layer model, evaluated on STS-B test and SciFact test; the untrained student is the
floor and the teacher's own scores the ceiling.

The recipe is ``conf/experiment/distillation.yaml``; this script runs it as five Hydra
sweeps (``embplex <command> -m``) and gathers their records into one table:

1. ``eval -m experiment=distillation data=stsb,scifact backbone.num_layers=2,null``
   (the untrained 2-layer student, and the 6-layer teacher itself);
2. ``train -m experiment=distillation data=stsb,scifact loss=infonce``;
3. ``train -m experiment=distillation data=stsb,scifact loss=score_distill,listwise_distill,soft_label
   loss.in_batch=true`` (the teacher scores every pair of each batch; its vectors are
   cached in ``teacher.cache`` and shared by the jobs);
4. and 5. ``eval -m experiment=distillation data=<d> model.load=<each student trained on d>``.

    python benchmarks/distillation.py            # the study (docs/results/training.md; 40 minutes on one thread)
    python benchmarks/distillation.py --smoke    # the same sweeps on a handful of texts with a tiny
                                                 # random BERT as student and teacher: what CI runs

Writes ``<output>/distillation.json`` (every job's metrics and overrides) and prints a
markdown table. Extra arguments are passed to every command as overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DATA_SETS = ("stsb", "scifact")
DISTILLATION_LOSSES = ("score_distill", "listwise_distill", "soft_label")
# what smoke mode changes: a few steps on a few examples, little bootstrapping
SMOKE = [
    "data.train.limit=8",
    "train.max_steps=2",
    "train.batch_size=4",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "eval.bootstrap=10",
    "eval.batch_size=16",
]


def smoke_data(shared: Path, target: Path) -> Path:
    """A data root with the files the recipe reads, cut to a handful of rows: STS-B train
    and test, and SciFact with 6 test queries, 8 train queries and their documents."""
    (target / "sts" / "stsb").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = (shared / "sts" / "stsb" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        # train keeps high-scoring pairs only (min_score 4): take enough rows to find some
        chosen = lines[:1] + [line for line in lines[1:] if split == "test" or float(line.split("\t")[-1]) >= 4][:12]
        (target / "sts" / "stsb" / f"{split}.tsv").write_text("\n".join(chosen) + "\n", encoding="utf-8")
    source, folder = shared / "retrieval" / "scifact", target / "retrieval" / "scifact"
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    queries_wanted: set[str] = set()
    documents_wanted: set[str] = set()
    for split, count in (("test", 6), ("train", 8)):
        lines = (source / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        kept = lines[1 : 1 + count]
        queries_wanted |= {line.split("\t")[0] for line in kept}
        documents_wanted |= {line.split("\t")[1] for line in kept}
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines[:1] + kept) + "\n", encoding="utf-8")
    for name, wanted, extra in (("queries", queries_wanted, 0), ("corpus", documents_wanted, 10)):
        kept = []
        for line in (source / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            record_id = json.loads(line)["_id"]
            if record_id in wanted or (extra and len(kept) < len(wanted) + extra and record_id not in wanted):
                kept.append(line)
        (folder / f"{name}.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    (target / "README.md").write_text("smoke-test cut of the shared data\n", encoding="utf-8")
    return target


def sweep(command: str, overrides: list[str], output: Path) -> list[dict[str, Any]]:
    """One ``embplex <command> -m`` sweep; its jobs' records (metrics, overrides)."""
    from embplex.cli import main
    from embplex.storage import read_json

    code = main([command, "-m", "experiment=distillation", f"output_dir={output}", *overrides])
    summary = read_json(output / "multirun_summary.json", "sweep summary")
    if code != 0 or summary["failed"]:
        errors = "; ".join(job["error"] or "" for job in summary["jobs"] if job["status"] != "completed")
        raise SystemExit(f"embplex {command} -m {' '.join(overrides)} failed: {errors}")
    if command == "eval":  # the headline keeps numbers only; each metric's 95% interval is in the job's results
        for job in summary["jobs"]:
            # evaluation.write_results wraps the results with the version and the time
            results = read_json(Path(job["output_dir"]) / "results.json", "evaluation results")["results"]
            job["metrics"].update({f"{name}_ci": results[f"{name}_ci"] for name in list(job["metrics"])})
    return summary["jobs"]


def choice(job: dict[str, Any], key: str) -> str | None:
    for override in job["overrides"]:
        name, _, value = override.partition("=")
        if name == key:
            return value
    return None


def run(output: Path, extra: list[str]) -> dict[str, Any]:
    data = ",".join(DATA_SETS)
    reference = sweep("eval", [f"data={data}", "backbone.num_layers=2,null", *extra], output / "reference")
    trained = sweep("train", [f"data={data}", "loss=infonce", *extra], output / "train-infonce")
    trained += sweep(
        "train",
        # ++: Hydra first composes the sweep with the recipe's loss (infonce), which has no in_batch
        [f"data={data}", f"loss={','.join(DISTILLATION_LOSSES)}", "++loss.in_batch=true", *extra],
        output / "train-distill",
    )
    rows: dict[str, dict[str, Any]] = {}
    for job in reference:
        name = "student, untrained (floor)" if choice(job, "backbone.num_layers") == "2" else "teacher (ceiling)"
        rows.setdefault(name, {})[choice(job, "data")] = job["metrics"]
    for data_set in DATA_SETS:
        runs = [job for job in trained if choice(job, "data") == data_set]
        evaluated = sweep(
            "eval",
            [f"data={data_set}", "model.load=" + ",".join(job["output_dir"] for job in runs), *extra],
            output / f"eval-{data_set}",
        )
        by_folder = {choice(job, "model.load"): job["metrics"] for job in evaluated}
        for job in runs:
            rows.setdefault(choice(job, "loss"), {})[data_set] = by_folder[job["output_dir"]]
    return {"rows": rows, "overrides": extra}


def cell(metrics: dict[str, Any], name: str) -> str:
    """``value (low–high)``: the metric and its 95% interval, where the run has them."""
    if name not in metrics:
        return "–"
    interval = metrics.get(f"{name}_ci")
    return f"{metrics[name]:.2f}" + (" ({:.2f}–{:.2f})".format(*interval) if interval else "")


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    metrics = {
        data_set: sorted({m for row in rows.values() for m in row.get(data_set, {}) if not m.endswith("_ci")})
        for data_set in DATA_SETS
    }
    header = ["model"] + [f"{d} {m}" for d in DATA_SETS for m in metrics[d]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = ["student, untrained (floor)", "infonce", *DISTILLATION_LOSSES, "teacher (ceiling)"]
    for name in [n for n in order if n in rows]:
        cells = [cell(rows[name].get(d, {}), m) for d in DATA_SETS for m in metrics[d]]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a handful of texts and steps (what CI runs)")
    parser.add_argument("--output", type=Path, default=Path("runs/distillation"), help="folder for every sweep")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data root")
    args, extra = parser.parse_known_args(argv)
    output = args.output.resolve()
    # every training job shares one cache of the teacher's vectors: it runs once per text
    overrides = [f"teacher.cache={output / 'teacher-cache.safetensors'}", *extra]
    if args.smoke:
        from embplex.testing import build_encoder

        root = smoke_data(args.data.resolve(), output / "smoke-data")
        # a tiny random 3-layer BERT stands in for all-MiniLM-L6-v2: student (2 layers) and teacher
        tiny = build_encoder(output / "smoke-model", layers=3)
        teacher = f"teacher.backbone={{name:hf_encoder,path:'{tiny}'}}"
        overrides = [*SMOKE, f"data.root={root}", f"backbone.path={tiny}", teacher, *overrides]
    results = run(output, overrides)
    output.mkdir(parents=True, exist_ok=True)
    (output / "distillation.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
