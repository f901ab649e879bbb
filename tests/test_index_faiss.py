"""Index ``faiss``: recall@10 against ``exact`` for flat, HNSW and IVF-PQ on synthetic
data with planted neighbours, deletion from every structure, training, persistence, errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss", reason="index 'faiss' needs the faiss extra: pip install 'embplex[faiss]'")

from embplex.errors import InputError, OptionError  # noqa: E402
from embplex.plugins.index.exact import ExactIndex  # noqa: E402
from embplex.plugins.index.faiss import FaissIndex  # noqa: E402
from embplex.testing import IndexContract  # noqa: E402

import faiss  # noqa: E402

# one OpenMP thread: on a machine whose cores are busy, more make k-means 20x slower
faiss.omp_set_num_threads(1)


def clustered(n: int, dim: int, seed: int, clusters: int = 64) -> np.ndarray:
    """Unit vectors around random centres: structured like real embeddings, so that
    IVF lists and PQ codebooks have something to learn."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    vectors = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(index, exact, queries) -> float:
    found, truth = index.search(queries, 10).ids, exact.search(queries, 10).ids
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))


SETTINGS = {
    "flat": ({"structure": "flat"}, 1.0),
    "hnsw": ({"structure": "hnsw", "hnsw_m": 16, "ef_search": 64}, 0.95),
    "ivfpq": ({"structure": "ivfpq", "nlist": 16, "pq_m": 32, "pq_bits": 6, "nprobe": 8}, 0.6),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_recall_at_10_against_exact(setting):
    options, floor = SETTINGS[setting]
    data, queries = clustered(2000, 64, seed=0), clustered(50, 64, seed=1)
    ids = [f"d{i}" for i in range(len(data))]
    exact, index = ExactIndex(dim=64), FaissIndex(dim=64, **options)
    exact.add(ids, data)
    index.add(ids, data)
    assert index.trained
    recall = recall_at_10(index, exact, queries)
    print(f"faiss {setting}: recall@10 = {recall:.3f}, bytes/vector = {index.nbytes / len(index):.1f}")
    assert recall >= floor
    if setting == "flat":
        np.testing.assert_allclose(index.search(queries, 10).scores, exact.search(queries, 10).scores, atol=1e-5)
    if setting == "ivfpq":  # PQ codes: 24 bytes instead of 256 per vector (+ the 8-byte label)
        assert index.nbytes / len(index) < 0.2 * exact.nbytes / len(exact)


@pytest.mark.parametrize("structure", ["flat", "hnsw", "ivfpq"])
def test_deleted_items_are_never_returned(structure):
    data = clustered(400, 16, seed=2)
    ids = [f"d{i}" for i in range(400)]
    index = FaissIndex(dim=16, structure=structure, nlist=4, pq_m=4, pq_bits=6, nprobe=4)
    index.add(ids, data)
    assert index.trained
    gone = ids[:50]
    index.delete(gone)
    assert len(index) == 350
    hits = index.search(data[:50], 20).ids
    assert all(not set(row) & set(gone) for row in hits)
    assert all(len(row) == 20 for row in hits)
    index.add(["d0"], data[:1])  # a deleted id may come back
    assert index.search(data[0], 1).ids == [["d0"]]


def test_ivfpq_searches_exactly_until_it_can_train_then_trains_once():
    data = clustered(300, 16, seed=3)
    ids = [f"d{i}" for i in range(300)]
    index = FaissIndex(dim=16, structure="ivfpq", nlist=4, pq_m=4, pq_bits=6, nprobe=4, train_size=200)
    exact = ExactIndex(dim=16)
    index.add(ids[:150], data[:150])
    exact.add(ids[:150], data[:150])
    assert not index.trained and index.nbytes == 150 * 16 * 4
    assert index.search(data[:5], 5).ids == exact.search(data[:5], 5).ids
    index.add(ids[150:], data[150:])
    assert index.trained and len(index) == 300
    assert index.nbytes < 300 * 16 * 4


def test_a_filter_is_answered_even_when_the_probed_lists_hold_no_match():
    data = clustered(600, 16, seed=4, clusters=8)
    ids = [f"d{i}" for i in range(600)]
    metadata = [{"keep": i == 599} for i in range(600)]
    index = FaissIndex(dim=16, structure="ivfpq", nlist=8, pq_m=4, pq_bits=6, nprobe=1)
    index.add(ids, data, metadata=metadata)
    assert index.search(data[:20], 5, filter={"keep": True}).ids == [["d599"]] * 20


def test_rescore_is_refused_by_codes_only():
    data = clustered(300, 16, seed=5)
    index = FaissIndex(dim=16, structure="ivfpq", nlist=4, pq_m=4, pq_bits=6)
    index.add([str(i) for i in range(300)], data)
    with pytest.raises(InputError, match="rescore=false"):
        index.search(data[:1], 3, rescore=True)


def test_bad_options_are_refused_up_front():
    with pytest.raises(OptionError, match="structure"):
        FaissIndex(dim=8, structure="lsh")
    with pytest.raises(OptionError, match="pq_m=16 must divide the dimension 24.*e.g. 12"):
        FaissIndex(dim=24, structure="ivfpq", pq_m=16)
    with pytest.raises(OptionError, match="pq_bits"):
        FaissIndex(dim=8, pq_bits=12)
    FaissIndex(dim=1, structure="ivfpq")  # the core's throw-away option check with dim=1 passes


class TestFaissFollowsTheIndexContract(IndexContract):
    @pytest.fixture(params=["flat", "hnsw", "ivfpq"])
    def make_index(self, request):
        self.exact = request.param == "flat"
        # ivfpq: enough items to train inside the suite's 20- to 40-item adds
        return lambda dim: FaissIndex(dim=dim, structure=request.param, nlist=2, pq_m=dim, pq_bits=4, train_size=16)
