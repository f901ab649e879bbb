"""Index ``matryoshka_funnel``: a prefix shortlist rescored in full; the recall-against-cost
curve rises with the prefix and the shortlist, and a full-length prefix is exact."""

from __future__ import annotations

import numpy as np
import pytest

from embplex.errors import OptionError
from embplex.plugins.index.exact import ExactIndex
from embplex.plugins.index.matryoshka_funnel import MatryoshkaFunnelIndex
from embplex.testing import IndexContract


def matryoshka_like(rows: int, dim: int, seed: int) -> np.ndarray:
    """Vectors whose leading dimensions carry most of the variance, as a Matryoshka-
    trained model's do (the spread of dimension i decays as 0.97**i)."""
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)) * 0.97 ** np.arange(dim)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(index, truth, queries) -> float:
    found = index.search(queries, 10).ids
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def data():
    vectors, queries = matryoshka_like(4000, 128, seed=0), matryoshka_like(50, 128, seed=1)
    ids = [f"d{i}" for i in range(len(vectors))]
    exact = ExactIndex(dim=128)
    exact.add(ids, vectors)
    return ids, vectors, queries, exact.search(queries, 10).ids


def test_recall_against_cost_curve(data):
    ids, vectors, queries, truth = data
    curve = []
    for prefix in (8, 16, 32, 64):
        for oversample in (1, 4, 16):
            index = MatryoshkaFunnelIndex(dim=128, prefix=prefix, oversample=oversample)
            index.add(ids, vectors)
            curve.append((prefix, oversample, index.cost(10), recall_at_10(index, truth, queries)))
    for prefix, oversample, cost, recall in curve:
        print(f"prefix {prefix:3d} oversample {oversample:2d}: cost {cost:.3f} of exact, recall@10 {recall:.3f}")
    by = {(p, o): r for p, o, _, r in curve}
    for oversample in (1, 4, 16):  # a longer prefix finds more of the true top 10
        assert by[8, oversample] <= by[16, oversample] <= by[32, oversample] <= by[64, oversample]
    for prefix in (8, 16, 32, 64):  # so does a longer shortlist
        assert by[prefix, 1] <= by[prefix, 4] <= by[prefix, 16]
    assert by[32, 16] >= 0.95 and by[8, 1] < 0.8
    assert all(cost < 1 for _, _, cost, _ in curve if _ < 64)


def test_a_full_length_prefix_is_exact(data):
    ids, vectors, queries, truth = data
    index = MatryoshkaFunnelIndex(dim=128, prefix=128, oversample=1)
    index.add(ids, vectors)
    assert index.search(queries, 10).ids == truth


def test_without_rescoring_the_scores_are_the_prefix_cosines(data):
    ids, vectors, queries, _ = data
    index = MatryoshkaFunnelIndex(dim=128, prefix=16)
    index.add(ids, vectors)
    hits = index.search(queries[:3], 5, rescore=False)
    short = lambda m: m[:, :16] / np.linalg.norm(m[:, :16], axis=1, keepdims=True)  # noqa: E731
    rows = [[ids.index(i) for i in row] for row in hits.ids]
    expected = np.array([[short(queries[q : q + 1])[0] @ short(vectors[r : r + 1])[0] for r in row] for q, row in enumerate(rows)])
    np.testing.assert_allclose(hits.scores, expected, atol=1e-5)


def test_a_prefix_longer_than_the_vectors_is_refused():
    with pytest.raises(OptionError, match="prefix=64 is longer than the vectors \\(dim 32\\)"):
        MatryoshkaFunnelIndex(dim=32, prefix=64)
    MatryoshkaFunnelIndex(dim=1, prefix=64)  # embplex's option check before it knows the width


class TestFunnelFollowsTheIndexContract(IndexContract):
    @pytest.fixture(params=["cosine", "ip"])
    def make_index(self, request):
        self.metric, self.exact = request.param, False
        return lambda dim: MatryoshkaFunnelIndex(dim=dim, metric=request.param, prefix=4, oversample=50)
