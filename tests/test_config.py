"""The configuration layer: Hydra composition, overrides, safety and the config files.

Every ``conf/<kind>/<name>.yaml`` must select its plugin by name and hold only options the
plugin's factory accepts, every recipe in ``conf/experiment/`` must compose, and a config
may never name code to import (``_target_``), whether on the command line or in a file.
"""

from __future__ import annotations

import enum
import inspect
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest
import yaml

import embplex
from embplex.config import ConfigError, check_config, compose_config, group_options, refuse_targets
from embplex.errors import OptionError, UnsafeConfigError
from embplex.registry import KINDS

if TYPE_CHECKING:  # a name only type checkers see: its annotations cannot be judged
    from somewhere import Unresolvable  # noqa: F401

CONF = Path(embplex.__file__).resolve().parent.parent / "conf"
if not CONF.is_dir():  # installed from a wheel
    import embplex.conf

    CONF = Path(embplex.conf.__file__).parent

COMPONENT_CONFIGS = sorted(path for kind in KINDS for path in (CONF / kind).glob("*.yaml"))
DATA_CONFIGS = sorted((CONF / "data").glob("*.yaml"))


class ConfigFolder:
    """An in-process plugin that registers a folder of config files, as a package would."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @embplex.hookimpl
    def register_config_paths(self, register):
        register(f"file://{self.folder}")


@pytest.fixture
def config_folder(tmp_path):
    """Write ``{"group/name.yaml": text}`` into a folder and return a registry that has it
    on Hydra's search path."""

    def make(files: dict[str, str]) -> embplex.Registry:
        for relative, text in files.items():
            path = tmp_path / "conf" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        return embplex.load_registry(extra_plugins=[("test-configs", ConfigFolder(tmp_path / "conf"))])

    return make


# ---------------------------------------------------------------------------
# Composition and overrides
# ---------------------------------------------------------------------------


def test_defaults_select_one_plugin_per_kind(registry):
    cfg = compose_config(registry=registry)
    for kind in ("backbone", "pooling", "loss", "sampler", "index"):
        assert cfg[kind]["name"] in registry.names(kind), kind
    assert cfg.get("attention") is None, "attention defaults to null: the backbone keeps its own"


def test_group_and_value_overrides(registry):
    other = next(name for name in group_options("pooling", registry) if name != "mean")

    cfg = compose_config([f"pooling={other}", "train.lr=0.001", "train.max_steps=7"], registry=registry)

    assert cfg["pooling"]["name"] == other
    assert cfg["train"]["lr"] == 0.001
    assert cfg["train"]["max_steps"] == 7
    assert compose_config(registry=registry)["train"]["lr"] == 2.0e-5, "overrides leaked into the next compose"


def test_plugin_option_override(registry):
    cfg = compose_config(["pooling=mean", "pooling.exclude_instruction=false"], registry=registry)
    assert cfg["pooling"] == {"name": "mean", "exclude_instruction": False}


def test_result_is_plain_python_values(registry):
    cfg = compose_config(registry=registry)

    def plain(node) -> bool:
        if isinstance(node, dict):
            return all(isinstance(k, str) and plain(v) for k, v in node.items())
        if isinstance(node, list):
            return all(plain(v) for v in node)
        return node is None or isinstance(node, (str, int, float, bool))

    assert type(cfg) is dict and plain(cfg)


def test_the_hydra_app_hands_commands_plain_values_through_finish_config(monkeypatch, registry, tmp_path):
    """Both ways in (compose_config, the command line's Hydra app) pass one function,
    finish_config, and what reaches a command holds no Hydra object."""
    import embplex.config

    finished = []
    original = embplex.config.finish_config
    monkeypatch.setattr(embplex.config, "finish_config", lambda cfg, reg: finished.append(1) or original(cfg, reg))
    ran = []

    compose_config(["pooling=cls"], registry=registry)
    embplex.config.run_hydra_app(
        "probe", ["pooling=cls", f"output_dir={tmp_path}"], lambda cfg, job: ran.append((cfg, job)), registry
    )

    assert len(finished) == 2
    (cfg, job), = ran
    assert type(cfg) is dict and cfg["pooling"] == {"name": "cls", "exclude_instruction": True}
    assert "hydra" not in cfg
    assert (job.command, job.output_dir, job.multirun, job.num) == ("probe", str(tmp_path), False, None)
    assert (tmp_path / ".hydra" / "config.yaml").exists()


def test_unknown_group_option_lists_the_available_ones(registry):
    with pytest.raises(ConfigError) as raised:
        compose_config(["pooling=average"], registry=registry)

    message = str(raised.value)
    assert "No pooling plugin named 'average'" in message
    assert f"Available pooling options: {', '.join(group_options('pooling', registry))}." in message


