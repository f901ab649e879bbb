"""Test helpers for plugin authors (and for embplex's own plugins).

Load it as a pytest plugin in your package's ``conftest.py``::

    pytest_plugins = ["embplex.testing"]

and your tests get the fixtures below; or import what you need from it directly. It
holds:

* :func:`isolated_registry`: a registry with only the plugin under test, plus the
  installed plugins it needs (a backbone, say), so nothing else installed interferes.
* :func:`tiny_features`, :func:`tiny_examples` and :func:`make_training_batch`: hand-made
  batches, with no model, or tokenized per role by a backbone.
* :func:`build_encoder` / :func:`build_decoder`: tiny random models (a BERT and every
  decoder family ``hf_decoder`` supports) built offline in well under a second.
* :class:`IndexContract`, :class:`PoolingContract`, :class:`LossContract`: the contract of
  each kind as a test class to subclass (see ``embplex.testing.conformance``).

Fixtures (with ``pytest_plugins = ["embplex.testing"]``): ``embplex_registry`` (a function
building an isolated registry), ``tiny_encoder_path``, ``tiny_decoder_paths`` (family ->
folder) and ``tiny_encoder`` (``hf_encoder`` + ``mean`` on the tiny BERT).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from types import ModuleType
from typing import Iterable, Sequence

import pytest
import torch

# Before the import, so that failed checks in the suites show the values compared.
pytest.register_assert_rewrite("embplex.testing.conformance")

from ..components import Example, Features  # noqa: E402
from ..registry import ENTRY_POINT_GROUP, Registry, load_registry  # noqa: E402
from ..training import make_training_batch  # noqa: E402
from .conformance import IndexContract, LossContract, PoolingContract  # noqa: E402
from .models import FAMILIES, WORDS, build_decoder, build_encoder, build_tokenizer  # noqa: E402

__all__ = [
    "FAMILIES",
    "IndexContract",
    "LossContract",
    "PoolingContract",
    "build_decoder",
    "build_encoder",
    "build_tokenizer",
    "isolated_registry",
    "make_training_batch",
    "tiny_examples",
    "tiny_features",
]


def isolated_registry(*plugins: ModuleType | object, include: Iterable[str] = ()) -> Registry:
    """A registry holding only ``plugins`` (modules or objects with hook implementations,
    registered in-process: no install needed) and the installed plugins named in
    ``include``, by entry-point name (``"backbone.hf_encoder"``) or distribution name.

    :raises LookupError: a name in ``include`` matches no installed entry point.
    """
    wanted = set(include)
    installed = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    chosen = [
        ep
        for ep in installed
        if ep.name in wanted or (getattr(ep, "dist", None) is not None and ep.dist.metadata["Name"] in wanted)
    ]
    found = {ep.name for ep in chosen} | {ep.dist.metadata["Name"] for ep in chosen if ep.dist is not None}
    missing = sorted(wanted - found)
    if missing:
        names = ", ".join(sorted(ep.name for ep in installed))
        raise LookupError(f"no installed embplex plugin named {missing}; installed entry points: {names}.")
    extra = [(getattr(plugin, "__name__", None) or f"plugin-{i}", plugin) for i, plugin in enumerate(plugins)]
    return load_registry(entry_points=chosen, extra_plugins=extra)


def tiny_features(
    lengths: Sequence[int] = (5, 2, 4),
    hidden: int = 8,
    padding_side: str = "right",
    prompt_tokens: int = 0,
    layers: int = 1,
    padding_value: float = 1e4,
    seed: int = 0,
) -> Features:
    """A batch of ``len(lengths)`` texts of those token counts, with random hidden states
    as if the backbone had run (``layers`` + 1 states: the embeddings, then each layer).

    Padding positions hold ``padding_value`` (large, so that a pooling reading padding
    shows it), on ``padding_side``. The first ``prompt_tokens`` real tokens of each text
    are flagged in ``instruction_mask``. Token ids are the positions + 1 (0 is padding).
    """
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive token counts, got {list(lengths)}")
    generator = torch.Generator().manual_seed(seed)
    width, batch = max(lengths), len(lengths)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        start = width - length if padding_side == "left" else 0
        mask[row, start : start + length] = 1
    instruction = torch.zeros_like(mask)
    for row in range(batch):
        real = mask[row].nonzero().flatten()
        instruction[row, real[:prompt_tokens]] = 1
    states = []
    for _ in range(layers + 1):
        state = torch.randn(batch, width, hidden, generator=generator)
        states.append(torch.where(mask.bool()[..., None], state, torch.full_like(state, padding_value)))
    input_ids = (torch.arange(width) + 1).expand(batch, width) * mask
    return Features(
        input_ids=input_ids,
        attention_mask=mask,
        instruction_mask=instruction,
        padding_side=padding_side,
        hidden_states=tuple(states),
    )


def tiny_examples(
    count: int = 4, negatives: int = 0, scores: bool = False, prompt: str | None = None
) -> list[Example]:
    """``count`` distinct training examples made of :data:`WORDS`, each with
    ``negatives`` hard negatives and, when ``scores``, teacher scores for the positive
    then each negative (falling from 1.0)."""
    examples = []
    for i in range(count):
        def text(offset: int) -> str:
            start = (i * 7 + offset * 3) % len(WORDS)
            return " ".join((WORDS * 2)[start : start + 4 + (i + offset) % 3])

        examples.append(
            Example(
                anchor=text(0),
                positive=text(1),
                negatives=[text(2 + n) for n in range(negatives)],
                scores=[1.0 - 0.1 * n for n in range(1 + negatives)] if scores else None,
                task="tiny",
                prompt=prompt,
            )
        )
    return examples


# ---------------------------------------------------------------------------
# pytest fixtures (active with pytest_plugins = ["embplex.testing"])
# ---------------------------------------------------------------------------


@pytest.fixture
def embplex_registry():
    """:func:`isolated_registry`, as a fixture: ``embplex_registry(my_plugin, include=[...])``."""
    return isolated_registry


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory) -> str:
    """A tiny random BERT saved once per session (see :func:`build_encoder`)."""
    return build_encoder(tmp_path_factory.mktemp("embplex-tiny-encoder"))


@pytest.fixture(scope="session")
def tiny_decoder_paths(tmp_path_factory) -> dict[str, str]:
    """A tiny random decoder of every family in :data:`FAMILIES`, by family name."""
    root: Path = tmp_path_factory.mktemp("embplex-tiny-decoders")
    return {family: build_decoder(family, root / family) for family in FAMILIES}


@pytest.fixture
def tiny_encoder(tiny_encoder_path):
    """``hf_encoder`` with ``mean`` pooling on the tiny BERT (the installed plugins)."""
    from ..model import EmbeddingModel

    registry = isolated_registry(include=["backbone.hf_encoder", "pooling.mean"])
    return EmbeddingModel.compose(
        {"name": "hf_encoder", "path": tiny_encoder_path}, pooling="mean", registry=registry
    )
