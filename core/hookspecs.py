"""Hook specifications: how plugins add components to embplex.

Each hook receives a ``register`` callable bound to the calling plugin, so every component
knows which plugin and distribution it came from. Call it once per component::

    register(name, factory, paper="Title (year), arXiv:XXXX.XXXXX")

``factory`` is a class deriving from the kind's base class in :mod:`embplex.components`;
it is constructed with the options from the component's config file. An implementation
may take fewer arguments than its spec (pluggy's rule), so specs can grow later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .registry import Register, RegisterPath

hookspec = pluggy.HookspecMarker("embplex")


# ---------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------


@hookspec
def register_backbones(register: "Register") -> None:
    """Register backbones: networks that turn tokens into every layer's hidden states.

    :param register: call ``register(name, factory, paper=...)`` for each backbone;
        ``factory`` subclasses :class:`embplex.components.Backbone`.

    Called once per plugin when the registry is built; the return value is ignored.
    """


@hookspec
def register_attentions(register: "Register") -> None:
    """Register attention policies: masks and score rewrites applied inside a backbone.

    :param register: call ``register(name, factory, paper=...)`` for each policy;
        ``factory`` subclasses :class:`embplex.components.Attention`.

    Called once per plugin when the registry is built; the return value is ignored.
    """


@hookspec
def register_poolings(register: "Register") -> None:
    """Register poolings: hidden states to one vector (or a set of vectors) per text.

    :param register: call ``register(name, factory, paper=...)`` for each pooling;
        ``factory`` subclasses :class:`embplex.components.Pooling`.

    Called once per plugin when the registry is built; the return value is ignored.
    """


@hookspec
def register_losses(register: "Register") -> None:
    """Register training losses.

    :param register: call ``register(name, factory, paper=...)`` for each loss;
        ``factory`` subclasses :class:`embplex.components.Loss`.

    Called once per plugin when the registry is built; the return value is ignored.
    """


@hookspec
def register_samplers(register: "Register") -> None:
    """Register batch samplers: which training examples share a batch.

    :param register: call ``register(name, factory, paper=...)`` for each sampler;
        ``factory`` subclasses :class:`embplex.components.Sampler`.

    Called once per plugin when the registry is built; the return value is ignored.
    """


@hookspec
def register_indexes(register: "Register") -> None:
    """Register vector indexes: store, search, delete, save and load embeddings.

    :param register: call ``register(name, factory, paper=...)`` for each index;
        ``factory`` subclasses :class:`embplex.components.Index`.

    Called once per plugin when the registry is built; the return value is ignored.
    """


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@hookspec
def register_config_paths(register: "RegisterPath") -> None:
    """Register folders of Hydra config files shipped by a plugin package.

    :param register: call ``register(path)`` with a ``pkg://package.module`` or
        ``file://`` search path whose ``<kind>/<name>.yaml`` files become options of
        the config groups (``pooling=<name>`` on the command line).

    Called once per plugin when the registry is built; the paths are searched by
    :func:`embplex.config.compose_config` (and so by the CLI).
    """
