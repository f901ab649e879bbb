"""The free-embedding experiment of "On the Theoretical Limitations of Embedding-Based
Retrieval" (Weller et al., 2025, arXiv:2508.21038): for each dimension d, the largest
number of documents n whose every pair (k = 2) a d-dimensional embedding can return as a
query's exact top 2, when the query and document vectors are optimised directly, with no
model and no language in between (the best any embedding model of that size could do).

For one (n, d): C(n, 2) queries, one per pair; unconstrained vectors, unit-normalised after
every step; full-batch InfoNCE over all documents averaged over each query's positives;
Adam (lr 0.01), temperature 0.1, until every query's top 2 is its pair, the loss stops
improving (patience) or the step budget ends: the paper's settings. The critical n of d is
found by doubling n until a task fails, then bisecting between the last solved and the
first failed n. Written here from the paper's description; the search and stopping rule
are ours.

    python benchmarks/free_embedding.py --dims 4 8 16 32 64 --output free_embedding.json
    python benchmarks/free_embedding.py --smoke --output /tmp/free.json   # seconds
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch


def solve(n: int, d: int, k: int = 2, steps: int = 20000, lr: float = 0.01, temperature: float = 0.1, patience: int = 1000, seed: int = 0) -> dict:
    """Optimise free vectors for the all-``k``-sets task on ``n`` documents in ``d`` dims."""
    combos = list(itertools.combinations(range(n), k))
    relevant = torch.zeros(len(combos), n)
    for row, combo in enumerate(combos):
        relevant[row, list(combo)] = 1.0
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(len(combos), d, generator=generator), dim=-1).requires_grad_()
    docs = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1).requires_grad_()
    optimizer = torch.optim.Adam([queries, docs], lr=lr)
    best, since_best, step, accuracy = float("inf"), 0, 0, 0.0
    for step in range(1, steps + 1):
        log_probs = torch.log_softmax(queries @ docs.T / temperature, dim=1)
        loss = -(log_probs * relevant).sum() / relevant.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            queries.copy_(torch.nn.functional.normalize(queries, dim=-1))
            docs.copy_(torch.nn.functional.normalize(docs, dim=-1))
            top = (queries @ docs.T).topk(k, dim=1).indices
            accuracy = float(relevant.gather(1, top).sum() / relevant.sum())
        if accuracy == 1.0:
            break
        if float(loss.detach()) < best - 1e-5:
            best, since_best = float(loss), 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    return {"n": n, "d": d, "solved": accuracy == 1.0, "accuracy": accuracy, "steps": step}


def critical_n(d: int, k: int = 2, n_max: int = 10_000, **options) -> tuple[int, list[dict]]:
    """The largest n solved for ``d``: double n from d + 1 until one fails, then bisect."""
    runs: list[dict] = []

    def solved(n: int) -> bool:
        runs.append(solve(n, d, k, **options))
        return runs[-1]["solved"]

    low, high = k, d + 1  # k documents: the only query is trivially solved
    while high <= n_max and solved(high):
        low, high = high, high * 2
    high = min(high, n_max + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if solved(middle):
            low = middle
        else:
            high = middle
    return low, runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20000, help="step budget per (n, d)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="d = 2 only, with a small budget: checks the script runs")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="a PNG of critical n against d")
    args = parser.parse_args(argv)
    dims, steps = ([2], 200) if args.smoke else (args.dims, args.steps)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    results = []
    for d in dims:
        n, runs = critical_n(d, args.k, steps=steps, seed=args.seed, patience=min(1000, steps))
        results.append({"d": d, "critical_n": n, "runs": runs})
        print(f"d={d}: critical n = {n} ({len(runs)} tasks)", flush=True)
    payload = {
        "experiment": "free_embedding",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "smoke": args.smoke,
        "settings": {"k": args.k, "steps": steps, "lr": 0.01, "temperature": 0.1, "seed": args.seed},
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(5, 3.5))
        axes.plot([r["d"] for r in results], [r["critical_n"] for r in results], marker="o")
        axes.set_xlabel("embedding dimension d")
        axes.set_ylabel(f"critical n (all top-{args.k} sets solved)")
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
