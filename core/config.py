"""The configuration layer: with :mod:`embplex.sweep`, the only part of embplex that imports Hydra.

Configs are composed from ``embplex.conf`` plus the config folders that plugins register
through ``register_config_paths``; the result is handed on as plain Python values. A
config never names code to import: ``_target_`` is refused wherever it appears.

Two ways in, one way out: :func:`compose_config` (Hydra's compose API, for Python and
``embplex config``) and :func:`run_hydra_app` (the command line as a Hydra application:
``-m`` sweeps, launchers, ``.hydra/`` folders, ``--cfg``, ``--help``); both turn the
composed config into plain values in :func:`finish_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from .errors import EmbplexError, UnknownComponentError, UnsafeConfigError
from .options import check_arguments, check_value
from .registry import KINDS, Registry, check_options, load_registry

CONFIG_MODULE = "embplex.conf"
PRIMARY_CONFIG = "embplex"
GROUPS = (*KINDS, "data", "experiment")
# Kinds whose config may name several plugins, applied in order (docs/concepts.md,
# "Attention lists"): `attention=[bidirectional,temp_scale]` on the command line.
LIST_KINDS = ("attention",)


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
    from omegaconf.errors import OmegaConfBaseException

    registry = registry or load_registry()
    given = expand_list_overrides(overrides)
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=[*given, *_searchpath_override(registry)])
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_closest_key(exc, given, registry, config_name) or _explain(exc)) from None
    return finish_config(cfg, registry)


def finish_config(cfg: Any, registry: Registry) -> dict[str, Any]:
    """Turn a config Hydra composed (a ``DictConfig``, ``hydra`` node excluded) into the
    plain dict the commands run with: the one point every composed config passes before
    it turns into work, from Python and from the command line alike (each job of a sweep
    included), so a check that needs the installed plugins belongs here (``registry``).

    :raises UnsafeConfigError: the config contains ``_target_``.
    :raises ConfigError: an interpolation that does not resolve.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    refuse_targets(OmegaConf.to_container(cfg, resolve=False))
    try:
        composed: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from None
    for kind in LIST_KINDS:
        if kind in composed:
            composed[kind] = as_plugin_list(composed[kind], kind)
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


INSTANTIATION_KEYS = ("_target_", "_partial_", "_args_")


def _refusal(path: str) -> UnsafeConfigError:
    return UnsafeConfigError(
        f"the config sets {path}: embplex never imports code named in a config. "
        "Choose a plugin by its registered name instead (e.g. pooling=mean), "
        "or install a plugin package that registers the component."
    )


