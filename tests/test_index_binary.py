"""Index ``binary``: memory ÷ 32 at 1 bit, Hamming search over packed bits, residual
planes that approximate better with more bits, and float rescoring that recovers the
exact top-k on planted data."""

from __future__ import annotations

import numpy as np
import pytest

from embplex.errors import InputError, OptionError
from embplex.plugins.index.binary import BinaryIndex, binarize, hamming
from embplex.plugins.index.exact import ExactIndex
from embplex.testing import IndexContract


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def planted(n: int = 2000, dim: int = 128, queries: int = 20, seed: int = 0):
    """Random unit vectors, and queries each with 10 planted neighbours at increasing
    distances (noise 0.15 ... 0.6): the exact top-10 of every query is its planted set,
    in a known order, and ties are unlikely."""
    rng = np.random.default_rng(seed)
    data = unit(n, dim, seed)
    asked = unit(queries, dim, seed + 1)
    for q in range(queries):
        for j in range(10):
            noise = rng.normal(size=dim) * (0.15 + 0.05 * j) / np.sqrt(dim)
            data[q * 10 + j] = asked[q] + noise
    return [f"d{i}" for i in range(n)], data, asked


def test_one_bit_codes_take_a_32nd_of_float32():
    ids, data, _ = planted(n=500, dim=384)
    exact, codes = ExactIndex(dim=384), BinaryIndex(dim=384, bits=1, rescore=False, keep_vectors=False)
    exact.add(ids, data)
    codes.add(ids, data)
    assert exact.nbytes == 500 * 384 * 4
    assert codes.nbytes == 500 * 384 // 8
    assert exact.nbytes / codes.nbytes == 32
    # more bits per dimension: proportionally more planes, plus one 4-byte scale each
    for bits in (2, 4):
        more = BinaryIndex(dim=384, bits=bits, rescore=False, keep_vectors=False)
        more.add(ids, data)
        assert more.nbytes == 500 * (bits * 384 // 8 + 4 * bits)


def test_packed_hamming_equals_counting_differing_signs():
    a, b = unit(7, 100, seed=1), unit(9, 100, seed=2)  # 100 bits: not whole bytes or words
    pa, pb = binarize(a, 1)[0][0], binarize(b, 1)[0][0]
    expected = ((a[:, None, :] >= 0) != (b[None, :, :] >= 0)).sum(-1)
    np.testing.assert_array_equal(hamming(pa, pb), expected)
    wide_a, wide_b = binarize(unit(3, 128, 3), 1)[0][0], binarize(unit(4, 128, 4), 1)[0][0]  # 64-bit words
    bits = lambda p: np.unpackbits(p, axis=1)  # noqa: E731
    np.testing.assert_array_equal(hamming(wide_a, wide_b), (bits(wide_a)[:, None] != bits(wide_b)[None]).sum(-1))


def test_residual_planes_approximate_better_with_more_bits():
    vectors = unit(200, 64, seed=5)
    errors = []
    for bits in (1, 2, 4):
        planes, scales = binarize(vectors, bits)
        signs = np.unpackbits(planes, axis=2)[:, :, :64].astype(np.float32) * 2 - 1
        approximation = (scales[:, :, None] * signs).sum(0)
        errors.append(float(np.linalg.norm(vectors - approximation, axis=1).mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.35 * errors[0]  # measured: 0.60 at 1 bit, 0.17 at 4 bits


def recall(found, truth) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_rescoring_recovers_the_exact_top_10_on_planted_data(bits):
    ids, data, queries = planted()
    exact, index = ExactIndex(dim=128), BinaryIndex(dim=128, bits=bits, oversample=10)
    exact.add(ids, data)
    index.add(ids, data)
    truth = exact.search(queries, 10)
    rescored = index.search(queries, 10)
    assert rescored.ids == truth.ids, "same items, same order"
    np.testing.assert_allclose(rescored.scores, truth.scores, atol=1e-5)
    raw = index.search(queries, 10, rescore=False)
    assert raw.ids != truth.ids, "the codes alone do not give the exact order: rescoring does the work"
    assert recall(raw.ids, truth.ids) > 0.5


def test_more_bits_rank_closer_to_float_without_rescoring():
    data, queries = unit(3000, 64, seed=7), unit(40, 64, seed=8)
    ids = [str(i) for i in range(3000)]
    exact = ExactIndex(dim=64)
    exact.add(ids, data)
    truth = exact.search(queries, 10).ids
    recalls = []
    for bits in (1, 2, 4):
        index = BinaryIndex(dim=64, bits=bits, rescore=False, keep_vectors=False)
        index.add(ids, data)
        recalls.append(recall(index.search(queries, 10).ids, truth))
    assert recalls[0] < recalls[1] < recalls[2]


def test_rescoring_needs_the_vectors():
    with pytest.raises(OptionError, match="keep_vectors"):
        BinaryIndex(dim=8, rescore=True, keep_vectors=False)
    index = BinaryIndex(dim=8, rescore=False, keep_vectors=False)
    index.add(["a", "b"], unit(2, 8, 0))
    with pytest.raises(InputError, match="rescore=false"):
        index.search(unit(1, 8, 1), 1, rescore=True)
    with pytest.raises(OptionError, match="bits"):
        BinaryIndex(dim=8, bits=3)


class TestBinaryFollowsTheIndexContract(IndexContract):
    @pytest.fixture(
        params=[(1, True, False), (2, False, False), (4, True, False), (1, True, True)],
        ids=["1bit-rescored", "2bit-codes", "4bit-rescored", "1bit-rescored-from-disk"],
    )
    def make_index(self, request):
        bits, rescore, on_disk = request.param
        self.exact = False
        # at dim 8, 1-bit codes tie often; oversampling the whole test index keeps the
        # rescored variants exact and lets each stored vector find itself
        return lambda dim: BinaryIndex(dim=dim, bits=bits, rescore=rescore, oversample=50, vectors_on_disk=on_disk)


def test_an_index_of_another_format_version_is_refused(tmp_path):
    import hashlib
    import json

    from embplex.errors import ModelFileError

    index = BinaryIndex(dim=8)
    index.add(["a", "b"], unit(2, 8, 0))
    index.save(tmp_path / "idx")
    description = json.loads((tmp_path / "idx" / "index.json").read_text())
    description["format"] = 99
    content = json.dumps(description).encode()
    (tmp_path / "idx" / "index.json").write_bytes(content)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["sha256"]["index.json"] = hashlib.sha256(content).hexdigest()  # a consistent, newer save
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="format 99; this version of 'binary' reads format 1"):
        BinaryIndex.load(tmp_path / "idx")


def test_vectors_on_disk_rescore_the_same_while_the_index_holds_only_codes(tmp_path):
    ids, data, queries = planted(n=1000, dim=128)
    in_memory, on_disk = BinaryIndex(dim=128, oversample=10), BinaryIndex(dim=128, oversample=10, vectors_on_disk=True)
    for index in (in_memory, on_disk):
        index.add(ids[:600], data[:600])
        index.add(ids[600:], data[600:])
        index.delete(ids[990:])
    assert on_disk.nbytes == 990 * 128 // 8, "codes only: the vectors are on disk"
    assert in_memory.nbytes == 990 * (128 // 8 + 128 * 4)
    expected = in_memory.search(queries, 10)
    found = on_disk.search(queries, 10)
    assert found.ids == expected.ids
    np.testing.assert_allclose(found.scores, expected.scores, atol=1e-6)
    on_disk.save(tmp_path / "idx")
    loaded = BinaryIndex.load(tmp_path / "idx")
    assert loaded.vectors_on_disk and loaded.nbytes == on_disk.nbytes
    assert loaded.search(queries, 10).ids == expected.ids
    with pytest.raises(OptionError, match="vectors_on_disk"):
        BinaryIndex(dim=8, rescore=False, keep_vectors=False, vectors_on_disk=True)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("dim", [100, 128])  # bytes only; whole 64-bit words
def test_chunked_code_scores_equal_the_plain_formula_exactly(monkeypatch, bits, dim):
    """The fast path (corpus chunks, in-place popcounts, all query planes in one pass)
    must give bit for bit the scores of the plain formula over the whole corpus, so search
    results (and ties) are the same as before it was optimised; 300 items in chunks of 64
    cover a ragged last chunk."""
    import embplex.plugins.index.binary as module

    monkeypatch.setattr(module, "CORPUS_CHUNK", 64)
    data, queries = unit(300, dim, seed=11), unit(5, dim, seed=12)
    # metric ip: the vectors are coded as given (cosine would renormalise them first)
    index = BinaryIndex(dim=dim, metric="ip", bits=bits, rescore=False, keep_vectors=False)
    index.add([f"d{i}" for i in range(300)], data)
    item_planes, item_scales = binarize(data, bits)
    query_planes, query_scales = binarize(queries, bits)
    signs = lambda planes: np.unpackbits(planes, axis=-1)[..., :dim].astype(bool)  # noqa: E731
    differing = lambda r, p: (signs(query_planes[r])[:, None] != signs(item_planes[p])[None]).sum(-1)  # noqa: E731
    if bits == 1:
        expected = (dim - 2 * differing(0, 0)).astype(np.float32) / dim
    else:
        expected = np.zeros((5, 300), dtype=np.float32)
        for p in range(bits):
            for r in range(bits):
                expected += query_scales[r][:, None] * item_scales[p][None, :] * (dim - 2 * differing(r, p)).astype(np.float32)
    np.testing.assert_array_equal(index.code_scores(queries), expected)
    found = index.search(queries, 10)
    np.testing.assert_array_equal(found.scores, -np.sort(-expected, axis=1)[:, :10])
