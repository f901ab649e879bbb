"""``embplex serve``: the server started on a free loopback port and driven by real clients
(the official ``openai`` package and httpx). Vectors must equal ``model.encode``'s, every
bad request must get a 4xx in its API's own error shape, and the server must keep serving.

A tiny random BERT (``embplex.testing.build_encoder``) keeps these tests fast; nothing here
needs real weights, since what is tested is that the server returns the model's vectors.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import embplex
from embplex.app import run_index
from embplex.config import compose_config
from embplex.errors import OptionError
from embplex.testing import WORDS, build_encoder

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from embplex.serve import Batcher, ServeSettings, create_app, load_served_index, serve_in_thread  # noqa: E402

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOLERANCE = 1e-6


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return build_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="module")
def model(model_path):
    return embplex.compose({"name": "hf_encoder", "path": model_path}, pooling="mean")


@pytest.fixture(scope="module")
def server(model):
    """A server with a key, a Matryoshka width, small limits and a short batching wait."""
    settings = ServeSettings(
        api_key=KEY, dimensions=[16], max_texts=8, max_chars=400, max_body_bytes=20_000,
        truncation="error", batch_wait_ms=20, max_queue_texts=512,
    )
    app = create_app(model, settings, name="tiny")
    with serve_in_thread(app, settings) as url:
        yield url


def client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def close(a, b) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() < TOLERANCE


# -- OpenAI ------------------------------------------------------------------------------


def test_openai_client_gets_the_models_vectors_base64_and_float(server, model):
    texts = ["the quick brown fox jumps over the lazy dog", "a cat sat", "where is the river"]
    expected = model.encode(texts)
    default = client(server).embeddings.create(input=texts, model="tiny")  # base64 on the wire
    assert [d.index for d in default.data] == [0, 1, 2]
    close([d.embedding for d in default.data], expected)
    assert default.model == "tiny" and default.object == "list"
    floats = client(server).embeddings.create(input=texts, model="tiny", encoding_format="float")
    close([d.embedding for d in floats.data], expected)
    single = client(server).embeddings.create(input="a cat sat", model="tiny")
    assert len(single.data) == 1
    close(single.data[0].embedding, expected[1])


def test_openai_usage_counts_tokens(server, model):
    texts = ["a cat sat", "the dog ran to the pond"]
    response = client(server).embeddings.create(input=texts, model="tiny")
    tokens = int(model.backbone.tokenize(texts).attention_mask.sum())
    assert response.usage.prompt_tokens == tokens == response.usage.total_tokens


def test_base64_is_little_endian_float32_of_the_vector(server, model):
    body = {"input": ["green river"], "encoding_format": "base64"}
    answer = httpx.post(f"{server}/v1/embeddings", json=body, headers=AUTH).json()
    decoded = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), dtype="<f4")
    close(decoded, model.encode(["green river"])[0])


def test_dimensions_truncate_and_renormalise(server, model):
    texts = ["a small bird flew", "old music book"]
    response = client(server).embeddings.create(input=texts, model="tiny", dimensions=16)
    vectors = np.array([d.embedding for d in response.data])
    close(vectors, model.encode(texts, dim=16))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    full = client(server).embeddings.create(input=texts, model="tiny", dimensions=model.dim)
    close([d.embedding for d in full.data], model.encode(texts))


@pytest.mark.parametrize("width", [8, 10_000, 0])
def test_dimensions_not_served_or_too_large_are_refused(server, width):
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).embeddings.create(input=["a cat"], model="tiny", dimensions=width)
    error = caught.value.body
    assert error["param"] == "dimensions" and "dimensions" in error["message"]


# -- TEI -----------------------------------------------------------------------------------


def test_tei_embed_and_info(server, model):
    texts = ["the cat sat on the mat", "paris is the capital of france"]
    got = httpx.post(f"{server}/embed", json={"inputs": texts}, headers=AUTH)
    assert got.status_code == 200
    close(got.json(), model.encode(texts))
    one = httpx.post(f"{server}/embed", json={"inputs": texts[0]}, headers=AUTH).json()
    assert len(one) == 1  # TEI answers a list of vectors for a single string too
    raw = httpx.post(f"{server}/embed", json={"inputs": texts, "normalize": False}, headers=AUTH).json()
    close(raw, model.encode(texts, normalize=False))
    info = httpx.get(f"{server}/info", headers=AUTH).json()
    assert info["model_id"] == "tiny" and info["max_client_batch_size"] == 8
    assert info["max_input_length"] == model.backbone.max_length
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}


def test_tei_truncate_flag_against_the_token_limit(server, model):
    long_text = " ".join(["a"] * 190)  # 379 characters, 192 tokens: over the model's 128
    assert len(long_text) <= 400
    refused = httpx.post(f"{server}/embed", json={"inputs": [long_text]}, headers=AUTH)
    assert refused.status_code == 413
    assert refused.json()["error_type"] == "validation" and "128" in refused.json()["error"]
    cut = httpx.post(f"{server}/embed", json={"inputs": [long_text], "truncate": True}, headers=AUTH)
    assert cut.status_code == 200
    close(cut.json(), model.encode([long_text], truncation="silent"))


# -- bad requests: each a 4xx in its API's shape, and the server keeps serving -------------

TOO_MANY = [f"text {i}" for i in range(9)]
TOO_LONG = "cat " * 150  # 600 characters > max_chars=400


@pytest.mark.parametrize(
    "body, status",
    [
        ({"input": ""}, 400),
        ({"input": []}, 400),
        ({"input": ["a cat", 3]}, 400),
        ({"input": [[1, 2, 3]]}, 400),
        ({"input": None}, 400),
        ({"input": TOO_MANY}, 413),
        ({"input": [TOO_LONG]}, 413),
        ({"input": ["a cat"], "encoding_format": "int8"}, 400),
        ([1, 2], 400),
    ],
    ids=["empty-string", "empty-list", "non-string", "token-ids", "missing", "too-many", "too-long", "format", "not-object"],
)
def test_openai_bad_requests(server, body, status):
    answer = httpx.post(f"{server}/v1/embeddings", json=body, headers=AUTH)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    assert "Traceback" not in answer.text


@pytest.mark.parametrize(
    "body, status, kind",
    [
        ({"inputs": ""}, 400, "empty"),
        ({"inputs": []}, 400, "empty"),
        ({"inputs": ["a", None]}, 422, "validation"),  # TEI: 422 for a body of the wrong shape
        ({"inputs": TOO_MANY}, 413, "validation"),
        ({"inputs": [TOO_LONG]}, 413, "validation"),
        ({"inputs": [TOO_LONG], "truncate": True}, 413, "validation"),  # truncate is about tokens, not serve.max_chars
        ({"inputs": ["a"], "normalize": "yes"}, 422, "validation"),
    ],
    ids=["empty-string", "empty-list", "non-string", "too-many", "too-long", "too-long-truncate", "bad-flag"],
)
def test_tei_bad_requests(server, body, status, kind):
    answer = httpx.post(f"{server}/embed", json=body, headers=AUTH)
    assert answer.status_code == status
    assert answer.json()["error_type"] == kind and answer.json()["error"]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embed"])
def test_malformed_json_and_oversized_body(server, path):
    broken = httpx.post(f"{server}{path}", content=b'{"input": ["a cat"', headers={**AUTH, "Content-Type": "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.text
    huge = json.dumps({"input": ["cat"] * 8, "inputs": ["cat"] * 8, "pad": "x" * 30_000})
    too_big = httpx.post(f"{server}{path}", content=huge.encode(), headers={**AUTH, "Content-Type": "application/json"})
    assert too_big.status_code == 413 and "max_body_bytes" in too_big.text


def test_body_size_is_enforced_without_content_length(server):
    def chunks():  # chunked transfer: no Content-Length for the server to trust
        yield b'{"inputs": ["cat"], "pad": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    answer = httpx.post(f"{server}/embed", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error_type"] == "validation"


def test_wrong_or_missing_api_key(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").embeddings.create(input=["a cat"], model="tiny")
    missing = httpx.post(f"{server}/embed", json={"inputs": ["a cat"]})
    assert missing.status_code == 401 and set(missing.json()) == {"error", "error_type"}
    near = httpx.post(f"{server}/embed", json={"inputs": ["a cat"]}, headers={"Authorization": f"Bearer {KEY}x"})
    assert near.status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200  # health checks need no key


def test_unknown_route_and_method(server):
    unknown = httpx.post(f"{server}/v1/completions", json={}, headers=AUTH)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    tei_unknown = httpx.get(f"{server}/rerank", headers=AUTH)
    assert tei_unknown.status_code == 404 and "error_type" in tei_unknown.json()
    wrong_method = httpx.get(f"{server}/v1/embeddings", headers=AUTH)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert httpx.delete(f"{server}/embed", headers=AUTH).status_code == 405


def test_search_without_an_index_is_a_4xx(server):
    answer = httpx.post(f"{server}/search", json={"query": "a cat"}, headers=AUTH)
    assert answer.status_code == 400 and "serve.index" in answer.json()["error"]


def test_server_keeps_serving_after_bad_requests(server, model):
    for body in ({"input": []}, {"input": [1]}, {"input": TOO_MANY}):
        httpx.post(f"{server}/v1/embeddings", json=body, headers=AUTH)
    httpx.post(f"{server}/v1/embeddings", content=b"{{{", headers=AUTH)
    response = client(server).embeddings.create(input=["still here"], model="tiny")
    close(response.data[0].embedding, model.encode(["still here"])[0])
    metrics = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert 'embplex_requests_total{route="/v1/embeddings",status="400"}' in metrics
    assert "# TYPE embplex_batch_texts histogram" in metrics and "embplex_request_seconds_bucket" in metrics


def test_plugins_names_the_served_components(server, model):
    answer = httpx.get(f"{server}/plugins", headers=AUTH).json()
    assert answer["components"]["backbone"]["name"] == "hf_encoder"
    assert answer["components"]["pooling"]["name"] == "mean"
    assert answer["components"]["pooling"]["version"] == model.specs["pooling"]["version"]
    assert answer["dim"] == model.dim and answer["index"] is None


# -- dynamic batching ------------------------------------------------------------------------


def test_concurrent_load_every_response_correct(server, model):
    """16 clients x 20 requests at once: each answer equals encoding its texts alone."""
    rng = random.Random(0)
    requests = [[sentence(rng, rng.randint(1, 30)) for _ in range(rng.randint(1, 4))] for _ in range(16 * 20)]
    texts = sorted({t for r in requests for t in r})
    expected = dict(zip(texts, model.encode(texts)))
    before = _batches(server)
    failures: list[str] = []

    def one_client(index: int) -> None:
        with httpx.Client(headers=AUTH, timeout=60) as http:
            for texts in requests[index::16]:
                answer = http.post(f"{server}/embed", json={"inputs": texts})
                if answer.status_code != 200:
                    failures.append(answer.text)
                    continue
                got = np.array(answer.json())
                if np.abs(got - np.array([expected[t] for t in texts])).max() >= TOLERANCE:
                    failures.append(f"wrong vectors for {texts}")

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one_client, range(16)))
    assert time.monotonic() - started < 90
    assert failures == []
    count, total = _batches(server)
    texts_sent = sum(len(r) for r in requests)
    assert total - before[1] == texts_sent
    assert count - before[0] < 16 * 20  # requests shared forward passes


def _batches(url: str) -> tuple[int, int]:
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    count = int(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("embplex_batch_texts_count")))
    texts = int(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("embplex_texts_embedded_total")))
    return count, texts


def test_batcher_merges_requests_and_answers_each_as_alone(model):
    settings = ServeSettings(batch_wait_ms=300, max_batch_texts=64)
    batcher = Batcher(model, settings)
    try:
        rng = random.Random(1)
        jobs = [[sentence(rng, rng.randint(1, 40)) for _ in range(rng.randint(1, 5))] for _ in range(6)]
        futures = [batcher.submit(texts, normalize=True, truncate=True) for texts in jobs]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert batcher.metrics.batch_texts.total == 1  # one forward-pass call for all six
    for texts, result in zip(jobs, results):
        alone = model.encode(texts)
        assert np.abs(result.vectors - alone).max() < TOLERANCE


def test_full_queue_answers_429_and_recovers(model):
    settings = ServeSettings(max_texts=4, max_queue_texts=4, batch_wait_ms=800, max_batch_texts=64)
    app = create_app(model, settings)
    with serve_in_thread(app, settings) as url:
        first: dict = {}
        sender = threading.Thread(
            target=lambda: first.update(r=httpx.post(f"{url}/embed", json={"inputs": ["a", "b", "c", "d"]}, timeout=30))
        )
        sender.start()
        time.sleep(0.3)  # the first request's 4 texts fill the queue while it waits for company
        crowded = httpx.post(f"{url}/embed", json={"inputs": ["e"]})
        openai_crowded = httpx.post(f"{url}/v1/embeddings", json={"input": ["e"]})
        sender.join()
        assert crowded.status_code == 429 and crowded.json()["error_type"] == "overloaded"
        assert openai_crowded.status_code == 429 and openai_crowded.json()["error"]["type"] == "rate_limit_error"
        assert first["r"].status_code == 200
        assert httpx.post(f"{url}/embed", json={"inputs": ["e"]}).status_code == 200


def test_oversized_text_is_truncated_when_configured(model):
    settings = ServeSettings(max_chars=20, truncation="truncate", batch_wait_ms=0)
    with serve_in_thread(create_app(model, settings), settings) as url:
        text = "the quick brown fox jumps over the lazy dog"
        answer = httpx.post(f"{url}/v1/embeddings", json={"input": [text], "encoding_format": "float"})
        assert answer.status_code == 200
        close(answer.json()["data"][0]["embedding"], model.encode([text[:20]])[0])


def test_a_taken_port_is_a_clear_error():
    from embplex.serve import bind

    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(OptionError, match="serve.port"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_settings_are_checked_before_serving():
    with pytest.raises(OptionError, match="serve.max_texts"):
        ServeSettings.from_dict({"max_texts": 0})
    with pytest.raises(OptionError, match="Did you mean 'api_key'"):
        ServeSettings.from_dict({"apikey": "x"})
    with pytest.raises(OptionError, match="max_queue_texts"):
        ServeSettings.from_dict({"max_texts": 100, "max_queue_texts": 10})


# -- search --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def documents() -> dict[str, dict[str, str]]:
    texts = ["the cat sat on the mat", "paris is the capital of france", "a fish swam in the pond", "music and a story book"]
    return {f"d{i}": {"title": "", "text": text} for i, text in enumerate(texts)}


def test_search_returns_ids_scores_and_metadata(model, documents, registry):
    index = registry.create("index", "exact", dim=model.dim)
    ids = list(documents)
    index.add(ids, model.encode([documents[i]["text"] for i in ids]))
    settings = ServeSettings(max_k=3)
    app = create_app(model, settings, index=index, documents=documents, index_name="exact")
    with serve_in_thread(app, settings) as url:
        answer = httpx.post(f"{url}/search", json={"query": ["paris is the capital of france", "a fish swam"], "k": 2})
        assert answer.status_code == 200
        results = answer.json()["results"]
        expected = index.search(model.encode(["paris is the capital of france", "a fish swam"]), 2)
        for got, want_ids, want_scores in zip(results, expected.ids, expected.scores):
            assert [h["id"] for h in got["hits"]] == want_ids
            close([h["score"] for h in got["hits"]], want_scores)
        assert results[0]["hits"][0] == {**results[0]["hits"][0], "id": "d1", "metadata": documents["d1"]}
        assert httpx.post(f"{url}/search", json={"query": "cat", "k": 4}).status_code == 400  # over max_k
        assert httpx.post(f"{url}/search", json={"query": []}).status_code == 400
        assert httpx.get(f"{url}/plugins").json()["index"] == {"name": "exact", "size": 4}


def test_an_index_built_by_another_model_is_refused(model, registry, tmp_path):
    index = registry.create("index", "exact", dim=model.dim)
    index.add(["a"], model.encode(["a cat"]))
    index.built_from = {"model": "0" * 64, "corpus": None, "index": {"name": "exact", "options": {}}}
    index.save(tmp_path / "index")
    settings = ServeSettings(index=str(tmp_path))  # the run folder: index/ inside it is found
    with pytest.raises(OptionError, match="another model"):
        load_served_index({}, registry, model, settings)


# -- the command: embplex index, then embplex serve, then SIGTERM -----------------------------


def test_embplex_serve_command_search_metadata_and_graceful_sigterm(model_path, tmp_path, registry):
    """`embplex index`'s run (in this process, to save a start-up) builds an index of a small
    BEIR corpus with a saved model; `embplex serve` serves both; SIGTERM arrives while requests wait in the batcher, and every one of
    them still gets its answer before the process exits."""
    model = embplex.compose({"name": "hf_encoder", "path": model_path}, pooling="mean")
    model.save(tmp_path / "model")
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = {"d1": "the cat sat on the mat", "d2": "paris is the capital of france", "d3": "a fish swam in the pond"}
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items()))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "cat"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    common = [f"model.load={tmp_path / 'model'}", f"data.eval.path={beir}", f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    embplex_cli = [sys.executable, "-m", "embplex.cli"]
    run_index(compose_config(common, registry), registry)
    serve = subprocess.Popen(
        [*embplex_cli, "serve", *common, "serve.port=0", f"serve.index={tmp_path / 'run'}", "serve.metadata=true",
         "serve.batch_wait_ms=1500", "serve.graceful_shutdown_s=20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = serve.stdout.readline()
        assert "serving" in line and "http://127.0.0.1:" in line, line + serve.stderr.read() if serve.poll() is not None else line
        url = line.split("on ", 1)[1].split(";")[0].strip()
        hit = httpx.post(f"{url}/search", json={"query": "paris is the capital of france", "k": 1}, timeout=30).json()
        assert hit["results"][0]["hits"][0]["id"] == "d2"
        assert hit["results"][0]["hits"][0]["metadata"]["text"] == docs["d2"]
        texts = ["the cat sat", "a fish swam", "paris"]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(httpx.post, f"{url}/embed", json={"inputs": [t]}, timeout=60) for t in texts]
            time.sleep(0.7)  # the requests are in the batcher's 1.5 s wait now
            serve.send_signal(signal.SIGTERM)
            answers = [p.result() for p in pending]
        assert [a.status_code for a in answers] == [200, 200, 200]
        close([a.json()[0] for a in answers], model.encode(texts))
        assert serve.wait(timeout=60) == 0
        assert "every request in flight was answered" in serve.stdout.read()
        with pytest.raises(httpx.TransportError):  # it is gone, not half-alive
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def test_a_model_failure_is_a_json_error_and_the_server_goes_on(model_path):
    """A fault of the model (here: non-finite vectors for one text) fails only the requests
    of that batch, with a JSON error and no traceback, and the server keeps answering."""
    from embplex.errors import NonFiniteError

    broken = embplex.compose({"name": "hf_encoder", "path": model_path}, pooling="mean")
    original = broken.encode

    def encode(texts, **options):
        if "poison" in texts:
            raise NonFiniteError("the model gave a non-finite embedding for text 0 ('poison')")
        return original(texts, **options)

    broken.encode = encode
    settings = ServeSettings(batching=False)
    with serve_in_thread(create_app(broken, settings), settings) as url:
        tei = httpx.post(f"{url}/embed", json={"inputs": ["poison"]})
        assert tei.status_code == 424 and tei.json()["error_type"] == "backend" and "non-finite" in tei.json()["error"]
        openai_shape = httpx.post(f"{url}/v1/embeddings", json={"input": ["poison"]})
        assert openai_shape.status_code == 500 and openai_shape.json()["error"]["type"] == "server_error"
        assert "Traceback" not in tei.text + openai_shape.text
        fine = httpx.post(f"{url}/embed", json={"inputs": ["a cat"]})
        assert fine.status_code == 200
        close(fine.json(), original(["a cat"]))
