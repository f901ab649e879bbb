"""The configuration layer: Hydra composition, overrides, safety and the config files.

Every ``conf/<kind>/<name>.yaml`` must select its plugin by name and hold only options the
plugin's factory accepts, every recipe in ``conf/experiment/`` must compose, and a config
may never name code to import (``_target_``), whether on the command line or in a file.
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest
import yaml

import embplex
from embplex.config import ConfigError, compose_config, group_options, refuse_targets
from embplex.errors import UnsafeConfigError
from embplex.registry import KINDS

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
    }
    assert required <= options, f"options without a default must be in the config: {sorted(required - options)}"

    cfg = compose_config([f"{kind}={name}"], registry=registry)
    assert cfg[kind] == config


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=lambda p: p.stem)
def test_data_config_composes(path, registry):
    cfg = compose_config([f"data={path.stem}"], registry=registry)
    assert cfg["data"]["name"] == path.stem
