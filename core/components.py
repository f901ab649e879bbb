"""The contracts between the six component kinds.

Data flows backbone -> attention -> pooling -> embedding (see ``docs/concepts.md``):

* :class:`Features` is the one batch structure passed along that path. The backbone's
  ``tokenize`` fills the token fields, its ``forward`` adds every layer's hidden states,
  and pooling reads whatever it needs from it.
* An :class:`Attention` decides who may attend to whom (``mask``) and may rewrite the
  attention scores or probabilities (``scores`` / ``probs``); the backbone calls it
  inside every self-attention layer.
* A :class:`Loss` receives the model and a :class:`TrainingBatch`; it asks the model for
  the embeddings it needs (several layers in one forward pass) and returns a scalar.
* A :class:`Sampler` turns a list of examples into batches of indices; it is handed a
  :class:`TrainingContext` with the current model and an index factory.
* An :class:`Index` stores single vectors or sets of vectors per item, searches, deletes,
  saves and loads.

Every component class is a plain ``torch.nn.Module`` (or a plain object, for samplers and
indexes) constructed from keyword options: the options in its config file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .model import EmbeddingModel

__all__ = [
    "Attention",
    "Backbone",
    "Component",
    "Example",
    "Features",
    "Index",
    "Loss",
    "Pooling",
    "SearchResult",
    "Sampler",
    "SentenceTransformersModule",
    "TrainingBatch",
    "TrainingContext",
]


# ---------------------------------------------------------------------------
# The batch structure that flows backbone -> attention -> pooling
# ---------------------------------------------------------------------------


@dataclass
class Features:
    """One tokenized batch and, after the backbone ran, its hidden states.

    :param input_ids: ``[batch, tokens]`` token ids, padded on ``padding_side``.
    :param attention_mask: ``[batch, tokens]``; 1 for real tokens, 0 for padding.
    :param instruction_mask: ``[batch, tokens]``; 1 for tokens of the instruction or
        prompt that was prepended to the text. Pooling may leave them out (NV-Embed).
    :param padding_side: ``"right"`` or ``"left"``.
    :param hidden_states: filled by the backbone: the embedding output followed by every
        layer's output, each ``[batch, tokens, hidden]`` (so ``hidden_states[k]`` is the
        output of layer ``k``, as in transformers).
    :param layer: the layer pooling should read; ``None`` means the last one computed.
    :param extra: free space for plugins (e.g. a domain label for routing).
    """

    input_ids: Tensor
    attention_mask: Tensor
    instruction_mask: Tensor | None = None
    padding_side: str = "right"
    hidden_states: tuple[Tensor, ...] | None = None
    layer: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Features":
        moved = {
            f.name: (v.to(device) if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return Features(**moved)

    @property
    def token_mask(self) -> Tensor:
        """Tokens pooling should read: real tokens that are not instruction tokens."""
        mask = self.attention_mask.bool()
        if self.instruction_mask is not None:
            mask = mask & ~self.instruction_mask.bool()
        return mask

    def pooling_mask(self, exclude_instruction: bool) -> Tensor:
        """The tokens a pooling reads: real tokens, without the instruction tokens when
        ``exclude_instruction`` is on. A row left with no token (the text was truncated
        away behind its prompt) falls back to all its real tokens."""
        real = self.attention_mask.bool()
        if not exclude_instruction:
            return real
        mask = self.token_mask
        return torch.where(mask.any(dim=1, keepdim=True), mask, real)

    def at_layer(self, layer: int | None) -> "Features":
        """The same batch with pooling pointed at another layer (elastic depth)."""
        return dataclasses.replace(self, layer=layer)

    @property
    def last_hidden_state(self) -> Tensor:
        """The hidden states at ``layer`` (or the last computed layer)."""
        if self.hidden_states is None:
            raise RuntimeError("the backbone has not run on these features yet")
        index = -1 if self.layer is None else self.layer
        return self.hidden_states[index]


# ---------------------------------------------------------------------------
# Base class shared by all trainable components
# ---------------------------------------------------------------------------


class Component(nn.Module):
    """A model part with weights that can be saved and restored.

    The default ``save`` writes the module's state dict as safetensors (nothing when it
    has none) and ``from_saved`` rebuilds it from its options then loads those weights.
    """

    weights_file: ClassVar[str] = "model.safetensors"

    def save(self, directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if not state:
            return
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / self.weights_file))

    @classmethod
    def from_saved(cls, directory: Path, options: dict[str, Any]) -> "Component":
        component = cls(**options)
        weights = directory / cls.weights_file
        if weights.exists():
            from .storage import load_safetensors

            component.load_state_dict(load_safetensors(weights), strict=True)
        return component

    def sentence_transformers_export(self, hidden_size: int) -> "SentenceTransformersModule | None":
        """This part as a sentence-transformers module, or ``None`` (the default) when no
        ``sentence_transformers.*`` module computes exactly what it computes.

        Return a module only when sentence-transformers, given the saved files, gives the
        same vectors as this part (within 1e-5) for every text encoded without a prompt.
        ``hidden_size`` is the backbone's width. When every part of a model exports, the
        saved folder loads in plain sentence-transformers; when one returns ``None`` it
        loads there only through :mod:`embplex.integrations.sentence_transformers`
        (see docs/concepts.md, "Saved models and sentence-transformers")."""
        return None


@dataclass
class SentenceTransformersModule:
    """One module of sentence-transformers' saved layout (an entry of ``modules.json``).

    :param type: the sentence-transformers class, e.g.
        ``"sentence_transformers.models.Pooling"``. Only classes of the
        ``sentence_transformers`` package: sentence-transformers refuses any other without
        ``trust_remote_code=True``.
    :param config: written as JSON to ``config_file`` in the module's folder.
    :param config_file: the file sentence-transformers reads the module's settings from;
        ``None`` for a module without settings.
    :param in_root: the module lives at the model folder's root (the transformer does;
        the other modules get a folder ``<index>_<class name>``).
    """

    type: str
    config: dict[str, Any] = field(default_factory=dict)
    config_file: str | None = "config.json"
    in_root: bool = False


# ---------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------


class Backbone(Component):
    """Turns tokens into every layer's hidden states.

    Subclasses set ``hidden_size``, ``num_layers`` and ``max_length`` and implement
    ``tokenize`` and ``forward``. A backbone saves itself at the root of the model
    directory (that is where sentence-transformers looks for the transformer).
    """

    hidden_size: int
    num_layers: int
    max_length: int

    def tokenize(
        self, texts: Sequence[str], prompt: str | None = None, truncate: bool = True
    ) -> Features:
        """Tokenize ``texts`` (each prefixed by ``prompt`` when given, with the prompt's
        tokens flagged in ``instruction_mask``)."""
        raise NotImplementedError

    def forward(
        self,
        features: Features,
        attention: "Attention | None" = None,
        num_layers: int | None = None,
    ) -> Features:
        """Run the network and return ``features`` with ``hidden_states`` filled.

        :param attention: the attention policy to apply inside every self-attention
            layer; ``None`` keeps the network's own behaviour.
        :param num_layers: stop after this many layers (elastic depth); ``None`` runs all.
        """
        raise NotImplementedError


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------


class Attention(Component):
    """How tokens see each other inside the backbone.

    Three overridable steps, each called by the backbone for every self-attention layer:

    * ``mask(padding_mask)`` -> boolean ``[batch, 1, q, k]``; True where a query may
      attend to a key. The default is bidirectional over real tokens (``causal=False``)
      or causal (``causal=True``); every token may always see itself, so left-padded
      rows stay finite.
    * ``scores(scores, layer)`` rewrites pre-softmax scores ``[batch, heads, q, k]``.
    * ``probs(probs, layer)`` rewrites post-softmax probabilities.

    When neither ``scores`` nor ``probs`` is overridden the backbone uses a fused kernel
    (``scaled_dot_product_attention``); otherwise it computes attention explicitly.
    """

    causal: bool = False

    def mask(self, padding_mask: Tensor) -> Tensor:
        keys = padding_mask.bool()[:, None, None, :]
        length = padding_mask.shape[-1]
        allowed = keys.expand(-1, 1, length, length)
        if self.causal:
            allowed = allowed & torch.ones(
                length, length, dtype=torch.bool, device=padding_mask.device
            ).tril()
        eye = torch.eye(length, dtype=torch.bool, device=padding_mask.device)
        return allowed | eye

    def scores(self, scores: Tensor, layer: int) -> Tensor:
        return scores

    def probs(self, probs: Tensor, layer: int) -> Tensor:
        return probs

    @property
    def rewrites_scores(self) -> bool:
        cls = type(self)
        return cls.scores is not Attention.scores or cls.probs is not Attention.probs

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor,
        scaling: float,
        layer: int,
        dropout: float = 0.0,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention for one layer. ``query`` is ``[batch, heads, q, dim]``; ``key`` and
        ``value`` may have fewer heads (grouped-query attention). Returns the output as
        ``[batch, q, heads, dim]`` and the probabilities when they were computed."""
        if key.shape[1] != query.shape[1]:
            repeat = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(repeat, dim=1)
            value = value.repeat_interleave(repeat, dim=1)
        if not self.rewrites_scores:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
            )
            return out.transpose(1, 2).contiguous(), None
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        scores = self.scores(scores, layer)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        probs = self.probs(probs, layer)
        if dropout and self.training:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out = torch.matmul(probs, value)
        return out.transpose(1, 2).contiguous(), probs


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------


