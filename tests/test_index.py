"""The ``exact`` index: exact top-k equal to brute force, ids, delete, persistence, errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from embplex.errors import DimensionError, EmptyIndexError, InputError, ModelFileError, OptionError
from embplex.plugins.index.exact import ExactIndex


def brute_force(stored: np.ndarray, queries: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and scores from the full score matrix, sorted with numpy."""
    if metric == "cosine":
        stored = stored / np.linalg.norm(stored, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries.astype(np.float64) @ stored.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def random_vectors(rows: int, dim: int, seed: int) -> np.ndarray:
    # Different norms per row, so cosine and inner product give different rankings.
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, dim)) * rng.uniform(0.1, 3.0, size=(rows, 1))).astype(np.float32)


def filled(n: int = 200, dim: int = 16, metric: str = "cosine", chunk_size: int = 4096, seed: int = 0):
    vectors = random_vectors(n, dim, seed)
    ids = [f"doc-{i}" for i in range(n)]
    index = ExactIndex(dim=dim, metric=metric, chunk_size=chunk_size)
    index.add(ids, vectors)
    return index, ids, vectors


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_search_equals_brute_force(metric, chunk_size):
    index, ids, vectors = filled(n=203, metric=metric, chunk_size=chunk_size)
    queries = random_vectors(37, 16, seed=1)
    k = 10
    result = index.search(queries, k)
    rows, scores = brute_force(vectors, queries, metric, k)
    assert result.ids == [[ids[r] for r in row] for row in rows]
    np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-5)
    assert result.scores.shape == (37, k)
    assert np.all(np.diff(result.scores, axis=1) <= 0), "hits must come best first"


def test_cosine_and_ip_rank_differently():
    # A guard that the metric option does something: long vectors win under ip only.
    index_cos, _, vectors = filled(metric="cosine")
    index_ip, _, _ = filled(metric="ip")
    queries = random_vectors(20, 16, seed=3)
    assert index_cos.search(queries, 5).ids != index_ip.search(queries, 5).ids
    np.testing.assert_array_less(np.abs(index_cos.search(queries, 5).scores), 1 + 1e-5)


def test_incremental_adds_equal_one_add():
    vectors = random_vectors(50, 8, seed=0)
    ids = [str(i) for i in range(50)]
    whole = ExactIndex(dim=8, chunk_size=16)
    whole.add(ids, vectors)
    pieces = ExactIndex(dim=8, chunk_size=16)
    for start in range(0, 50, 13):
        pieces.add(ids[start : start + 13], vectors[start : start + 13])
    queries = random_vectors(5, 8, seed=9)
    assert pieces.search(queries, 7).ids == whole.search(queries, 7).ids
    assert len(pieces) == 50 and pieces.ids == ids


