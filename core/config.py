"""The configuration layer: the only part of embplex that imports Hydra.

Configs are composed from ``embplex.conf`` plus the config folders that plugins register
through ``register_config_paths``; the result is handed on as plain Python values. A
config never names code to import: ``_target_`` is refused wherever it appears.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Iterable, Literal, Mapping, Sequence

from .errors import EmbplexError, UnsafeConfigError
from .options import check_arguments, check_value
from .registry import KINDS, Registry, check_options, load_registry

CONFIG_MODULE = "embplex.conf"
PRIMARY_CONFIG = "embplex"
GROUPS = (*KINDS, "data", "experiment")


class ConfigError(EmbplexError):
    """An override or config file Hydra could not compose."""


def _searchpath_override(registry: Registry) -> list[str]:
    if not registry.config_paths:
        return []
    quoted = ",".join(f"'{path}'" for path in registry.config_paths)
    return [f"hydra.searchpath=[{quoted}]"]


def compose_config(
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    config_name: str = PRIMARY_CONFIG,
) -> dict[str, Any]:
    """Compose the configuration with Hydra overrides and return it as plain values.

    :raises ConfigError: an override Hydra rejects (unknown key, unknown group option).
    :raises UnsafeConfigError: the config contains ``_target_``.
    """
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    registry = registry or load_registry()
    given = list(overrides)
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=[*given, *_searchpath_override(registry)])
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_closest_key(exc, given, registry, config_name) or _explain(exc)) from None
    refuse_targets(OmegaConf.to_container(cfg, resolve=False))
    try:
        composed: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from None
    check_config(composed, registry)
    return composed


def _closest_key(exc: Exception, overrides: list[str], registry: Registry, config_name: str) -> str | None:
    """For an override of a key that does not exist, the schema check's message, which
    names the closest existing key, instead of Hydra's advice to add the key with '+'."""
    match = re.search(r"Could not override '([^']+)'", str(exc))
    if match is None:
        return None
    key = match.group(1)
    appended = [f"+{item}" if item.split("=", 1)[0] == key else item for item in overrides]
    if appended == overrides:
        return None
    try:
        compose_config(appended, registry, config_name)
    except EmbplexError as checked:
        return f"Could not override '{key}': {checked}"
    return None


def _explain(exc: Exception) -> str:
    from hydra.errors import MissingConfigException

    missing = getattr(exc, "missing_cfg_file", None)
    if isinstance(exc, MissingConfigException) and missing and "/" in missing:
        group, name = missing.rsplit("/", 1)
        available = ", ".join(sorted(exc.options or [])) or "(none installed)"
        return f"No {group} plugin named '{name}'. Available {group} options: {available}."
    text = str(exc).strip().splitlines()
    message = " ".join(line.strip() for line in text if line.strip() and not line.startswith("\t"))
    return (
        f"{message} (see `embplex plugins` for the installed plugins, "
        "and docs/getting-started.md for the configuration keys)"
    )


def refuse_targets(node: Any, where: str = "") -> None:
    """Refuse ``_target_`` anywhere: configs choose plugins by registered name only."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key in ("_target_", "_partial_", "_args_"):
                raise UnsafeConfigError(
                    f"the config sets {path}: embplex never imports code named in a config. "
                    "Choose a plugin by its registered name instead (e.g. pooling=mean), "
                    "or install a plugin package that registers the component."
                )
            refuse_targets(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            refuse_targets(value, f"{where}[{i}]")


def group_options(group: str, registry: Registry | None = None) -> list[str]:
    """Names of the config files Hydra finds for ``group`` (``pooling``, ``data``, ...)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    registry = registry or load_registry()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        # The loader's repository is fixed at start-up, so plugin folders need a new one.
        search_path = GlobalHydra.instance().config_loader().get_search_path()
        for path in registry.config_paths:
            search_path.append(provider="embplex-plugin", path=path)
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        extended = ConfigLoaderImpl(config_search_path=search_path)
        return sorted(extended.get_group_options(group, results_filter=ObjectType.CONFIG))