def test_unknown_key_is_a_config_error(registry):
    with pytest.raises(ConfigError, match="train.lrr"):
        compose_config(["train.lrr=1"], registry=registry)


def test_unknown_key_without_plus_suggests_the_closest_key(registry):
    with pytest.raises(ConfigError, match=r"Unknown key train\.lrr: .* Did you mean 'lr'\?"):
        compose_config(["train.lrr=1"], registry=registry)
    with pytest.raises(ConfigError, match=r"Did you mean 'exclude_instruction'\?"):
        compose_config(["pooling.exclude_instructon=false"], registry=registry)


# ---------------------------------------------------------------------------
# The schema: checked before any work starts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.normalize=no", r"model\.normalize='no' is text, but the model section expects true or false"),
        ("model.normalize='true'", r"model\.normalize='true' is text"),
        ("model.normalize=1", r"model\.normalize=1 is a whole number, .* true or false"),
        ("pooling.exclude_instruction=maybe", r"pooling\.exclude_instruction='maybe' is text, but pooling 'mean' expects true or false"),
        ("train.batch_size=true", r"train\.batch_size=true is a boolean, .* a whole number"),
        ("train.lr=fast", r"train\.lr='fast' is text, .* a number"),
        ("encode.truncation=loud", r"encode\.truncation='loud' .* one of 'warn', 'silent', 'error'"),
        ("search.query=42", r"search\.query=42 is a whole number, .* text or null.*Quote it"),
        ("backbone.num_layers=2.5", r"backbone\.num_layers=2\.5 is a number, but backbone 'hf_encoder' expects a whole number or null"),
        ("seed=forty-two", r"seed='forty-two' is text, .* a whole number"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_at_composition(registry, override, message):
    with pytest.raises(OptionError, match=message):
        compose_config([override], registry=registry)


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("model.normalize=false", ("model", "normalize"), False),
        ("model.normalize=TRUE", ("model", "normalize"), True),  # Hydra's booleans ignore case
        ("train.lr=1", ("train", "lr"), 1),  # a whole number is a number
        ("search.query='42'", ("search", "query"), "42"),
        ("backbone.num_layers=null", ("backbone", "num_layers"), None),
        ("++train.keep_checkpoints=3", ("train", "keep_checkpoints"), 3),  # add-or-override
    ],
)
def test_values_of_the_right_type_pass(registry, override, key, value):
    cfg = compose_config([override], registry=registry)
    assert cfg[key[0]][key[1]] == value


@pytest.mark.parametrize(
    "override, message",
    [
        ("+foo=bar", r"Unknown key foo: the config has no key 'foo'\. Top-level keys: seed, output_dir"),
        ("+seeed=1", r"Unknown key seeed: .* Did you mean 'seed'\?"),
        ("+encode.promt=query:", r"Unknown key encode\.promt: .* Did you mean 'prompt'\?"),
        ("+pooling.exclude_instructions=false", r"Unknown key pooling\.exclude_instructions: .* Did you mean 'exclude_instruction'\?"),
        ("+backbone.adapter.r=8", r"Unknown key backbone\.adapter: backbone 'hf_encoder' has no option 'adapter'"),
    ],
)
def test_an_added_unknown_key_is_refused_with_the_closest_key(registry, override, message):
    with pytest.raises((ConfigError, OptionError), match=message):
        compose_config([override], registry=registry)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+data.eval.splitt=dev"], r"Unknown key data\.eval\.splitt: .* Did you mean 'split'\?"),
        (["+data.train.limt=5"], r"Unknown key data\.train\.limt: data format 'beir' has no option 'limt'\. Did you mean 'limit'\?"),
        (["data=stsb", "data.train.min_score=high"], r"data\.train\.min_score='high' is text, but data format 'sts' expects a number or null"),
        (["data.eval.task=ranking"], r"data\.eval\.task='ranking' .* one of 'sts', 'retrieval'"),
        (["data.train.format=csv"], r"unknown data format 'csv'; data\.train\.format must be one of"),
    ],
)
def test_data_keys_and_values_are_checked_at_composition(registry, overrides, message):
    with pytest.raises(OptionError, match=message):
        compose_config(overrides, registry=registry)


def test_check_config_takes_a_dictconfig_or_a_dict(registry):
    """The check a Hydra app calls on the config it is handed."""
    from omegaconf import OmegaConf

    cfg = compose_config(registry=registry)
    check_config(OmegaConf.create(cfg), registry)
    check_config(cfg, registry)

    cfg["model"]["normalize"] = "no"
    with pytest.raises(OptionError, match="model.normalize='no'"):
        check_config(OmegaConf.create(cfg), registry)
    cfg["model"]["normalize"] = True
    cfg["encode"]["promt"] = "query: "
    with pytest.raises(OptionError, match="Did you mean 'prompt'"):
        check_config(cfg, registry)


