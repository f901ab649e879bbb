"""`embplex encode` into Parquet shards: streamed, resumable after SIGKILL with the same
bytes, split over torchrun's processes with the same bytes, a corrupt shard re-encoded,
another model's folder refused, and `embplex index` built from the shards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import embplex
from embplex import bulk
from embplex.app import load_index, model_fingerprint, search
from embplex.cli import main
from embplex.errors import InputError, OutputError

ROWS = 23
SHARD = 4  # 6 shards, the last one short


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def texts(tmp_path) -> Path:
    words = "cat dog sits on the mat in a park kitten plays red blue car road".split()
    path = tmp_path / "texts.txt"
    path.write_text("".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)) + "\n" for i in range(ROWS)))
    return path


def cli_model(path: str, *overrides: str):
    """The model the CLI builds from these overrides."""
    from embplex.app import build_model
    from embplex.config import compose_config

    registry = embplex.load_registry()
    return build_model(compose_config([f"backbone.path={path}", *overrides], registry=registry), registry)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """What the encode wrote (Hydra's own run record left out)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("shard-") or p.name == "manifest.json"}


def encode_args(model_path: str, source: Path, out: Path, *extra: str) -> list[str]:
    return [
        "encode", f"backbone.path={model_path}", f"encode.input={source}", f"output_dir={out}",
        "encode.output=embeddings", f"encode.shard_size={SHARD}", "encode.batch_size=3", *extra,
    ]


def test_shards_hold_every_row_with_its_id_and_vector(capsys, tmp_path, tiny_bert_path, texts):
    code, out, err = run(capsys, *encode_args(tiny_bert_path, texts, tmp_path / "out"))
    assert code == 0, err
    folder = tmp_path / "out" / "embeddings"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["input"]["rows"] == ROWS and manifest["input"]["kind"] == "text"
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 23)]
    model = cli_model(tiny_bert_path)
    assert manifest["model"] == model_fingerprint(model)
    ids, vectors = bulk.read_shards(folder, model_fingerprint(model))
    assert ids == [str(n) for n in range(1, ROWS + 1)]  # the id of a text line is its number
    np.testing.assert_allclose(vectors, model.encode(texts.read_text().splitlines()), atol=1e-5)


def test_jsonl_and_beir_inputs_name_their_fields(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"id": 7, "text": "a cat"}\n\n{"_id": "d2", "title": "Dogs", "text": "run fast"}\n')
    assert list(bulk._rows(jsonl, "jsonl")) == [("7", "a cat"), ("d2", "Dogs run fast")]
    (tmp_path / "beir").mkdir()
    (tmp_path / "beir" / "corpus.jsonl").write_text('{"_id": "x", "text": "t"}\n')
    assert bulk.describe_input(tmp_path / "beir").kind == "beir"
    jsonl.write_text('{"text": "no id"}\n')
    with pytest.raises(InputError, match=r"docs.jsonl, line 1 has no 'id'"):
        bulk.describe_input(jsonl)
    blank = tmp_path / "blank.txt"
    blank.write_text("one\n\nthree\n")
    with pytest.raises(InputError, match="line 2 is blank"):
        bulk.describe_input(blank)


KILL_AT_THIRD_RECORD = """
import os, signal, sys
from embplex import bulk, storage
from embplex.cli import main

write_json = storage.write_json
def dying(path, data):
    if path.name == "shard-00002.json":  # shard 2 is on disk, its record is not: killed in between
        os.kill(os.getpid(), signal.SIGKILL)
    return write_json(path, data)
bulk.storage.write_json = dying
sys.exit(main(sys.argv[1:]))
"""


