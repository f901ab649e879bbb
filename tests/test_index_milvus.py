"""Index ``milvus`` against Milvus Lite (embedded) and against a Milvus Lite server process
reached by URI (the code path of a cluster): insert, search, delete, reopen, metadata
filters, saves, and clear errors for an address that cannot be reached or a file held by
another process. The whole ``IndexContract`` runs on it in tests/test_index_plugins.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="index 'milvus' needs the milvus extra: pip install 'embplex[milvus]'")
pytest.importorskip("milvus_lite", reason="index 'milvus' needs the milvus extra: pip install 'embplex[milvus]'")

from embplex.errors import DimensionError, InputError, OptionError  # noqa: E402
from embplex.plugins.index.exact import ExactIndex  # noqa: E402
from embplex.plugins.index.milvus import MilvusIndex  # noqa: E402


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


IDS = [f"doc-{i}-é" for i in range(60)]
VECTORS = unit(60, 16, seed=0)
METADATA = [{"lang": "en" if i % 3 else "fr", "year": 2020 + i % 5} for i in range(60)]
QUERIES = unit(5, 16, seed=1)


def reference(keep=lambda i: True) -> ExactIndex:
    exact = ExactIndex(dim=16)
    rows = [i for i in range(60) if keep(i)]
    exact.add([IDS[i] for i in rows], VECTORS[rows])
    return exact


def test_insert_search_delete_reopen_and_filter_a_lite_file(tmp_path):
    uri = str(tmp_path / "items.db")
    index = MilvusIndex(dim=16, uri=uri, collection="docs")
    index.add(IDS, VECTORS, metadata=METADATA)
    assert len(index) == 60
    found, truth = index.search(QUERIES, 10), reference().search(QUERIES, 10)
    assert found.ids == truth.ids
    np.testing.assert_allclose(found.scores, truth.scores, atol=1e-5)
    english_2021 = index.search(QUERIES, 60, filter={"lang": "en", "year": [2021, 2022]})
    wanted = {IDS[i] for i in range(60) if METADATA[i]["lang"] == "en" and METADATA[i]["year"] in (2021, 2022)}
    assert all(set(row) == wanted for row in english_2021.ids)

    index.delete(IDS[:10])
    assert len(index) == 50  # Strong consistency: the delete is visible at once
    assert index.search(QUERIES, 10).ids == reference(lambda i: i >= 10).search(QUERIES, 10).ids
    index.close()

    reopened = MilvusIndex(dim=16, uri=uri, collection="docs")  # a later run, the same file
    assert len(reopened) == 50
    assert reopened.search(QUERIES, 10).ids == reference(lambda i: i >= 10).search(QUERIES, 10).ids
    assert all(set(row) == wanted - set(IDS[:10]) for row in reopened.search(QUERIES, 60, filter={"lang": "en", "year": [2021, 2022]}).ids)
    with pytest.raises(InputError, match="already in the index"):
        reopened.add([IDS[20]], VECTORS[:1])
    with pytest.raises(InputError, match="not in the index"):
        reopened.delete([IDS[0]])  # deleted before the reopen
    assert len(reopened) == 50
    reopened.close()
    with pytest.raises(DimensionError, match="dimension 16, not 8"):
        len(MilvusIndex(dim=8, uri=uri, collection="docs"))


def test_a_saved_lite_index_loads_as_a_private_copy(tmp_path):
    index = MilvusIndex(dim=16)
    index.add(IDS, VECTORS, metadata=METADATA)
    index.save(tmp_path / "saved")
    loaded = MilvusIndex.load(tmp_path / "saved")
    assert loaded.search(QUERIES, 5).ids == index.search(QUERIES, 5).ids
    loaded.delete(IDS[:5])
    assert len(loaded) == 55 and len(MilvusIndex.load(tmp_path / "saved")) == 60, "the save is not written to"
    description = json.loads((tmp_path / "saved" / "index.json").read_text())
    assert description["uri"] is None


def test_an_unreachable_server_names_the_uri_and_the_embedded_default():
    index = MilvusIndex(dim=16, uri="http://127.0.0.1:1", timeout=3)  # nothing listens on port 1
    with pytest.raises(OptionError, match=r"uri=http://127.0.0.1:1 .*embedded Milvus Lite default"):
        index.add(IDS[:2], VECTORS[:2])


def test_bad_options_and_metadata_are_refused():
    with pytest.raises(OptionError, match="neither a server address"):
        MilvusIndex(dim=16, uri="data/items.sqlite")
    with pytest.raises(OptionError, match="index_type"):
        MilvusIndex(dim=16, index_type="DISKANN_PLUS")
    index = MilvusIndex(dim=16)
    with pytest.raises(InputError, match="collection's own"):
        index.add(IDS[:1], VECTORS[:1], metadata=[{"vector": 1}])
    with pytest.raises(InputError, match="longer than 512 bytes"):
        index.add(["x" * 600], VECTORS[:1])
    assert len(index) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def milvus_server(tmp_path):
    """A Milvus Lite server in its own process, reached over gRPC like a cluster."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "server"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_server_by_uri_round_trips_and_saves_only_its_address(milvus_server, tmp_path):
    index = MilvusIndex(dim=16, uri=milvus_server, token="root:Milvus", collection="remote")
    index.add(IDS, VECTORS, metadata=METADATA)
    assert index.search(QUERIES, 10).ids == reference().search(QUERIES, 10).ids
    index.delete(IDS[:10])
    index.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["index.json", "manifest.json"]
    description = json.loads((tmp_path / "saved" / "index.json").read_text())
    assert description["uri"] == milvus_server and "Milvus" not in json.dumps(description), "no token saved"
    loaded = MilvusIndex.load(tmp_path / "saved")
    assert len(loaded) == 50
    assert loaded.search(QUERIES, 10, filter={"lang": "fr"}).ids == index.search(QUERIES, 10, filter={"lang": "fr"}).ids


def test_a_lite_file_open_in_another_process_is_a_clear_error(tmp_path):
    uri = str(tmp_path / "held.db")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pymilvus import MilvusClient\nMilvusClient(sys.argv[1])\n"
         "print('open', flush=True)\ntime.sleep(60)", uri],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(OptionError, match="one process at a time"):
            MilvusIndex(dim=16, uri=uri).add(IDS[:1], VECTORS[:1])
    finally:
        holder.kill()
        holder.wait()
