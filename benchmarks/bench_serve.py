"""Serving: `embplex serve`'s app against a plain FastAPI app calling sentence-transformers.

Three servers of all-MiniLM-L6-v2 answer the same OpenAI-style requests (one sentence
each, ``encoding_format=float``) on a loopback port, each in turn:

* ``embplex_batching``: embplex's app with dynamic batching (``serve.batching=true``,
  ``serve.batch_wait_ms`` as given);
* ``embplex_no_batching``: the same app, one request per forward pass;
* ``st_fastapi``: the baseline, a minimal FastAPI app whose endpoint calls
  ``SentenceTransformer.encode`` per request (FastAPI runs it in its thread pool).

For 1, 4 and 16 concurrent clients (threads, each with its own httpx connection), each
client sends ``--requests`` requests back to back. Reported per server and concurrency:
texts/s over the whole run, p50 and p99 latency, errors; and whether every answer equals
``model.encode`` of its text (max abs difference). Servers and clients share one process
(uvicorn in a background thread), as in the tests; the clients' Python work competes with
the server for the GIL on every contender alike.

    python benchmarks/bench_serve.py            # several minutes on 2 cores
    python benchmarks/bench_serve.py --smoke    # seconds: 1 and 4 clients, 3 requests each
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import time
from typing import Any

import numpy as np

import common

NAME = "serve"
SERVERS = ("embplex_batching", "embplex_no_batching", "st_fastapi")


def baseline_app(model_path: str) -> Any:
    """The plain way: FastAPI + sentence-transformers, one encode call per request."""
    from fastapi import FastAPI
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu")
    app = FastAPI()

    @app.post("/v1/embeddings")
    def embeddings(body: dict) -> dict:  # a sync endpoint: FastAPI runs it in a worker thread
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = model.encode(texts, normalize_embeddings=True)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "model": "all-MiniLM-L6-v2",
        }

    return app


def load(url: str, sentences: list[str], clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads each sending ``requests`` one-sentence requests; latencies and
    the vectors received, by sentence."""
    import httpx

    latencies: list[float] = []
    received: dict[str, list[float]] = {}
    errors = 0

    def client(index: int) -> tuple[list[float], dict[str, list[float]], int]:
        mine, got, failed = [], {}, 0
        with httpx.Client(timeout=120) as http:
            for r in range(requests):
                text = sentences[(index * requests + r) % len(sentences)]
                started = time.perf_counter()
                answer = http.post(f"{url}/v1/embeddings", json={"input": [text], "model": "m", "encoding_format": "float"})
                mine.append(time.perf_counter() - started)
                if answer.status_code == 200:
                    got[text] = answer.json()["data"][0]["embedding"]
                else:
                    failed += 1
        return mine, got, failed

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for mine, got, failed in pool.map(client, range(clients)):
            latencies += mine
            received.update(got)
            errors += failed
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": wall,
        "texts_per_second": (len(latencies) - errors) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))],
        "_received": received,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--requests", type=int, default=None, help="requests per client (default 40; smoke 3)")
    parse.add_argument("--clients", type=int, nargs="+", default=None, help="concurrency levels (default 1 4 16; smoke 1 4)")
    parse.add_argument("--batch-wait-ms", type=float, default=5.0, help="embplex's serve.batch_wait_ms")
    args = parse.parse_args(argv)
    requests = args.requests or (3 if args.smoke else 40)
    levels = args.clients or ([1, 4] if args.smoke else [1, 4, 16])

    import embplex
    from embplex.serve import ServeSettings, create_app, serve_in_thread

    machine = common.machine_info()
    path = common.minilm_path()
    sentences = common.benchmark_sentences(max(levels) * requests)
    model = embplex.compose({"name": "hf_encoder", "path": path}, pooling="mean")
    expected = dict(zip(sentences, model.encode(sentences, batch_size=64)))
    settings = {
        "embplex_batching": ServeSettings(batching=True, batch_wait_ms=args.batch_wait_ms),
        "embplex_no_batching": ServeSettings(batching=False),
        "st_fastapi": ServeSettings(),
    }
    results: dict[str, dict[str, Any]] = {}
    for name in SERVERS:
        app = baseline_app(path) if name == "st_fastapi" else create_app(model, settings[name])
        results[name] = {}
        with serve_in_thread(app, settings[name]) as url:
            load(url, sentences[:4], 1, 2)  # warm-up: first requests pay for lazy set-up
            for clients in levels:
                figures = load(url, sentences, clients, requests)
                received = figures.pop("_received")
                figures["max_abs_diff_vs_encode"] = max(
                    float(np.abs(np.asarray(vector) - expected[text]).max()) for text, vector in received.items()
                ) if received else None
                results[name][str(clients)] = figures
    top = str(max(levels))
    ratios = {
        f"batching_vs_st_fastapi_texts_per_second_at_{top}": results["embplex_batching"][top]["texts_per_second"]
        / results["st_fastapi"][top]["texts_per_second"],
        f"batching_vs_no_batching_texts_per_second_at_{top}": results["embplex_batching"][top]["texts_per_second"]
        / results["embplex_no_batching"][top]["texts_per_second"],
    }
    result = {
        "benchmark": NAME,
        "command": "python benchmarks/run.py serve --json" + (" --smoke" if args.smoke else ""),
        "smoke": args.smoke,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            "model": common.MODEL_NAME,
            "requests_per_client": requests,
            "clients": levels,
            "texts_per_request": 1,
            "batch_wait_ms": args.batch_wait_ms,
            "interleaved": False,
            "transport": "HTTP/1.1 on 127.0.0.1, uvicorn in a background thread, clients in threads of the same process",
        },
        "results": results,
        "ratios": ratios,
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return common.finish(result, args, NAME)


if __name__ == "__main__":
    main()
