"""Index settings side by side: quality, speed, build time and memory per vector.

Two parts, each over the settings of ``SETTINGS`` (every index plugin, several options):

* **SciFact** (5,183 documents, 300 test queries, all-MiniLM-L6-v2 embeddings computed
  once): nDCG@10 of each setting with its percentile bootstrap 95% interval over queries
  and its paired change against ``exact`` (same resampled queries; the per-query scores
  are in the JSON), recall@10 against ``exact``, queries per second (all queries in one
  ``search`` call), build time (``add`` of the whole corpus) and bytes per vector
  (``index.nbytes / len(index)``).
* **Synthetic scale** (default 1,000,000 × 384): random unit vectors with planted
  neighbours — each of the 1,000 queries has 10 stored vectors near it (noise growing
  from 0.15 to 0.6), the rest are uniform on the sphere — with recall@10 against
  ``exact``, queries per second, build time and bytes per vector. Drawn in chunks: at
  1,000,000 the vectors take 1.5 GB and the run an estimated 5 GB.

Every build and search also records its CPU seconds (``time.process_time``), steadier than
wall time on a shared machine; the time estimates in docs/results/indexes.md scale from them.

Then two Pareto plots (quality against bytes per vector, quality against queries per
second) next to the JSON result. ``conf/experiment/indexes.yaml`` is the same comparison
through ``embplex eval -m``, one job per index plugin, for nDCG@10 alone.

    python benchmarks/run.py indexes --ef-construction 64 --json    # the full run at 1,000,000 (see docs/results/indexes.md)
    python benchmarks/run.py indexes --parts synthetic --synthetic-count 200000 --synthetic-settings "faiss hnsw,binary 1-bit rescored"
    python benchmarks/run.py indexes --smoke     # 10 SciFact queries, 2,000 synthetic vectors: about a minute
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import common

NAME = "indexes"

# (label, index plugin, options, parts it runs in)
SETTINGS: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    ("exact", "exact", {}, ("scifact", "synthetic")),
    ("faiss flat", "faiss", {"structure": "flat"}, ("scifact", "synthetic")),
    ("faiss hnsw", "faiss", {"structure": "hnsw", "hnsw_m": 32, "ef_construction": 200, "ef_search": 128}, ("scifact", "synthetic")),
    ("faiss ivfpq", "faiss", {"structure": "ivfpq", "nlist": "sqrt", "pq_m": 48, "pq_bits": 8, "nprobe": 16}, ("scifact", "synthetic")),
    *[
        (f"binary {bits}-bit{' rescored' if rescore else ''}", "binary",
         {"bits": bits, "rescore": rescore, "keep_vectors": rescore, "vectors_on_disk": rescore, "oversample": 10},
         ("scifact", "synthetic"))
        for bits in (1, 2, 4) for rescore in (False, True)
    ],
    ("funnel prefix 64", "matryoshka_funnel", {"prefix": 64, "oversample": 10}, ("scifact", "synthetic")),
    ("funnel prefix 128", "matryoshka_funnel", {"prefix": 128, "oversample": 10}, ("scifact", "synthetic")),
    ("milvus lite", "milvus", {}, ("scifact",)),
]


def options_for(options: dict[str, Any], items: int, threads: int, name: str) -> dict[str, Any]:
    """Options resolved for a corpus size: ``nlist: sqrt`` is about 4·√n IVF lists, and
    faiss gets the thread count every setting runs with."""
    resolved = dict(options)
    if resolved.get("nlist") == "sqrt":
        resolved["nlist"] = max(16, min(4096, int(4 * np.sqrt(items))))
    if name == "faiss":
        resolved["threads"] = threads
    return resolved


def planted(items: int, queries: int, dim: int, seed: int = 0, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors; the first ``10 · queries`` are the planted neighbours of the queries.

    Drawn and normalised ``chunk`` rows at a time (the same random stream as one draw), so
    1,000,000 × 384 needs its 1.5 GB and no full-size temporaries."""
    rng = np.random.default_rng(seed)
    data = np.empty((items, dim), dtype=np.float32)
    for start in range(0, items, chunk):
        block = rng.standard_normal((min(chunk, items - start), dim), dtype=np.float32)
        data[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    asked = rng.standard_normal((queries, dim), dtype=np.float32)
    asked /= np.linalg.norm(asked, axis=1, keepdims=True)
    noise = (0.15 + 0.05 * np.arange(10, dtype=np.float32))[None, :, None] / np.sqrt(dim)
    near = asked[:, None, :] + noise * rng.standard_normal((queries, 10, dim), dtype=np.float32)
    data[: 10 * queries] = (near / np.linalg.norm(near, axis=2, keepdims=True)).reshape(-1, dim)
    return data, asked


def measure(registry: Any, name: str, options: dict[str, Any], ids: list[str], vectors: np.ndarray,
            queries: np.ndarray, k: int) -> tuple[list[list[str]], dict[str, Any]]:
    """Build one index, search every query once; hits and costs."""
    index = registry.create("index", name, dim=vectors.shape[1], **options)
    # wall and CPU seconds: on a shared machine the CPU seconds (this process's, all its
    # threads) are the steadier figure, and what the time estimates scale from
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(ids), 100_000):
        index.add(ids[start : start + 100_000], vectors[start : start + 100_000])
    build, build_cpu = time.perf_counter() - started, time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    hits = index.search(queries, k).ids
    seconds, search_cpu = time.perf_counter() - started, time.process_time() - cpu
    costs = {
        "build_seconds": round(build, 3),
        "build_cpu_seconds": round(build_cpu, 3),
        "queries_per_second": round(len(queries) / seconds, 1),
        "search_cpu_seconds_per_query": round(search_cpu / len(queries), 6),
        "bytes_per_vector": round(index.nbytes / len(index), 2),
        "peak_rss_mib": round(common.peak_rss_mib(), 1),
    }
    if hasattr(index, "close"):
        index.close()
    return hits, costs


