"""Options checked against the signature and annotations of what they configure.

A config hands a factory plain YAML values (strings, numbers, booleans, null, lists and
mappings). Before the factory runs, every key must be one of its parameters and every
value must fit that parameter's annotation, so ``exclude_instruction=no`` (the string
``'no'``: Hydra reads only ``true`` and ``false`` as booleans) is refused instead of
being taken as true.

What is checked: ``bool``, ``int``, ``float`` (an int is fine), ``str``, ``None``,
``Literal[...]``, unions (``int | None``), ``list[...]``/``Sequence[...]``/``tuple[...]``
(a list), ``dict[...]``/``Mapping[...]`` (a mapping), enums (a member's value or name)
and classes (an instance; a path class also takes a string). A parameter without an annotation, ``Any``, an annotation
that does not resolve at run time (e.g. a name imported under ``TYPE_CHECKING``), other
``typing`` constructs, and values that are not plain config values (a ``Path`` or a
tensor passed from Python) are not checked.
"""

from __future__ import annotations

import collections.abc
import difflib
import enum
import inspect
import os
import pathlib
import sys
import types
import typing
from typing import Any, Callable, Literal, Mapping

from .errors import OptionError

UNCHECKED: Any = typing.Any
_PLAIN = (str, int, float, bool, type(None), list, dict)
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def parameter_types(factory: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """The keyword parameters of ``factory`` with their resolved annotations, and whether
    it takes ``**kwargs`` (then any key is accepted)."""
    signature = inspect.signature(factory)
    namespace = _namespace(factory)
    types_by_name: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            types_by_name[parameter.name] = _resolve(parameter.annotation, namespace)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    return types_by_name, takes_any


def _namespace(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    target = inspect.unwrap(target)
    found = getattr(target, "__globals__", None)
    if found is None:
        module = sys.modules.get(getattr(factory, "__module__", "") or "")
        found = vars(module) if module else {}
    return found


def _resolve(annotation: Any, namespace: dict[str, Any]) -> Any:
    if annotation is inspect.Parameter.empty:
        return UNCHECKED
    if isinstance(annotation, str):  # ``from __future__ import annotations``
        try:
            return eval(annotation, dict(namespace))  # noqa: S307 - the plugin's own annotation text
        except Exception:  # a name only imported for type checkers: we cannot judge it
            return UNCHECKED
    return annotation


def check_arguments(
    factory: Callable[..., Any], options: Mapping[str, Any], *, owner: str, prefix: str
) -> None:
    """Refuse a key ``factory`` does not take and a value its annotation does not allow.

    :param owner: who takes the options, for messages (``"pooling 'mean'"``).
    :param prefix: the config path of the options (``"pooling"``), so that messages name
        the key the user typed (``pooling.exclude_instruction``).
    :raises OptionError: naming the key, the value and what was expected.
    """
    accepted, takes_any = parameter_types(factory)
    for key, value in options.items():
        if key not in accepted:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise OptionError(
                f"Unknown key {prefix + '.' if prefix else ''}{key}: {owner} has no option '{key}'.{hint} "
                f"Its options are: {', '.join(accepted) or '(none)'}."
            )
        check_value(f"{prefix}.{key}" if prefix else key, value, accepted[key], owner)


def check_value(key: str, value: Any, annotation: Any, owner: str = "") -> None:
    """Raise :class:`OptionError` when ``value`` does not fit ``annotation``."""
    if fits(value, annotation):
        return
    by = f" {owner}" if owner else ""
    hint = ""
    if isinstance(value, str) and fits(True, annotation) and not fits(value, annotation):
        hint = " Write true or false (Hydra reads no other word as a boolean)."
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and fits("x", annotation):
        hint = f" Quote it to pass text: {key}=\"'{value}'\"."
    raise OptionError(
        f"{key}={_written(value)} is {_what(value)}, but{by} expects {describe(annotation)} there.{hint}"
    )


def _written(value: Any) -> str:
    """A value as it is written in a config (``true``, ``null``, ``'no'``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


def fits(value: Any, annotation: Any) -> bool:
    """Whether a plain config value may fill a parameter annotated ``annotation``."""
    if annotation is UNCHECKED or annotation is inspect.Parameter.empty:
        return True
    if not isinstance(value, _PLAIN):
        return True  # a Python object handed in from code: the factory's business
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(fits(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if annotation is None or annotation is type(None):
        return value is None
    if origin in _SEQUENCES:
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        item = args[0] if args else UNCHECKED
        return all(fits(v, item) for v in value)
    if origin in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        key_type, value_type = args if len(args) == 2 else (UNCHECKED, UNCHECKED)
        return all(fits(k, key_type) and fits(v, value_type) for k, v in value.items())
    if annotation in _SEQUENCES:
        return isinstance(value, list)
    if annotation in _MAPPINGS:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum) and not isinstance(value, (list, dict)):
            return any(value == member.value or value == member.name for member in annotation)
        if isinstance(value, bool) and annotation is not bool and issubclass(annotation, (int, float)):
            return False
        if isinstance(value, str) and issubclass(annotation, (os.PathLike, pathlib.PurePath)):
            return True
        return isinstance(value, annotation)
    return True  # TypeVar, Callable, Protocol generics and the like: not judged here


def describe(annotation: Any) -> str:
    """``annotation`` in words, as a config author writes the value."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if annotation is None or annotation is type(None):
        return "null"
    if origin in _SEQUENCES or annotation in _SEQUENCES:
        return f"a list of {describe(args[0])}" if args and args[0] is not UNCHECKED else "a list"
    if origin in _MAPPINGS or annotation in _MAPPINGS:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    words = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    if annotation in words:
        return words[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _what(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "text"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if value is None:
        return "null"
    return "a list" if isinstance(value, list) else "a mapping"
