"""Index ``muvera``: fixed-dimensional encodings searched by an inner single-vector
index, candidates re-ranked by exact Chamfer similarity."""

from __future__ import annotations

import inspect
from importlib.resources import files

import numpy as np
import pytest
import torch

import embplex
from embplex.errors import DimensionError, InputError, ModelFileError, OptionError, UnknownComponentError
from embplex.plugins.index.muvera import MuveraIndex
from embplex.testing import IndexContract


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny tensor operations: on a loaded machine, torch's thread pool makes
    each one wait for a busy core (12 s instead of 0.2 s to add 200 sets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def muvera(dim: int, **options) -> MuveraIndex:
    return embplex.load_registry().create("index", "muvera", dim=dim, **options)


def chamfer_by_hand(query: np.ndarray, document: np.ndarray) -> float:
    return float(sum(max(float(q @ d) for d in document) for q in query))


def topic_sets(count: int, dim: int, seed: int, topics: int = 6, lengths=(4, 20)) -> tuple[list[np.ndarray], list[int]]:
    """Sets of unit vectors drawn around a few topic centres, as token vectors of texts on
    a few subjects are: Chamfer similarity then varies between sets."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, 4, dim))
    sets, labels = [], []
    for _ in range(count):
        topic = int(rng.integers(topics))
        size = int(rng.integers(*lengths))
        points = centres[topic][rng.integers(4, size=size)] + 0.8 * rng.normal(size=(size, dim))
        sets.append((points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32))
        labels.append(topic)
    return sets, labels


# -- the single-vector index contract, on sets of one vector ---------------------------------


class OneVectorSets(MuveraIndex):
    """Each single vector of the contract's checks as a set of one vector (where Chamfer
    similarity is the inner product), so the whole index contract applies: ids, deletes,
    errors, empty indexes, atomic checksummed saves."""

    def add(self, ids, vectors):
        return super().add(ids, _one_vector_sets(vectors))

    def search(self, queries, k):
        queries = np.asarray(queries, dtype=np.float32)
        return super().search(_one_vector_sets(queries[None] if queries.ndim == 1 else queries), k)


def _one_vector_sets(vectors):
    array = np.asarray(vectors, dtype=np.float32)
    return [row[None, :] for row in array] if array.ndim == 2 else vectors


class TestMuveraReRankingEveryItemFollowsTheIndexContract(IndexContract):
    """``candidates: null`` re-ranks every item: exact search."""

    @pytest.fixture
    def make_index(self):
        return lambda dim: OneVectorSets(dim=dim, candidates=None, r_reps=2, k_sim=2)


class TestMuveraThroughItsInnerIndexFollowsTheIndexContract(IndexContract):
    """Few candidates: found through the FDEs in the inner ``exact`` index."""

    exact = False

    @pytest.fixture
    def make_index(self):
        return lambda dim: OneVectorSets(dim=dim, candidates=4, r_reps=10, k_sim=2, d_proj=None)


# -- fixed-dimensional encodings ----------------------------------------------------------------


def fde_by_hand(index: MuveraIndex, points: np.ndarray, query: bool) -> np.ndarray:
    """The reference algorithm written out point by point: SimHash bits appended to a Gray
    code give the partition; sums (queries) or averages (documents); an empty partition of
    a document takes the first point whose bits differ least from the partition's."""
    out = []
    for rep in range(index.r_reps):
        hyperplanes = index._random["simhash"][rep].numpy()
        projection = index._random["projection"][rep].numpy() if index.d_proj else np.eye(index.dim)
        blocks = np.zeros((index.partitions, projection.shape[1]))
        sizes = np.zeros(index.partitions)
        bits_of = []
        for point in points:
            bits = [bool(value > 0) for value in point @ hyperplanes]
            partition = 0
            for bit in bits:  # AppendToGrayCode
                partition = (partition << 1) + (bit ^ (partition & 1))
            blocks[partition] += point @ projection
            sizes[partition] += 1
            bits_of.append(bits)
        for partition in range(index.partitions):
            if query or sizes[partition]:
                blocks[partition] /= 1 if query else sizes[partition]
                continue
            if index.fill_empty:
                binary = partition ^ (partition >> 1)
                wanted = [bool(binary >> (index.k_sim - 1 - i) & 1) for i in range(index.k_sim)]
                distances = [sum(a != b for a, b in zip(bits, wanted)) for bits in bits_of]
                blocks[partition] = points[int(np.argmin(distances))] @ projection
        out.append(blocks.ravel())
    return np.concatenate(out)


