"""Every installed index plugin — first-party or third-party — follows the index contract
(``embplex.testing.IndexContract``), built by name from the registry with its defaults.

Each plugin's own test module runs the suite again with the settings it cares about
(exact rankings, rescoring on or off); this module makes sure no installed index, however
it got there, escapes it.
"""

from __future__ import annotations

import embplex
import pytest

from embplex.testing import IndexContract

INDEXES = embplex.load_registry().names("index")


class TestEveryInstalledIndex(IndexContract):
    exact = False  # approximate indexes are welcome here; exactness is checked per plugin
    dim = 96  # wider than the defaults of options bounded by the width (a funnel's prefix: 64)

    @pytest.fixture(params=INDEXES)
    def make_index(self, request):
        registry = embplex.load_registry()
        factory = registry.get("index", request.param).factory
        if getattr(factory, "multi_vector", False):
            pytest.skip(f"index '{request.param}' stores sets of vectors; its own tests check its contract")
        return lambda dim: registry.create("index", request.param, dim=dim)


def test_every_installed_index_is_checked():
    assert "exact" in INDEXES


# -- every index through the command line: build, save, verify and reuse ------------------

import json  # noqa: E402

from embplex.cli import main  # noqa: E402

# options a 32-wide test model needs (the funnel's default prefix is 64 dimensions)
# options each index needs on the tiny model: a prefix within its width, sets of vectors for muvera
NARROW = {"matryoshka_funnel": ["index.prefix=16"], "muvera": ["pooling=multi_vector", "pooling.dim=16"]}


@pytest.mark.parametrize("name", INDEXES)
def test_embplex_index_builds_saves_and_reuses_every_index(name, tmp_path, tiny_bert_path, capsys):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "text": text} for i, text in enumerate(["first light", "second wind", "third time"])]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "which first"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\n")
    arguments = ["index", f"index={name}", *NARROW.get(name, []), f"backbone.path={tiny_bert_path}",
                 f"data.eval.path={folder}", "data.eval.split=test", f"output_dir={tmp_path / 'out'}",
                 "search.query=which first", "search.k=2"]
    assert main(arguments) == 0, capsys.readouterr().err
    first = capsys.readouterr().out
    assert "building the index" in first
    manifest = json.loads((tmp_path / "out" / "index" / "manifest.json").read_text())
    assert (manifest["index"], manifest["size"]) == (name, 3)
    assert main(arguments) == 0, capsys.readouterr().err
    second = capsys.readouterr().out
    assert "reusing the saved index" in second
    hits = lambda out: [line for line in out.splitlines() if line.strip().startswith(("1.", "2."))]  # noqa: E731
    assert hits(second) == hits(first) and len(hits(first)) == 2


# -- the extended suite catches an index that breaks the new promises ----------------------

from embplex.plugins.index.exact import ExactIndex  # noqa: E402

CONTRACT_FAILED = (AssertionError, pytest.fail.Exception)


class IgnoresFilters(ExactIndex):
    """Broken on purpose: takes a filter and answers as if there were none."""

    def search(self, queries, k, *, filter=None, rescore=None):
        return super().search(queries, k)


class RescoresWrongly(ExactIndex):
    """Broken on purpose: claims to rescore but halves every score."""

    def search(self, queries, k, *, filter=None, rescore=None):
        result = super().search(queries, k, filter=filter)
        if rescore:
            result.scores = result.scores / 2
        return result


class WithoutMemory(ExactIndex):
    """Broken on purpose: says it holds nothing."""

    @property
    def nbytes(self):
        return 0


def test_the_suite_catches_an_index_that_ignores_filters_rescores_wrongly_or_hides_its_memory(tmp_path):
    contract = IndexContract()
    with pytest.raises(CONTRACT_FAILED):
        contract.test_a_filter_keeps_only_matching_items(lambda dim: IgnoresFilters(dim=dim), tmp_path)
    with pytest.raises(CONTRACT_FAILED):
        contract.test_rescoring_gives_the_float_scores_or_is_refused(lambda dim: RescoresWrongly(dim=dim))
    with pytest.raises(CONTRACT_FAILED):
        contract.test_nbytes_counts_the_memory_the_items_take(lambda dim: WithoutMemory(dim=dim))
    # ...while the honest index passes each of them
    contract.test_a_filter_keeps_only_matching_items(lambda dim: ExactIndex(dim=dim), tmp_path / "honest")
    contract.test_rescoring_gives_the_float_scores_or_is_refused(lambda dim: ExactIndex(dim=dim))