def test_check_config_refuses_target_and_unknown_plugins(registry):
    cfg = compose_config(registry=registry)
    with pytest.raises(UnsafeConfigError):
        check_config({**cfg, "pooling": {"name": "mean", "_target_": "os.system"}}, registry)
    with pytest.raises(embplex.errors.UnknownComponentError, match="Did you mean 'mean'"):
        check_config({**cfg, "pooling": {"name": "meen"}}, registry)


class ThirdPartyPoolings:
    """Factories as a plugin author writes them: typed, untyped, **kwargs, unresolvable."""

    @embplex.hookimpl
    def register_poolings(self, register):
        def typed(mode: Literal["sum", "max"] = "sum", p: float = 3.0, layers: list[int] | None = None):
            raise AssertionError("composition never builds")

        def open_ended(scale: "Unresolvable" = 1.0, **extra):
            raise AssertionError("composition never builds")

        register("typed", typed)
        register("open_ended", open_ended)


@pytest.fixture
def third_party(tmp_path) -> embplex.Registry:
    folder = tmp_path / "conf" / "pooling"
    folder.mkdir(parents=True)
    (folder / "typed.yaml").write_text("name: typed\nmode: sum\np: 3.0\n")
    (folder / "open_ended.yaml").write_text("name: open_ended\nscale: 1.0\n")
    return embplex.load_registry(
        extra_plugins=[("confs", ConfigFolder(tmp_path / "conf")), ("third-party", ThirdPartyPoolings())]
    )


def test_plugin_options_are_checked_against_the_factory_annotations(third_party):
    cfg = compose_config(["pooling=typed", "pooling.p=2", "+pooling.layers=[1,2]"], registry=third_party)
    assert cfg["pooling"] == {"name": "typed", "mode": "sum", "p": 2, "layers": [1, 2]}

    with pytest.raises(OptionError, match=r"pooling\.mode='mean' is text, but pooling 'typed' expects one of 'sum', 'max'"):
        compose_config(["pooling=typed", "pooling.mode=mean"], registry=third_party)
    with pytest.raises(OptionError, match=r"pooling\.layers=\['a'\] .* a list of a whole number or null"):
        compose_config(["pooling=typed", "+pooling.layers=[a]"], registry=third_party)
    with pytest.raises(OptionError, match=r"Unknown key pooling\.moed: .*Did you mean 'mode'"):
        compose_config(["pooling=typed", "+pooling.moed=max"], registry=third_party)


class Mode(enum.Enum):
    SUM = "sum"


@pytest.mark.parametrize(
    "value, annotation, expected",
    [
        (True, "bool", True), ("no", "bool", False), (0, "bool", False),
        (3, "int", True), (True, "int", False), (3, "float", True), (False, "float", False),
        ("x", "str | None", True), (None, "int | None", True), ("1", "int | None", False),
        ([1, 2], "list[int]", True), ([1, "a"], "list[int]", False), ("ab", "Sequence[str]", False),
        ([1, "a"], "tuple[int, str]", True), ([1], "tuple[int, str]", False),
        ({"r": 8}, "dict[str, int]", True), ({"r": "8"}, "dict[str, int]", False),
        ("a/b", "Path", True), ("sum", "Mode", True), ("SUM", "Mode", True), ("max", "Mode", False),
        ("anything", "Any", True), (object(), "int", True),  # a Python object is the factory's business
    ],
)
def test_which_plain_values_fit_which_annotations(value, annotation, expected):
    from collections.abc import Sequence
    from typing import Any

    from embplex.options import fits

    names = {"Sequence": Sequence, "Any": Any, "Path": Path, "Mode": Mode}
    assert fits(value, eval(annotation, names)) is expected


def test_kwargs_and_unresolvable_annotations_are_not_judged(third_party):
    cfg = compose_config(
        ["pooling=open_ended", "pooling.scale=anything", "+pooling.extra_option=1"], registry=third_party
    )
    assert cfg["pooling"] == {"name": "open_ended", "scale": "anything", "extra_option": 1}


def test_group_options_list_the_config_files(registry):
    for kind in KINDS:
        assert group_options(kind, registry) == sorted(p.stem for p in (CONF / kind).glob("*.yaml"))


# ---------------------------------------------------------------------------
# Safety: a config never names code
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override", ["+pooling._target_=os.system", "+_target_=os.system", "+train.loader._target_=os.system"]
)
def test_target_on_the_command_line_is_refused(registry, override):
    with pytest.raises(UnsafeConfigError, match="_target_"):
        compose_config([override], registry=registry)