def refuse_targets(node: Any, where: str = "") -> None:
    """Refuse ``_target_`` anywhere: configs choose plugins by registered name only."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key in INSTANTIATION_KEYS:
                raise _refusal(path)
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


_LIST_OVERRIDE = re.compile(r"^(?P<kind>\w+)=\[(?P<names>[^\[\]{}=]*)\]$")


def expand_list_overrides(overrides: Sequence[str]) -> list[str]:
    """Rewrite ``attention=[a,b]`` (a list of plugins of a kind in ``LIST_KINDS``) into
    what Hydra composes without merging the configs into one node: ``~attention``, then
    ``+attention@attention.a=a`` and ``+attention@attention.b=b``. Each plugin's options
    are then ``attention.<name>.<option>=...``; :func:`as_plugin_list` turns the node
    into the ordered list. Other overrides pass unchanged."""
    expanded: list[str] = []
    for override in overrides:
        match = _LIST_OVERRIDE.match(override)
        if match is None or match["kind"] not in LIST_KINDS:
            key, _, value = override.partition("=")
            if key.lstrip("+~") in LIST_KINDS and "[" in value:
                # Hydra would merge the listed files into one node: a silently wrong model
                raise ConfigError(
                    f"{override}: a list of {key.lstrip('+~')} plugins is written {key.lstrip('+~')}=[a,b] "
                    "with plain names, one list per command (lists cannot be swept with -m)."
                )
            expanded.append(override)
            continue
        kind = match["kind"]
        names = [name.strip().strip("'\"") for name in match["names"].split(",") if name.strip()]
        if not names:
            raise ConfigError(f"{kind}=[] names no plugin; name at least one, or leave {kind} out.")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ConfigError(
                f"{kind}=[{','.join(names)}] names {', '.join(twice)} more than once; a list holds "
                f"each plugin once (its options are {kind}.<name>.<option>=...)."
            )
        expanded.append(f"~{kind}")
        expanded.extend(f"+{kind}@{kind}.{name}={name}" for name in names)
    return expanded


def as_plugin_list(node: Any, kind: str) -> Any:
    """A kind's composed node as the components expect it: ``None``, one
    ``{"name": ..., **options}``, or a list of them in order. Hydra composes a list as a
    mapping from each plugin's name to its config (see :func:`expand_list_overrides`);
    a list given as such passes unchanged.

    :raises ConfigError: such members next to a selected plugin or other keys."""
    if not isinstance(node, dict) or not node:
        return node
    # the shape the rewrite and `/attention@attention.<name>: <name>` produce: each member
    # under its own name (an option whose value names a plugin under another key is not one)
    listed = [key for key, member in node.items() if isinstance(member, dict) and member.get("name") == key]
    if not listed:
        return node
    strays = [key for key in node if key not in listed]
    if not strays:
        return [node[key] for key in listed]
    raise ConfigError(
        f"{kind} mixes a list of plugins ({', '.join(listed)}) with "
        f"other keys ({', '.join(map(str, strays))}); set options as {kind}.<plugin>.<option>=..."
    )


def component_config(cfg: dict[str, Any], kind: str) -> Any:
    """The ``{"name": ..., **options}`` node of one kind, or ``None`` when unset; for a
    kind of ``LIST_KINDS`` given as a list, the list of such nodes."""
    node = cfg.get(kind)
    if node is None:
        return None
    if kind in LIST_KINDS:
        node = as_plugin_list(node, kind)
        if isinstance(node, list):
            for i, member in enumerate(node):
                if not isinstance(member, dict) or "name" not in member:
                    raise ConfigError(f"{kind}[{i}] must select a plugin by name, not {member!r}.")
            return node
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
    layer: int | None = None
    dim: int | None = None
    domain: str | int | None = None  # for a backbone that routes by domain (Backbone.takes_domain)
    shard_size: int = 10000
    overwrite: bool = False
    distributed_timeout: float = 3600.0


@dataclasses.dataclass
class EvalSection:
    batch_size: int
    output: str
    bootstrap: int
    domain: str | int | None = None  # every evaluated text's domain label


@dataclasses.dataclass
class SearchSection:
    k: int
    query: str | None
    rebuild: bool
    embeddings: str | None = None


@dataclasses.dataclass
class EvalDataSection:
    task: Literal["sts", "retrieval", "limit", "passkey", "needle"]
    path: str | None = None  # the data files (or, for passkey and needle, the essays); limit generates its own
    split: str | None = None
    queries: int | None = None  # the generated tasks: limit (default 1000), passkey and needle (50 per length)
    seed: int = 0
    # limit (embplex.limit) only
    documents: int = 46
    relevant: int = 2
    distractors: int = 0
    items_per_document: int | None = None
    # the synthetic long-document tasks (embplex.long_context) only
    lengths: list[int] | None = None
    candidates: int = 100
    filler: Literal["essay", "repeat"] = "essay"


def core_schema() -> dict[str, Any]:
    """Each core top-level key and the type or dataclass that describes it."""
    from .serve import ServeSettings
    from .teachers import TeacherSection
    from .training import TrainSettings

    return {
        "seed": int,
        "output_dir": str,
        "device": str,
        "model": ModelSection,
        "train": TrainSettings,
        "encode": EncodeSection,
        "eval": EvalSection,
        "search": SearchSection,
        "serve": ServeSettings,
        "teacher": TeacherSection,
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
    if isinstance(cfg.get("device"), str):
        from .devices import resolve_device

        resolve_device(cfg["device"])  # cuda on a machine without one fails here, not mid-run
    for kind in KINDS:
        node = component_config(cfg, kind)
        if isinstance(node, list):
            for i, member in enumerate(node):
                try:
                    info = registry.get(kind, member["name"])
                except UnknownComponentError as exc:
                    raise UnknownComponentError(f"{kind}[{i}]: {exc}") from None
                check_options(info, options_of(member))
        elif node is not None:
            check_options(registry.get(kind, node["name"]), options_of(node))
    if cfg.get("data") is not None:
        _check_data(cfg["data"])
    from .teachers import check_teacher_config

    check_teacher_config(cfg.get("teacher"), registry)


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


# The command line as a Hydra application
# ---------------------------------------------------------------------------


@dataclass
class Job:
    """What a command learns from Hydra about the job it runs, as plain values."""

    command: str
    output_dir: str  # the job's folder: Hydra's runtime output dir, where .hydra/ is saved
    overrides: list[str] = field(default_factory=list)  # as in .hydra/overrides.yaml
    multirun: bool = False
    num: int | None = None  # the job's number in a sweep
    sweep_dir: str | None = None


def refuse_target_overrides(args: Sequence[str]) -> None:
    """Refuse an override that sets ``_target_`` anywhere, ``hydra.*`` included: Hydra
    would import and call what it names (a callback, a launcher) before any job runs."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if any(part in INSTANTIATION_KEYS for part in key.split(".")):
            raise _refusal(key)
        # a hydra.* value never reaches finish_config: look inside it (`+hydra.callbacks.x={_target_: ...}`)
        if key.split(".")[0] == "hydra" and any(name in value for name in INSTANTIATION_KEYS):
            raise _refusal(f"{key} (a value naming {', '.join(n for n in INSTANTIATION_KEYS if n in value)})")


_PLUGIN_CONFIG_FOLDERS: Any = None


