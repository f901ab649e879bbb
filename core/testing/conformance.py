"""The contract of each component kind, as pytest test classes to subclass.

A plugin package runs the suite of its kind against its own component by subclassing
the contract in a test module (a class whose name starts with ``Test``) and providing
the one fixture it asks for::

    import pytest
    from embplex.testing import IndexContract

    class TestMyIndex(IndexContract):
        @pytest.fixture
        def make_index(self):
            return lambda dim: MyIndex(dim=dim, metric="cosine")

Every check is a test method of its own, so a failure names the broken promise. The
classes themselves are not collected (their names do not start with ``Test``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from ..components import Features, Index, Loss, Pooling, SearchResult, TrainingBatch
from ..errors import DimensionError, EmptyIndexError, InputError, ModelFileError

__all__ = ["IndexContract", "LossContract", "PoolingContract"]


def _vectors(rows: int, dim: int, seed: int, unit: bool = False) -> np.ndarray:
    """Random float32 rows; of different norms unless ``unit`` (so that cosine and inner
    product rank differently)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(rows, dim))
    if unit:
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    else:
        vectors *= rng.uniform(0.2, 3.0, size=(rows, 1))
    return vectors.astype(np.float32)


# ---------------------------------------------------------------------------
# index
# ---------------------------------------------------------------------------


