"""The late-interaction study: ``python benchmarks/run.py late_interaction [--smoke] [overrides...]``.

Runs the recipe ``conf/experiment/late_interaction.yaml`` (any Hydra override after the
options applies to every arm, except ``pooling.*`` and ``index.*`` ones, which do not apply
to the single-vector arm) and compares, on SciFact test:

* ``single_vector``: the recipe's backbone with ``pooling=mean`` in ``index=exact``;
* ``multi_vector_untrained``: the recipe's ``multi_vector`` model as composed;
* ``multi_vector_finetuned``: the same after the recipe's ``late_interaction`` fine-tune.

For each arm: nDCG@10 and recall@100 with 95% bootstrap intervals over queries, bytes
stored per document, and queries per second of its search. A multi-vector arm is
searched twice over the same stored sets: exact Chamfer search (every document
re-ranked) and MUVERA (``index.candidates`` found by FDE, then re-ranked); the result
also says how many of exact Chamfer's top 10 MUVERA finds. Paired intervals compare the
arms query by query. ``--smoke`` keeps 12 judged queries, their documents and 40 others,
short texts and 2 training steps: a check that it runs, not a measurement.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import common

NAME = "late_interaction"
SMOKE = [
    "train.max_steps=2", "train.batch_size=4", "train.progress_bar=false", "data.train.limit=16",
    "backbone.max_length=48", "eval.bootstrap=50",
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import embplex
    from embplex.app import build_model, run_train
    from embplex.config import compose_config

    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--plot", type=Path, default=None, help="also draw the result as a PNG here")
    parse.add_argument("overrides", nargs="*", help="Hydra overrides applied on top of experiment=late_interaction")
    args = parse.parse_args(argv)
    registry = embplex.load_registry()
    overrides = ["experiment=late_interaction", *(SMOKE if args.smoke else []), *args.overrides]
    if args.smoke and not any(o.startswith("output_dir=") for o in args.overrides):
        overrides.append(f"output_dir={tempfile.mkdtemp(prefix='late-interaction-smoke-')}")
    cfg = compose_config(overrides, registry=registry)
    # the single-vector arm: the same run with mean pooling and an exact index; options of the
    # multi-vector pooling and of muvera given on the command line do not apply to it
    shared = [o for o in overrides if not o.lstrip("+~").startswith(("pooling.", "index."))]
    single_cfg = compose_config([*shared, "pooling=mean", "index=exact"], registry=registry)
    corpus, queries, qrels = _data(cfg, args.smoke)
    bootstrap = cfg["eval"]["bootstrap"]
    started = time.perf_counter()

    arms: dict[str, dict[str, Any]] = {}
    print("1/4 single-vector model (mean pooling, exact index)", file=sys.stderr, flush=True)
    arms["single_vector"] = _single_vector(build_model(single_cfg, registry), single_cfg, registry, corpus, queries, qrels, bootstrap)
    print("2/4 multi-vector model, untrained projection", file=sys.stderr, flush=True)
    model = build_model(cfg, registry)
    arms["multi_vector_untrained"] = _multi_vector(model, cfg, registry, corpus, queries, qrels, bootstrap)
    print("3/4 late-interaction fine-tune", file=sys.stderr, flush=True)
    trained = run_train(cfg, registry, model=model)
    print("4/4 multi-vector model, fine-tuned", file=sys.stderr, flush=True)
    arms["multi_vector_finetuned"] = _multi_vector(model, cfg, registry, corpus, queries, qrels, bootstrap)

    from embplex.evaluation import paired_change

    def change(before: str, after: str, search: str = "exact_chamfer") -> dict[str, Any]:
        old, new = (arms[name].get(search, arms[name].get("exact")) for name in (before, after))
        return paired_change(old, new, n=bootstrap)

    result = {
        "benchmark": NAME,
        "smoke": args.smoke,
        "command": " ".join(["python benchmarks/run.py", NAME, *(argv if argv is not None else sys.argv[1:])]),
        "machine": common.machine_info(),
        "settings": {
            "overrides": overrides,
            "pooling": cfg["pooling"], "loss": cfg["loss"], "index": cfg["index"], "train": cfg["train"],
            "backbone": cfg["backbone"], "queries": len(queries), "corpus": len(corpus),
            "training": {"steps": trained.step, "final_loss": trained.loss},
        },
        "arms": {name: _summary(arm) for name, arm in arms.items()},
        "paired_change": {
            "multi_vector_untrained_vs_single_vector": change("single_vector", "multi_vector_untrained"),
            "multi_vector_finetuned_vs_untrained": change("multi_vector_untrained", "multi_vector_finetuned"),
            "multi_vector_finetuned_vs_single_vector": change("single_vector", "multi_vector_finetuned"),
            "muvera_vs_exact_chamfer_finetuned": paired_change(
                arms["multi_vector_finetuned"]["exact_chamfer"], arms["multi_vector_finetuned"]["muvera"], n=bootstrap
            ),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": common.peak_rss_mib(),
    }
    if args.plot is not None:
        plot(result, args.plot)
    return common.finish(result, args, NAME)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Two panels: nDCG@10 (95% interval) against bytes stored per document, and against
    queries per second of the search, one point per arm and search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_size, by_speed) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for arm, figures in result["arms"].items():
        sizes = figures["bytes_per_document"]
        size = sizes if isinstance(sizes, (int, float)) else sum(sizes.values())
        for search in ("exact", "exact_chamfer", "muvera"):
            if search not in figures:
                continue
            scores = figures[search]
            low, high = scores["ndcg@10_ci"]
            error = [[scores["ndcg@10"] - low], [high - scores["ndcg@10"]]]
            label = f"{arm} · {search.replace('_', ' ')}"
            marker = "s" if search == "muvera" else "o"
            by_size.errorbar([size], [scores["ndcg@10"]], yerr=error, fmt=marker, capsize=3, label=label)
            by_speed.errorbar([scores["queries_per_second"]], [scores["ndcg@10"]], yerr=error, fmt=marker, capsize=3)
    by_size.set(xscale="log", xlabel="bytes stored per document", ylabel="SciFact test nDCG@10 (95% CI)")
    by_speed.set(xscale="log", xlabel="queries per second (search only)")
    by_size.legend(fontsize=7, loc="lower right")
    for axes in (by_size, by_speed):
        axes.grid(alpha=0.3)
    figure.suptitle("Late interaction on SciFact test: quality against storage and search speed")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _data(cfg: dict[str, Any], smoke: bool) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, float]]]:
    from embplex.data import load_beir

    corpus, queries, qrels = load_beir(cfg["data"]["eval"]["path"], cfg["data"]["eval"]["split"])
    judged = [q for q in qrels if qrels[q]]
    if smoke:
        judged = judged[:12]
        keep = {d for q in judged for d in qrels[q]} | set(list(corpus)[:40])
        corpus = {d: text for d, text in corpus.items() if d in keep}
    return corpus, {q: queries[q] for q in judged}, {q: qrels[q] for q in judged}


def _scores(hits: list[list[str]], judged: list[str], qrels: dict[str, dict[str, float]], bootstrap: int) -> dict[str, Any]:
    """The retrieval metrics of ``embplex.evaluation.evaluate_retrieval`` for given hits."""
    from embplex.evaluation import bootstrap_ci, ndcg_at_k, recall_at_k

    per_query = {
        "ndcg@10": np.array([ndcg_at_k(ranked, qrels[q], 10) for q, ranked in zip(judged, hits)]),
        "recall@100": np.array([recall_at_k(ranked, qrels[q], 100) for q, ranked in zip(judged, hits)]),
    }
    out: dict[str, Any] = {"task": "retrieval", "per_item": {"ids": judged, **{k: v.tolist() for k, v in per_query.items()}}}
    for name, values in per_query.items():
        low, high = bootstrap_ci(values, np.mean, n=bootstrap)
        out[name], out[f"{name}_ci"] = 100 * float(values.mean()), [100 * low, 100 * high]
    return out


def _timed_search(index: Any, query_vectors: Any, k: int) -> tuple[Any, float]:
    started = time.perf_counter()
    hits = index.search(query_vectors, k)
    return hits, len(query_vectors) / (time.perf_counter() - started)


def _encode(model: Any, texts: list[str], cfg: dict[str, Any]) -> Any:
    return model.encode(texts, batch_size=cfg["eval"]["batch_size"])


def _single_vector(model, cfg, registry, corpus, queries, qrels, bootstrap) -> dict[str, Any]:
    from embplex.app import index_factory

    doc_ids, judged = list(corpus), list(queries)
    index = index_factory(cfg, registry)(model.dim)
    index.add(doc_ids, _encode(model, [corpus[d] for d in doc_ids], cfg))
    hits, qps = _timed_search(index, _encode(model, [queries[q] for q in judged], cfg), 100)
    return {"exact": {**_scores(hits.ids, judged, qrels, bootstrap), "queries_per_second": qps}, "bytes_per_document": 4 * model.dim}


def _multi_vector(model, cfg, registry, corpus, queries, qrels, bootstrap) -> dict[str, Any]:
    from embplex.app import index_factory

    doc_ids, judged = list(corpus), list(queries)
    index = index_factory(cfg, registry)(model.dim)
    index.add(doc_ids, _encode(model, [corpus[d] for d in doc_ids], cfg))
    query_sets = _encode(model, [queries[q] for q in judged], cfg)
    found, muvera_qps = _timed_search(index, query_sets, 100)
    candidates, index.candidates = index.candidates, None  # the same stored sets, every document re-ranked
    exact, exact_qps = _timed_search(index, query_sets, 100)
    index.candidates = candidates
    overlap = [len(set(f[:10]) & set(e[:10])) / min(10, len(e)) for f, e in zip(found.ids, exact.ids)]
    sizes = index.nbytes_per_item()
    return {
        "exact_chamfer": {**_scores(exact.ids, judged, qrels, bootstrap), "queries_per_second": exact_qps},
        "muvera": {
            **_scores(found.ids, judged, qrels, bootstrap), "queries_per_second": muvera_qps,
            "candidates": candidates, "recall@10_of_exact_chamfer_top10": float(np.mean(overlap)),
        },
        "bytes_per_document": sizes,
        "mean_vectors_per_document": float(sizes["vectors"] / (4 * model.dim)),
    }


def _summary(arm: dict[str, Any]) -> dict[str, Any]:
    """An arm without the per-query lists (kept only for the paired intervals)."""
    return {
        key: ({k: v for k, v in value.items() if k != "per_item"} if isinstance(value, dict) else value)
        for key, value in arm.items()
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
