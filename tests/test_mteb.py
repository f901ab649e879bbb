"""The MTEB adapter: MTEB, run through ``embplex.mteb``, scores a model as ``embplex eval``
does on the same files, and MTEB's task-specific prompts reach ``encode(prompt=...)``.

No hub access here: MTEB's own STSBenchmark and SciFact tasks (their metrics, their
evaluators) are given the local STS-B and SciFact files. The fast tests use deterministic
subsets of those files, written to a folder and read by both evaluations; the slow ones the
whole test sets (reference figures: STS-B 82.03, SciFact nDCG@10 64.51). Each text is
embedded once and shared by both evaluations (vectors do not depend on their batch), so a
comparison costs one evaluation's encoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import embplex
from embplex.data import load_beir, load_sts
from embplex.errors import InputError, OptionError
from embplex.evaluation import evaluate_retrieval, evaluate_sts
from embplex.testing import build_encoder

pytest.importorskip("mteb")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import embplex.mteb as embplex_mteb  # noqa: E402

TOLERANCE = 0.05


def share_embeddings(model) -> list[str | None]:
    """Make ``model.encode`` remember each (prompt, text)'s vector, so a second evaluation of
    the same texts reuses them; returns the list of prompts it was called with."""
    original = model.encode
    cache: dict[tuple[str | None, str], np.ndarray] = {}
    prompts: list[str | None] = []

    def encode(texts, prompt=None, **options):
        prompts.append(prompt)
        texts = [texts] if isinstance(texts, str) else list(texts)
        missing = list(dict.fromkeys(t for t in texts if (prompt, t) not in cache))
        if missing:
            for text, vector in zip(missing, original(missing, prompt=prompt, **options)):
                cache[(prompt, text)] = vector
        return np.stack([cache[(prompt, t)] for t in texts])

    model.encode = encode
    return prompts


@pytest.fixture
def minilm_shared(minilm_path):
    model = embplex.compose({"name": "hf_encoder", "path": minilm_path}, pooling="mean")
    share_embeddings(model)
    return model


def sts_subset(source: Path, target: Path, pairs: int) -> Path:
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join(lines[: pairs + 1]), encoding="utf-8")  # the header and the first pairs
    return target


def beir_subset(source: Path, target: Path, queries: int, extra_docs: int) -> Path:
    """The first ``queries`` judged test queries, their relevant documents and the first
    ``extra_docs`` other documents of the corpus, as a BEIR folder."""
    qrel_lines = (source / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = qrel_lines[0], [line.split("\t") for line in qrel_lines[1:] if line.strip()]
    kept_queries = list(dict.fromkeys(row[0] for row in rows))[:queries]
    kept_rows = [row for row in rows if row[0] in kept_queries]
    relevant = {row[1] for row in kept_rows}
    corpus_lines = (source / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    others = [line for line in corpus_lines if json.loads(line)["_id"] not in relevant][:extra_docs]
    docs = [line for line in corpus_lines if json.loads(line)["_id"] in relevant] + others
    query_lines = [
        line for line in (source / "queries.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["_id"] in kept_queries
    ]
    (target / "qrels").mkdir(parents=True)
    (target / "corpus.jsonl").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (target / "queries.jsonl").write_text("\n".join(query_lines) + "\n", encoding="utf-8")
    (target / "qrels" / "test.tsv").write_text("\n".join([header, *("\t".join(r) for r in kept_rows)]) + "\n", encoding="utf-8")
    return target


def embplex_sts(model, path: Path) -> float:
    s1, s2, gold = load_sts(path)
    return evaluate_sts(model, s1, s2, gold, bootstrap=10)["spearman"]


def embplex_ndcg(model, folder: Path, registry) -> float:
    corpus, queries, qrels = load_beir(folder, "test")
    make = lambda dim: registry.create("index", "exact", dim=dim)  # noqa: E731
    return evaluate_retrieval(model, corpus, queries, qrels, make, bootstrap=10)["ndcg@10"]


def mteb_score(model, task, metric: str) -> float:
    return embplex_mteb.evaluate(embplex_mteb.model(model), [task])[task.metadata.name][metric]


# -- fast: subsets --------------------------------------------------------------------------


def test_mteb_sts_equals_embplex_eval_on_the_same_file(minilm_shared, data_dir, tmp_path):
    path = sts_subset(data_dir / "sts" / "stsb" / "test.tsv", tmp_path / "stsb.tsv", pairs=150)
    ours = embplex_sts(minilm_shared, path)
    theirs = mteb_score(minilm_shared, embplex_mteb.local_sts_task(path), "cosine_spearman")
    assert abs(ours - theirs) < TOLERANCE, (ours, theirs)


def test_mteb_retrieval_equals_embplex_eval_on_the_same_folder(minilm_shared, data_dir, tmp_path, registry):
    folder = beir_subset(data_dir / "retrieval" / "scifact", tmp_path / "scifact", queries=10, extra_docs=30)
    ours = embplex_ndcg(minilm_shared, folder, registry)
    theirs = mteb_score(minilm_shared, embplex_mteb.local_retrieval_task(folder), "ndcg_at_10")
    assert abs(ours - theirs) < TOLERANCE, (ours, theirs)
    assert 0 < theirs < 100  # a real score, not a degenerate one


# -- prompts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return build_encoder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = {"d1": "the cat sat on the mat", "d2": "paris is the capital of france", "d3": "a fish swam"}
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items()))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "where is paris"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    return folder


def test_mteb_prompts_reach_encode(tiny_path, tiny_beir):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_path}, pooling="mean")
    seen = share_embeddings(model)
    encoder = embplex_mteb.model(model, prompts={"query": "query: ", "document": "passage: "})
    embplex_mteb.evaluate(encoder, [embplex_mteb.local_retrieval_task(tiny_beir)])
    assert set(seen) == {"query: ", "passage: "}


def test_task_specific_prompt_wins_and_task_instructions_are_used(tiny_path, tiny_beir):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_path}, pooling="mean")
    seen = share_embeddings(model)
    encoder = embplex_mteb.model(model, prompts={"SciFact-query": "claim: ", "query": "query: "})
    embplex_mteb.evaluate(encoder, [embplex_mteb.local_retrieval_task(tiny_beir)])
    assert "claim: " in seen and "query: " not in seen and None in seen  # documents get no prompt
    seen.clear()
    task = embplex_mteb.local_retrieval_task(tiny_beir)
    instructed = embplex_mteb.model(model, task_instructions=True, instruction_template="Instruct: {instruction}\nQuery: ")
    embplex_mteb.evaluate(instructed, [task])
    from mteb.types import PromptType

    expected = "Instruct: " + instructed.get_instruction(task.metadata, PromptType.query) + "\nQuery: "
    assert expected in seen and len(expected) > len("Instruct: \nQuery: ")


def test_bad_input_is_refused(tiny_path, data_dir):
    with pytest.raises(InputError, match="EmbeddingModel"):
        embplex_mteb.model(42)
    model = embplex.compose({"name": "hf_encoder", "path": tiny_path}, pooling="mean")
    with pytest.raises(OptionError, match="placeholder"):
        embplex_mteb.model(model, task_instructions=True, instruction_template="Instruct: ")
    with pytest.raises(OptionError, match="NoSuchTask"):
        embplex_mteb.model(model, prompts={"NoSuchTask": "x: "})
    with pytest.raises(InputError, match="split"):
        embplex_mteb.local_sts_task(data_dir / "sts" / "stsb" / "test.tsv", split="nosplit")


def test_saved_model_folder_is_accepted(tiny_path, tmp_path):
    model = embplex.compose({"name": "hf_encoder", "path": tiny_path}, pooling="mean")
    model.save(tmp_path / "saved")
    encoder = embplex_mteb.model(tmp_path / "saved", name="tiny")
    assert encoder.mteb_model_meta.name == "embplex/tiny" and encoder.mteb_model_meta.embed_dim == model.dim


# -- slow: the whole test sets ----------------------------------------------------------------


@pytest.mark.slow
def test_mteb_full_stsb_equals_embplex_eval_and_the_reference(minilm_shared, data_dir):
    path = data_dir / "sts" / "stsb" / "test.tsv"
    ours = embplex_sts(minilm_shared, path)
    theirs = mteb_score(minilm_shared, embplex_mteb.local_sts_task(path), "cosine_spearman")
    assert abs(ours - theirs) < TOLERANCE and abs(theirs - 82.03) < TOLERANCE, (ours, theirs)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("EMBPLEX_MTEB_FULL"),
    reason="embeds the 5183 SciFact documents (about 10 minutes on 2 cores); set EMBPLEX_MTEB_FULL=1",
)
def test_mteb_full_scifact_equals_embplex_eval_and_the_reference(minilm_shared, data_dir, registry):
    folder = data_dir / "retrieval" / "scifact"
    ours = embplex_ndcg(minilm_shared, folder, registry)
    theirs = mteb_score(minilm_shared, embplex_mteb.local_retrieval_task(folder), "ndcg_at_10")
    assert abs(ours - theirs) < TOLERANCE and abs(theirs - 64.51) < TOLERANCE, (ours, theirs)
