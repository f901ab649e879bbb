"""Pooling ``multi_vector``: one projected, normalised vector per token (late interaction).

Paper: ColBERT: Efficient and Effective Passage Search via Contextualized Late Interaction
over BERT (Khattab & Zaharia, 2020, arXiv:2004.12832); the sets it produces are what
MUVERA (Dhulipala et al., 2024, arXiv:2405.19504) turns into fixed-dimensional encodings.
Each token state of the chosen layer goes through a linear map without bias to ``dim``
(ColBERT's 128) and is L2-normalised; padding, and the tokens of ASCII punctuation as
ColBERT's document skiplist does, are left out of the set (``vector_mask``). Ours differs
from ColBERT in three ways: punctuation is left out of queries too and queries are not
padded with ``[MASK]`` tokens (a pooling does not know whether it pools a query or a
document); the projection starts as a seeded random semi-orthogonal map, so an untrained
model already gives sets whose inner products approximate the backbone's; and instruction
tokens are left out when ``exclude_instruction`` is on.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import embplex
from embplex.components import Backbone, Features, Pooling
from embplex.errors import InputError, ModelFileError, OptionError


class MultiVectorPooling(Pooling):
    """``[batch, tokens, dim]`` unit vectors, zero where ``vector_mask`` is False."""

    def __init__(
        self,
        dim: int | None = 128,
        skip_punctuation: bool = True,
        exclude_instruction: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dim is not None and dim < 1:
            raise OptionError(f"dim must be a positive width (ColBERT uses 128) or null to keep the backbone's, not {dim}.")
        self.dim = dim
        self.skip_punctuation = bool(skip_punctuation)
        self.exclude_instruction = bool(exclude_instruction)
        self.seed = int(seed)
        # Built by ``bind`` (or ``from_saved``), once the backbone's width is known.
        self.projection: nn.Linear | None = None
        self.register_buffer("skip_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self.bound = False

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size if self.dim is None else self.dim

    def _build_projection(self, hidden_size: int) -> None:
        self.projection = nn.Linear(hidden_size, self.dim, bias=False)
        # A random semi-orthogonal map (orthonormal rows, or columns when dim > hidden)
        # keeps inner products approximately (Johnson-Lindenstrauss), so the untrained
        # pooling already scores like the backbone; seeded so that two composes agree.
        generator = torch.Generator().manual_seed(self.seed)
        gaussian = torch.randn(max(self.dim, hidden_size), min(self.dim, hidden_size), generator=generator)
        basis, _ = torch.linalg.qr(gaussian)
        with torch.no_grad():
            self.projection.weight.copy_(basis if self.dim >= hidden_size else basis.T)

    @classmethod
    def from_saved(cls, directory: Path, options: dict[str, Any]) -> "MultiVectorPooling":
        pooling = cls(**options)
        weights = directory / cls.weights_file
        if weights.exists():
            state = embplex.storage.load_safetensors(weights)
            projection = state.get("projection.weight")
            if projection is None or projection.dim() != 2 or (pooling.dim is not None and projection.shape[0] != pooling.dim):
                shape = None if projection is None else tuple(projection.shape)
                raise ModelFileError(
                    f"{weights} holds no projection to dim={pooling.dim} (projection.weight of shape {shape}); "
                    "save the model again."
                )
            pooling._build_projection(int(projection.shape[1]))
            pooling.load_state_dict(state, strict=True)
        return pooling

    def bind(self, backbone: Backbone) -> None:
        """Build the projection for the backbone's width (unless loaded) and find the
        token ids of punctuation in its tokenizer (ColBERT's skiplist)."""
        if self.dim is not None and self.projection is None:
            self._build_projection(int(backbone.hidden_size))
        if self.projection is not None and self.projection.in_features != backbone.hidden_size:
            raise ModelFileError(
                f"pooling 'multi_vector' holds a projection from width {self.projection.in_features}, but the "
                f"backbone's width is {backbone.hidden_size}: it was saved with another backbone."
            )
        ids: set[int] = set()
        tokenizer = getattr(backbone, "tokenizer", None)
        if self.skip_punctuation and tokenizer is None:
            raise OptionError(
                f"pooling 'multi_vector' leaves punctuation out and reads it from the backbone's tokenizer, "
                f"but {type(backbone).__name__} has no `tokenizer`; set pooling.skip_punctuation=false."
            )
        if self.skip_punctuation:
            for symbol in string.punctuation:
                for text in (symbol, " " + symbol):  # word-initial forms of BPE vocabularies too
                    pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
                    if len(pieces) == 1 and tokenizer.decode(pieces).strip() == symbol:
                        ids.add(int(pieces[0]))
        self.skip_ids = torch.tensor(sorted(ids), dtype=torch.long, device=self.skip_ids.device)
        self.bound = True

    def vector_mask(self, features: Features) -> Tensor:
        """Real tokens that are neither punctuation nor (with ``exclude_instruction``)
        instruction tokens. A text of nothing else keeps an empty set."""
        mask = features.token_mask if self.exclude_instruction else features.attention_mask.bool()
        if self.skip_punctuation:
            if not self.bound:
                raise InputError(
                    "pooling 'multi_vector' leaves punctuation out, which needs the backbone's tokenizer: build "
                    "the model with embplex.compose or embplex.load (or call pooling.bind(backbone)), or set "
                    "skip_punctuation=false."
                )
            skip = torch.isin(features.input_ids, self.skip_ids.to(features.input_ids.device))
            mask = mask & ~skip
        return mask

    def forward(self, features: Features) -> Tensor:
        states = features.last_hidden_state
        if self.dim is not None and self.projection is None:
            raise InputError(
                "pooling 'multi_vector' builds its projection when it learns the backbone's width: build the "
                "model with embplex.compose or embplex.load (or call pooling.bind(backbone)) first."
            )
        keep = self.vector_mask(features)
        # Zero the left-out positions before anything else: padding may hold any value, and
        # a zero vector stays zero through the projection and the normalisation.
        states = states * keep.unsqueeze(-1).to(states.dtype)
        if self.projection is not None:
            states = self.projection(states)
        return nn.functional.normalize(states, dim=-1)


@embplex.hookimpl
def register_poolings(register: Any) -> None:
    register(
        "multi_vector",
        MultiVectorPooling,
        paper="ColBERT: Efficient and Effective Passage Search via Contextualized Late Interaction over BERT (2020), arXiv:2004.12832",
    )
