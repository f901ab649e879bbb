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
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .errors import OptionError

if TYPE_CHECKING:
    from .model import EmbeddingModel

__all__ = [
    "Attention",
    "AttentionChain",
    "Backbone",
    "Component",
    "Example",
    "Features",
    "Index",
    "Loss",
    "Pooling",
    "Positions",
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
    :param extra: free space for plugins.
    :param domain: one domain label per text (a name or an index), or ``None``: the
        ``task`` of each training example (``make_training_batch``), or
        ``encode(..., domain=)`` at inference. A backbone that routes by domain
        (``domain_moe``) reads it; the others ignore it.
    """

    input_ids: Tensor
    attention_mask: Tensor
    instruction_mask: Tensor | None = None
    padding_side: str = "right"
    hidden_states: tuple[Tensor, ...] | None = None
    layer: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    domain: list[str | int | None] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Features":
        """The features on ``device``, hidden states and tensors in ``extra`` included.
        ``non_blocking`` overlaps the copy to a GPU with work already queued there (the
        tensors are pinned first, which that needs)."""
        device = torch.device(device)
        pin = non_blocking and device.type == "cuda"

        def move(value: Any) -> Any:
            if isinstance(value, Tensor):
                source = value.pin_memory() if pin and value.device.type == "cpu" else value
                return source.to(device, non_blocking=non_blocking)
            if isinstance(value, tuple):
                return tuple(move(item) for item in value)
            if isinstance(value, dict):
                return {key: move(item) for key, item in value.items()}
            return value

        return Features(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

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
    ``tokenize`` and ``forward``. ``causal`` says whether the network's own attention is
    causal (decoder LLMs); an attention policy keeps that unless it declares otherwise.
    ``takes_domain`` says whether ``forward`` reads ``Features.domain`` (routes by
    domain); ``encode(..., domain=)`` is refused for a backbone that does not, since the
    label would change nothing.
    A backbone saves itself at the root of the model directory (that is where
    sentence-transformers looks for the transformer).

    Layers count from 1: layer ``k`` is the ``k``-th transformer block and its output is
    ``hidden_states[k]`` (``hidden_states[0]`` is the embedding output, not a layer).
    """

    hidden_size: int
    num_layers: int
    max_length: int
    causal: bool = False
    takes_domain: bool = False

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
            layer; ``None`` keeps the network's own behaviour. The backbone binds it
            (``attention.bind(self.num_layers, self.causal)``), masks every layer with
            ``attention.effective_mask(features.attention_mask)`` and calls
            ``attention.attend`` with layers numbered 1..``num_layers``.
        :param num_layers: stop after this many layers (elastic depth, 1..``num_layers``);
            ``None`` runs all.
        """
        raise NotImplementedError


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------


@dataclass
class Positions:
    """The positions a backbone gives its tokens in one forward pass, for attention
    policies that reason about distances (:meth:`Attention.feed_positions`).

    :param ids: ``[batch, length]`` position ids, counted over each text's real tokens.
    :param kind: ``"absolute"`` (looked up in a position table: the ids fed *are* what the
        model sees), ``"rotary"`` (queries and keys are rotated by their positions before
        attention; ``rotate`` is set) or ``"other"`` (a scheme embplex cannot act on).
    :param rotate: for ``"rotary"``, ``rotate(x, positions)``: ``x`` ``[..., head_dim]``
        rotated by ``positions`` (broadcast to ``x.shape[:-1]``, any integers, negative
        ones undo a rotation) exactly as the model rotates its queries and keys.
    """

    ids: Tensor
    kind: str = "other"
    rotate: Callable[[Tensor, Tensor], Tensor] | None = None


class Attention(Component):
    """How tokens see each other inside the backbone.

    Layers count 1..depth, as everywhere in embplex: ``layer`` is ``k`` in the ``k``-th
    transformer block, whose output ``encode(layer=k)`` pools. A policy composes with the
    backbone's own mask; it never replaces it:

    * Padding keys are never seen (each token always sees itself, so left-padded rows
      stay finite), and a causal backbone (``Backbone.causal``, decoder LLMs) stays causal
      unless the policy declares ``causal``: ``None`` (the default) keeps the backbone's
      causality, ``True`` makes every layer causal, ``False`` bidirectional.
    * ``mask(padding_mask)`` -> boolean ``[batch, 1, q, k]``, True where a query may
      attend to a key. A policy may narrow it (a window, global tokens); the backbone uses
      ``effective_mask``: what ``mask`` allows *and* the backbone's own mask allows.
    * ``scores(scores, layer)`` rewrites the scaled pre-softmax scores
      ``[batch, heads, q, k]`` (``heads`` = query heads, ``q`` = ``k`` = the batch's token
      width, dtype of the model's activations). It sees every pair, masked ones included:
      it runs *before* the mask, and masked pairs are set to the dtype's minimum after it.
    * ``score_scale(layer)`` -> ``[batch, 1, 1, 1]`` or ``None`` (the default): a factor
      per text by which the layer's scaled scores are multiplied, before ``scores`` (in a
      list, in list order among the members' ``scores``). Unlike ``scores`` it keeps the
      fused kernel: when nothing else rewrites the layer, the queries are multiplied by it,
      which multiplies every score ``q·k`` of the text by the same factor.
    * ``probs(probs, layer)`` rewrites the probabilities (same shape and dtype; masked
      keys are 0). Masked keys are set back to 0 after it.
    * ``attend(query, key, value, mask, scaling, layer, dropout)`` is the whole
      computation; a policy overriding it must apply ``mask`` itself.
    * ``feed_positions(positions)`` -> ``[batch, length]``: the position ids the backbone
      feeds its model, asked once per forward pass before the model runs, with the
      :class:`Positions` it would use (default: unchanged). A policy may keep
      ``positions`` for its attention in that pass (rotary distances), or change what an
      absolute-position model sees.
    * ``qk_scores(query, key, scaling, layer)``: the scaled pre-softmax scores from the
      layer's queries and keys (already rotated in a rotary model; as many key heads as
      query heads), before ``scores``; default ``query @ keyᵀ · scaling``.
    * ``layers``: the layers whose attention the policy rewrites (``qk_scores``,
      ``scores``, ``probs``, ``attend``); ``None`` is every layer. Other layers run plain attention under
      ``effective_mask``. A policy with a ``layers`` option stores it here; ``bind``
      refuses a layer the backbone does not have.

    When none of ``qk_scores``, ``scores``, ``probs`` or ``probs_with_values`` is
    overridden the backbone uses a fused kernel (``scaled_dot_product_attention``, with
    ``score_scale`` folded into the queries); otherwise it computes attention explicitly.
    """

    causal: bool | None = None
    layers: Sequence[int] | None = None
    depth: int | None = None
    backbone_causal: bool | None = None

    def bind(self, depth: int, causal: bool) -> None:
        """Learn the backbone's depth and whether its own attention is causal. The model
        calls it when composed or loaded, and the backbone before every forward pass;
        a policy may override it to check more options (call ``super().bind``)."""
        self.depth, self.backbone_causal = depth, bool(causal)
        if self.layers is None:
            return
        layers = list(self.layers)
        if not layers:
            raise OptionError(
                f"attention option layers=[] selects no layer; set layers=null to rewrite every "
                f"layer, or name layers between 1 and {depth}."
            )
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 1 <= layer <= depth:
                raise OptionError(
                    f"attention option layers={layers} names layer {layer!r}, but the backbone has "
                    f"{depth} layers, numbered 1 (the first transformer block) to {depth}."
                )

    @property
    def is_causal(self) -> bool:
        """Whether every layer masks future tokens: ``causal`` when the policy sets it,
        else the backbone's own attention (known once bound)."""
        if self.causal is not None:
            return bool(self.causal)
        if self.backbone_causal is None:
            raise RuntimeError(
                f"{type(self).__name__} keeps the backbone's causality but is not bound to a "
                "backbone; call bind(depth, causal) first (EmbeddingModel and the backbone do)."
            )
        return self.backbone_causal

    def applies_to(self, layer: int) -> bool:
        """Whether the policy rewrites the attention of ``layer`` (1..depth)."""
        return self.layers is None or layer in self.layers

    def mask(self, padding_mask: Tensor) -> Tensor:
        """The backbone's own mask under this policy's causality (see ``is_causal``)."""
        keys = padding_mask.bool()[:, None, None, :]
        length = padding_mask.shape[-1]
        allowed = keys.expand(-1, 1, length, length)
        if self.is_causal:
            allowed = allowed & torch.ones(
                length, length, dtype=torch.bool, device=padding_mask.device
            ).tril()
        eye = torch.eye(length, dtype=torch.bool, device=padding_mask.device)
        return allowed | eye

    def effective_mask(self, padding_mask: Tensor) -> Tensor:
        """The mask every layer uses: what ``mask`` allows within the backbone's own mask."""
        own = Attention.mask(self, padding_mask)
        if type(self).mask is Attention.mask:
            return own
        return self.mask(padding_mask) & own

    def feed_positions(self, positions: Positions) -> Tensor:
        return positions.ids

    def qk_scores(self, query: Tensor, key: Tensor, scaling: float, layer: int) -> Tensor:
        # the scaling on the queries (head_dim wide), not on the [q, k] product: one pass less
        return torch.matmul(query * scaling, key.transpose(-1, -2))

    def score_scale(self, layer: int) -> Tensor | None:
        return None

    def scores(self, scores: Tensor, layer: int) -> Tensor:
        return scores

    def probs(self, probs: Tensor, layer: int) -> Tensor:
        return probs

    def _explicit_hooks(self, layer: int) -> frozenset[str]:
        """Which steps of the explicit computation this policy rewrites on ``layer``, so
        that the others (each a pass over ``[batch, heads, q, k]``) are skipped."""
        cls = type(self)
        hooks = {n for n in ("scores", "probs", "probs_with_values") if getattr(cls, n) is not getattr(Attention, n)}
        if cls.score_scale is not Attention.score_scale:
            hooks.add("score_scale")
        return frozenset(hooks)

    def probs_with_values(self, probs: Tensor, value: Tensor, layer: int) -> Tensor:
        """Rewrite the probabilities knowing the values (``[batch, heads, k, head_dim]``,
        repeated to the query heads): runs after ``probs``, masked keys 0 before and
        after it. For policies that weigh keys by their values (attention sinks)."""
        return probs

    @property
    def computes_qk_scores(self) -> bool:
        """Whether this policy computes the scores from queries and keys itself
        (overrides ``qk_scores``); a policy whose override is off for its options says
        False here, so its layers keep the fused kernel."""
        return type(self).qk_scores is not Attention.qk_scores

    @property
    def rewrites_scores(self) -> bool:
        cls = type(self)
        return (
            self.computes_qk_scores
            or cls.scores is not Attention.scores
            or cls.probs is not Attention.probs
            or cls.probs_with_values is not Attention.probs_with_values
        )

    @property
    def rewrites_attention(self) -> bool:
        """Whether the policy changes any layer's attention beyond the mask."""
        cls = type(self)
        return (
            self.rewrites_scores
            or cls.score_scale is not Attention.score_scale
            or cls.attend is not Attention.attend
        )

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
        if not self.rewrites_scores:
            return fused_attention(_scaled_query(query, self.score_scale(layer)), key, value, mask, scaling, dropout), None
        key, value = _repeat_heads(query, key, value)
        hooks = self._explicit_hooks(layer)
        # Without autograd, the tensors this method made itself (not returned by a policy
        # hook, which may keep them) are rewritten in place: at 4096 tokens each is
        # batch × heads × 64 MiB, and allocating a fresh one per step dominated the time.
        in_place = not torch.is_grad_enabled()
        scale = self.score_scale(layer)
        if scale is not None and not self.computes_qk_scores:  # query @ keyᵀ is linear in the query
            query, scale = _scaled_query(query, scale), None
        scores = self.qk_scores(query, key, scaling, layer)
        own = in_place and not self.computes_qk_scores
        if scale is not None:
            scale = scale.to(device=scores.device, dtype=scores.dtype)
            scores = scores.mul_(scale) if own else scores * scale
        if "scores" in hooks:
            scores = self.scores(scores, layer)
            own = False
        blocked = ~mask
        low = torch.finfo(scores.dtype).min
        scores = scores.masked_fill_(blocked, low) if own else scores.masked_fill(blocked, low)
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        del scores
        if "probs" in hooks:
            probs = self.probs(probs, layer).masked_fill(blocked, 0.0)
        elif "scores" in hooks:  # a rewrite may leave a row nothing above the masked pairs
            probs = probs.masked_fill(blocked, 0.0)
        # else the masked pairs are 0 already: exp(dtype minimum − a real score) underflows
        if "probs_with_values" in hooks:
            probs = self.probs_with_values(probs, value, layer)
            # in place without autograd (the contract lets the backbone zero the masked
            # pairs of what this hook returns)
            probs = probs.masked_fill_(blocked, 0.0) if in_place else probs.masked_fill(blocked, 0.0)
        if dropout and self.training:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out = torch.matmul(probs, value)
        return out.transpose(1, 2).contiguous(), probs


def _scaled_query(query: Tensor, scale: Tensor | None) -> Tensor:
    """``query`` multiplied by a ``score_scale`` (``[batch, 1, 1, 1]``): every score the
    fused kernel computes from it is then multiplied by that factor."""
    if scale is None:
        return query
    return query * scale.to(device=query.device, dtype=query.dtype)


class AttentionChain(Attention):
    """Several policies applied in order: what ``attention=[a, b]`` (a list) composes to.

    The mask is what every member's mask allows; a layer's scores go through each
    member's ``scores`` in list order, the probabilities through each member's ``probs``
    then each member's ``probs_with_values`` (a member only rewrites the layers in its
    own ``layers``). Members that declare ``causal`` must agree; the chain's causality is
    theirs (else the backbone's), and every member is bound with it, so a mask of a later
    member never re-imposes a causality an earlier one removed. A member that overrides
    ``attend`` computes its layers itself: it may share no layer with another member
    that rewrites attention (refused when bound).
    """

    def __init__(self, policies: Sequence[Attention]) -> None:
        super().__init__()
        if not policies:
            raise OptionError("attention=[] names no policy; name at least one, or set attention=null.")
        self.policies = nn.ModuleList(policies)
        declared = [(i, p.causal) for i, p in enumerate(policies) if p.causal is not None]
        if len({c for _, c in declared}) > 1:
            names = ", ".join(f"attention[{i}] ({type(policies[i]).__name__}) causal={c}" for i, c in declared)
            raise OptionError(f"the attention list declares opposite causality: {names}; keep one of them.")
        self.causal = declared[0][1] if declared else None

    def bind(self, depth: int, causal: bool) -> None:
        super().bind(depth, causal)
        for policy in self.policies:
            policy.bind(depth, self.is_causal)
        for index, policy in enumerate(self.policies):
            if not policy.computes_qk_scores:
                continue
            for other_index, other in enumerate(self.policies[index + 1 :], index + 1):
                shared = [k for k in range(1, depth + 1) if policy.applies_to(k) and other.applies_to(k)]
                if other.computes_qk_scores and shared:
                    raise OptionError(
                        f"attention[{index}] ({type(policy).__name__}) and attention[{other_index}] "
                        f"({type(other).__name__}) both compute the scores from queries and keys "
                        f"(qk_scores) on layer {shared[0]}; give them disjoint 'layers' or drop one of them."
                    )
        for index, policy in enumerate(self.policies):
            if type(policy).attend is Attention.attend:
                continue
            for other_index, other in enumerate(self.policies):
                shared = [k for k in range(1, depth + 1) if policy.applies_to(k) and other.applies_to(k)]
                if other_index != index and other.rewrites_attention and shared:
                    raise OptionError(
                        f"attention[{index}] ({type(policy).__name__}) computes attention itself "
                        f"(attend) and cannot run with attention[{other_index}] "
                        f"({type(other).__name__}) on layer {shared[0]}; give them disjoint "
                        "'layers' or drop one of them."
                    )

    def mask(self, padding_mask: Tensor) -> Tensor:
        allowed = Attention.mask(self, padding_mask)
        for policy in self.policies:
            allowed = allowed & policy.mask(padding_mask)
        return allowed

    def _active(self, layer: int) -> list[Attention]:
        return [p for p in self.policies if p.applies_to(layer)]

    def feed_positions(self, positions: Positions) -> Tensor:
        for policy in self.policies:  # in order: each member sees what the previous ones feed
            positions = dataclasses.replace(positions, ids=policy.feed_positions(positions))
        return positions.ids

    def qk_scores(self, query: Tensor, key: Tensor, scaling: float, layer: int) -> Tensor:
        for policy in self._active(layer):  # at most one overrides it per layer (see bind)
            if policy.computes_qk_scores:
                return policy.qk_scores(query, key, scaling, layer)
        return super().qk_scores(query, key, scaling, layer)

    @property
    def computes_qk_scores(self) -> bool:
        return any(policy.computes_qk_scores for policy in self.policies)

    def _explicit_hooks(self, layer: int) -> frozenset[str]:
        hooks: set[str] = set()
        for policy in self._active(layer):
            hooks |= policy._explicit_hooks(layer)
        if "score_scale" in hooks and "scores" in hooks:
            # the factors interleave with the members' scores: the chain's scores applies
            # both in list order (score_scale below then answers None)
            hooks.add("interleaved")
        return frozenset(hooks)

    def score_scale(self, layer: int) -> Tensor | None:
        """The product of the members' factors, when no member rewrites ``scores`` on
        ``layer`` (then the order does not matter); else ``None`` and ``scores`` applies
        them in list order."""
        if "interleaved" in self._explicit_hooks(layer):
            return None
        scale = None
        for policy in self._active(layer):  # factors multiply in any order
            factor = policy.score_scale(layer)
            if factor is not None:
                scale = factor if scale is None else scale * factor.to(scale)
        return scale

    def scores(self, scores: Tensor, layer: int) -> Tensor:
        interleaved = "interleaved" in self._explicit_hooks(layer)
        for policy in self._active(layer):
            scale = policy.score_scale(layer) if interleaved else None
            if scale is not None:
                scores = scores * scale.to(device=scores.device, dtype=scores.dtype)
            scores = policy.scores(scores, layer)
        return scores

    def probs(self, probs: Tensor, layer: int) -> Tensor:
        for policy in self._active(layer):
            probs = policy.probs(probs, layer)
        return probs

    def probs_with_values(self, probs: Tensor, value: Tensor, layer: int) -> Tensor:
        for policy in self._active(layer):
            probs = policy.probs_with_values(probs, value, layer)
        return probs

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
        active = self._active(layer)
        for policy in active:
            if type(policy).attend is not Attention.attend:  # alone on this layer (see bind)
                return policy.attend(query, key, value, mask, scaling, layer, dropout)
        if not any(policy.rewrites_scores for policy in active):
            return fused_attention(_scaled_query(query, self.score_scale(layer)), key, value, mask, scaling, dropout), None
        return super().attend(query, key, value, mask, scaling, layer, dropout)

    def save(self, directory: Path) -> None:
        for index, policy in enumerate(self.policies):
            policy.save(directory / str(index))


def _repeat_heads(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values with as many heads as the queries (grouped-query attention)."""
    if key.shape[1] == query.shape[1]:
        return key, value
    repeat = query.shape[1] // key.shape[1]
    return key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)


def fused_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scaling: float, dropout: float = 0.0
) -> Tensor:
    """Plain attention under a boolean ``mask`` with the fused kernel, as ``[batch, q,
    heads, dim]``: what a layer a policy leaves alone computes."""
    key, value = _repeat_heads(query, key, value)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous()


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

    #: The weights read from a saved model folder, kept until :meth:`attach` has bound the
    #: pooling (``None`` once loaded, or when nothing was saved). ``bind`` may read it to
    #: build modules of the saved shape.
    saved_state: dict[str, Tensor] | None = None

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size

    def bind(self, backbone: "Backbone") -> None:
        """Learn the backbone the pooling reads (``hidden_size``, ``num_layers``, ...).

        Called once when the model is composed or loaded, before any weights are loaded
        or trained: a pooling whose weights depend on the backbone's shape builds them
        here, and one that depends on its tokenizer learns it here (``multi_vector``
        finds the punctuation ids it leaves out). Binding again to a backbone of the same
        shape must keep the weights. The default does nothing."""

    def attach(self, backbone: "Backbone") -> None:
        """What the model calls (do not override): :meth:`bind`, then load the weights
        :meth:`from_saved` read, now that every module exists."""
        self.bind(backbone)
        if self.saved_state is not None:
            state, self.saved_state = self.saved_state, None
            self.load_state_dict(state, strict=True)

    @classmethod
    def from_saved(cls, directory: Path, options: dict[str, Any]) -> "Pooling":
        """Rebuild from options; the saved weights are loaded by :meth:`attach` (after
        :meth:`bind` built the modules they belong to)."""
        component = cls(**options)
        weights = directory / cls.weights_file
        if weights.exists():
            from .storage import load_safetensors

            component.saved_state = load_safetensors(weights)
        return component

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
    """One training example.

    :param anchor: the query or first text.
    :param positive: the text that should embed close to the anchor.
    :param negatives: hard negatives (texts that should embed far from it).
    :param scores: teacher scores, the positive's then one per negative (the ``sts`` and
        scored ``flagembedding`` formats fill them).
    :param task: the data set or task it came from (loaders use the file or folder name).
    :param prompt: an instruction prepended to the anchor only; its tokens are flagged
        in ``instruction_mask`` so pooling can leave them out.
    """

    anchor: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    task: str | None = None
    prompt: str | None = None


@dataclass
class TrainingBatch:
    """A batch of examples, tokenized per role (build one with
    :func:`embplex.training.make_training_batch`).

    :param examples: the batch's examples, in order.
    :param anchors: features of the anchors (queries), tokenized with their prompts.
    :param positives: features of the positives, aligned with anchors.
    :param negatives: features of all hard negatives, ``negatives_per_anchor`` per anchor,
        flattened anchor by anchor; ``None`` when there are none.
    :param negatives_per_anchor: ``k``, the smallest number of negatives of any example
        in the batch (each example keeps its first ``k``).
    :param scores: ``[batch, 1 + k]`` float32 teacher scores (positive, then negatives),
        set only when every example has at least ``1 + k`` of them, or by a model teacher
        (:mod:`embplex.teachers`).
    :param teacher_matrix: ``[batch, batch * (1 + k)]`` a model teacher's score of every
        anchor against every candidate of the batch: all positives, then all negatives
        (anchor by anchor), the columns of ``infonce``'s logits; ``None`` without one.
    """

    examples: list[Example]
    anchors: Features
    positives: Features
    negatives: Features | None = None
    negatives_per_anchor: int = 0
    scores: Tensor | None = None
    teacher_matrix: Tensor | None = None

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

    ``teacher_scores`` says which teacher scores the loss reads (``docs/concepts.md``,
    "Teachers"): ``None`` (none), ``"pairs"`` (``batch.scores``) or ``"matrix"``
    (``batch.teacher_matrix`` too). The trainer checks before the first step that they
    will be there, and runs a configured model teacher only for a loss that reads them.
    A loss wrapping another one copies its inner loss's value.
    """

    teacher_scores: str | None = None

    #: Whether this loss trains the same model under data-parallel training as in one
    #: process on the same global batch (``docs/concepts.md``, "Losses across
    #: processes"): its value is a mean over the local anchors of per-anchor terms, and
    #: everything it takes from the rest of the batch comes through
    #: :func:`embplex.distributed.gather_with_offset`. Off by default: a loss that has not
    #: been checked is refused under more than one process.
    distributed_correct: bool = False

    def distributed_problem(self) -> str | None:
        """Why this loss, with these options, would not train the single-process model
        under more than one process (``None``: it would). The trainer calls it once when
        ``torch.distributed`` runs more than one process and refuses to start on an
        answer. The default reads :attr:`distributed_correct`; a loss whose answer depends
        on its options overrides it, and a wrapping loss returns its inner loss's answer
        when its own part is correct."""
        if self.distributed_correct:
            return None
        return "it does not declare itself distributed-correct (Loss.distributed_correct)"

    def forward(self, model: "EmbeddingModel", batch: TrainingBatch) -> Tensor:
        embeddings = self.embed(model, batch)
        return self.compute({role: by_layer[None] for role, by_layer in embeddings.items()}, batch)

    def embed(
        self, model: "EmbeddingModel", batch: TrainingBatch, layers: Sequence[int | None] = (None,)
    ) -> dict[str, dict[int | None, Tensor]]:
        """How this loss wants the embeddings computed: each role's embeddings per layer,
        as ``model.embed_roles(batch, layers)`` (the default) returns them. A loss that
        controls the forward pass itself (GradCache) overrides it; a loss wrapping another
        one asks its inner loss (``self.inner.embed(model, batch, layers=[...])``) instead
        of calling ``model.embed_roles``, so the two compose."""
        return model.embed_roles(batch, layers)

    def bind(self, model: "EmbeddingModel") -> None:
        """Check the options against the model to be trained, before any training step
        (the trainer calls it once): raise :class:`~embplex.errors.OptionError` for a
        prefix wider than ``model.dim`` or a layer the backbone does not have. A wrapping
        loss calls its inner loss's ``bind`` too. Default: nothing to check."""

    def recommended_sizes(self, model: "EmbeddingModel") -> list[tuple[int, int]] | None:
        """The ``(layer, dim)`` pairs this loss trained the model to serve (elastic
        losses), smallest first; the trainer records them in the saved model
        (``EmbeddingModel.recommended_sizes``). ``None`` (the default): only the full model."""
        return None

    def compute(self, embeddings: dict[str, Tensor], batch: TrainingBatch) -> Tensor:
        """Loss from embeddings per role: ``anchors`` and ``positives`` ``[batch, dim]``,
        and ``negatives`` ``[batch * k, dim]`` (``k = batch.negatives_per_anchor``, anchor
        by anchor), a key that is absent when the batch has no negatives."""
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

    ``batches`` yields one list per batch. Each item is either an ``int``, the position of
    an example in ``examples``, or an :class:`Example` itself, used as it is: that is how a
    sampler hands the trainer an example it changed (a mined sampler's example with its
    mined negatives, say). Items of both kinds may share a batch; the trainer turns a
    batch into examples with :meth:`examples_of`, which a wrapping sampler uses too.

    ``batches`` must be a pure function of ``(examples, batch_size, seed, epoch)`` and of
    the sampler's state (:meth:`state_dict`) — that is what makes resuming a run exact.
    A sampler that reads the live model from ``context`` (to mine negatives, say) keeps
    what it derived from it — the epoch's plan, mined negatives, counters — in its state:
    every checkpoint saves :meth:`state_dict`, and a resumed run calls
    :meth:`load_state_dict` and then ``batches`` again for the interrupted epoch, whose
    first batches (those already trained on) it discards. That call must yield the same
    batches as the interrupted run did, so it must reuse the restored plan instead of
    asking the model again (whose weights have moved on since the epoch started).
    """

    def batches(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        epoch: int,
        context: TrainingContext,
    ) -> Iterator[list["int | Example"]]:
        raise NotImplementedError

    def examples_of(self, examples: Sequence[Example], batch: Sequence["int | Example"]) -> list[Example]:
        """The examples of one batch that ``batches`` yielded: a position is looked up in
        ``examples``, an :class:`Example` is kept. Anything else, a position outside
        ``examples`` (negative ones included: they would silently count from the end) or
        an empty batch is a ``TypeError`` / ``IndexError`` naming the sampler."""
        name = type(self).__name__
        items = None if isinstance(batch, (str, bytes, Example)) else list(batch) if isinstance(batch, Iterable) else None
        if not items:
            raise TypeError(f"sampler {name} yielded {batch!r}; a batch is a non-empty list of positions or Examples.")
        resolved = []
        for item in items:
            if isinstance(item, Example):
                resolved.append(item)
            elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
                if not 0 <= item < len(examples):
                    raise IndexError(
                        f"sampler {name} yielded position {item}, but there are {len(examples)} examples "
                        f"(positions 0 to {len(examples) - 1})."
                    )
                resolved.append(examples[int(item)])
            else:
                raise TypeError(
                    f"sampler {name} yielded {item!r} ({type(item).__name__}) in a batch; an item is the "
                    "position of an example (int) or an Example."
                )
        return resolved

    @staticmethod
    def permutation(count: int, seed: int, epoch: int) -> list[int]:
        """A shuffled ``range(count)`` that depends only on ``seed`` and ``epoch``."""
        return np.random.default_rng([seed, epoch]).permutation(count).tolist()

    def num_batches(self, examples: Sequence[Example], batch_size: int) -> int:
        """An estimate for progress bars and schedules."""
        return math.ceil(len(examples) / batch_size)

    def state_dict(self) -> dict[str, Any]:
        """What the sampler derived during the run and needs to continue it exactly.

        Saved in every checkpoint, so it may hold only tensors, numbers, strings, ``None``
        and lists, tuples and dicts (string keys) of these — never other objects. The
        default is ``{}``: a sampler whose batches depend only on ``(examples,
        batch_size, seed, epoch)`` has nothing to keep.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned, before ``batches`` is called again.

        Raise ``ValueError`` (or an :class:`~embplex.errors.EmbplexError`) when ``state``
        does not fit this sampler; the trainer reports it with the checkpoint's path.
        """
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but got one with keys {sorted(state)}.")


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
    Wrong dimensions raise :class:`~embplex.errors.DimensionError`.

    Optional, for indexes that support them (``docs/concepts.md``, "Index"):
    ``add(..., metadata=[{field: value}, ...])`` stores one dict of scalars per item;
    ``search(..., filter={field: value or [values]})`` keeps only the items whose metadata
    match; ``search(..., rescore=True / False)`` asks an approximate index to rescore its
    candidates with the stored float vectors, or not (``None``: the index's own setting).
    :attr:`nbytes` is the memory the index's vectors, codes and graph hold. The checks
    every index needs are in :mod:`embplex.indexing`.

    ``save(path)`` writes the folder ``path`` inside
    ``with embplex.storage.saving_index(path, self, "<name>") as root:``, which makes the
    save atomic and records the plugin name, ``dim``, ``len(self)``, :attr:`built_from`
    and a SHA-256 of every file in ``manifest.json``. ``load(path)`` (a classmethod) first
    calls ``manifest = embplex.storage.verify_index(path, "<name>")``, which refuses an
    index saved by another plugin or whose bytes changed, and sets
    ``built_from = manifest["built_from"]`` on the loaded index.
    """

    dim: int
    #: What the vectors were made from (the model's and the corpus's fingerprints), set by
    #: whoever fills the index and kept through save and load, so a saved index can be
    #: reused only for the same model and data. ``None`` when unknown.
    built_from: dict[str, Any] | None = None

    def add(
        self,
        ids: Sequence[str],
        vectors: np.ndarray | Sequence[np.ndarray],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        raise NotImplementedError

    def search(
        self,
        queries: np.ndarray | Sequence[np.ndarray],
        k: int,
        *,
        filter: dict[str, Any] | None = None,
        rescore: bool | None = None,
    ) -> SearchResult:
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

    @property
    def nbytes(self) -> int:
        """Bytes of memory the stored vectors, codes and search structures hold (not
        the ids and metadata): what an index setting costs per item, ``nbytes / len``."""
        raise NotImplementedError