@pytest.mark.parametrize("options", [{"k_sim": 3, "r_reps": 2, "d_proj": 5}, {"k_sim": 2, "r_reps": 3, "d_proj": None, "fill_empty": False}])
def test_fdes_equal_the_reference_algorithm_written_out(options):
    index = muvera(6, **options)
    sets, _ = topic_sets(5, 6, seed=1, lengths=(1, 9))
    tensors = [torch.from_numpy(s) for s in sets]
    for query in (True, False):
        encoded = index.encode(tensors, query=query).numpy()
        for row, points in enumerate(sets):
            np.testing.assert_allclose(encoded[row], fde_by_hand(index, points, query), rtol=1e-5, atol=1e-5)


def test_one_partition_gives_sum_times_mean():
    """k_sim = 0: the query FDE is the sum of its vectors, the document FDE their mean."""
    index = muvera(4, k_sim=0, r_reps=1, d_proj=None)
    sets, _ = topic_sets(2, 4, seed=2)
    fde = index.encode([torch.from_numpy(s) for s in sets], query=True).numpy()
    np.testing.assert_allclose(fde[0], sets[0].sum(axis=0), rtol=1e-5)
    fde = index.encode([torch.from_numpy(s) for s in sets], query=False).numpy()
    np.testing.assert_allclose(fde[1], sets[1].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_the_final_projection_is_a_count_sketch_of_the_fde():
    wide = muvera(8, k_sim=2, r_reps=3, d_proj=4)
    narrow = muvera(8, k_sim=2, r_reps=3, d_proj=4, final_dim=10)
    assert narrow.fde_dim == 10 and wide.fde_dim == 48
    sets = [torch.from_numpy(s) for s in topic_sets(3, 8, seed=3)[0]]
    full = wide.encode(sets, query=False).numpy()
    index, sign = narrow._random["final_index"].numpy(), narrow._random["final_sign"].numpy()
    by_hand = np.zeros((3, 10))
    for column in range(48):
        by_hand[:, index[column]] += sign[column] * full[:, column]
    np.testing.assert_allclose(narrow.encode(sets, query=False).numpy(), by_hand, rtol=1e-5, atol=1e-5)


def _correlation(index: MuveraIndex, queries: list[np.ndarray], documents: list[np.ndarray]) -> float:
    fde_q = index.encode([torch.from_numpy(q) for q in queries], query=True).numpy()
    fde_d = index.encode([torch.from_numpy(d) for d in documents], query=False).numpy()
    approx = (fde_q @ fde_d.T).ravel()
    exact = np.array([chamfer_by_hand(q, d) for q in queries for d in documents])
    return float(np.corrcoef(approx, exact)[0, 1])


def test_fde_inner_product_correlates_with_chamfer_and_more_with_more_repetitions():
    queries, _ = topic_sets(12, 16, seed=4, lengths=(3, 8))
    documents, _ = topic_sets(40, 16, seed=5)
    correlation = {reps: _correlation(muvera(16, r_reps=reps), queries, documents) for reps in (1, 4, 20)}
    print("FDE inner product vs Chamfer, Pearson r by r_reps (synthetic):", correlation)
    assert correlation[1] < correlation[4] < correlation[20]
    assert correlation[20] > 0.75  # measured 0.81 (k_sim 5, d_proj 16); 0.33 with one repetition


def test_on_real_minilm_token_vectors_too(minilm_path, data_dir):
    """A few SciFact claims and abstracts encoded by all-MiniLM-L6-v2 as a multi_vector
    model (its own token states: dim null, no projection)."""
    from embplex.data import load_beir

    corpus, queries, qrels = load_beir(data_dir / "retrieval" / "scifact", "test")
    judged = [q for q in qrels if qrels[q]][:8]
    doc_ids = sorted({d for q in judged for d in qrels[q]})[:8] + list(corpus)[:8]
    model = embplex.compose({"name": "hf_encoder", "path": minilm_path, "max_length": 96}, pooling={"name": "multi_vector", "dim": None})
    query_sets = model.encode([queries[q] for q in judged], truncation="silent")
    doc_sets = model.encode([corpus[d] for d in doc_ids], truncation="silent")
    correlation = {reps: _correlation(muvera(384, r_reps=reps), query_sets, doc_sets) for reps in (1, 5, 20)}
    print("FDE inner product vs Chamfer, Pearson r by r_reps (MiniLM on SciFact):", correlation)
    assert correlation[1] < correlation[5] < correlation[20]
    assert correlation[20] > 0.8  # measured 0.89; 0.54 with one repetition


# -- Chamfer re-ranking and recall ------------------------------------------------------------


@pytest.mark.parametrize("budget", [None, 40], ids=["one-block", "many-blocks"])
def test_scores_are_chamfer_similarities_computed_by_hand(budget, monkeypatch):
    if budget:  # scores held at once: items are scored in many blocks
        monkeypatch.setattr("embplex.plugins.index.muvera.SCORE_BUDGET", budget)
    documents, _ = topic_sets(30, 8, seed=6)
    queries, _ = topic_sets(4, 8, seed=7, lengths=(2, 6))
    index = muvera(8, candidates=None)
    index.add([f"d{i}" for i in range(30)], documents)
    result = index.search(queries, k=5)
    for q, query in enumerate(queries):
        scores = np.array([chamfer_by_hand(query, d) for d in documents])
        best = np.argsort(-scores, kind="stable")[:5]
        assert result.ids[q] == [f"d{i}" for i in best]
        np.testing.assert_allclose(result.scores[q], scores[best], rtol=1e-5, atol=1e-5)


def test_recall_of_candidates_grows_with_their_number_and_reaches_one_with_all():
    documents, _ = topic_sets(300, 16, seed=8)
    queries, _ = topic_sets(25, 16, seed=9, lengths=(3, 8))
    ids = [f"d{i}" for i in range(300)]
    exact = muvera(16, candidates=None)
    exact.add(ids, documents)
    truth = exact.search(queries, k=10).ids
    recall = {}
    for candidates in (10, 20, 50, 100, 300):
        index = muvera(16, candidates=candidates, k_sim=4, r_reps=10, d_proj=8)
        index.add(ids, documents)
        found = index.search(queries, k=10).ids
        recall[candidates] = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
    print("recall@10 of MUVERA + Chamfer re-ranking against exact Chamfer, by candidates:", recall)
    values = list(recall.values())
    assert all(later >= earlier - 0.02 for earlier, later in zip(values, values[1:])), recall
    assert recall[300] == 1.0 and recall[10] < 1.0


# -- bad input ----------------------------------------------------------------------------------


def test_a_single_vector_model_is_refused_with_what_to_do(tiny_model):
    vectors = tiny_model.encode(["a cat", "a dog"])  # mean pooling: [2, 32]
    index = muvera(tiny_model.dim)
    with pytest.raises(InputError, match="multi_vector"):
        index.add(["a", "b"], vectors)
    index.add(["a"], [vectors])  # as ONE set of two vectors it is fine
    with pytest.raises(InputError, match=r"for one query pass \[vectors\]"):
        index.search(vectors, k=1)
    with pytest.raises(InputError, match="padding"):
        index.add(["p"], np.zeros((1, 3, tiny_model.dim), dtype=np.float32))
    assert len(index) == 1


def test_sets_of_mixed_width_are_refused_naming_the_item():
    index = muvera(8)
    good = np.ones((3, 8), dtype=np.float32)
    with pytest.raises(DimensionError, match=r"item 1 \(id 'b'\) has vectors of width 6"):
        index.add(["a", "b"], [good, np.ones((2, 6), dtype=np.float32)])
    with pytest.raises(DimensionError, match="shape"):
        index.add(["a"], [np.ones(8, dtype=np.float32)])
    assert len(index) == 0, "a refused add adds nothing"


def test_an_empty_set_is_refused_naming_the_document():
    index = muvera(8)
    with pytest.raises(InputError, match=r"id 'only-punctuation'\) is an empty set"):
        index.add(["ok", "only-punctuation"], [np.ones((2, 8), dtype=np.float32), np.zeros((0, 8), dtype=np.float32)])
    with pytest.raises(InputError, match="empty set"):
        index.search([np.zeros((0, 8), dtype=np.float32)], k=1)
    assert len(index) == 0


def test_bad_options_are_refused():
    for options, name in [({"k_sim": 17}, "k_sim"), ({"r_reps": 0}, "r_reps"), ({"d_proj": 0}, "d_proj"), ({"candidates": 0}, "candidates"), ({"metric": "l2"}, "metric")]:
        with pytest.raises(OptionError, match=name):
            muvera(8, **options)
    with pytest.raises(OptionError, match="index.inner.metric"):
        muvera(8, inner={"name": "exact", "metric": "cosine"})
    with pytest.raises(UnknownComponentError, match="index.inner"):
        muvera(8, inner="exakt")


def test_the_inner_index_is_any_plugin_built_by_the_registry_with_the_fde_width():
    index = muvera(8, k_sim=2, r_reps=3, d_proj=4, inner={"name": "exact", "chunk_size": 7})
    assert type(index._inner).__name__ == "ExactIndex"
    assert (index._inner.dim, index._inner.metric, index._inner.chunk_size) == (48, "ip", 7)


def test_saved_index_loads_through_the_core_and_refuses_mismatched_files(tmp_path):
    from embplex.app import load_index

    documents, _ = topic_sets(20, 8, seed=10)
    index = muvera(8, candidates=5, final_dim=64)
    index.add([f"d{i}" for i in range(20)], documents)
    index.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "index.json", "inner", "manifest.json", "projections.safetensors", "sets.safetensors"
    ]
    loaded = load_index(tmp_path / "index", embplex.load_registry(), dim=8)
    queries = documents[:3]
    assert loaded.search(queries, 4).ids == index.search(queries, 4).ids
    with pytest.raises(DimensionError):
        load_index(tmp_path / "index", embplex.load_registry(), dim=16)
    # a consistent-looking but wrong inner index (rewritten with its checksums) is refused
    inner = embplex.load_registry().create("index", "exact", dim=64, metric="ip")
    inner.save(tmp_path / "index" / "inner")
    with pytest.raises(ModelFileError):
        MuveraIndex.load(tmp_path / "index")


