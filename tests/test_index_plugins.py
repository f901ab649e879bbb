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