class Pooling(Component):
    """Hidden states to one vector per text (``[batch, dim]``), or to a set of vectors
    per text (``[batch, tokens, dim]`` plus ``vector_mask``) for late interaction.

    Reads ``features.last_hidden_state`` (the layer chosen by ``features.layer``) or any
    of ``features.hidden_states``, and ``features.token_mask`` to leave out padding and,
    when ``exclude_instruction`` is on, instruction tokens. ``output_dim(hidden)`` says
    how wide the result is for a backbone of width ``hidden``.
    """

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size

    def forward(self, features: Features) -> Tensor:
        raise NotImplementedError

    def vector_mask(self, features: Features) -> Tensor:
        """For multi-vector poolings (``forward`` returns ``[batch, tokens, dim]``): which
        of the vectors belong to each text. Default: the real tokens."""
        return features.attention_mask.bool()


# ---------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------


@dataclass
class Example:
    """One training example. ``anchor`` and ``positive`` are texts; ``negatives`` are
    hard negatives; ``scores`` optional teacher scores for positive then negatives;
    ``task`` names the dataset or task it came from; ``prompt`` an instruction."""

    anchor: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    task: str | None = None
    prompt: str | None = None


@dataclass
class TrainingBatch:
    """A batch of examples, tokenized per role.

    :param anchors: features of the anchors (queries).
    :param positives: features of the positives, aligned with anchors.
    :param negatives: features of all hard negatives, ``negatives_per_anchor`` per anchor
        in anchor order (empty when the data has none).
    :param scores: ``[batch, 1 + negatives_per_anchor]`` teacher scores, when present.
    """

    examples: list[Example]
    anchors: Features
    positives: Features
    negatives: Features | None = None
    negatives_per_anchor: int = 0
    scores: Tensor | None = None

    def roles(self) -> dict[str, Features]:
        roles = {"anchors": self.anchors, "positives": self.positives}
        if self.negatives is not None:
            roles["negatives"] = self.negatives
        return roles