def test_registered_with_its_paper_and_config_file_lists_every_option():
    from omegaconf import OmegaConf

    info = embplex.load_registry().get("index", "muvera")
    assert "2405.19504" in info.paper
    config = OmegaConf.load(str(files("embplex.conf") / "index" / "muvera.yaml"))
    parameters = {k: p for k, p in inspect.signature(info.factory).parameters.items() if k != "registry"}
    assert list(config)[0] == "name" and config.name == "muvera"
    assert set(config) - {"name"} == set(parameters)
    assert all(config[key] == parameter.default for key, parameter in parameters.items())


def test_an_inner_index_that_finds_too_few_candidates_does_not_shorten_the_results():
    documents, _ = topic_sets(12, 8, seed=11)
    index = muvera(8, candidates=6)
    index.add([f"d{i}" for i in range(12)], documents)
    index._inner.search = lambda queries, k: type(index._inner).search(index._inner, queries, 2)  # an approximate inner index
    result = index.search(documents[:2], k=5)
    exact = muvera(8, candidates=None)
    exact.add([f"d{i}" for i in range(12)], documents)
    assert result.ids == exact.search(documents[:2], k=5).ids and result.scores.shape == (2, 5)


def test_nbytes_counts_the_stored_sets_and_the_fdes():
    index = muvera(8, k_sim=2, r_reps=3, d_proj=4)
    empty = index.nbytes
    documents, _ = topic_sets(10, 8, seed=12)
    index.add([f"d{i}" for i in range(10)], documents)
    vectors = sum(len(d) for d in documents) * 8 * 4
    assert index.nbytes - empty >= vectors + 10 * 48 * 4 - 8  # the sets and one 48-wide FDE each
    assert index.nbytes_per_item() == {"vectors": vectors / 10, "fde": 48 * 4.0}
    assert MuveraIndex.multi_vector is True
