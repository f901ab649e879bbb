"""Backbone ``domain_moe``: an encoder whose feed-forward blocks have one expert per domain.

Paper: Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings
(Hallee et al., 2024, arXiv:2401.15713). Every transformer block's feed-forward network
becomes ``len(domains)`` copies (the experts), each initialised from the original; a text
of domain ``d`` passes expert ``d`` only, in every block (routing is enforced by the label,
not learned), so one model serves several domains and a fine-tune on several domains at
once trains each expert on its own. The label comes from ``Features.domain``: a training
example's ``task`` or ``encode(..., domain=)``. Where ours differs: the attention and
embeddings stay shared (as in the paper's MoE-ified BERT), and only BERT-style blocks
(``intermediate`` + ``output``) are supported.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import embplex
from embplex.components import Attention, Backbone, Features
from embplex.errors import InputError, ModelFileError, OptionError
from embplex.hf import TransformersBackbone

EXPERTS_FILE = "domain_experts.safetensors"


class _Experts(nn.Module):
    """One copy of a block's module per domain; the rows of domain ``d`` pass copy ``d``."""

    def __init__(self, module: nn.Module, count: int, router: "DomainMoE") -> None:
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(module) for _ in range(count))
        self.__dict__["router"] = router  # not a submodule: the backbone owns this module

    def forward(self, hidden: Tensor, *args: Tensor) -> Tensor:
        ids = self.router.routing
        if ids is None or ids.shape[0] != hidden.shape[0]:
            raise RuntimeError("domain_moe ran a block without a domain per text; call the backbone's forward.")
        out: Tensor | None = None
        for expert_id in ids.unique().tolist():
            rows = (ids == expert_id).nonzero().flatten()
            part = self.experts[expert_id](hidden[rows], *(a[rows] for a in args))
            if out is None:
                out = part.new_zeros((hidden.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out


class DomainMoE(TransformersBackbone, Backbone):
    auto_class = "AutoModel"
    takes_domain = True

    def __init__(
        self,
        path: str = "all-MiniLM-L6-v2",
        domains: list[str] = ("scifact", "stsb"),
        max_length: int | None = None,
        trust_remote_code: bool = False,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.domains = [str(d) for d in domains]
        if len(self.domains) < 2 or len(set(self.domains)) != len(self.domains):
            raise OptionError(
                f"option domains={list(domains)} must name at least two distinct domains "
                "(one expert each); with one domain use hf_encoder."
            )
        self.trust_remote_code = trust_remote_code
        self.routing: Tensor | None = None
        self._load(path, max_length, None, trust_remote_code, dtype)
        owner, attribute = self._layer_list()
        for block in getattr(owner, attribute):
            if not (hasattr(block, "intermediate") and hasattr(block, "output")):
                raise OptionError(
                    f"domain_moe supports BERT-style blocks (intermediate + output); "
                    f"{type(block).__name__} has neither. Use hf_encoder for this model."
                )
            block.intermediate = _Experts(block.intermediate, len(self.domains), self)
            block.output = _Experts(block.output, len(self.domains), self)

    def expert_ids(self, features: Features) -> Tensor:
        """The expert of every text (``[batch]``), from ``features.domain``: a domain name
        or its index in ``domains``. A missing or unknown label is an ``InputError``."""
        labels = features.domain
        count = features.input_ids.shape[0]
        if labels is None or len(labels) != count or any(label is None for label in labels):
            raise InputError(
                f"domain_moe needs a domain label for every text (one of {self.domains}): training "
                "examples carry it as their task (the data folder's name), encode takes domain=...; "
                f"got {labels!r}."
            )
        ids = []
        for label in labels:
            if isinstance(label, str) and label in self.domains:
                ids.append(self.domains.index(label))
            elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(self.domains):
                ids.append(label)
            else:
                raise InputError(
                    f"domain {label!r} is not one of domain_moe's domains {self.domains} "
                    f"(names, or indices 0 to {len(self.domains) - 1})."
                )
        return torch.tensor(ids, dtype=torch.long, device=features.input_ids.device)

    def forward(
        self, features: Features, attention: Attention | None = None, num_layers: int | None = None
    ) -> Features:
        self.routing = self.expert_ids(features)
        try:
            return super().forward(features, attention=attention, num_layers=num_layers)
        finally:
            self.routing = None

    # -- persistence -----------------------------------------------------------------

    def _expert_modules(self) -> list[tuple[str, _Experts]]:
        return [(name, module) for name, module in self.model.named_modules() if isinstance(module, _Experts)]

    def save(self, directory: Path) -> None:
        """The folder holds a plain transformers model with expert 0 in place (so it loads
        anywhere as the first domain's model) and every expert in ``EXPERTS_FILE``."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        plain = {}
        for key, value in self.model.state_dict().items():
            if ".experts." not in key:
                plain[key] = value
            elif ".experts.0." in key:
                plain[key.replace(".experts.0.", ".")] = value
        self.model.save_pretrained(str(directory), state_dict=plain, safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        experts = {
            key: value.detach().contiguous().cpu() for key, value in self.model.state_dict().items() if ".experts." in key
        }
        save_file(experts, str(directory / EXPERTS_FILE))

    @classmethod
    def from_saved(cls, directory: Path, options: dict[str, Any]) -> "DomainMoE":
        from embplex.storage import load_safetensors

        if not (directory / EXPERTS_FILE).is_file():
            raise ModelFileError(f"{directory} has no {EXPERTS_FILE}: the domain experts were not saved there.")
        backbone = cls(**{**options, "path": str(directory)})
        experts = load_safetensors(directory / EXPERTS_FILE)
        _, unexpected = backbone.model.load_state_dict(experts, strict=False)
        expected = {key for key in backbone.model.state_dict() if ".experts." in key}
        if unexpected or expected - set(experts):
            raise ModelFileError(
                f"{directory / EXPERTS_FILE} does not hold the experts of this model's "
                f"{len(backbone.domains)} domains; save the model again."
            )
        return backbone


@embplex.hookimpl
def register_backbones(register: Any) -> None:
    register(
        "domain_moe",
        DomainMoE,
        paper="Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings (2024), arXiv:2401.15713",
    )