def overlap(found: list[list[str]], truth: list[list[str]], k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, truth)]))


def with_intervals(per_query: np.ndarray, judged: list[str], bootstrap: int) -> dict[str, Any]:
    """nDCG@10 ×100 with its percentile bootstrap 95% interval, and the per-query scores
    in the shape of ``embplex.evaluation.evaluate_retrieval``'s result, so
    ``paired_change`` can compare two settings query by query."""
    from embplex.evaluation import bootstrap_ci

    low, high = bootstrap_ci(per_query, np.mean, n=bootstrap)
    return {"task": "retrieval", "ndcg@10": 100 * float(per_query.mean()), "ndcg@10_ci": [100 * low, 100 * high],
            "per_item": {"ids": judged, "ndcg@10": per_query.tolist()}}


def scifact_part(registry: Any, smoke: bool, threads: int, bootstrap: int) -> dict[str, Any]:
    import embplex
    from embplex.data import load_beir
    from embplex.evaluation import ndcg_at_k, paired_change

    corpus, queries, qrels = load_beir(common.DATA / "retrieval" / "scifact", split="test")
    judged = [q for q in qrels if qrels[q]]
    if smoke:  # 10 queries, their judged documents and 50 others
        judged = judged[:10]
        keep = {d for q in judged for d in qrels[q]} | set(list(corpus)[:50])
        corpus = {d: t for d, t in corpus.items() if d in keep}
    model = embplex.compose({"name": "hf_encoder", "path": common.minilm_path()}, pooling="mean")
    doc_ids = list(corpus)
    started = time.perf_counter()
    doc_vectors = np.asarray(model.encode([corpus[d] for d in doc_ids], batch_size=64, show_progress=False), dtype=np.float32)
    query_vectors = np.asarray(model.encode([queries[q] for q in judged], batch_size=64, show_progress=False), dtype=np.float32)
    encode_seconds = time.perf_counter() - started
    rows, truth, baseline = [], None, None
    for label, name, options, parts in SETTINGS:
        if "scifact" not in parts:
            continue
        hits, costs = measure(registry, name, options_for(options, len(doc_ids), threads, name), doc_ids,
                              doc_vectors, query_vectors, 100)
        scores = with_intervals(np.array([ndcg_at_k(ranked, qrels[q], 10) for q, ranked in zip(judged, hits)]),
                                judged, bootstrap)
        truth = hits if truth is None else truth  # exact comes first
        baseline = scores if baseline is None else baseline
        # paired: each resample draws the same queries for both settings (×100 already)
        change = paired_change(baseline, scores, n=bootstrap)["ndcg@10"]
        rows.append({"setting": label, "index": name, "options": options, "ndcg@10": round(scores["ndcg@10"], 2),
                     "ndcg@10_ci": [round(x, 2) for x in scores["ndcg@10_ci"]],
                     "ndcg@10_change_vs_exact": round(change["change"], 2),
                     "ndcg@10_change_vs_exact_ci": [round(x, 2) for x in change["change_ci"]],
                     "recall@10_vs_exact": round(overlap(hits, truth), 4), **costs,
                     "ndcg@10_per_query": [round(x, 5) for x in scores["per_item"]["ndcg@10"]]})
    return {"documents": len(doc_ids), "queries": len(judged), "query_ids": judged, "encode_seconds": round(encode_seconds, 1),
            "model": common.MODEL_NAME, "bootstrap": bootstrap,
            "intervals": "percentile bootstrap 95% over queries; the change against exact is paired (same resampled queries)",
            "settings": rows}


