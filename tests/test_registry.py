"""Plugin discovery and the registry.

Fake plugins are real distributions: a ``*.dist-info`` folder with an ``entry_points.txt``
and a module, written to a temporary folder put on ``sys.path``. ``importlib.metadata``
then finds them exactly as it finds an installed package, so every test goes through the
same discovery path as production (``embplex.load_registry()`` with no arguments).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import textwrap
import warnings
from pathlib import Path

import pluggy
import pytest

import embplex
from embplex.cli import main
from embplex.components import Features, Pooling
from embplex.errors import DuplicateComponentError, OptionError, PluginError, UnknownComponentError
from embplex.registry import KINDS, Distribution

POOLING_MODULE = """
import embplex
from embplex.components import Pooling

class FirstToken(Pooling):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, features):
        return features.last_hidden_state[:, 0] * self.scale

@embplex.hookimpl
def register_poolings(register):
    register({name!r}, FirstToken, paper="Sentence-BERT (2019), arXiv:1908.10084")
"""


def install_fake(
    site: Path, distribution: str, version: str, modules: dict[str, str], entry_points: dict[str, str]
) -> None:
    """Write a distribution into ``site`` the way pip would: modules plus dist-info."""
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[embplex]\n{lines}")


def install_pooling(site: Path, distribution: str, component: str, module: str, version: str = "1.0") -> None:
    install_fake(
        site,
        distribution,
        version,
        {module: POOLING_MODULE.format(name=component)},
        {f"pooling.{component}": module},
    )


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A folder on ``sys.path`` that fake distributions are installed into."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("EMBPLEX_PLUGINS", raising=False)
    monkeypatch.delenv("EMBPLEX_DISABLE_PLUGINS", raising=False)
    return folder


def fake_distribution_entry_points(site: Path) -> list[importlib.metadata.EntryPoint]:
    return [
        ep
        for dist in importlib.metadata.distributions(path=[str(site)])
        for ep in dist.entry_points
        if ep.group == "embplex"
    ]


# ---------------------------------------------------------------------------
# Discovery and attribution
# ---------------------------------------------------------------------------


def test_register_records_plugin_and_distribution(site):
    install_pooling(site, "embplex-first-token", "first_token", "embplex_first_token_a", version="1.2.3")

    info = embplex.load_registry().get("pooling", "first_token")

    assert info.plugin == "pooling.first_token"
    assert info.distribution == Distribution("embplex-first-token", "1.2.3")
    assert info.requirement == "embplex-first-token==1.2.3"
    assert info.paper == "Sentence-BERT (2019), arXiv:1908.10084"
    assert info.option_names() == ["scale"]


def test_hand_made_entry_points_and_in_process_plugins_have_no_distribution(site):
    (site / "embplex_hand_made.py").write_text(POOLING_MODULE.format(name="hand_made"))
    entry_point = importlib.metadata.EntryPoint(
        name="pooling.hand_made", value="embplex_hand_made", group="embplex"
    )

    class InProcess:
        @embplex.hookimpl
        def register_poolings(self, register):
            register("in_process", Pooling)

    registry = embplex.load_registry(entry_points=[entry_point], extra_plugins=[("notebook", InProcess())])

    assert registry.get("pooling", "hand_made").distribution is None
    assert registry.get("pooling", "hand_made").requirement is None
    assert registry.get("pooling", "in_process").plugin == "notebook"
    assert registry.get("pooling", "in_process").distribution is None


def test_entry_point_value_may_name_an_attribute(site):
    source = """
    import embplex
    from embplex.components import Pooling

    class Hooks:
        @embplex.hookimpl
        def register_poolings(self, register):
            register("from_attribute", Pooling)

    hooks = Hooks()
    """
    install_fake(site, "attr-dist", "2.0", {"embplex_attr_plugin": source}, {"pooling.attr": "embplex_attr_plugin:hooks"})

    info = embplex.load_registry(entry_points=fake_distribution_entry_points(site)).get("pooling", "from_attribute")

    assert info.distribution == Distribution("attr-dist", "2.0")


def test_broken_plugin_is_reported_and_the_others_still_load(site):
    install_fake(
        site,
        "embplex-broken",
        "0.3",
        {"embplex_broken_plugin": "raise ImportError('needs the package torchaudio')\n"},
        {"pooling.broken": "embplex_broken_plugin"},
    )
    install_pooling(site, "embplex-healthy", "healthy", "embplex_healthy_plugin")

    with pytest.warns(RuntimeWarning, match="plugin 'pooling.broken'.*embplex-broken.*torchaudio"):
        registry = embplex.load_registry()

    assert [(f.name, f.distribution) for f in registry.failed] == [
        ("pooling.broken", Distribution("embplex-broken", "0.3"))
    ]
    assert "ImportError: needs the package torchaudio" in registry.failed[0].error
    assert "healthy" in registry.names("pooling")
    assert "mean" in registry.names("pooling"), "a broken third-party plugin took a built-in down"


def test_same_name_in_same_kind_is_an_error_only_when_used(site):
    install_pooling(site, "embplex-twin-one", "twin", "embplex_twin_one", version="1.0")
    install_pooling(site, "embplex-twin-two", "twin", "embplex_twin_two", version="2.0")

    registry = embplex.load_registry()  # start-up goes on: only using the name fails

    assert "twin" not in registry.names("pooling") and "mean" in registry.names("pooling")
    assert [info.distribution.name for info in registry.conflicts[("pooling", "twin")]] == [
        "embplex-twin-one", "embplex-twin-two"
    ]
    with pytest.raises(DuplicateComponentError) as raised:
        registry.create("pooling", "twin")
    message = str(raised.value)
    assert "pooling 'twin' is registered by 2 plugins" in message
    assert "embplex-twin-one 1.0" in message and "embplex-twin-two 2.0" in message
    assert "EMBPLEX_DISABLE_PLUGINS=embplex-twin-two:pooling.twin keeps 'embplex-twin-one:pooling.twin'" in message


def printed_choices(message: str) -> dict[str, str]:
    """``{setting: the plugin it keeps}`` from a conflict message."""
    return dict(re.findall(r"EMBPLEX_DISABLE_PLUGINS=(\S+) keeps '([^']+)'", message))


def test_a_second_distribution_claiming_a_builtin_name(site, monkeypatch, capsys):
    """The case of issue 7: another distribution registers ``pooling.mean``."""
    install_fake(
        site,
        "embplex-mean-clone",
        "1.0",
        {"embplex_mean_clone": POOLING_MODULE.format(name="mean")},
        {"pooling.mean": "embplex_mean_clone"},
    )

    # `embplex plugins` still runs and shows both sides of the conflict.
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    (conflict,) = listing["conflicts"]
    assert (conflict["kind"], conflict["name"]) == ("pooling", "mean")
    assert {side["disable"] for side in conflict["plugins"]} == {"embplex:pooling.mean", "embplex-mean-clone:pooling.mean"}
    assert main(["plugins"]) == 0
    assert "CONFLICT" in capsys.readouterr().out

    # Using the name fails with one line that says how to keep either side...
    assert main(["config"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    choices = printed_choices(error)
    assert set(choices.values()) == {"embplex:pooling.mean", "embplex-mean-clone:pooling.mean"}

    # ...and each printed setting disables exactly one side.
    for setting, kept in choices.items():
        monkeypatch.setenv("EMBPLEX_DISABLE_PLUGINS", setting)
        registry = embplex.load_registry()
        info = registry.get("pooling", "mean")
        assert info.selector == kept
        assert registry.conflicts == {}
        assert info.distribution.name == kept.split(":")[0]
    monkeypatch.setenv("EMBPLEX_PLUGINS", "embplex-mean-clone:pooling.mean")
    monkeypatch.delenv("EMBPLEX_DISABLE_PLUGINS")
    assert embplex.load_registry().get("pooling", "mean").distribution.name == "embplex-mean-clone"


def test_entry_point_name_taken_by_another_distribution_still_loads(site):
    # pluggy's own loader would silently skip the second plugin named "pooling.mean".
    install_fake(
        site,
        "embplex-mean-variants",
        "1.0",
        {"embplex_mean_variants": POOLING_MODULE.format(name="mean_variant")},
        {"pooling.mean": "embplex_mean_variants"},
    )

    registry = embplex.load_registry()

    assert registry.get("pooling", "mean").distribution.name == "embplex"
    variant = registry.get("pooling", "mean_variant")
    assert variant.distribution == Distribution("embplex-mean-variants", "1.0")
    # Whichever loads second is told apart by its distribution, in the form that
    # EMBPLEX_DISABLE_PLUGINS accepts.
    assert {variant.plugin, registry.get("pooling", "mean").plugin} in (
        {"pooling.mean", "embplex:pooling.mean"},
        {"pooling.mean", "embplex-mean-variants:pooling.mean"},
    )
    assert variant.selector == "embplex-mean-variants:pooling.mean"
    assert registry.get("pooling", "mean").selector == "embplex:pooling.mean"


def test_same_name_in_different_kinds_is_allowed(site):
    source = """
    import embplex
    from embplex.components import Loss

    @embplex.hookimpl
    def register_losses(register):
        register("mean", Loss)
    """
    install_fake(site, "loss-named-mean", "1.0", {"embplex_loss_mean": source}, {"loss.mean": "embplex_loss_mean"})

    registry = embplex.load_registry()

    assert registry.get("loss", "mean").distribution == Distribution("loss-named-mean", "1.0")
    assert registry.get("pooling", "mean").distribution.name == "embplex"


def test_hookimpl_matching_no_spec_is_rejected(site):
    typo = """
    import embplex
    from embplex.components import Pooling

    @embplex.hookimpl
    def register_pooling(register):  # the spec is register_poolings
        register("never", Pooling)
    """
    install_fake(site, "typo-dist", "1.0", {"embplex_typo_plugin": typo}, {"pooling.typo": "embplex_typo_plugin"})

    with pytest.raises(pluggy.PluginValidationError, match="register_pooling"):
        embplex.load_registry()


# ---------------------------------------------------------------------------
# Allow-list and block-list
# ---------------------------------------------------------------------------


def test_allow_list_by_distribution_or_entry_point_name(site, monkeypatch):
    install_pooling(site, "embplex-allowed", "allowed", "embplex_allowed_plugin")
    install_pooling(site, "embplex-other", "other", "embplex_other_plugin")

    monkeypatch.setenv("EMBPLEX_PLUGINS", "embplex-allowed, pooling.mean")
    registry = embplex.load_registry()

    assert registry.names("pooling") == ["allowed", "mean"]
    assert registry.names("backbone") == []

    monkeypatch.setenv("EMBPLEX_PLUGINS", "embplex")  # the built-ins' distribution
    registry = embplex.load_registry()
    assert "other" not in registry.names("pooling") and "allowed" not in registry.names("pooling")
    assert {info.distribution.name for info in registry} == {"embplex"}
    assert "hf_encoder" in registry.names("backbone")


def test_block_list_by_distribution_or_entry_point_name(site, monkeypatch):
    install_pooling(site, "embplex-blocked", "blocked", "embplex_blocked_plugin")
    install_pooling(site, "embplex-kept", "kept", "embplex_kept_plugin")

    monkeypatch.setenv("EMBPLEX_DISABLE_PLUGINS", "embplex-blocked,pooling.mean")
    registry = embplex.load_registry()

    assert "kept" in registry.names("pooling")
    assert "blocked" not in registry.names("pooling")
    assert "mean" not in registry.names("pooling")
    assert "hf_encoder" in registry.names("backbone")


def test_block_list_resolves_a_duplicate(site, monkeypatch):
    install_pooling(site, "embplex-twin-one", "twin", "embplex_twin_keep", version="1.0")
    install_pooling(site, "embplex-twin-two", "twin", "embplex_twin_drop", version="2.0")

    monkeypatch.setenv("EMBPLEX_DISABLE_PLUGINS", "embplex-twin-two")

    assert embplex.load_registry().get("pooling", "twin").distribution.version == "1.0"


def test_blocked_broken_plugin_is_never_imported(site, monkeypatch):
    install_fake(
        site,
        "embplex-broken",
        "0.3",
        {"embplex_blocked_broken": "raise ImportError('boom')\n"},
        {"pooling.broken": "embplex_blocked_broken"},
    )
    monkeypatch.setenv("EMBPLEX_DISABLE_PLUGINS", "pooling.broken")

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        registry = embplex.load_registry()

    assert registry.failed == []


# ---------------------------------------------------------------------------
# Errors that say what the user can do
# ---------------------------------------------------------------------------


def test_unknown_plugin_name_lists_the_available_ones(registry):
    with pytest.raises(UnknownComponentError) as raised:
        registry.get("pooling", "meen")

    message = str(raised.value)
    assert "No pooling plugin named 'meen'" in message
    assert "Did you mean 'mean'?" in message
    assert f"Available pooling plugins: {', '.join(registry.names('pooling'))}." in message


def test_unknown_kind_lists_the_kinds(registry):
    with pytest.raises(UnknownComponentError, match="Kinds: " + ", ".join(KINDS)):
        registry.names("poolings")


def test_compose_with_unknown_pooling_lists_the_available_ones(registry, minilm_path):
    with pytest.raises(UnknownComponentError, match="Available pooling plugins: .*mean"):
        embplex.compose({"name": "hf_encoder", "path": minilm_path}, pooling="average", registry=registry)


def test_mistyped_option_suggests_the_right_one(registry):
    with pytest.raises(OptionError) as raised:
        registry.create("pooling", "mean", exclude_instructions=False)

    message = str(raised.value)
    assert "pooling 'mean' has no option 'exclude_instructions'" in message
    assert "Did you mean 'exclude_instruction'?" in message
    assert "Its options are: exclude_instruction." in message


def test_unknown_option_without_a_close_match_lists_the_options(registry):
    with pytest.raises(OptionError, match="has no option 'colour'. Its options are: exclude_instruction."):
        registry.create("pooling", "mean", colour="blue")


def test_wrong_type_is_refused_before_the_factory_runs(registry):
    with pytest.raises(OptionError) as raised:
        registry.create("pooling", "mean", exclude_instruction="no")

    message = str(raised.value)
    assert "pooling.exclude_instruction='no' is text" in message
    assert "pooling 'mean' expects true or false" in message


class Picky(Pooling):
    """A third-party pooling that checks its own option, as docs/writing-plugins.md says."""

    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        if not p > 0:
            raise OptionError(f"option p must be positive, not {p}.")


def failing_factory(p: float = 3.0) -> Pooling:
    raise ValueError(f"math domain error for p={p}")


class PickyPlugin:
    @embplex.hookimpl
    def register_poolings(self, register):
        register("picky", Picky)
        register("failing", failing_factory)


def test_option_error_from_a_factory_names_the_component():
    registry = embplex.load_registry(entry_points=[], extra_plugins=[("picky-plugin", PickyPlugin())])

    with pytest.raises(OptionError) as raised:
        registry.create("pooling", "picky", p=-1)

    assert str(raised.value) == "pooling 'picky': option p must be positive, not -1."


def test_other_errors_from_a_factory_become_one_line_naming_the_plugin():
    registry = embplex.load_registry(entry_points=[], extra_plugins=[("picky-plugin", PickyPlugin())])

    with pytest.raises(PluginError) as raised:
        registry.create("pooling", "failing", p=-1.0)

    message = str(raised.value)
    assert "pooling 'failing' (plugin 'picky-plugin'" in message
    assert "failed to build: ValueError: math domain error for p=-1.0" in message
    assert "\n" not in message
    assert isinstance(raised.value.__cause__, ValueError), "the cause stays chained for debugging"


def test_valid_options_reach_the_factory(registry):
    pooling = registry.create("pooling", "mean", exclude_instruction=False)
    assert pooling.exclude_instruction is False


# ---------------------------------------------------------------------------
# Built-ins are plugins like any other
# ---------------------------------------------------------------------------


def embplex_entry_points() -> list[importlib.metadata.EntryPoint]:
    dist = importlib.metadata.distribution("embplex")
    return [ep for ep in dist.entry_points if ep.group == "embplex"]


def test_each_builtin_component_comes_from_its_own_entry_point(monkeypatch):
    monkeypatch.delenv("EMBPLEX_PLUGINS", raising=False)
    monkeypatch.delenv("EMBPLEX_DISABLE_PLUGINS", raising=False)
    entry_points = embplex_entry_points()
    assert entry_points, "the installed embplex distribution has no embplex entry points"

    for ep in entry_points:
        registry = embplex.load_registry(entry_points=[ep])
        components = list(registry)
        assert registry.failed == [], f"{ep.name}: {registry.failed}"
        assert len(components) == 1, f"entry point {ep.name} registers {[c.name for c in components]}"
        (info,) = components
        assert ep.value == f"embplex.plugins.{info.kind}.{info.name}", ep
        assert ep.name == f"{info.kind}.{info.name}"
        assert info.plugin == ep.name
        assert info.distribution == Distribution("embplex", importlib.metadata.version("embplex"))


def test_every_plugin_module_has_an_entry_point():
    import embplex.plugins

    plugins = Path(embplex.plugins.__file__).parent
    modules = {
        f"embplex.plugins.{path.parent.name}.{path.stem}"
        for kind in KINDS
        for path in (plugins / kind).glob("*.py")
        if path.stem != "__init__"
    }
    declared = {ep.value for ep in embplex_entry_points()}
    assert modules - declared == set(), "plugin modules without an entry point (add them to pyproject.toml)"
    assert declared - modules == set(), "entry points naming no plugin module"


def test_default_registry_holds_every_builtin(registry):
    registered = {(info.kind, info.name) for info in registry if info.distribution.name == "embplex"}
    expected = {tuple(ep.name.split(".", 1)) for ep in embplex_entry_points()}
    assert registered == expected


# ---------------------------------------------------------------------------
# No global state
# ---------------------------------------------------------------------------


def test_registries_are_independent():
    class OnlyHere:
        @embplex.hookimpl
        def register_poolings(self, register):
            register("only_here", Pooling)

    first = embplex.load_registry(extra_plugins=[("only-here", OnlyHere())])
    second = embplex.load_registry()

    assert "only_here" in first.names("pooling")
    assert "only_here" not in second.names("pooling")
    assert first.plugin_manager is not second.plugin_manager
    assert first.components is not second.components

    del first.components["pooling"]["mean"]
    first.config_paths.append("file:///nowhere")
    assert "mean" in second.names("pooling")
    assert "file:///nowhere" not in second.config_paths
    assert "mean" in embplex.load_registry().names("pooling")


def test_a_registered_component_builds_and_runs():
    class Doubling(Pooling):
        def forward(self, features: Features):
            return features.last_hidden_state[:, 0] * 2

    class Plugin:
        @embplex.hookimpl
        def register_poolings(self, register):
            register("doubling", Doubling)

    import torch

    registry = embplex.load_registry(entry_points=[], extra_plugins=[("doubling", Plugin())])
    states = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    features = Features(
        input_ids=torch.zeros(1, 3, dtype=torch.long),
        attention_mask=torch.ones(1, 3, dtype=torch.long),
        hidden_states=(states,),
    )
    assert registry.create("pooling", "doubling")(features).tolist() == [[0.0, 2.0, 4.0, 6.0]]
    assert [info.name for info in registry] == ["doubling"]