def _plugin_config_folders() -> Any:
    """The Hydra search-path plugin that adds the config folders of embplex plugins
    (``register_config_paths``) while an embplex command runs, registered once per process.

    Hydra's way to extend the search path of an application for good: ``--help``, shell
    completion and every job of a sweep see the folders, where ``hydra.searchpath`` on
    the command line is forgotten by ``--help``'s list of config groups. Built on first use
    so that importing this module does not import Hydra.
    """
    global _PLUGIN_CONFIG_FOLDERS
    if _PLUGIN_CONFIG_FOLDERS is None:
        from hydra.core.config_search_path import ConfigSearchPath
        from hydra.core.plugins import Plugins
        from hydra.plugins.search_path_plugin import SearchPathPlugin

        class PluginConfigFolders(SearchPathPlugin):
            paths: list[str] = []

            def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
                for path in type(self).paths:
                    search_path.append(provider="embplex-plugin", path=path)

        Plugins.instance().register(PluginConfigFolders)
        _PLUGIN_CONFIG_FOLDERS = PluginConfigFolders
    return _PLUGIN_CONFIG_FOLDERS


def _with_overrides(args: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Hydra's arguments with ``extra`` overrides added: all overrides first, then the
    flags (argparse takes overrides as one positional run; a trailing ``--info`` must not
    swallow an override as its value)."""
    from hydra._internal.utils import get_args_parser

    overrides = get_args_parser().parse_args(list(args)).overrides
    flags = list(args)
    for override in overrides:
        flags.remove(override)
    return [*extra, *overrides, *flags]


def record_device(cfg: dict[str, Any], saved_config: Path) -> None:
    """Set ``cfg["device"]`` to the device ``auto`` (or ``cuda``) chose, and write it into
    the run's saved config, so that it says where the run ran, not what was asked for
    (``overrides.yaml`` keeps that)."""
    from omegaconf import OmegaConf

    from .devices import resolve_device

    used = str(resolve_device(cfg.get("device", "auto")))
    if used == cfg.get("device"):
        return
    cfg["device"] = used
    if saved_config.is_file():
        saved = OmegaConf.load(saved_config)
        saved.device = used
        OmegaConf.save(saved, saved_config)  # the way Hydra wrote it, beside its other records


def run_hydra_app(
    command: str,
    args: Sequence[str],
    task: Callable[[dict[str, Any], Job], Any],
    registry: Registry,
) -> None:
    """Run ``embplex <command> <args>`` as a Hydra application.

    ``args`` are what follows the command: overrides and Hydra's flags (``-m``, ``--cfg``,
    ``--info``, ``--help``, ``--shell-completion``). For every job, ``task(cfg, job)`` gets
    the plain config from :func:`finish_config` with ``output_dir`` set to the job's folder
    (``hydra.run.dir`` for one run, ``hydra.sweep.dir``/``hydra.sweep.subdir`` in a sweep;
    both default to ``output_dir``, see ``conf/embplex.yaml``); what it returns goes back to
    the sweeper (an optimising sweeper such as optuna needs a number).

    :raises ConfigError: Hydra could not compose or parse the overrides.
    :raises SystemExit: Hydra's own exits (``--help``, a bad flag); the caller turns it into
        an exit code.
    """
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    refuse_target_overrides(args)
    started: list[bool] = []
    stopped: list[Exception] = []

    def task_function(hydra_cfg: Any) -> Any:
        started.append(True)
        runtime = HydraConfig.get()
        multirun = runtime.mode == RunMode.MULTIRUN
        job = Job(
            command=command,
            output_dir=runtime.runtime.output_dir,
            overrides=list(runtime.overrides.task),
            multirun=multirun,
            num=runtime.job.num if multirun else None,
            sweep_dir=str(runtime.sweep.dir) if multirun else None,
        )
        try:
            cfg = finish_config(hydra_cfg, registry)
            if os.path.abspath(cfg["output_dir"]) != os.path.abspath(job.output_dir):
                cfg["output_dir"] = job.output_dir
            if runtime.output_subdir is not None:
                record_device(cfg, Path(job.output_dir) / runtime.output_subdir / "config.yaml")
            return task(cfg, job)
        except (EmbplexError, OSError) as exc:
            if multirun or (isinstance(exc, OSError) and exc.filename is None):
                raise
            # raised again once Hydra has closed the run: its own report of a failed
            # job would print the overrides before our one-line message
            stopped.append(exc)
            return None

    app = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=PRIMARY_CONFIG)(
        task_function
    )
    saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    # argv[0] "embplex" is the program name in usage lines and the bash completion script
    sys.argv = ["embplex", *_with_overrides(expand_list_overrides(args), [f"hydra.job.name={command}"])]
    # errors come back to us as exceptions instead of Hydra's printout and exit 1
    os.environ["HYDRA_FULL_ERROR"] = "1"
    folders = _plugin_config_folders()
    folders.paths = list(registry.config_paths)
    try:
        app()
        if stopped:
            raise stopped[0]
    except (HydraException, OmegaConfBaseException) as exc:
        overrides = [arg for arg in args if not arg.startswith("-")]
        raise ConfigError(_closest_key(exc, overrides, registry, PRIMARY_CONFIG) or _explain(exc)) from None
    except ValueError as exc:
        if started:  # the command's own error: not Hydra's to explain
            raise
        raise ConfigError(_explain(exc)) from None
    finally:
        folders.paths = []
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