def test_single_query_vector_and_k_capped_at_size():
    index, ids, vectors = filled(n=5, dim=4)
    result = index.search(vectors[2], k=50)
    assert len(result.ids) == 1 and len(result.ids[0]) == 5
    assert result.ids[0][0] == "doc-2"
    assert result.scores.shape == (1, 5)
    assert result.scores[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_accepts_torch_tensors_of_any_float_dtype():
    import torch

    vectors = random_vectors(20, 8, seed=5)
    from_numpy = ExactIndex(dim=8)
    from_numpy.add([str(i) for i in range(20)], vectors)
    from_torch = ExactIndex(dim=8)
    from_torch.add([str(i) for i in range(20)], torch.from_numpy(vectors).to(torch.bfloat16))
    queries = torch.from_numpy(random_vectors(4, 8, seed=6))
    assert from_torch.search(queries, 3).ids == from_numpy.search(queries.numpy(), 3).ids


def test_search_on_empty_index_is_refused_naming_the_index_and_the_remedy():
    index = ExactIndex(dim=4)
    with pytest.raises(EmptyIndexError, match=r"index 'exact' is empty: it holds no vectors to search\. Add vectors first"):
        index.search(np.ones((3, 4), dtype=np.float32), k=5)


def test_delete_removes_items_from_results():
    index, ids, vectors = filled(n=30, dim=8, chunk_size=4)
    gone = ["doc-3", "doc-17", "doc-29"]
    index.delete(gone)
    assert len(index) == 27
    assert all(doc not in index for doc in gone)
    # each deleted vector queried for itself must no longer find itself
    result = index.search(vectors[[3, 17, 29]], k=27)
    for row in result.ids:
        assert not set(row) & set(gone)
        assert len(row) == 27
    keep = [i for i in range(30) if ids[i] not in gone]
    rows, _ = brute_force(vectors[keep], vectors[[3, 17, 29]], "cosine", 27)
    assert result.ids == [[ids[keep[r]] for r in row] for row in rows]
    # a deleted id may be added again
    index.add(["doc-3"], vectors[[3]])
    assert index.search(vectors[3], 1).ids == [["doc-3"]]


def test_delete_unknown_id_is_an_error_and_changes_nothing():
    index, _, _ = filled(n=10, dim=4)
    with pytest.raises(InputError, match="'nope'.*not in the index"):
        index.delete(["doc-1", "nope"])
    assert len(index) == 10 and "doc-1" in index


def test_duplicate_ids_are_refused():
    index, _, vectors = filled(n=10, dim=4)
    with pytest.raises(InputError, match="already in the index; delete them first"):
        index.add(["doc-4"], vectors[:1])
    with pytest.raises(InputError, match="more than once"):
        index.add(["x", "x"], vectors[:2])
    assert len(index) == 10


def test_wrong_dimension_names_both_dimensions():
    index, _, _ = filled(n=10, dim=16)
    with pytest.raises(DimensionError, match=r"dimension 8.*dimension 16"):
        index.search(np.ones((2, 8), dtype=np.float32), 3)
    with pytest.raises(DimensionError, match=r"dimension 12.*dimension 16"):
        index.add(["a"], np.ones((1, 12), dtype=np.float32))
    with pytest.raises(DimensionError):
        index.add(["a", "b"], [np.ones((3, 16)), np.ones((3, 16))])  # multi-vector input


def test_bad_inputs_and_options():
    index, _, _ = filled(n=10, dim=4)
    with pytest.raises(InputError, match="one id per vector"):
        index.add(["a", "b"], np.ones((3, 4), dtype=np.float32))
    with pytest.raises(InputError, match="strings"):
        index.add([1], np.ones((1, 4), dtype=np.float32))
    with pytest.raises(InputError, match="NaN"):
        index.add(["a"], np.full((1, 4), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="k must be"):
        index.search(np.ones(4), 0)
    with pytest.raises(OptionError, match="dim"):
        ExactIndex()
    with pytest.raises(OptionError, match="metric"):
        ExactIndex(dim=4, metric="l2")


def test_save_load_round_trip(tmp_path):
    index, ids, vectors = filled(n=57, dim=8, metric="ip", chunk_size=10)
    index.delete(["doc-5"])
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.json", "manifest.json", "vectors.safetensors"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["metric"] == "ip" and meta["dim"] == 8 and meta["ids"] == index.ids
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert (manifest["index"], manifest["dim"], manifest["size"]) == ("exact", 8, 56)
    assert set(manifest["sha256"]) == {"index.json", "vectors.safetensors"}

    loaded = ExactIndex.load(tmp_path / "idx")
    assert (loaded.dim, loaded.metric, loaded.chunk_size, len(loaded)) == (8, "ip", 10, 56)
    queries = random_vectors(6, 8, seed=4)
    before, after = index.search(queries, 9), loaded.search(queries, 9)
    assert after.ids == before.ids
    np.testing.assert_array_equal(after.scores, before.scores)
    # the loaded index keeps working: delete and add
    loaded.delete(["doc-0"])
    loaded.add(["doc-5"], vectors[[5]])
    assert "doc-5" in loaded and "doc-0" not in loaded


def test_save_overwrites_atomically(tmp_path):
    first, _, _ = filled(n=5, dim=4)
    first.save(tmp_path / "idx")
    second, _, _ = filled(n=9, dim=4, seed=2)
    second.save(tmp_path / "idx")
    assert len(ExactIndex.load(tmp_path / "idx")) == 9
    assert [p.name for p in tmp_path.iterdir()] == ["idx"], "no staging folders left behind"


def test_load_missing_folder_or_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        ExactIndex.load(tmp_path / "nowhere")
    index, _, _ = filled(n=5, dim=4)
    index.save(tmp_path / "idx")
    (tmp_path / "idx" / "vectors.safetensors").unlink()
    with pytest.raises(ModelFileError, match="missing"):
        ExactIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").unlink()
    with pytest.raises(ModelFileError, match="index.json is missing"):
        ExactIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").unlink()
    with pytest.raises(ModelFileError, match="no manifest.json"):
        ExactIndex.load(tmp_path / "idx")


def test_load_corrupt_files(tmp_path):
    index, _, _ = filled(n=5, dim=4)
    index.save(tmp_path / "idx")
    vectors_file = tmp_path / "idx" / "vectors.safetensors"
    vectors_file.write_bytes(vectors_file.read_bytes()[:40])
    with pytest.raises(ModelFileError, match="corrupt"):
        ExactIndex.load(tmp_path / "idx")

    index.save(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="corrupt"):
        ExactIndex.load(tmp_path / "idx")

    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    meta["ids"] = meta["ids"][:-1]  # ids and vectors disagree, checksum updated to match
    rewrite_consistently(tmp_path / "idx", "index.json", json.dumps(meta).encode())
    with pytest.raises(ModelFileError, match="does not match"):
        ExactIndex.load(tmp_path / "idx")


def rewrite_consistently(folder, name, content: bytes) -> None:
    """Replace a file of a saved index and its recorded checksum, as a careful forger would."""
    (folder / name).write_bytes(content)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"][name] = hashlib.sha256(content).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def flip_one_byte(path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_vector_bytes_are_detected_on_load(tmp_path):
    # One flipped bit in a float keeps the file a valid safetensors file with a plausible
    # vector: only the checksum recorded at save time can tell.
    index, _, vectors = filled(n=20, dim=8)
    index.save(tmp_path / "idx")
    vectors_file = tmp_path / "idx" / "vectors.safetensors"
    flip_one_byte(vectors_file, len(vectors_file.read_bytes()) - 3)
    with pytest.raises(ModelFileError, match="vectors.safetensors is corrupt: its bytes no longer match the SHA-256"):
        ExactIndex.load(tmp_path / "idx")


def test_an_index_saved_by_another_plugin_or_of_another_dim_is_refused(tmp_path, registry):
    from embplex.app import load_index
    from embplex.storage import verify_index

    index, _, _ = filled(n=6, dim=8)
    index.built_from = {"model": "m", "corpus": "c"}
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx", registry, name="exact", dim=8)
    assert len(loaded) == 6 and loaded.built_from == {"model": "m", "corpus": "c"}
    with pytest.raises(DimensionError, match="dimension 8, but dimension 16 was expected"):
        load_index(tmp_path / "idx", registry, name="exact", dim=16)
    with pytest.raises(ModelFileError, match="saved by the 'exact' index plugin, not 'sign_hamming'"):
        verify_index(tmp_path / "idx", "sign_hamming")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["index"] = "sign_hamming"
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="saved by the 'sign_hamming' index plugin, not 'exact'"):
        ExactIndex.load(tmp_path / "idx")


def test_registered_through_the_registry(registry):
    info = registry.get("index", "exact")
    assert "1702.08734" in info.paper
    index = registry.create("index", "exact", dim=3, metric="ip")
    assert isinstance(index, ExactIndex) and index.dim == 3
    with pytest.raises(OptionError, match="chunk_size"):
        registry.create("index", "exact", dim=3, chunksize=5)


def test_the_core_verifies_every_plugins_saved_index_even_one_that_loads_carelessly(tmp_path, registry):
    from embplex import storage
    from embplex.app import load_index
    from embplex.components import Index
    from embplex.registry import ComponentInfo

    class CarelessIndex(Index):
        """Saves through the core's helper but reads its file back without any check."""

        def __init__(self, dim: int) -> None:
            self.dim, self.vectors = dim, np.zeros((0, dim), dtype=np.float32)

        def __len__(self) -> int:
            return len(self.vectors)

        def save(self, path) -> None:
            with storage.saving_index(path, self, "careless") as root:
                np.save(root / "vectors.npy", self.vectors)

        @classmethod
        def load(cls, path) -> "CarelessIndex":
            vectors = np.load(path / "vectors.npy")
            index = cls(vectors.shape[1])
            index.vectors = vectors
            return index

    registry.add(ComponentInfo("index", "careless", CarelessIndex, "tests.careless", None))
    index = CarelessIndex(4)
    index.vectors = random_vectors(3, 4, seed=0)
    index.save(tmp_path / "idx")
    assert len(load_index(tmp_path / "idx", registry)) == 3  # the plugin is found from the manifest
    flip_one_byte(tmp_path / "idx" / "vectors.npy", -1)
    assert len(CarelessIndex.load(tmp_path / "idx")) == 3, "the plugin alone does not notice"
    with pytest.raises(ModelFileError, match="vectors.npy is corrupt"):
        load_index(tmp_path / "idx", registry)

# -- the index contract every index plugin passes (embplex.testing) --------------------

from embplex.testing import IndexContract  # noqa: E402


class TestExactFollowsTheIndexContract(IndexContract):
    @pytest.fixture(params=["cosine", "ip"])
    def make_index(self, request):
        self.metric = request.param
        return lambda dim: ExactIndex(dim=dim, metric=request.param, chunk_size=7)
