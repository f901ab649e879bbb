"""Plugin discovery and the component registry.

Plugins are modules named by entry points in the ``embplex`` group (first-party ones
too). We load them with our own loop rather than pluggy's ``load_setuptools_entrypoints``
so that one broken plugin is reported instead of aborting start-up, and so that two
plugins claiming the same name is an error instead of a silent skip. That error is
raised when the name is used, not at start-up, so ``embplex plugins`` still lists both.

Environment variables:

* ``EMBPLEX_PLUGINS``: comma-separated allow-list of entry-point names (``pooling.mean``),
  distribution names (``embplex``) or ``distribution:entry-point`` (``embplex:pooling.mean``,
  one plugin even when two distributions use the same entry-point name); when set,
  nothing else loads.
* ``EMBPLEX_DISABLE_PLUGINS``: comma-separated block-list, same names.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import inspect
import os
import warnings
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import pluggy

from . import hookspecs
from .errors import DuplicateComponentError, EmbplexError, OptionError, PluginError, UnknownComponentError
from .options import check_arguments

ENTRY_POINT_GROUP = "embplex"
KINDS = ("backbone", "attention", "pooling", "loss", "sampler", "index")
_HOOK_FOR_KIND = {
    "backbone": "register_backbones",
    "attention": "register_attentions",
    "pooling": "register_poolings",
    "loss": "register_losses",
    "sampler": "register_samplers",
    "index": "register_indexes",
}

hookimpl = pluggy.HookimplMarker("embplex")


class Register(Protocol):
    def __call__(self, name: str, factory: Callable[..., Any], *, paper: str | None = None) -> None:
        ...


class RegisterPath(Protocol):
    def __call__(self, path: str) -> None:
        ...


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str


@dataclass(frozen=True)
class ComponentInfo:
    """A registered component and where it came from."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: Distribution | None
    paper: str | None = None
    entry_point: str | None = None  # the entry point the plugin was loaded from
    # The registry holding this entry (set by Registry.add): a factory that asks for it
    # builds its parts from the same plugins, in-process and disabled ones included.
    registry: "Registry | None" = field(default=None, compare=False, repr=False)

    @property
    def selector(self) -> str | None:
        """The name ``EMBPLEX_DISABLE_PLUGINS`` / ``EMBPLEX_PLUGINS`` take to choose exactly
        this plugin: ``distribution:entry-point`` (``None`` for an in-process plugin)."""
        return None if self.entry_point is None else _selector(self.entry_point, self.distribution)

    @property
    def origin(self) -> str:
        """Who registered the component, for messages."""
        return f"plugin '{self.plugin}', {_describe(self.distribution)}"

    @property
    def requirement(self) -> str | None:
        if self.distribution is None:
            return None
        return f"{self.distribution.name}=={self.distribution.version}"

    def option_names(self) -> list[str]:
        return [
            p.name
            for p in inspect.signature(self.factory).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not _is_registry_parameter(p)
        ]

    @property
    def wants_registry(self) -> bool:
        """Whether the factory declares a keyword-only ``registry`` parameter."""
        return any(_is_registry_parameter(p) for p in inspect.signature(self.factory).parameters.values())

    def factory_arguments(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options``, plus ``registry=`` (the registry holding this entry) when the
        factory declares a keyword-only ``registry`` parameter."""
        arguments = dict(options)
        if self.wants_registry:
            if REGISTRY_PARAMETER in arguments:
                raise OptionError(
                    f"{self.kind} '{self.name}' has no option '{REGISTRY_PARAMETER}': it receives "
                    "the registry that builds it. Remove it from the config."
                )
            if self.registry is None:
                raise RuntimeError(
                    f"{self.kind} '{self.name}' needs the registry that builds it; create it "
                    "through a Registry (registry.create), not from a detached ComponentInfo."
                )
            arguments[REGISTRY_PARAMETER] = self.registry
        return arguments

    def create(self, **options: Any) -> Any:
        """Build the component, rejecting options its factory does not take."""
        return self.create_at(self.kind, options)

    def create_at(self, path: str, options: Mapping[str, Any]) -> Any:
        """Build the component from ``options`` found at config path ``path`` (``"loss"``,
        ``"loss.inner.0"``), so that an error names the key the user must fix."""
        options = dict(options)
        check_options(self, options, prefix=path)
        with reported_by(self):
            return self.factory(**self.factory_arguments(options))


REGISTRY_PARAMETER = "registry"


def _is_registry_parameter(parameter: inspect.Parameter) -> bool:
    return parameter.name == REGISTRY_PARAMETER and parameter.kind == parameter.KEYWORD_ONLY


def check_options(info: ComponentInfo, options: dict[str, Any], prefix: str | None = None) -> None:
    """Refuse an option the factory does not take or a value its annotation does not allow."""
    check_arguments(
        info.factory, options, owner=f"{info.kind} '{info.name}'", prefix=info.kind if prefix is None else prefix
    )


@contextlib.contextmanager
def reported_by(info: ComponentInfo) -> Iterator[None]:
    """Name the component and its plugin in any error its factory raises.

    An :class:`EmbplexError` (a plugin rejecting an option raises ``OptionError``) keeps its
    class and gets the component's name in front; anything else becomes a
    :class:`PluginError` that names the plugin and its distribution, chained to the cause.
    """
    try:
        yield
    except EmbplexError as exc:
        named = f"{info.kind} '{info.name}'"
        if exc.args and isinstance(exc.args[0], str) and named not in exc.args[0]:
            exc.args = (f"{named}: {exc.args[0]}", *exc.args[1:])
        raise
    except Exception as exc:
        raise PluginError(
            f"{info.kind} '{info.name}' ({info.origin}) failed to build: {type(exc).__name__}: {exc}. "
            "If an option is wrong, fix it in the config; otherwise report this to the plugin's authors."
        ) from exc


@dataclass(frozen=True)
class FailedPlugin:
    name: str
    distribution: Distribution | None
    error: str


@dataclass
class Registry:
    """Every component registered by the loaded plugins, by kind and name."""

    components: dict[str, dict[str, ComponentInfo]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    failed: list[FailedPlugin] = field(default_factory=list)
    conflicts: dict[tuple[str, str], list[ComponentInfo]] = field(default_factory=dict)
    config_paths: list[str] = field(default_factory=list)
    plugin_manager: pluggy.PluginManager | None = None

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> ComponentInfo:
        self._check_kind(kind)
        if (kind, name) in self.conflicts:
            raise DuplicateComponentError(self.conflict_message(kind, name))
        try:
            return self.components[kind][name]
        except KeyError:
            available = ", ".join(self.names(kind)) or "(none installed)"
            close = difflib.get_close_matches(name, self.names(kind), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UnknownComponentError(
                f"No {kind} plugin named '{name}'.{hint} Available {kind} plugins: {available}."
            ) from None

    def create(self, kind: str, name: str, **options: Any) -> Any:
        return self.get(kind, name).create(**options)

    def create_part(self, kind: str, spec: str | Mapping[str, Any], option: str) -> Any:
        """Build a component named by another component's option: ``spec`` is a plugin
        name or ``{"name": ..., **options}``. For composite plugins (a loss wrapping
        losses by name), which receive this registry as their ``registry`` parameter.
        Errors name ``option`` (e.g. ``"loss.inner"``), the setting the user must fix."""
        if isinstance(spec, str):
            name, options = spec, {}
        elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
            name, options = spec["name"], {k: v for k, v in spec.items() if k != "name"}
        else:
            raise OptionError(
                f"{option} must be a {kind} plugin name or a config with a 'name' key, not {spec!r}."
            )
        try:
            info = self.get(kind, name)
        except UnknownComponentError as exc:
            raise UnknownComponentError(f"{option}: {exc}") from None
        return info.create_at(option, options)

    def __iter__(self) -> Iterable[ComponentInfo]:
        for kind in KINDS:
            yield from (self.components[kind][n] for n in self.names(kind))

    def add(self, info: ComponentInfo) -> None:
        """Add a component; a name taken twice becomes a conflict, which is an error only
        when the name is used (so ``embplex plugins`` still runs and shows it)."""
        key = (info.kind, info.name)
        existing = self.components[info.kind].pop(info.name, None)
        if existing is not None:
            self.conflicts[key] = [existing]
        if key in self.conflicts:
            self.conflicts[key].append(info)
        else:
            self.components[info.kind][info.name] = replace(info, registry=self)

    def conflict_message(self, kind: str, name: str) -> str:
        """What a name registered by several plugins is, and how to keep exactly one."""
        sides = self.conflicts[(kind, name)]
        who = "; ".join(f"'{info.selector or info.plugin}' ({_describe(info.distribution)})" for info in sides)
        selectors = [info.selector for info in sides if info.selector]
        choices = [
            f"EMBPLEX_DISABLE_PLUGINS={','.join(other for other in selectors if other != keep)} keeps '{keep}'"
            for keep in selectors
        ]
        in_process = [info.plugin for info in sides if info.selector is None]
        if in_process:
            choices.append(f"or leave {', '.join(repr(p) for p in in_process)} out of extra_plugins")
        return (
            f"{kind} '{name}' is registered by {len(sides)} plugins: {who}. Keep one: "
            f"{'; '.join(choices)}; or uninstall one of the distributions."
        )

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise UnknownComponentError(f"No component kind '{kind}'. Kinds: {', '.join(KINDS)}.")


def _describe(distribution: Distribution | None) -> str:
    if distribution is None:
        return "not from an installed distribution"
    return f"distribution {distribution.name} {distribution.version}"


def _split_env(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def new_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("embplex")
    manager.add_hookspecs(hookspecs)
    return manager


def load_registry(
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    extra_plugins: Iterable[tuple[str, ModuleType | object]] = (),
) -> Registry:
    """Discover plugins and build a fresh registry (no global state).

    :param entry_points: the entry points to load; defaults to the installed ones of the
        ``embplex`` group. Tests pass fake ones.
    :param extra_plugins: ``(name, module_or_object)`` pairs registered as well, for
        plugins defined in-process (tests, notebooks).
    """
    manager = new_plugin_manager()
    registry = Registry(plugin_manager=manager)
    allow = _split_env("EMBPLEX_PLUGINS")
    block = _split_env("EMBPLEX_DISABLE_PLUGINS") or set()
    origins: dict[str, tuple[Distribution | None, str | None]] = {}  # plugin -> (distribution, entry point)

    for ep in _entry_points() if entry_points is None else entry_points:
        dist = _distribution_of(ep)
        selector = _selector(ep.name, dist)
        names = {ep.name, selector} | ({dist.name} if dist else set())
        if allow is not None and not names & allow:
            continue
        if names & block:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            message = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"embplex plugin '{ep.name}' ({_describe(dist)}) failed to load and was "
                f"skipped: {message}. Reinstall or fix it, or disable it with "
                f"EMBPLEX_DISABLE_PLUGINS={selector}.",
                RuntimeWarning,
                stacklevel=2,
            )
            registry.failed.append(FailedPlugin(ep.name, dist, message))
            continue
        if manager.is_registered(plugin):  # the same module reached through two entry points
            continue
        plugin_name = ep.name
        if manager.get_plugin(plugin_name) is not None:
            # Two distributions may pick the same entry-point name; load both, so that a
            # clash of component names is reported instead of one plugin vanishing.
            plugin_name = selector if dist else f"{ep.name}@{ep.value}"
        manager.register(plugin, name=plugin_name)
        origins[plugin_name] = (dist, ep.name)

    for name, plugin in extra_plugins:
        manager.register(plugin, name=name)
        origins[name] = (None, None)

    manager.check_pending()

    for kind, hook_name in _HOOK_FOR_KIND.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            register = _bound_register(registry, kind, impl.plugin_name, *origins.get(impl.plugin_name, (None, None)))
            impl.function(*[register for _ in impl.argnames])
    for impl in manager.hook.register_config_paths.get_hookimpls():
        impl.function(*[registry.config_paths.append for _ in impl.argnames])
    return registry


def _bound_register(
    registry: Registry, kind: str, plugin: str, distribution: Distribution | None, entry_point: str | None
) -> Register:
    def register(name: str, factory: Callable[..., Any], *, paper: str | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"plugin '{plugin}' registered a {kind} without a name")
        registry.add(ComponentInfo(kind, name, factory, plugin, distribution, paper, entry_point))

    return register


def _selector(entry_point: str, distribution: Distribution | None) -> str:
    """``distribution:entry-point``: one plugin even when two distributions share an
    entry-point name (see :attr:`ComponentInfo.selector`)."""
    return f"{distribution.name}:{entry_point}" if distribution else entry_point


def _distribution_of(ep: importlib.metadata.EntryPoint) -> Distribution | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    return Distribution(dist.metadata["Name"], dist.version)
