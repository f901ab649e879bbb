"""The configuration layer: the only part of embplex that imports Hydra.

Configs are composed from ``embplex.conf`` plus the config folders that plugins register
through ``register_config_paths``; the result is handed on as plain Python values. A
config never names code to import: ``_target_`` is refused wherever it appears.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from .errors import EmbplexError, UnsafeConfigError
from .registry import KINDS, Registry, load_registry

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
    overrides = [*overrides, *_searchpath_override(registry)]
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_explain(exc)) from None
    refuse_targets(OmegaConf.to_container(cfg, resolve=False))
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from None


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