def test_target_in_a_registered_config_file_is_refused(config_folder):
    registry = config_folder(
        {
            "pooling/sneaky.yaml": """
                name: mean
                _target_: os.system
            """,
            "data/sneaky.yaml": """
                name: sneaky
                train:
                  loaders:
                    - {path: a}
                    - {_target_: os.system, _args_: [rm -rf /]}
            """,
        }
    )
    assert "sneaky" in group_options("pooling", registry)

    with pytest.raises(UnsafeConfigError, match=r"pooling\._target_"):
        compose_config(["pooling=sneaky"], registry=registry)
    with pytest.raises(UnsafeConfigError, match=r"data\.train\.loaders\[1\]\._target_"):
        compose_config(["data=sneaky"], registry=registry)


@pytest.mark.parametrize("key", ["_target_", "_partial_", "_args_"])
def test_refuse_targets_finds_instantiation_keys_at_any_depth(key):
    refuse_targets({"a": [{"b": 1}, {"c": {"d": "_target_ as a value is fine"}}]})
    with pytest.raises(UnsafeConfigError, match=rf"a\[1\]\.c\.{key}"):
        refuse_targets({"a": [{"b": 1}, {"c": {key: "os.system"}}]})


# ---------------------------------------------------------------------------
# Experiments (paper recipes)
# ---------------------------------------------------------------------------


def test_experiment_group_is_wired_into_the_defaults():
    defaults = yaml.safe_load((CONF / "embplex.yaml").read_text())["defaults"]
    assert {"experiment": None} in defaults
    groups = [next(iter(entry)) for entry in defaults if isinstance(entry, dict)]
    assert groups[-1] == "experiment", "experiment must come last so a recipe overrides the defaults"


def test_an_experiment_overrides_groups_and_values(config_folder):
    registry = config_folder(
        {
            "experiment/probe.yaml": """
                # @package _global_
                defaults:
                  - override /pooling: cls
                train:
                  lr: 0.123
            """
        }
    )
    assert "probe" in group_options("experiment", registry)

    cfg = compose_config(["experiment=probe"], registry=registry)
    assert cfg["pooling"]["name"] == "cls"
    assert cfg["train"]["lr"] == 0.123

    cfg = compose_config(["experiment=probe", "train.lr=0.5"], registry=registry)
    assert cfg["train"]["lr"] == 0.5, "the command line must win over the recipe"


def test_every_shipped_experiment_composes(registry):
    """One pass over ``conf/experiment/`` (``experiment=glob(*)``); empty is fine."""
    experiments = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    assert group_options("experiment", registry) == experiments
    failures = {}
    for name in experiments:
        try:
            cfg = compose_config([f"experiment={name}"], registry=registry)
        except Exception as exc:  # collect them all: one report names every broken recipe
            failures[name] = f"{type(exc).__name__}: {exc}"
            continue
        for kind in KINDS:
            if cfg.get(kind) is not None and cfg[kind]["name"] not in registry.names(kind):
                failures[name] = f"{kind} '{cfg[kind]['name']}' is not a registered plugin"
    assert failures == {}


# ---------------------------------------------------------------------------
# Component and data config files
# ---------------------------------------------------------------------------


def test_there_are_component_configs():
    assert {p.parent.name for p in COMPONENT_CONFIGS} >= {"backbone", "pooling", "index"}


@pytest.mark.parametrize("path", COMPONENT_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_component_config_matches_its_factory(path, registry):
    kind, name = path.parent.name, path.stem
    config = yaml.safe_load(path.read_text())

    assert isinstance(config, dict) and next(iter(config)) == "name", "the first key must be `name`"
    assert config["name"] == name, f"{path.name} selects '{config['name']}'"
    info = registry.get(kind, name)
    options = set(config) - {"name"}
    accepted = set(info.option_names())
    assert options - accepted == set(), f"{kind} '{name}' does not take {sorted(options - accepted)}"
    required = {
        p.name for p in inspect.signature(info.factory).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name != "registry"  # the registry building a composite plugin, never an option
    }
    assert required <= options, f"options without a default must be in the config: {sorted(required - options)}"

    cfg = compose_config([f"{kind}={name}"], registry=registry)
    # a top-level interpolation (the exact index's `device: ${device}`) arrives resolved
    top_level = {f"${{{key}}}": value for key, value in cfg.items() if not isinstance(value, dict)}
    assert cfg[kind] == {key: top_level.get(value, value) if isinstance(value, str) else value for key, value in config.items()}


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=lambda p: p.stem)
def test_data_config_composes(path, registry):
    cfg = compose_config([f"data={path.stem}"], registry=registry)
    assert cfg["data"]["name"] == path.stem
