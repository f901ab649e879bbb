"""embplex: a plugin-based framework for text-embedding models.

The public API::

    import embplex
    model = embplex.compose(backbone={"name": "hf_encoder", "path": "all-MiniLM-L6-v2"})
    vectors = model.encode(["a sentence"])
    model.save("my-model"); model = embplex.load("my-model")

Plugins mark their hook implementations with :data:`embplex.hookimpl`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import storage
from .components import (
    Attention,
    Backbone,
    Component,
    Example,
    Features,
    Index,
    Loss,
    Pooling,
    Sampler,
    SearchResult,
    SentenceTransformersModule,
    TrainingBatch,
    TrainingContext,
)
from .errors import EmbplexError
from .model import EmbeddingModel, sentence_transformers_pooling
from .registry import KINDS, Registry, hookimpl, load_registry

try:
    __version__ = version("embplex")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

compose = EmbeddingModel.compose
load = EmbeddingModel.load

__all__ = [
    "KINDS",
    "Attention",
    "Backbone",
    "Component",
    "EmbeddingModel",
    "EmbplexError",
    "Example",
    "Features",
    "Index",
    "Loss",
    "Pooling",
    "Registry",
    "Sampler",
    "SearchResult",
    "SentenceTransformersModule",
    "TrainingBatch",
    "TrainingContext",
    "compose",
    "hookimpl",
    "load",
    "load_registry",
    "sentence_transformers_pooling",
    "storage",
]