def fresh_encode(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    """``embplex encode`` in a new process. Byte equality holds between runs in the same
    kind of process: the test process's torch state (threads, flags other tests set) can
    change the last bits of a float, so every run compared here is a fresh one."""
    launch = ["-c", script] if script else ["-m", "embplex"]
    return subprocess.run([sys.executable, *launch, *args], capture_output=True, text=True, timeout=180)


def test_a_killed_encode_resumes_to_the_same_bytes(tmp_path, tiny_bert_path, texts):
    straight_run = fresh_encode(*encode_args(tiny_bert_path, texts, tmp_path / "straight"))
    assert straight_run.returncode == 0, straight_run.stderr[-2000:]
    straight = shard_bytes(tmp_path / "straight" / "embeddings")

    args = encode_args(tiny_bert_path, texts, tmp_path / "killed")
    killed = fresh_encode(*args, script=KILL_AT_THIRD_RECORD)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = tmp_path / "killed" / "embeddings"
    assert not json.loads((folder / "manifest.json").read_text())["complete"]
    assert (folder / "shard-00002.parquet").exists() and not (folder / "shard-00002.json").exists()

    resumed = fresh_encode(*args)  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = resumed.stdout + resumed.stderr
    assert "2 of its 6 shards are done and verified" in said
    assert "shard 2 (shard-00002.parquet): written without its record" in said
    assert shard_bytes(folder) == straight


def test_a_corrupt_shard_is_encoded_again_and_another_models_folder_refused(capsys, tmp_path, tiny_bert_path, texts):
    args = encode_args(tiny_bert_path, texts, tmp_path / "out")
    assert run(capsys, *args)[0] == 0
    folder = tmp_path / "out" / "embeddings"
    before = shard_bytes(folder)
    data = bytearray((folder / "shard-00001.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "shard-00001.parquet").write_bytes(bytes(data))
    with pytest.raises(Exception, match="corrupt"):
        bulk.verify_output(folder)

    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "shard 1 (shard-00001.parquet): corrupt (its SHA-256 differs from its record); encoding it again" in out
    assert shard_bytes(folder) == before

    # another model (cls pooling) into the same folder: refused, naming what differs and what to do
    code, _, err = run(capsys, *args, "pooling=cls")
    assert code == 2
    assert "written by another model, input or settings (model:" in err and "encode.overwrite=true" in err
    assert shard_bytes(folder) == before, "nothing lost"
    code, out, err = run(capsys, *args, "pooling=cls", "encode.overwrite=true")
    assert code == 0, err
    assert shard_bytes(folder)["manifest.json"] != before["manifest.json"]


def test_one_npy_file_is_refused_under_torchrun(capsys, tmp_path, tiny_bert_path, texts, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; nothing starts before the refusal
    code, _, err = run(capsys, "encode", f"backbone.path={tiny_bert_path}", f"encode.input={texts}", f"output_dir={tmp_path}")
    assert code == 2 and "one .npy file, which one process writes" in err and "encode.output=<folder name>" in err
    assert not (tmp_path / "embeddings.npy").exists()


def test_commands_that_run_in_one_process_refuse_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in ("eval", "index", "serve", "quickstart"):
        code, _, err = run(capsys, command)
        assert code == 2 and f"embplex {command}: error: this command runs in one process" in err


def test_an_unwritable_output_fails_before_encoding(tmp_path, texts):
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    class NoEncoding:
        dim = 8

        def encode(self, *args, **kwargs):
            raise AssertionError("encoded before the output was known to be writable")

    with pytest.raises(OutputError, match=r"cannot write .*a-file/embeddings"):
        bulk.encode_to_shards(NoEncoding(), texts, blocker / "embeddings", bulk.EncodeJob(batch_size=2, shard_size=4), "f")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_processes_write_the_one_process_bytes(tmp_path, tiny_bert_path, texts):
    # One CPU thread per process in both runs, as torchrun sets it: on the CPU the number
    # of threads changes the summation order inside matrix products, hence the last bits.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(
        [sys.executable, "-m", "embplex", *encode_args(tiny_bert_path, texts, tmp_path / "one")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "embplex",
        *encode_args(tiny_bert_path, texts, tmp_path / "two"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1" not in done.stdout  # a fresh folder: nothing skipped
    assert shard_bytes(tmp_path / "two" / "embeddings") == shard_bytes(tmp_path / "one" / "embeddings")


def test_index_builds_from_the_shards_without_encoding_again(capsys, tmp_path, tiny_bert_path, monkeypatch):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = {f"d{i}": f"the {w} sits on the mat" for i, w in enumerate("cat dog kitten puppy man woman child".split())}
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items()))
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "the dog"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    common = [f"backbone.path={tiny_bert_path}", "data=scifact", f"data.eval.path={beir}"]
    encode = ["encode", *common, f"encode.input={beir}", f"output_dir={tmp_path / 'enc'}", "encode.output=embeddings"]
    assert run(capsys, *encode)[0] == 0
    shards = tmp_path / "enc" / "embeddings"

    from embplex.model import EmbeddingModel

    def no_encoding(*args, **kwargs):
        raise AssertionError("the corpus was encoded again")

    with monkeypatch.context() as patched:
        patched.setattr(EmbeddingModel, "encode", no_encoding)
        code, out, err = run(capsys, "index", *common, f"output_dir={tmp_path / 'idx'}", f"search.embeddings={shards}")
    assert code == 0, err
    assert "from the verified shards" in out and "indexed 7 documents" in out
    index = load_index(tmp_path / "idx" / "index", embplex.load_registry())
    model = cli_model(tiny_bert_path)
    assert len(index) == 7
    assert search(model, index, docs["d1"], 1)[0][0] == "d1"

    # shards of another model are refused
    code, _, err = run(capsys, "index", *common, "pooling=cls", f"output_dir={tmp_path / 'idx2'}", f"search.embeddings={shards}")
    assert code == 2 and "encoded by another model than the configured one" in err