class Loss(Component):
    """What training optimises.

    ``forward(model, batch)`` returns a scalar. The default asks the model for each role's
    final embeddings and hands them to ``compute``; a loss that wraps another one (e.g.
    Matryoshka around InfoNCE) calls ``model.embed_roles(batch, layers=[...])`` once and
    feeds the inner loss's ``compute`` with slices of the result.
    """

    def forward(self, model: "EmbeddingModel", batch: TrainingBatch) -> Tensor:
        embeddings = model.embed_roles(batch)
        return self.compute({role: by_layer[None] for role, by_layer in embeddings.items()}, batch)

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        """Loss from embeddings per role (``anchors``, ``positives``, ``negatives``)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------


@dataclass
class TrainingContext:
    """What a sampler may use during training.

    :param model: the model being trained (its current weights).
    :param make_index: builds an empty index of the configured kind for a dimension.
    :param step: the optimizer step about to run.
    """

    model: "EmbeddingModel | None" = None
    make_index: Callable[[int], "Index"] | None = None
    step: int = 0


class Sampler:
    """Which examples share a batch.

    ``batches`` must be a pure function of ``(examples, batch_size, seed, epoch)`` plus
    whatever it reads from ``context`` — that is what makes resuming a run exact.
    """

    def batches(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        epoch: int,
        context: TrainingContext,
    ) -> Iterator[list[int]]:
        raise NotImplementedError

    @staticmethod
    def permutation(count: int, seed: int, epoch: int) -> list[int]:
        """A shuffled ``range(count)`` that depends only on ``seed`` and ``epoch``."""
        return np.random.default_rng([seed, epoch]).permutation(count).tolist()

    def num_batches(self, examples: Sequence[Example], batch_size: int) -> int:
        """An estimate for progress bars and schedules."""
        return math.ceil(len(examples) / batch_size)


# ---------------------------------------------------------------------------
# index
# ---------------------------------------------------------------------------


@dataclass
class SearchResult:
    """``ids[q]`` and ``scores[q]`` are the top hits of query ``q``, best first."""

    ids: list[list[str]]
    scores: np.ndarray


class Index:
    """Vectors to search.

    ``add(ids, vectors)`` takes ``[n, dim]`` (single vector per item) or a list of
    ``[tokens_i, dim]`` arrays (a set of vectors per item, for multi-vector indexes).
    ``search(queries, k)`` returns a :class:`SearchResult`. ``delete(ids)`` removes items.
    ``save(path)`` writes atomically; ``load(path)`` is a classmethod.
    Wrong dimensions raise :class:`~embplex.errors.DimensionError`.
    """

    dim: int

    def add(self, ids: Sequence[str], vectors: np.ndarray | Sequence[np.ndarray]) -> None:
        raise NotImplementedError

    def search(self, queries: np.ndarray | Sequence[np.ndarray], k: int) -> SearchResult:
        raise NotImplementedError

    def delete(self, ids: Sequence[str]) -> None:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | Path) -> "Index":
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError
