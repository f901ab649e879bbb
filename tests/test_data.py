"""Training and evaluation data loaders, on the real files in ../shared/data."""

from __future__ import annotations

import csv
import json

import pytest

from embplex.components import Example
from embplex.data import (
    FORMATS,
    load_beir,
    load_beir_pairs,
    load_flagembedding_jsonl,
    load_pairs_tsv,
    load_sts,
    load_sts_pairs,
    load_training_data,
    load_triplets_tsv,
)
from embplex.errors import InputError, ModelFileError, OptionError


def _plain_rows(path):
    """Rows of a plain (unquoted) TSV file, split by hand."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]


def _raw_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


# -- pairs ---------------------------------------------------------------------------


def test_mrpc_pairs_keep_only_paraphrases_and_unquote_fields(data_dir):
    path = data_dir / "pairs/mrpc/train.tsv"
    rows = _raw_rows(path)
    examples = load_pairs_tsv(path)
    paraphrases = [r for r in rows if r["label"] == "1"]
    assert len(examples) == len(paraphrases) and 0 < len(examples) < len(rows)
    assert [(e.anchor, e.positive) for e in examples] == [(r["sentence1"], r["sentence2"]) for r in paraphrases]
    # the file quotes fields with doubled quotes; they come back as plain text
    first = examples[0].anchor
    assert first.startswith("Amrozi accused") and '" the witness "' in first and '""' not in first
    assert all(e.negatives == [] and e.task == "train" for e in examples)


def test_stsb_pairs_keep_scores_of_at_least_min_score(data_dir):
    path = data_dir / "sts/stsb/train.tsv"
    rows = _plain_rows(path)
    default = load_pairs_tsv(path, quoting="none")
    assert len(default) == sum(float(r["score"]) >= 4.0 for r in rows)
    stricter = load_pairs_tsv(path, min_score=4.8, quoting="none")
    assert 0 < len(stricter) < len(default)
    assert len(stricter) == sum(float(r["score"]) >= 4.8 for r in rows)


def test_min_score_on_a_labelled_file_is_refused(data_dir):
    with pytest.raises(OptionError, match="min_score"):
        load_pairs_tsv(data_dir / "pairs/mrpc/train.tsv", min_score=3)


def test_sts_pairs_keep_every_pair_with_its_score(data_dir):
    path = data_dir / "sts/stsb/dev.tsv"
    examples = load_sts_pairs(path)
    first, second, scores = load_sts(path)
    assert len(examples) == len(first) == 1500
    assert [e.scores for e in examples] == [[s] for s in scores]
    # training and evaluation read an STS file the same way: as written
    assert [(e.anchor, e.positive) for e in examples] == list(zip(first, second))
    assert [(r["sentence1"], r["sentence2"]) for r in _plain_rows(path)] == list(zip(first, second))
    assert any('"' in f for f in first + second)
    assert len(load_sts_pairs(path, min_score=4.0)) == sum(s >= 4.0 for s in scores)


# -- quoting, per file kind -------------------------------------------------------------

# Texts with a quote inside and at the start: the cases a reader mangles when it guesses
# the wrong convention.
QUOTED_TEXTS = ['He said "no" twice.', '"Quoted" at the start.', '"', 'ends with a quote"']


def test_sts_files_reach_the_model_exactly_as_written(tmp_path):
    """STS files are plain TSV: every character, a leading quote included, is text —
    for evaluation (load_sts), for training (format sts) and through evaluate_sts into
    the texts the model encodes."""
    from embplex.evaluation import evaluate_sts

    path = tmp_path / "sts.tsv"
    lines = ["sentence1\tsentence2\tscore"] + [
        f"{text}\tplain sentence {i}\t{i}.0" for i, text in enumerate(QUOTED_TEXTS)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first, second, _ = load_sts(path)
    assert first == QUOTED_TEXTS
    assert [e.anchor for e in load_sts_pairs(path)] == QUOTED_TEXTS
    assert [e.anchor for e in load_training_data({"format": "sts", "path": str(path)})] == QUOTED_TEXTS

    class RecordingModel:
        seen: list[str] = []

        def encode(self, texts, **options):
            import numpy as np

            self.seen.extend(texts)
            return np.stack([np.array([1.0, float(len(t))]) / np.hypot(1.0, len(t)) for t in texts])

    model = RecordingModel()
    evaluate_sts(model, first, second, [0.0, 1.0, 2.0, 3.0], bootstrap=10)
    assert set(QUOTED_TEXTS) <= set(model.seen)


@pytest.mark.parametrize("kind", ["pairs", "triplets"])
def test_csv_quoted_pairs_and_triplets_come_back_as_the_original_text(tmp_path, kind):
    """Pairs and triplets files are CSV-quoted TSV by default (as MRPC's are): a text
    written by a CSV writer, quotes and all, is read back unchanged; quoting="none" reads a
    plain TSV file as written."""
    header = ["sentence1", "sentence2", "label"] if kind == "pairs" else ["anchor", "positive", "negative"]
    loader = load_pairs_tsv if kind == "pairs" else load_triplets_tsv
    quoted, plain = tmp_path / "quoted.tsv", tmp_path / "plain.tsv"
    with quoted.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        for text in QUOTED_TEXTS:
            writer.writerow([text, "other", "1" if kind == "pairs" else "negative"])
    assert '""' in quoted.read_text()  # the writer really quoted them
    assert [e.anchor for e in loader(quoted)] == QUOTED_TEXTS
    plain.write_text(
        "\t".join(header) + "\n" + "".join(f"{t}\tother\t{'1' if kind == 'pairs' else 'n'}\n" for t in QUOTED_TEXTS),
        encoding="utf-8",
    )
    assert [e.anchor for e in loader(plain, quoting="none")] == QUOTED_TEXTS
    assert [e.anchor for e in load_training_data({"format": kind, "path": str(plain), "quoting": "none"})] == QUOTED_TEXTS
    with pytest.raises(OptionError, match="quoting"):
        loader(plain, quoting="maybe")


def test_triplets_have_one_hard_negative(data_dir):
    path = data_dir / "pairs/snli/dev_triplets.tsv"
    examples = load_triplets_tsv(path)
    rows = _raw_rows(path)
    assert len(examples) == len(rows) == 2943
    assert (examples[0].anchor, examples[0].positive, examples[0].negatives) == (
        rows[0]["anchor"],
        rows[0]["positive"],
        [rows[0]["negative"]],
    )


def test_limit_keeps_the_first_examples(data_dir):
    path = data_dir / "pairs/snli/dev_triplets.tsv"
    assert load_triplets_tsv(path, limit=5) == load_triplets_tsv(path)[:5]
    with pytest.raises(OptionError, match="limit"):
        load_triplets_tsv(path, limit=0)


# -- BEIR ----------------------------------------------------------------------------


def test_beir_test_split_matches_the_files(data_dir):
    folder = data_dir / "retrieval/scifact"
    corpus, queries, qrels = load_beir(folder, "test")
    assert len(corpus) == 5183
    qrel_rows = _raw_rows(folder / "qrels/test.tsv")
    assert sum(len(docs) for docs in qrels.values()) == len(qrel_rows) == 339
    assert set(queries) == {r["query-id"] for r in qrel_rows}
    with open(folder / "corpus.jsonl", encoding="utf-8") as handle:
        record = json.loads(handle.readline())
    assert corpus[record["_id"]] == (record["title"] + " " + record["text"]).strip()
    assert queries["1"] == "0-dimensional biomaterials show inductive properties."


def test_beir_pairs_pair_each_query_with_its_relevant_document(data_dir):
    folder = data_dir / "retrieval/scifact"
    corpus, queries, qrels = load_beir(folder, "train")
    examples = load_beir_pairs(folder, "train")
    relevant = [(q, d) for q, docs in qrels.items() for d, s in docs.items() if s > 0]
    assert len(examples) == len(relevant) == 919
    assert [(e.anchor, e.positive) for e in examples] == [(queries[q], corpus[d]) for q, d in relevant]
    assert all(e.task == "scifact" for e in examples)


def test_beir_missing_split_names_the_path(data_dir):
    with pytest.raises(ModelFileError, match="dev.tsv"):
        load_beir(data_dir / "retrieval/scifact", "dev")


# -- FlagEmbedding -------------------------------------------------------------------


def test_flagembedding_rows_become_one_example_per_positive(data_dir):
    path = data_dir / "formats/flagembedding-example-data/retrieval/msmarco.jsonl"
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    examples = load_flagembedding_jsonl(path)
    assert len(examples) == sum(len(r["pos"]) for r in records)
    first, record = examples[0], records[0]
    assert first.anchor == record["query"] and first.positive == record["pos"][0]
    assert first.negatives == record["neg"]
    assert first.scores == [record["pos_scores"][0], *record["neg_scores"]]
    assert first.prompt == record["prompt"] and first.task == "msmarco"


def test_flagembedding_max_negatives_trims_negatives_and_their_scores(data_dir):
    path = data_dir / "formats/flagembedding-example-data/retrieval/msmarco.jsonl"
    examples = load_flagembedding_jsonl(path, max_negatives=3)
    assert all(len(e.negatives) == 3 and len(e.scores) == 4 for e in examples)


def test_flagembedding_folder_reads_every_file_without_scores_or_prompt(data_dir):
    folder = data_dir / "formats/flagembedding-example-data"
    examples = load_flagembedding_jsonl(folder)
    tasks = {e.task for e in examples}
    assert {"toy_finetune_data", "msmarco", "nq", "nli", "sts", "arXiv_title", "Banking77Classification"} <= tasks
    toy = [e for e in examples if e.task == "toy_finetune_data"]
    assert toy and all(e.scores is None and e.prompt is None for e in toy)


def test_flagembedding_bad_line_says_where(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "pos": ["p"], "neg": []}\n{"query": "q2"}\n')
    with pytest.raises(InputError, match="line 2"):
        load_flagembedding_jsonl(path)


# -- dispatch ------------------------------------------------------------------------


def test_load_training_data_dispatches_on_format(data_dir):
    spec = {"name": "scifact", "format": "beir", "path": str(data_dir / "retrieval/scifact"), "split": "train", "limit": 7}
    examples = load_training_data(spec)
    assert examples == load_beir_pairs(data_dir / "retrieval/scifact", "train")[:7]
    assert all(isinstance(e, Example) for e in examples)
    sts = load_training_data({"format": "sts", "path": str(data_dir / "sts/stsb/train.tsv"), "min_score": 4.0, "limit": None})
    assert [(e.anchor, e.positive) for e in sts] == [(e.anchor, e.positive) for e in load_pairs_tsv(data_dir / "sts/stsb/train.tsv", quoting="none")]


def test_unknown_format_lists_the_formats(tmp_path):
    with pytest.raises(OptionError) as error:
        load_training_data({"format": "parquet", "path": str(tmp_path)})
    assert all(name in str(error.value) for name in FORMATS)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.tsv"
    with pytest.raises(ModelFileError, match="nowhere.tsv"):
        load_training_data({"format": "pairs", "path": str(missing)})


def test_unknown_option_for_a_format_is_refused(data_dir):
    with pytest.raises(OptionError, match="max_negatives"):
        load_training_data({"format": "pairs", "path": str(data_dir / "pairs/mrpc/train.tsv"), "max_negatives": 2})


def test_wrong_columns_are_explained(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("a\tb\nx\ty\n")
    with pytest.raises(InputError, match="sentence1, sentence2, label"):
        load_pairs_tsv(path)