def component_config(cfg: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The ``{"name": ..., **options}`` node of one kind, or ``None`` when unset."""
    node = cfg.get(kind)
    if node is None:
        return None
    if not isinstance(node, dict) or "name" not in node:
        raise ConfigError(f"config group '{kind}' must select a plugin: {kind}=<name>.")
    return node


def options_of(node: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in node.items() if key != "name"}


def iter_groups() -> Iterable[str]:
    return GROUPS


# ---------------------------------------------------------------------------
# The schema: checked before any work starts
# ---------------------------------------------------------------------------
# The core sections are described by dataclasses (used for their annotations only; the
# defaults live in conf/embplex.yaml). ``train`` is described by TrainSettings itself,
# so a setting added there is known here too. Plugin options are described by their
# factories' signatures.


@dataclasses.dataclass
class ModelSection:
    normalize: bool
    load: str | None


@dataclasses.dataclass
class EncodeSection:
    batch_size: int
    input: str | None
    output: str
    prompt: str | None
    truncation: Literal["warn", "silent", "error"]


@dataclasses.dataclass
class EvalSection:
    batch_size: int
    output: str
    bootstrap: int


@dataclasses.dataclass
class SearchSection:
    k: int
    query: str | None
    rebuild: bool


@dataclasses.dataclass
class EvalDataSection:
    task: Literal["sts", "retrieval"]
    path: str
    split: str | None = None


def core_schema() -> dict[str, Any]:
    """Each core top-level key and the type or dataclass that describes it."""
    from .training import TrainSettings

    return {
        "seed": int,
        "output_dir": str,
        "model": ModelSection,
        "train": TrainSettings,
        "encode": EncodeSection,
        "eval": EvalSection,
        "search": SearchSection,
    }


def check_config(cfg: Any, registry: Registry) -> None:
    """Refuse a composed config that would not run as written, before any work starts.

    Every key must be known (a typo gets the closest key suggested), every core value must
    have its schema's type, and every plugin's options must be parameters of its factory
    with values its annotations allow. Booleans are ``true`` and ``false`` only: Hydra
    reads ``model.normalize=no`` as the text ``'no'``, which is refused, not taken as true.

    :param cfg: the composed config, as a dict or an OmegaConf ``DictConfig``.
    :raises ConfigError: an unknown top-level key or a section that is not a mapping.
    :raises OptionError: an unknown option or a value of the wrong type (key, value and
        what was expected are named).
    :raises UnknownComponentError, DuplicateComponentError: a plugin name that is not
        installed, or that two installed plugins claim.
    :raises UnsafeConfigError: the config contains ``_target_``.
    """
    cfg = _plain(cfg)
    refuse_targets(cfg)
    schema = core_schema()
    known = [*schema, *KINDS, "data"]
    for key in cfg:
        if key not in known and key != "hydra":  # a Hydra app may leave its own node in
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown key {key}: the config has no key '{key}'.{hint} "
                f"Top-level keys: {', '.join(known)}."
            )
    for section, expected in schema.items():
        if section not in cfg:
            continue
        if dataclasses.is_dataclass(expected):
            values = cfg[section]
            if not isinstance(values, dict):
                raise ConfigError(f"{section} must be a mapping of settings, not {values!r}.")
            check_arguments(expected, values, owner=f"the {section} section", prefix=section)
        else:
            check_value(section, cfg[section], expected, "the config")
    for kind in KINDS:
        node = component_config(cfg, kind)
        if node is not None:
            check_options(registry.get(kind, node["name"]), options_of(node))
    if cfg.get("data") is not None:
        _check_data(cfg["data"])


def _check_data(data: Any) -> None:
    """``data.train`` against its format's loader, ``data.eval`` against its schema. Other
    keys of a data config (``name``, ``root``, helpers for interpolation) are free."""
    from .data import training_loader

    if not isinstance(data, dict):
        raise ConfigError(f"data must select a data set: data=<name>, not {data!r}.")
    train = data.get("train")
    if train is not None:
        if not isinstance(train, dict):
            raise ConfigError(f"data.train must be a mapping (format, path, options), not {train!r}.")
        loader = training_loader(train.get("format"))
        check_value("data.train.path", train.get("path"), str, "data.train")
        # A null option means the loader's default, as load_training_data reads it.
        options = {k: v for k, v in train.items() if k not in ("name", "format", "path") and v is not None}
        check_arguments(loader, options, owner=f"data format '{train['format']}'", prefix="data.train")
    evaluation = data.get("eval")
    if evaluation is not None:
        if not isinstance(evaluation, dict):
            raise ConfigError(f"data.eval must be a mapping (task, path, split), not {evaluation!r}.")
        check_arguments(EvalDataSection, evaluation, owner="data.eval", prefix="data.eval")


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping) and not hasattr(cfg, "_get_node"):
        return dict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