class IndexContract:
    """What every index promises (``docs/concepts.md``, "Index").

    For indexes of one vector per item (a multi-vector index, which stores a set of
    vectors per item, needs checks of its own). Provide ``make_index``: a fixture
    returning ``make(dim) -> Index`` (an empty index).
    Set ``metric`` to the metric it builds (``"cosine"`` or ``"ip"``) and ``exact`` to
    ``False`` for an approximate index, which then skips the brute-force comparison.

    The optional parts of the contract are checked when the index has them: metadata
    and filters when ``add`` takes ``metadata`` and ``search`` takes ``filter``, rescoring
    when ``search`` takes ``rescore``, memory when the class defines ``nbytes``. An index
    written before they existed skips those checks, saying why.
    """

    metric: str = "cosine"
    exact: bool = True
    dim: int = 8

    @pytest.fixture
    def make_index(self) -> Callable[[int], Index]:
        pytest.fail(f"{type(self).__name__} must define the fixture make_index: `make(dim) -> Index`")

    def filled(self, make_index: Callable[[int], Index], rows: int = 20, unit: bool = False):
        index = make_index(self.dim)
        ids = [f"doc-{i}-é" for i in range(rows)]  # not numbers, not ASCII: ids are opaque strings
        vectors = _vectors(rows, self.dim, seed=0, unit=unit)
        index.add(ids, vectors)
        return index, ids, vectors

    def test_searching_an_empty_index_is_refused_naming_it(self, make_index):
        """Empty rows from an empty index would read as "nothing relevant" (a recall of 0
        that looks like a result); the error names the index and says to add vectors."""
        index = make_index(self.dim)
        assert isinstance(index, Index), "an index derives from embplex.components.Index"
        assert len(index) == 0
        with pytest.raises(EmptyIndexError, match=r"index '\w+' is empty.*[Aa]dd vectors"):
            index.search(_vectors(3, self.dim, seed=1), k=4)
        assert len(index) == 0

    def test_an_index_emptied_by_delete_is_refused_too(self, make_index):
        index, ids, vectors = self.filled(make_index, rows=3)
        index.delete(ids)
        assert len(index) == 0
        with pytest.raises(EmptyIndexError):
            index.search(vectors, k=1)
        index.add(ids[:1], vectors[:1])  # and it works again once it holds vectors
        assert index.search(vectors, k=1).ids == [[ids[0]]] * 3

    def test_search_result_shapes_and_types(self, make_index):
        index, ids, _ = self.filled(make_index)
        assert len(index) == len(ids)
        result = index.search(_vectors(5, self.dim, seed=1), k=4)
        assert isinstance(result, SearchResult)
        assert isinstance(result.ids, list) and len(result.ids) == 5
        assert all(isinstance(row, list) and len(row) == 4 for row in result.ids)
        assert all(isinstance(item, str) and item in ids for row in result.ids for item in row)
        assert all(len(set(row)) == len(row) for row in result.ids), "an item appears once per row"
        assert isinstance(result.scores, np.ndarray) and result.scores.shape == (5, 4)
        assert np.issubdtype(result.scores.dtype, np.floating)
        assert np.isfinite(result.scores).all()
        assert (np.diff(result.scores, axis=1) <= 1e-6).all(), "hits come best first"

    def test_a_single_query_vector_is_answered_as_one_row(self, make_index):
        index, _, vectors = self.filled(make_index)
        result = index.search(vectors[3], k=2)
        assert len(result.ids) == 1 and result.scores.shape == (1, 2)

    def test_each_stored_vector_finds_its_own_id(self, make_index):
        index, ids, vectors = self.filled(make_index, unit=True)
        result = index.search(vectors, k=1)
        assert [row[0] for row in result.ids] == ids

    def test_top_k_equals_brute_force(self, make_index):
        if not self.exact:
            pytest.skip("an approximate index (exact = False) does not promise the exact ranking")
        index, ids, vectors = self.filled(make_index, rows=50)
        queries = _vectors(7, self.dim, seed=2)
        stored, asked = vectors.astype(np.float64), queries.astype(np.float64)
        if self.metric == "cosine":
            stored = stored / np.linalg.norm(stored, axis=1, keepdims=True)
            asked = asked / np.linalg.norm(asked, axis=1, keepdims=True)
        scores = asked @ stored.T
        best = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        result = index.search(queries, k=5)
        assert result.ids == [[ids[row] for row in rows] for rows in best]
        np.testing.assert_allclose(result.scores, np.take_along_axis(scores, best, axis=1), rtol=1e-4, atol=1e-5)

    def test_k_beyond_the_size_returns_every_item_once(self, make_index):
        index, ids, _ = self.filled(make_index, rows=5)
        result = index.search(_vectors(2, self.dim, seed=1), k=50)
        assert [sorted(row) for row in result.ids] == [sorted(ids)] * 2
        assert result.scores.shape == (2, 5)

    def test_a_wrong_dimension_is_refused_and_changes_nothing(self, make_index):
        index, _, _ = self.filled(make_index)
        with pytest.raises(DimensionError):
            index.add(["wide"], _vectors(1, self.dim + 1, seed=3))
        with pytest.raises(DimensionError):
            index.search(_vectors(1, self.dim - 1, seed=3), k=1)
        assert len(index) == 20 and all("wide" not in row for row in index.search(_vectors(1, self.dim, 4), 20).ids)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_vectors_are_refused_and_change_nothing(self, make_index, bad):
        index, _, _ = self.filled(make_index)
        vectors = _vectors(2, self.dim, seed=3)
        vectors[1, 0] = bad
        # the error names what is wrong, so the user looks at the model's output, not the index
        with pytest.raises(InputError, match="(?i)nan|infinit|finite"):
            index.add(["x", "y"], vectors)
        assert len(index) == 20
        with pytest.raises(InputError, match="(?i)nan|infinit|finite"):
            index.search(vectors, k=1)
        assert len(index) == 20 and index.search(_vectors(1, self.dim, seed=4), k=20).scores.shape == (1, 20)

    def test_an_id_added_twice_is_refused(self, make_index):
        index, ids, vectors = self.filled(make_index)
        with pytest.raises(InputError):
            index.add([ids[0]], vectors[:1])
        with pytest.raises(InputError):
            index.add(["same", "same"], vectors[:2])
        assert len(index) == 20

    def test_ids_and_vectors_must_pair_up(self, make_index):
        index = make_index(self.dim)
        with pytest.raises(InputError):
            index.add(["a", "b"], _vectors(3, self.dim, seed=0))
        assert len(index) == 0

    def test_ids_must_be_strings(self, make_index):
        index = make_index(self.dim)
        with pytest.raises(InputError):
            index.add([1, 2], _vectors(2, self.dim, seed=0))  # type: ignore[list-item]
        assert len(index) == 0

    def test_delete_removes_items_and_refuses_unknown_ids(self, make_index):
        index, ids, vectors = self.filled(make_index)
        index.delete([ids[0], ids[5]])
        assert len(index) == 18
        found = index.search(vectors, k=18).ids
        assert all(ids[0] not in row and ids[5] not in row for row in found)
        with pytest.raises(InputError):
            index.delete([ids[1], "never-added"])
        assert len(index) == 18, "a refused delete deletes nothing"

    def test_save_and_load_give_the_same_results(self, make_index, tmp_path: Path):
        index, _, _ = self.filled(make_index)
        index.save(tmp_path / "index")
        loaded = type(index).load(tmp_path / "index")
        assert type(loaded) is type(index) and len(loaded) == len(index)
        queries = _vectors(4, self.dim, seed=5)
        before, after = index.search(queries, k=6), loaded.search(queries, k=6)
        assert after.ids == before.ids
        np.testing.assert_allclose(after.scores, before.scores, rtol=1e-6, atol=1e-6)

    def test_saving_again_replaces_the_save_and_leaves_nothing_behind(self, make_index, tmp_path: Path):
        index, _, _ = self.filled(make_index)
        index.save(tmp_path / "index")
        index.add(["later"], _vectors(1, self.dim, seed=6))
        index.save(tmp_path / "index")
        assert len(type(index).load(tmp_path / "index")) == 21
        assert [p.name for p in tmp_path.iterdir()] == ["index"], "no staging folder left next to the save"

    def test_a_changed_byte_in_any_saved_file_is_detected_on_load(self, make_index, tmp_path: Path):
        """Saves are checksummed (``embplex.storage.saving_index``): a flipped byte in any
        file the plugin wrote — which may still parse as valid floats — is refused by the
        plugin's ``load`` (``embplex.storage.verify_index``)."""
        index, _, _ = self.filled(make_index)
        index.save(tmp_path / "index")
        files = [p for p in sorted((tmp_path / "index").rglob("*")) if p.is_file() and p.name != "manifest.json"]
        assert files, "the save wrote no files"
        for file in files:
            original = file.read_bytes()
            changed = bytearray(original)
            changed[-1] ^= 0x01
            file.write_bytes(bytes(changed))
            try:
                with pytest.raises(ModelFileError):
                    type(index).load(tmp_path / "index")
            finally:
                file.write_bytes(original)
        assert len(type(index).load(tmp_path / "index")) == len(index)

    def test_loading_a_missing_folder_is_a_model_file_error(self, make_index, tmp_path: Path):
        index = make_index(self.dim)
        with pytest.raises(ModelFileError):
            type(index).load(tmp_path / "nothing-here")


    # -- k, memory, metadata, filters, rescoring, foreign saves ----------------------------

    @pytest.mark.parametrize("k", [0, -3, 2.5, True])
    def test_a_k_that_is_not_a_positive_integer_is_refused(self, make_index, k):
        index, _, vectors = self.filled(make_index)
        with pytest.raises(InputError, match=r"\bk\b"):  # names the argument at fault
            index.search(vectors[:2], k=k)
        assert len(index) == 20 and index.search(vectors[:1], k=20).scores.shape == (1, 20)

    def test_nbytes_counts_the_memory_the_items_take(self, make_index):
        index = make_index(self.dim)
        if type(index).nbytes is Index.nbytes:
            pytest.skip("this index does not define nbytes (written before the extended index contract)")
        empty = index.nbytes
        index.add([f"n{i}" for i in range(40)], _vectors(40, self.dim, seed=0))
        assert isinstance(index.nbytes, int) and isinstance(empty, int)
        assert index.nbytes > empty >= 0, "40 stored items take memory"

    def _with_metadata(self, make_index, rows: int = 20):
        index = make_index(self.dim)
        if not _takes(index.add, "metadata") or not _takes(index.search, "filter"):
            pytest.skip("this index takes no metadata or filter (written before the extended index contract)")
        ids = [f"doc-{i}" for i in range(rows)]
        metadata = [{"parity": i % 2, "group": "abc"[i % 3], "flag": i < 5} for i in range(rows)]
        vectors = _vectors(rows, self.dim, seed=0, unit=True)
        index.add(ids, vectors, metadata=metadata)
        return index, ids, vectors, metadata

    def test_a_filter_keeps_only_matching_items(self, make_index, tmp_path: Path):
        index, ids, vectors, metadata = self._with_metadata(make_index)
        wanted = lambda m: m["parity"] == 1 and m["group"] in ("a", "b")  # noqa: E731
        matching = sorted(i for i, m in zip(ids, metadata) if wanted(m))
        result = index.search(vectors[:3], k=50, filter={"parity": 1, "group": ["a", "b"]})
        assert [sorted(row) for row in result.ids] == [matching] * 3, "every matching item, and only those"
        assert result.scores.shape == (3, len(matching))
        top = index.search(vectors[:3], k=2, filter={"flag": True})
        assert all(set(row) <= set(ids[:5]) and len(row) == 2 for row in top.ids)
        none = index.search(vectors[:2], k=3, filter={"group": "z"})
        assert none.ids == [[], []] and none.scores.shape == (2, 0)
        # metadata survive a save and a delete
        index.delete([matching[0]])
        index.save(tmp_path / "index")
        loaded = type(index).load(tmp_path / "index")
        again = loaded.search(vectors[:3], k=50, filter={"parity": 1, "group": ["a", "b"]})
        assert [sorted(row) for row in again.ids] == [matching[1:]] * 3

    def test_bad_metadata_or_filters_are_refused_and_change_nothing(self, make_index):
        index, ids, vectors, _ = self._with_metadata(make_index)
        new = _vectors(2, self.dim, seed=7)
        for metadata in ([{"a": 1}], [{"a": {"nested": 1}}, {}], [{"bad name": 1}, {}], [{"a": float("nan")}, {}]):
            with pytest.raises(InputError):
                index.add(["x", "y"], new, metadata=metadata)
            assert len(index) == 20
        assert all("x" not in row for row in index.search(new, k=20).ids)
        for bad in ({}, {"parity": {"gt": 1}}, {"parity": []}, "parity == 1"):
            with pytest.raises(InputError):
                index.search(vectors[:1], k=3, filter=bad)

    def test_rescoring_gives_the_float_scores_or_is_refused(self, make_index):
        index, ids, vectors = self.filled(make_index, rows=30, unit=True)
        if not _takes(index.search, "rescore"):
            pytest.skip("this index takes no rescore option (written before the extended index contract)")
        queries = _vectors(4, self.dim, seed=8)
        plain = index.search(queries, k=5, rescore=False)
        assert plain.scores.shape == (4, 5)
        try:
            result = index.search(queries, k=5, rescore=True)
        except InputError:
            return  # an index without the float vectors says so
        stored = {item: vector for item, vector in zip(ids, vectors.astype(np.float64))}
        asked = queries.astype(np.float64)
        if self.metric == "cosine":
            asked = asked / np.linalg.norm(asked, axis=1, keepdims=True)
        expected = np.array([[asked[q] @ stored[item] for item in row] for q, row in enumerate(result.ids)])
        np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-4)
        assert (np.diff(result.scores, axis=1) <= 1e-6).all(), "rescored hits come best first"

    def test_a_truncated_file_is_detected_on_load(self, make_index, tmp_path: Path):
        index, _, _ = self.filled(make_index)
        index.save(tmp_path / "index")
        files = [p for p in sorted((tmp_path / "index").rglob("*")) if p.is_file() and p.name != "manifest.json"]
        for file in files:
            original = file.read_bytes()
            file.write_bytes(original[: len(original) // 2])
            try:
                with pytest.raises(ModelFileError):
                    type(index).load(tmp_path / "index")
            finally:
                file.write_bytes(original)

    def test_an_index_saved_in_another_format_version_is_refused(self, make_index, tmp_path: Path):
        """A save whose manifest records another format version (an older or newer
        embplex) is refused naming the format, not read as if it were this one's."""
        index, _, _ = self.filled(make_index)
        index.save(tmp_path / "index")
        manifest_path = tmp_path / "index" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["format"] = manifest["format"] + 100
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(ModelFileError, match="format"):
            type(index).load(tmp_path / "index")

    def test_an_index_saved_by_another_plugin_is_refused(self, make_index, tmp_path: Path):
        index, _, _ = self.filled(make_index)
        index.save(tmp_path / "index")
        manifest_path = tmp_path / "index" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["index"] = "some_other_plugin"
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(ModelFileError, match="some_other_plugin"):
            type(index).load(tmp_path / "index")


def _takes(method: Callable[..., Any], parameter: str) -> bool:
    """Whether ``method`` accepts the keyword ``parameter`` (or ``**kwargs``)."""
    parameters = inspect.signature(method).parameters.values()
    return any(p.name == parameter or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------


def _placement_checked(work: Callable[[], Any], what: str) -> None:
    """Run ``work`` on inputs placed on PyTorch's ``meta`` device, which holds no data: a
    tensor the component creates without ``device=`` lands on the CPU, and mixing it with
    the inputs fails here just as it fails (or silently copies) on a GPU. That lets a
    CPU-only test suite check what every plugin must do for CUDA."""
    try:
        work()
    except NotImplementedError as error:
        pytest.skip(f"{what}: an operation it uses has no meta-device kernel ({error}); check its placement on a GPU")
    except RuntimeError as error:
        text = str(error)
        if "device" in text and ("expected device" in text or "same device" in text):
            pytest.fail(
                f"{what} made a tensor on another device than its inputs ({text}). Create tensors "
                "with device=<input>.device and dtype=<input>.dtype (docs/writing-plugins.md)."
            )
        if "meta" in text:
            pytest.skip(f"{what}: it reads tensor values ({text}), which the meta device does not hold")
        raise


def _on_meta(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to("meta")
    if isinstance(value, dict):
        return {key: _on_meta(item) for key, item in value.items()}
    return value


def _per_text(pooling: Pooling, features: Features) -> list[Tensor]:
    """Each text's output: its vector, or its set of vectors for a multi-vector pooling."""
    out = pooling(features)
    if out.dim() == 2:
        return list(out)
    keep = pooling.vector_mask(features).bool()
    return [out[row][keep[row]] for row in range(out.shape[0])]


def _alone(features: Features, row: int) -> Features:
    """Text ``row`` of a batch on its own, without padding."""
    keep = features.attention_mask[row].bool()
    instruction = features.instruction_mask
    return Features(
        input_ids=features.input_ids[row : row + 1, keep],
        attention_mask=features.attention_mask[row : row + 1, keep],
        instruction_mask=None if instruction is None else instruction[row : row + 1, keep],
        padding_side=features.padding_side,
        hidden_states=tuple(state[row : row + 1, keep] for state in features.hidden_states or ()),
        layer=features.layer,
    )


class PoolingContract:
    """What every pooling promises (``docs/concepts.md``, "Pooling").

    Provide ``pooling``: a fixture returning the pooling to check (in eval mode is
    fine; the suite sets it). Set ``reads_one_layer = False`` for a pooling that reads
    several of ``features.hidden_states`` rather than the layer asked for.
    """

    hidden: int = 8
    reads_one_layer: bool = True

    @pytest.fixture
    def pooling(self) -> Pooling:
        pytest.fail(f"{type(self).__name__} must define the fixture pooling")

    def features(self, **options: Any) -> Features:
        from ..testing import tiny_features

        return tiny_features(hidden=self.hidden, **options)

    def test_output_shape_and_values(self, pooling):
        assert isinstance(pooling, Pooling), "a pooling derives from embplex.components.Pooling"
        pooling.eval()
        features = self.features(lengths=(5, 2, 4), layers=2)
        with torch.no_grad():
            out = pooling(features)
        assert out.dim() in (2, 3), "[batch, dim], or [batch, vectors, dim] for a multi-vector pooling"
        assert out.shape[0] == 3 and out.shape[-1] == pooling.output_dim(self.hidden)
        if out.dim() == 3:
            assert pooling.vector_mask(features).shape == out.shape[:2]
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("side", ["right", "left"])
    @pytest.mark.parametrize("prompt_tokens", [0, 1])
    def test_padding_never_changes_the_output(self, pooling, side, prompt_tokens):
        pooling.eval()
        lengths = (6, 2, 4, 1)
        with torch.no_grad():
            batched = {
                value: _per_text(pooling, self.features(lengths=lengths, padding_side=side, prompt_tokens=prompt_tokens, padding_value=value))
                for value in (1e4, -1e4, 0.0)
            }
            features = self.features(lengths=lengths, padding_side=side, prompt_tokens=prompt_tokens)
            alone = [_per_text(pooling, _alone(features, row))[0] for row in range(len(lengths))]
        for row in range(len(lengths)):
            for value, rows in batched.items():
                torch.testing.assert_close(
                    rows[row], alone[row], atol=1e-5, rtol=1e-5,
                    msg=lambda m: f"text {row} (padding {side}, padding value {value}) differs from the text alone: {m}",
                )

    def test_tensors_are_made_on_the_inputs_device(self, pooling):
        import copy

        placed = copy.deepcopy(pooling).to("meta").eval()
        features = self.features(lengths=(5, 2, 4), layers=2, prompt_tokens=1).to("meta")
        _placement_checked(lambda: placed(features), f"pooling {type(pooling).__name__}")

    @pytest.mark.parametrize("side", ["right", "left"])
    def test_no_gradient_reaches_padding(self, pooling, side):
        pooling.train()
        features = self.features(lengths=(5, 2, 4), padding_side=side, padding_value=0.0)
        with torch.enable_grad():  # even inside a test module that turns gradients off
            states = features.hidden_states[-1].clone().requires_grad_(True)
            features.hidden_states = (*features.hidden_states[:-1], states)
            torch.stack([vector.sum() for vector in _per_text(pooling, features)]).sum().backward()
        assert states.grad is not None, "the output does not depend on the hidden states"
        assert torch.isfinite(states.grad).all()
        padding = ~features.attention_mask.bool()
        assert (states.grad[padding] == 0).all(), "padding positions must not influence the output"
        assert states.grad[~padding].abs().sum() > 0

    def test_reads_the_layer_it_is_asked_for(self, pooling):
        if not self.reads_one_layer:
            pytest.skip("this pooling reads several layers (reads_one_layer = False)")
        pooling.eval()
        features = self.features(lengths=(5, 2, 4), layers=3)
        with torch.no_grad():
            at_layer = pooling(features.at_layer(1))
            only_that_layer = pooling(
                Features(
                    input_ids=features.input_ids,
                    attention_mask=features.attention_mask,
                    instruction_mask=features.instruction_mask,
                    padding_side=features.padding_side,
                    hidden_states=(features.hidden_states[1],),
                )
            )
            last = pooling(features)
        torch.testing.assert_close(at_layer, only_that_layer)
        assert not torch.allclose(at_layer, last), "features.layer must choose the layer pooled"


# ---------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------


class LossContract:
    """What every loss promises (``docs/concepts.md``, "Loss").

    Provide ``loss``: a fixture returning the loss to check. ``negatives_per_anchor``
    lists the hard-negative counts to try (0: no ``negatives`` key at all); set
    ``needs_scores = True`` for a loss that learns from teacher scores.
    """

    dim: int = 8
    batch_size: int = 4
    negatives_per_anchor: tuple[int, ...] = (0, 2)
    needs_scores: bool = False

    @pytest.fixture
    def loss(self) -> Loss:
        pytest.fail(f"{type(self).__name__} must define the fixture loss")

    def batch(self, negatives: int, seed: int = 0) -> tuple[dict[str, Tensor], list[Tensor], TrainingBatch]:
        """Normalised random embeddings per role (and their leaves, to read gradients
        from), with a :class:`TrainingBatch` of matching shape."""
        from ..testing import make_training_batch, tiny_examples, tiny_features

        generator = torch.Generator().manual_seed(seed)
        roles = {"anchors": self.batch_size, "positives": self.batch_size}
        if negatives:
            roles["negatives"] = self.batch_size * negatives
        leaves = [torch.randn(rows, self.dim, generator=generator, requires_grad=True) for rows in roles.values()]
        with torch.enable_grad():
            embeddings = {role: torch.nn.functional.normalize(leaf, dim=-1) for role, leaf in zip(roles, leaves)}
        examples = tiny_examples(self.batch_size, negatives=negatives, scores=True)

        class ByLength:  # tokenizes nothing: each text becomes len(words) tokens
            def tokenize(self, texts, prompt=None, truncate=True):
                return tiny_features(lengths=[len(text.split()) for text in texts], hidden=2)

        batch = make_training_batch(ByLength(), examples)
        return embeddings, leaves, batch

    @pytest.mark.parametrize("negatives", [0, 2])
    def test_compute_returns_a_finite_scalar_with_gradients(self, loss, negatives):
        if negatives not in self.negatives_per_anchor:
            pytest.skip(f"negatives_per_anchor = {self.negatives_per_anchor}")
        embeddings, leaves, batch = self.batch(negatives)
        if not self.needs_scores:
            batch.scores = None
        with torch.enable_grad():
            value = loss.compute(embeddings, batch)
            assert isinstance(value, Tensor) and value.dim() == 0, "compute returns a scalar tensor"
            assert value.dtype.is_floating_point and torch.isfinite(value)
            value.backward()
        for role, leaf in zip(embeddings, leaves):
            assert leaf.grad is not None, f"no gradient reaches the {role}"
            assert torch.isfinite(leaf.grad).all(), f"non-finite gradient on the {role}"
        assert all(leaf.grad.abs().sum() > 0 for leaf in leaves[:2]), "anchors and positives get gradient"

    def test_tensors_are_made_on_the_inputs_device(self, loss):
        import copy

        negatives = max(self.negatives_per_anchor)
        embeddings, _, batch = self.batch(negatives)
        if not self.needs_scores:
            batch.scores = None
        placed = copy.deepcopy(loss).to("meta")
        batch = TrainingBatch(
            examples=batch.examples,
            anchors=batch.anchors.to("meta"),
            positives=batch.positives.to("meta"),
            negatives=None if batch.negatives is None else batch.negatives.to("meta"),
            negatives_per_anchor=batch.negatives_per_anchor,
            scores=None if batch.scores is None else batch.scores.to("meta"),
        )
        _placement_checked(lambda: placed.compute(_on_meta(embeddings), batch), f"loss {type(loss).__name__}")

    def test_says_whether_it_trains_across_processes(self, loss):
        # None (distributed-correct) or the reason a data-parallel run refuses it
        problem = loss.distributed_problem()
        assert problem is None or (isinstance(problem, str) and problem.strip()), (
            f"loss {type(loss).__name__}: distributed_problem() must return None or a reason, not {problem!r}"
        )

    def test_forward_trains_a_model(self, loss, tiny_model):
        from ..testing import make_training_batch, tiny_examples

        negatives = max(self.negatives_per_anchor)
        examples = tiny_examples(self.batch_size, negatives=negatives, scores=self.needs_scores)
        batch = make_training_batch(tiny_model.backbone, examples)
        tiny_model.train()
        tiny_model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            value = loss(tiny_model, batch)
            assert value.dim() == 0 and torch.isfinite(value)
            value.backward()
        grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
        assert grads, "no gradient reached the model"
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0

    @pytest.fixture(scope="class")
    def tiny_model(self, tmp_path_factory):
        """``hf_encoder`` + ``mean`` on a tiny random BERT, built once per class."""
        from ..model import EmbeddingModel
        from ..testing import build_encoder, isolated_registry

        path = build_encoder(tmp_path_factory.mktemp("loss-contract-encoder"))
        registry = isolated_registry(include=["backbone.hf_encoder", "pooling.mean"])
        return EmbeddingModel.compose({"name": "hf_encoder", "path": path}, pooling="mean", registry=registry)
