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
