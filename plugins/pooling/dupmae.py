"""Pooling ``dupmae``: the [CLS] vector next to a reduced bag-of-words vector of the other tokens.

Paper: RetroMAE v2: Duplex Masked Auto-Encoder For Pre-Training Retrieval-Oriented
Language Models (Liu & Shao, 2022, arXiv:2211.08769), DupMAE. The [CLS] state is kept as
it is; every ordinary token's state is projected into vocabulary space, made non-negative
(``log(1 + relu(·))``), max-pooled over the text's tokens and reduced to ``lexical_dim``
numbers; the two are concatenated (``hidden + lexical_dim``). The projection is the model
folder's own masked-language-model head when it has one, else the backbone's word
embeddings (the tied decoder of an MLM head, without its transform), trainable either way.
Where ours differs: the reduction max-pools contiguous buckets of token ids (the paper
reduces and aggregates but we do not reproduce its exact scheme), and DupMAE's pre-training
(the two decoding tasks) is not part of a pooling.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

import embplex
from embplex.components import Backbone, Features, Pooling
from embplex.errors import OptionError

MLM_PREFIX = "mlm_head."


class DupMAEPooling(Pooling):
    def __init__(
        self,
        lexical_dim: int = 256,
        head: Literal["auto", "mlm", "embeddings"] = "auto",
        exclude_instruction: bool = True,
    ) -> None:
        super().__init__()
        if lexical_dim < 1:
            raise OptionError(f"option lexical_dim must be at least 1, not {lexical_dim}.")
        if head not in ("auto", "mlm", "embeddings"):
            raise OptionError(f"option head must be 'auto', 'mlm' or 'embeddings', not {head!r}.")
        self.lexical_dim, self.head = lexical_dim, head
        self.exclude_instruction = exclude_instruction
        self.hidden: int | None = None
        self.vocab_size: int | None = None

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size + self.lexical_dim

    # -- the vocabulary projection -------------------------------------------------------

    def bind(self, backbone: Backbone) -> None:
        if self.hidden is not None:
            if self.hidden != backbone.hidden_size:
                raise OptionError(f"dupmae was built for width {self.hidden}, not {backbone.hidden_size}.")
            return
        network = getattr(backbone, "model", None)
        config = getattr(network, "config", None)
        saved = self.saved_state
        if saved is not None:  # loading: build the projection the saved weights belong to
            if any(key.startswith(MLM_PREFIX) for key in saved):
                self.mlm_head = _mlm_head(config, load=False)
            else:
                vocab, hidden = saved["projection.weight"].shape
                self.projection = nn.Linear(hidden, vocab)
        else:
            head = _mlm_head(config, load=True) if self.head in ("auto", "mlm") else None
            if head is not None:
                self.mlm_head = head
            elif self.head == "mlm":
                raise OptionError(
                    "option head='mlm' but the backbone's folder has no masked-language-model head; "
                    "use head='auto' or head='embeddings' to project with the word embeddings."
                )
            else:
                embeddings = network.get_input_embeddings() if hasattr(network, "get_input_embeddings") else None
                if embeddings is None:
                    raise OptionError(
                        "dupmae needs a backbone with word embeddings (a transformers model) to "
                        "project token states into vocabulary space."
                    )
                weight = embeddings.weight.detach()
                self.projection = nn.Linear(weight.shape[1], weight.shape[0])
                with torch.no_grad():
                    self.projection.weight.copy_(weight)
                    self.projection.bias.zero_()
        self.hidden = backbone.hidden_size
        self.vocab_size = self._project(torch.zeros(1, 1, self.hidden)).shape[-1]

    def _project(self, states: Tensor) -> Tensor:
        head = getattr(self, "mlm_head", None)
        return head(states) if head is not None else self.projection(states)

    # -- forward ------------------------------------------------------------------------

    def vocabulary_vector(self, features: Features) -> Tensor:
        """``[batch, vocab]``: the ordinary tokens' max-pooled ``log(1 + relu(logits))``."""
        if self.hidden is None:
            raise RuntimeError("dupmae is not bound to a backbone; compose it into a model first.")
        mask = features.pooling_mask(self.exclude_instruction)
        first = features.attention_mask.bool().int().argmax(dim=1)  # [CLS]: the first real token
        ordinary = mask.clone()
        ordinary[torch.arange(mask.shape[0]), first] = False
        ordinary = torch.where(ordinary.any(dim=1, keepdim=True), ordinary, mask)  # a text of [CLS] alone
        states = features.last_hidden_state.masked_fill(~ordinary[..., None], 0.0)
        weights = torch.log1p(torch.relu(self._project(states)))
        # weights are >= 0, so 0 at left-out tokens never wins the max over a real one
        return weights.masked_fill(~ordinary[..., None], 0.0).amax(dim=1)

    def forward(self, features: Features) -> Tensor:
        states = features.last_hidden_state
        first = features.attention_mask.bool().int().argmax(dim=1)
        cls = states[torch.arange(states.shape[0], device=states.device), first]
        vocabulary = self.vocabulary_vector(features)
        size = math.ceil(vocabulary.shape[-1] / self.lexical_dim)
        padded = nn.functional.pad(vocabulary, (0, size * self.lexical_dim - vocabulary.shape[-1]))
        lexical = padded.view(-1, self.lexical_dim, size).amax(dim=-1)
        return torch.cat([cls, lexical], dim=-1)


def _mlm_head(config: Any, load: bool) -> nn.Module | None:
    """The masked-LM head of the backbone's model (``cls`` in BERT, ``lm_head`` in
    RoBERTa), read from its folder when ``load`` and the folder has its weights, else
    built from the config; ``None`` for a model without one."""
    if config is None:
        return None
    from transformers import AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "model_type", None) not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return None
    if load:
        location = getattr(config, "_name_or_path", None)
        if not location:
            return None
        model, info = AutoModelForMaskedLM.from_pretrained(location, output_loading_info=True)
    else:
        model, info = AutoModelForMaskedLM.from_config(config), {"missing_keys": []}
    heads = [module for name, module in model.named_children() if name != model.base_model_prefix]
    head_names = [name for name, _ in model.named_children() if name != model.base_model_prefix]
    missing = [key for key in info["missing_keys"] if any(key.startswith(name) for name in head_names)]
    if len(heads) != 1 or missing:
        return None  # a folder saved without its head (e.g. sentence-transformers' layout)
    return _untie(heads[0])


def _untie(module: nn.Module) -> nn.Module:
    """Give every parameter its own tensor: an MLM head shares its bias (and, with the
    model, its decoder weight) between attributes, which safetensors refuses to save."""
    seen: dict[int, nn.Parameter] = {}
    for owner in module.modules():
        for name, parameter in list(owner.named_parameters(recurse=False)):
            if id(parameter) in seen:
                setattr(owner, name, nn.Parameter(parameter.detach().clone()))
            seen[id(parameter)] = parameter
    return module


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register(
        "dupmae",
        DupMAEPooling,
        paper="RetroMAE v2: Duplex Masked Auto-Encoder For Pre-Training Retrieval-Oriented Language Models (2022), arXiv:2211.08769",
    )
