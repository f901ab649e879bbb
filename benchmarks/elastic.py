"""The elastic-embeddings study: which loss makes shallow, short embeddings good?

Trains all-MiniLM-L6-v2 under each loss of ``--losses`` with the recipe
``conf/experiment/elastic.yaml`` (same data, seed and budget; each run in
``<output_dir>/<loss>``), then scores the untrained model and each trained one at every
layer × width: STS-B test Spearman, SciFact test nDCG@10 and the LIMIT-style task's
recall@2/10/100 (``data=limit``), each with its 95% bootstrap interval. Writes one JSON
with every grid, and with ``--plots`` a heatmap per model and metric and a difference map
against ``infonce``. Beside the grids, a lexical baseline on the same LIMIT task (and on
its large variant, 1,000 distractors): BM25 (``bm25s``, the ``bench`` extra) over words,
and over word 1-3-grams within each comma-separated phrase — our items are three-word
phrases built from shared words ("huge amber bicycles"), so a bag of single words cannot
tell them apart, while the paper's items are single distinctive words.

    python benchmarks/elastic.py --output runs/elastic/results.json --plots docs/results
    python benchmarks/elastic.py --smoke --output /tmp/elastic.json backbone.path=<tiny model>
    python benchmarks/elastic.py --lexical-only --output runs/elastic/lexical.json  # BM25 alone, seconds

Extra arguments are Hydra overrides applied to every run. ``--smoke`` trains 1 step on 8
pairs, scores 2 layers × 2 widths on 16 STS-B pairs and a 8-document LIMIT task, and skips
SciFact: it checks the pipeline, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LOSSES = ["infonce", "matryoshka", "matryoshka_2d", "starbucks"]
DIMS = [32, 64, 128, 256, 384]
#: BM25 tokenizations: word n-gram lengths (1: plain BM25 over words)
BM25_NGRAMS = {"bm25_words": (1,), "bm25_phrases": (1, 2, 3)}


def lexical_tokens(text: str, ngrams: tuple[int, ...]) -> list[str]:
    """Lower-cased word n-grams of ``text``, never across punctuation (a LIMIT document's
    items are comma-separated, so an n-gram never joins two items)."""
    import re

    tokens = []
    for phrase in re.split(r"[^\w\s]", text.lower()):
        words = phrase.split()
        tokens += [" ".join(words[i : i + n]) for n in ngrams for i in range(len(words) - n + 1)]
    return tokens


def bm25_limit(corpus: dict, queries: dict, qrels: dict, ngrams: tuple[int, ...], bootstrap: int) -> dict:
    """Recall@2/10/100 (95% bootstrap intervals) of BM25 (``bm25s``, its default k1=1.5,
    b=0.75) on a LIMIT task: ``{"limit_recall@c": {"value", "ci"}}``."""
    import bm25s
    import numpy as np

    from embplex import evaluation

    ids, asked = list(corpus), [q for q in queries if q in qrels]
    retriever = bm25s.BM25()
    retriever.index([lexical_tokens(corpus[i], ngrams) for i in ids], show_progress=False)
    rows, _ = retriever.retrieve([lexical_tokens(queries[q], ngrams) for q in asked], k=min(100, len(ids)), show_progress=False)
    out = {}
    for cut in (2, 10, 100):
        per_query = np.array([evaluation.recall_at_k([ids[r] for r in row], qrels[q], cut) for q, row in zip(asked, rows)])
        out[f"limit_recall@{cut}"] = {"value": float(per_query.mean()), "ci": list(evaluation.bootstrap_ci(per_query, np.mean, n=bootstrap))}
    return out


def lexical_baselines(smoke: bool) -> dict:
    """BM25 on the grid's LIMIT task ("small") and on its large variant (1,000 distractor
    documents; skipped in smoke mode), for each tokenization of ``BM25_NGRAMS``."""
    from embplex.limit import generate

    tasks = {"small": generate(documents=8, queries=20) if smoke else generate()}
    if not smoke:
        tasks["large"] = generate(distractors=1000)
    return {
        f"{name}/{task}": bm25_limit(*limit, ngrams, bootstrap=50 if smoke else 1000)
        for task, limit in tasks.items() for name, ngrams in BM25_NGRAMS.items()
    }


def grid_scores(model, cfg, registry, layers, dims, smoke: bool) -> dict:
    """Every metric at every (layer, dim) cell: {metric: {"layer,dim": {value, ci}}}."""
    from embplex import evaluation
    from embplex.app import index_factory
    from embplex.data import load_beir, load_sts
    from embplex.limit import generate

    root = Path(cfg["data"]["root"])
    s1, s2, gold = load_sts(root / "sts" / "stsb" / "test.tsv")
    bootstrap = 50 if smoke else 1000
    if smoke:
        s1, s2, gold = s1[:16], s2[:16], gold[:16]
    limit = generate(documents=8, queries=20) if smoke else generate()
    scifact = None if smoke else load_beir(root / "retrieval" / "scifact", "test")
    make_index = index_factory(cfg, registry)
    out: dict = {}
    for layer in layers:
        for dim in dims:
            if dim > model.dim:
                continue
            cell = f"{layer},{dim}"
            options = {"layer": layer, "dim": dim}
            sts = evaluation.evaluate_sts(model, s1, s2, gold, encode_options=options, bootstrap=bootstrap)
            out.setdefault("stsb_spearman", {})[cell] = {"value": sts["spearman"], "ci": sts["spearman_ci"]}
            found = evaluation.evaluate_retrieval(model, *limit, make_index, k=100, encode_options=options, recall_at=(2, 10), bootstrap=bootstrap)
            for cut in (2, 10, 100):
                out.setdefault(f"limit_recall@{cut}", {})[cell] = {"value": found[f"recall@{cut}"], "ci": found[f"recall@{cut}_ci"]}
            if scifact is not None:
                found = evaluation.evaluate_retrieval(model, *scifact, make_index, encode_options=options, bootstrap=bootstrap)
                out.setdefault("scifact_ndcg@10", {})[cell] = {"value": found["ndcg@10"], "ci": found["ndcg@10_ci"]}
    return out


def plot(grids: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for metric in next(iter(grids.values())):
        for name, scores in grids.items():
            cells = scores[metric]
            layers = sorted({int(c.split(",")[0]) for c in cells})
            dims = sorted({int(c.split(",")[1]) for c in cells})
            table = np.array([[cells.get(f"{layer},{dim}", {}).get("value", np.nan) for dim in dims] for layer in layers])
            if name != "infonce" and "infonce" in grids:
                base = grids["infonce"][metric]
                table_base = np.array([[base.get(f"{layer},{dim}", {}).get("value", np.nan) for dim in dims] for layer in layers])
                panels = [(table, f"{name}"), (table - table_base, f"{name} − infonce")]
            else:
                panels = [(table, name)]
            figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
            for ax, (values, title) in zip(axes[0], panels):
                image = ax.imshow(values, cmap="viridis" if "−" not in title else "coolwarm", aspect="auto")
                ax.set_xticks(range(len(dims)), dims)
                ax.set_yticks(range(len(layers)), layers)
                ax.set_xlabel("dimensions")
                ax.set_ylabel("layer")
                ax.set_title(f"{title}: {metric}")
                figure.colorbar(image, ax=ax)
            figure.tight_layout()
            path = folder / f"elastic-{name}-{metric.replace('@', '_at_')}.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> int:
    import embplex
    from embplex.app import build_model, run_train
    from embplex.config import compose_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=LOSSES)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--plots", type=Path, help="folder for the heatmaps (PNG)")
    parser.add_argument("--lexical-only", action="store_true", help="the BM25 baseline alone: no model, no training")
    args, overrides = parser.parse_known_args(argv)
    if args.lexical_only:
        lexical = lexical_baselines(args.smoke)
        for name, scores in lexical.items():
            print(name, "  ".join(f"{metric} {cell['value']:.3f} [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]" for metric, cell in scores.items()))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"experiment": "elastic", "lexical": lexical}, indent=2) + "\n", encoding="utf-8")
        return 0
    registry = embplex.load_registry()
    base = ["experiment=elastic", *overrides]
    if args.smoke:
        base += ["train.max_steps=1", "train.batch_size=4", "data.train.limit=8", "train.progress_bar=false"]
    started = time.perf_counter()
    grids: dict = {}
    for name in ["untrained", *args.losses]:
        cfg = compose_config(base, registry=registry)
        model = build_model(cfg, registry)
        depth = model.backbone.num_layers
        if name != "untrained":
            extra = [f"loss={name}", f"output_dir={Path(cfg['output_dir']) / name}"]
            widths = sorted({d for d in DIMS if d <= model.dim} | {model.dim})
            if name in ("matryoshka", "matryoshka_2d"):
                extra.append("loss.dims=[" + ",".join(map(str, widths)) + "]")
            if name == "starbucks" and (depth, model.dim) != (6, 384):  # scale the ladder to this model
                pairs = [[layer, max(1, model.dim * layer // depth)] for layer in range(1, depth + 1)]
                extra.append("loss.pairs=" + json.dumps(pairs).replace(" ", ""))
            cfg = compose_config(base + extra, registry=registry)
            result = run_train(cfg, registry)
            model = embplex.load(result.model_path, registry=registry)
        layers = [1, depth] if args.smoke else list(range(1, depth + 1))
        dims = [d for d in DIMS if d <= model.dim][:2] if args.smoke else DIMS
        grids[name] = grid_scores(model, cfg, registry, layers, dims, args.smoke)
        print(f"{name}: scored {len(layers)} layers × {len(dims)} widths", flush=True)
    payload = {
        "experiment": "elastic",
        "command": "python benchmarks/elastic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": args.smoke,
        "seconds": round(time.perf_counter() - started, 1),
        "grids": grids,
        "lexical": lexical_baselines(args.smoke),
    }
    if args.plots:
        payload["plots"] = plot(grids, args.plots)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
