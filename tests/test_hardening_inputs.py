"""Inputs that used to give a silently wrong result, and outputs that must never be half
written: each test here failed before the behaviour it names existed."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

import embplex
from embplex import storage
from embplex.cli import main
from embplex.data import load_beir, load_flagembedding_jsonl, load_pairs_tsv, load_sts, load_sts_pairs, read_texts
from embplex.errors import InputError, OutputError


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- non-finite numbers ----------------------------------------------------------------


@pytest.mark.parametrize("written", ["nan", "NaN", "inf", "-Infinity"])
def test_sts_gold_score_that_is_not_finite_is_refused_with_file_and_line(tmp_path, written):
    path = tmp_path / "sts.tsv"
    path.write_text(f"sentence1\tsentence2\tscore\na\tb\t1.0\nc\td\t{written}\n")
    for load in (load_sts, load_sts_pairs, load_pairs_tsv):
        with pytest.raises(InputError, match=rf"sts.tsv, line 3: score '{written}' is not a finite number"):
            load(path)


def test_pair_label_that_is_not_finite_is_refused(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("sentence1\tsentence2\tlabel\na\tb\t1\nc\td\tnan\n")
    with pytest.raises(InputError, match="line 3: label 'nan' is not a finite number"):
        load_pairs_tsv(path)


@pytest.mark.parametrize(
    "scores, message",
    [
        ({"pos_scores": [float("nan")], "neg_scores": [0.1]}, "pos_scores nan is not a finite number"),
        ({"pos_scores": [0.9], "neg_scores": [float("inf")]}, "neg_scores inf is not a finite number"),
        ({"pos_scores": ["high"], "neg_scores": [0.1]}, "pos_scores 'high' is not a number"),
    ],
)
def test_flagembedding_teacher_scores_must_be_finite_numbers(tmp_path, scores, message):
    path = tmp_path / "train.jsonl"
    record = {"query": "q", "pos": ["p"], "neg": ["n"], **scores}
    path.write_text(json.dumps({"query": "q0", "pos": ["p0"]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(InputError, match=rf"train.jsonl, line 2: {message}"):
        load_flagembedding_jsonl(path)


def test_flagembedding_row_with_no_positive_is_refused_not_dropped(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"query": "q0", "pos": ["p0"]}) + "\n" + json.dumps({"query": "q1", "pos": []}) + "\n")
    with pytest.raises(InputError, match="train.jsonl, line 2: 'pos' is empty"):
        load_flagembedding_jsonl(path)


# -- BEIR ------------------------------------------------------------------------------


def beir_folder(tmp_path, corpus, queries, qrels):
    (tmp_path / "qrels").mkdir(parents=True)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return tmp_path


DOCS = [{"_id": "d1", "title": "A", "text": "first"}, {"_id": "d2", "text": "second"}]
QUERIES = [{"_id": "q1", "text": "which first"}]


def test_beir_corpus_with_a_duplicate_id_is_refused_naming_both_lines(tmp_path):
    folder = beir_folder(tmp_path, [*DOCS, {"_id": "d1", "text": "a different first"}], QUERIES, [("q1", "d1", 1)])
    with pytest.raises(InputError, match=r"corpus.jsonl, line 3: document _id 'd1' already appeared on line 1"):
        load_beir(folder, "test")


def test_beir_duplicate_query_id_and_query_without_id_are_refused(tmp_path):
    folder = beir_folder(tmp_path / "dup", DOCS, [*QUERIES, {"_id": "q1", "text": "other"}], [("q1", "d1", 1)])
    with pytest.raises(InputError, match=r"queries.jsonl, line 2: query _id 'q1' already appeared on line 1"):
        load_beir(folder, "test")
    folder = beir_folder(tmp_path / "noid", DOCS, [*QUERIES, {"text": "no id"}], [("q1", "d1", 1)])
    with pytest.raises(InputError, match=r"queries.jsonl, line 2 has no '_id'"):
        load_beir(folder, "test")


@pytest.mark.parametrize(
    "qrels, message",
    [
        ([("q1", "d1", 1), ("q1", "d1", 0)], r"test.tsv, line 3: the judgement 'q1 -> d1' already appeared on line 2"),
        ([("q1", "d1", "nan")], r"test.tsv, line 2: score 'nan' is not a finite number"),
        ([("q1", "d1", "0.5")], r"test.tsv, line 2: score '0.5' is not a whole-number relevance grade"),
    ],
)
def test_beir_qrels_scores_are_finite_whole_numbers_judged_once(tmp_path, qrels, message):
    folder = beir_folder(tmp_path, DOCS, QUERIES, qrels)
    with pytest.raises(InputError, match=message):
        load_beir(folder, "test")


# -- encode: rows stay aligned with lines ------------------------------------------------


def test_read_texts_refuses_blank_lines_with_their_numbers(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("one\n\ntwo\n   \nthree\n")
    with pytest.raises(InputError, match=r"texts.txt: lines 2, 4 are blank"):
        read_texts(path)


def test_read_texts_keeps_one_text_per_newline(tmp_path):
    # \u2028 and \x0c split a line for str.splitlines(), which would shift every later row.
    path = tmp_path / "texts.txt"
    path.write_bytes("\ufeffa\u2028b\r\nc\x0cd\nlast".encode("utf-8"))
    assert read_texts(path) == ["a\u2028b", "c\x0cd", "last"]


def test_encode_refuses_a_blank_line_and_writes_nothing(capsys, tmp_path, tiny_bert_path):
    source = tmp_path / "texts.txt"
    source.write_text("first text\n\nthird\n")
    code, _, err = run(
        capsys, "encode", f"backbone.path={tiny_bert_path}", f"encode.input={source}", f"output_dir={tmp_path / 'out'}"
    )
    assert code == 2 and "line 2 is blank" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "embeddings.npy").exists()


# -- outputs are atomic; OS errors are one clear line ----------------------------------


def test_a_failed_npy_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "embeddings.npy"
    with storage.atomic_file(target) as handle:
        np.save(handle, np.ones((3, 4), dtype=np.float32))

    def disk_full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    with pytest.raises(OutputError, match=r"cannot write .*embeddings.npy: No space left on device"):
        with storage.atomic_file(target) as handle:
            np.save(handle, np.zeros((1000, 4), dtype=np.float32))
    np.testing.assert_array_equal(np.load(target), np.ones((3, 4), dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["embeddings.npy"], "no temporary file left behind"


def test_encode_into_a_full_disk_is_one_line_naming_the_path(capsys, tmp_path, tiny_bert_path, monkeypatch):
    source = tmp_path / "texts.txt"
    source.write_text("first text\nsecond\n")

    def disk_full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    code, _, err = run(
        capsys, "encode", f"backbone.path={tiny_bert_path}", f"encode.input={source}", f"output_dir={tmp_path / 'out'}"
    )
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [f"embplex encode: error: cannot write {tmp_path / 'out' / 'embeddings.npy'}: No space left "
                      "on device. Check that its folder is writable and the disk has space, or choose another "
                      "output_dir; nothing was left half-written."]
    assert "Traceback" not in err
    hydra_run_record = {".hydra", "encode.log"}  # what Hydra writes in every run folder
    written = {p.name for p in (tmp_path / "out").iterdir()} - hydra_run_record
    assert written == set(), "neither the vectors nor their ids half-written"


def test_a_read_only_output_folder_is_one_clear_error(tmp_path, monkeypatch):
    from embplex.evaluation import write_results
    from embplex.plugins.index.exact import ExactIndex

    def read_only(*_, **__):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(storage.tempfile, "mkdtemp", read_only)
    with pytest.raises(OutputError, match=r"cannot write .*results.json: Permission denied"):
        write_results(tmp_path / "results.json", {"spearman": 80.0})
    with pytest.raises(OutputError, match=r"cannot write .*index: Permission denied"):
        ExactIndex(dim=2).save(tmp_path / "index")


# -- `embplex index` reuses a saved index only when it is the same one ---------------------


def test_index_command_reuses_a_verified_index_and_rebuilds_a_stale_one(capsys, tmp_path, tiny_bert_path, monkeypatch):
    folder = beir_folder(tmp_path / "beir", [*DOCS, {"_id": "d3", "text": "third"}], QUERIES, [("q1", "d1", 1)])
    out = tmp_path / "out"
    common = [f"backbone.path={tiny_bert_path}", f"data.eval.path={folder}", "data.eval.split=test", f"output_dir={out}"]
    encoded: list[int] = []
    original_encode = embplex.EmbeddingModel.encode

    def counting_encode(self, texts, *args, **kwargs):
        encoded.append(len(texts))
        return original_encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(embplex.EmbeddingModel, "encode", counting_encode)

    def index(*extra):
        encoded.clear()
        code, stdout, err = run(capsys, "index", *common, *extra)
        return code, stdout, err, list(encoded)

    code, stdout, err, calls = index()
    assert code == 0, err
    assert "building the index: no index saved" in stdout and calls == [3]
    built_from = json.loads((out / "index" / "manifest.json").read_text())["built_from"]
    assert set(built_from) == {"model", "corpus", "index"}

    code, stdout, err, calls = index()
    assert code == 0 and "reusing the saved index" in stdout and calls == [], "nothing encoded again"

    code, stdout, err, calls = index("search.rebuild=true")
    assert code == 0 and "search.rebuild=true" in stdout and calls == [3]

    code, stdout, err, calls = index("pooling=cls")
    assert code == 0 and "was built from another model" in stdout and calls == [3]

    code, stdout, err, calls = index("pooling=cls", "index.metric=ip")
    assert code == 0 and "was built from other index settings" in stdout and calls == [3]

    with (folder / "corpus.jsonl").open("a") as handle:
        handle.write(json.dumps({"_id": "d4", "text": "fourth"}) + "\n")
    code, stdout, err, calls = index("pooling=cls", "index.metric=ip")
    assert code == 0 and "was built from another corpus" in stdout and calls == [4]

    vectors_file = out / "index" / "vectors.safetensors"
    data = bytearray(vectors_file.read_bytes())
    data[-2] ^= 0x01
    vectors_file.write_bytes(bytes(data))
    code, stdout, err, calls = index("pooling=cls", "index.metric=ip")
    assert code == 2 and calls == []
    assert "vectors.safetensors is corrupt: its bytes no longer match the SHA-256" in err and "search.rebuild=true" in err


def test_any_os_error_about_a_file_is_one_line_from_the_cli(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # Hydra records the run in ./runs/latest/.hydra
    # e.g. training appending to metrics.csv in a folder that became read-only
    def read_only_run(*_):
        raise PermissionError(errno.EACCES, "Permission denied", "/runs/latest/metrics.csv")

    monkeypatch.setitem(embplex.cli.HANDLERS, "train", read_only_run)
    code, _, err = run(capsys, "train")
    assert (code, err) == (2, "embplex train: error: /runs/latest/metrics.csv: Permission denied\n")


def test_a_failed_folder_replace_puts_the_previous_folder_back(tmp_path, monkeypatch):
    with storage.atomic_directory(tmp_path / "model") as root:
        (root / "weights").write_text("old")
    real_replace = storage.os.replace

    def staging_cannot_move(source, target):
        if ".tmp-" in str(source):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(storage.os, "replace", staging_cannot_move)
    with pytest.raises(OutputError, match="cannot write .*model: Input/output error"):
        with storage.atomic_directory(tmp_path / "model") as root:
            (root / "weights").write_text("new")
    assert (tmp_path / "model" / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