def synthetic_part(registry: Any, items: int, queries: int, dim: int, threads: int,
                   only: list[str] | None = None, ef_construction: int | None = None) -> dict[str, Any]:
    """The settings of ``SETTINGS`` for the synthetic part (``only``: these labels, in
    ``SETTINGS`` order; ``exact`` always runs first, it is the reference), HNSW built with
    ``ef_construction`` when given."""
    data, asked = planted(items, queries, dim)
    ids = [f"v{i}" for i in range(items)]
    rows, truth = [], None
    for label, name, options, parts in SETTINGS:
        if "synthetic" not in parts or (name == "matryoshka_funnel" and options["prefix"] >= dim):
            continue
        if only is not None and label != "exact" and label not in only:
            continue
        if ef_construction is not None and "ef_construction" in options:
            options = {**options, "ef_construction": ef_construction}
        hits, costs = measure(registry, name, options_for(options, items, threads, name), ids, data, asked, 10)
        truth = hits if truth is None else truth
        planted_recall = overlap(hits, [[f"v{10 * q + j}" for j in range(10)] for q in range(queries)])
        rows.append({"setting": label, "index": name, "options": options, "recall@10_vs_exact": round(overlap(hits, truth), 4),
                     "recall@10_planted": round(planted_recall, 4), **costs})
    return {"items": items, "queries": queries, "dim": dim,
            "data": "random unit vectors; each query has 10 planted neighbours (noise 0.15 to 0.6 / sqrt(dim))",
            "settings": rows}


def pareto_plots(result: dict[str, Any], output: Path) -> list[str]:
    """Quality against bytes per vector and against queries per second, one point per
    setting and part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    output.parent.mkdir(parents=True, exist_ok=True)
    for x_key, x_label, suffix in (("bytes_per_vector", "bytes per vector (log)", "memory"),
                                   ("queries_per_second", "queries per second (log)", "speed")):
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for axis, (part, y_key, y_label) in zip(axes, (("scifact", "ndcg@10", "SciFact nDCG@10 (95% CI)"),
                                                       ("synthetic", "recall@10_vs_exact", "synthetic recall@10 vs exact"))):
            for row in result.get(part, {}).get("settings", []):  # a part not run draws nothing
                if f"{y_key}_ci" in row:  # SciFact nDCG@10: its 95% interval as an error bar
                    low, high = row[f"{y_key}_ci"]
                    axis.errorbar(row[x_key], row[y_key], yerr=[[row[y_key] - low], [high - row[y_key]]], fmt="none",
                                  ecolor="grey", capsize=2)
                axis.scatter(row[x_key], row[y_key])
                axis.annotate(row["setting"], (row[x_key], row[y_key]), fontsize=7)
            axis.set_xscale("log")
            axis.set(xlabel=x_label, ylabel=y_label, title=part)
        figure.tight_layout()
        path = output.with_name(f"{output.stem}-{suffix}.png")
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(str(path))
    return written


def check_arguments(parse: Any, args: Any) -> tuple[list[str], list[str] | None]:
    """The parts and synthetic settings asked for, checked before any work starts."""
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if not parts or set(parts) - {"scifact", "synthetic"}:
        parse.error(f"--parts takes scifact and/or synthetic, not {args.parts!r}")
    only = None
    if args.synthetic_settings is not None:
        only = [label.strip() for label in args.synthetic_settings.split(",") if label.strip()]
        known = [label for label, _, _, setting_parts in SETTINGS if "synthetic" in setting_parts]
        unknown = [label for label in only if label not in known]
        if unknown or not only:
            parse.error(f"--synthetic-settings: unknown {unknown or only}; the labels are: {', '.join(known)}")
    if args.items < 10 * args.queries:
        parse.error(f"--items ({args.items}) must be at least 10 x --queries ({args.queries}): each query plants 10 neighbours")
    return parts, only


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--items", "--synthetic-count", dest="items", type=int, default=1_000_000,
                       help="synthetic vectors (smoke: 2,000)")
    parse.add_argument("--queries", type=int, default=1_000, help="synthetic queries (smoke: 20)")
    parse.add_argument("--dim", type=int, default=384, help="synthetic width")
    parse.add_argument("--threads", type=int, default=1, help="threads for torch and faiss: one, so settings compare fairly")
    parse.add_argument("--parts", default="scifact,synthetic", help="comma-separated parts to run: scifact, synthetic")
    parse.add_argument("--synthetic-settings", default=None,
                       help="comma-separated setting labels for the synthetic part (default all; exact always runs)")
    parse.add_argument("--ef-construction", type=int, default=None,
                       help="HNSW ef_construction in the synthetic part (default the setting's 200)")
    parse.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (smoke: 50)")
    args = parse.parse_args(argv)
    if args.smoke:
        args.items, args.queries, args.bootstrap = 2_000, 20, 50
    parts, only = check_arguments(parse, args)
    import torch

    import embplex

    torch.set_num_threads(args.threads)
    registry = embplex.load_registry()
    result = {
        "benchmark": NAME,
        "command": " ".join(["python benchmarks/run.py", NAME, *(argv if argv is not None else sys.argv[1:])]),
        "smoke": args.smoke,
        "finished": None,
        "machine": common.machine_info(),
        "settings": {"threads": args.threads, "search": "all queries in one search call, k=100 (SciFact), 10 (synthetic)"},
    }
    if "scifact" in parts:
        result["scifact"] = scifact_part(registry, args.smoke, args.threads, args.bootstrap)
    if "synthetic" in parts:
        result["synthetic"] = synthetic_part(registry, args.items, args.queries, args.dim, args.threads,
                                             only, args.ef_construction)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["plots"] = pareto_plots(result, common.output_path(args, NAME))
    return common.finish(result, args, NAME)


if __name__ == "__main__":
    main()
