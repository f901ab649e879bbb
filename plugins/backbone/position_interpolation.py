"""Backbone ``position_interpolation``: training-free context extension of another backbone.

Papers: LongEmbed: Extending Embedding Models for Long Context Retrieval (Zhu et al., 2024,
arXiv:2404.12096); Giraffe: Adventures in Expanding Context Lengths in LLMs (Pal et al.,
2023, arXiv:2308.10882, linear scaling); the NTK-aware RoPE scaling of the CLEX / E²-LLM
line (CLEX, Chen et al., 2023, arXiv:2310.16450). A model trained on 512 positions embeds
longer texts when its positions are squeezed into the range it knows.

This backbone wraps another one (``inner``, built by name from the same registry) and
changes only how positions are looked up, and only for inputs longer than the model's own
position table: a text that fits runs through the untouched model. For absolute position
tables (BERT family, GPT-2): ``linear`` interpolates the table to ``target_length`` rows,
``grouped`` gives position ``p`` the row ``p // ceil(target_length / table)``,
``recurrent`` the row ``p % table`` (LongEmbed's alternatives), and ``parallel`` runs the
text as consecutive windows of the table's length, each from position 0 (LongEmbed's
parallel context windows; their averaging happens in the pooling, e.g. ``mean``). For
rotary models ``linear`` divides the rotary frequencies by ``target_length / table``
(position interpolation) and ``ntk`` raises the rotary base by that factor to the power
``d / (d - 2)`` (NTK-aware scaling). The saved model is the inner model as it was loaded:
the extension is recomputed from the options at load time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn

import embplex
from embplex.components import Attention, Backbone, Features
from embplex.errors import OptionError

METHODS = ("linear", "grouped", "recurrent", "parallel", "ntk")
ABSOLUTE_ONLY = ("grouped", "recurrent")
ROTARY_ONLY = ("ntk",)


class _Rows(nn.Module):
    """A position lookup from a table computed from the original one (so gradients still
    reach the original weights and nothing new is saved)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.table)


def _find_position_table(model: nn.Module) -> tuple[nn.Module, str, nn.Embedding] | None:
    for name, module in model.named_modules():
        for attribute in ("position_embeddings", "wpe"):
            table = getattr(module, attribute, None)
            if isinstance(table, nn.Embedding):
                return module, attribute, table
    return None


def _find_rotary(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


class PositionInterpolation(Backbone):
    def __init__(
        self,
        inner: str | dict[str, Any] = "hf_encoder",
        target_length: int = 4096,
        method: Literal["linear", "grouped", "recurrent", "parallel", "ntk"] = "linear",
        *,
        registry: embplex.Registry,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise OptionError(f"option method must be one of {', '.join(METHODS)}, not {method!r}.")
        self.inner = registry.create_part("backbone", inner, option="backbone.inner")
        self._setup(target_length, method)

    def _setup(self, target_length: int, method: str) -> None:
        model = getattr(self.inner, "model", None)
        if model is None:
            raise OptionError(
                f"backbone.inner {type(self.inner).__name__} exposes no transformers model "
                "(attribute 'model'), so its positions cannot be rescaled."
            )
        self.method, self.target_length = method, target_length
        found = _find_position_table(model)
        self._rotary = _find_rotary(model)
        if found is not None:
            self.kind, self.positions = "absolute", found[2].num_embeddings
        elif self._rotary:
            self.kind = "rotary"
            self.positions = int(getattr(model.config, "max_position_embeddings", 0) or self.inner.max_length)
        else:
            raise OptionError(
                f"backbone.inner {type(model).__name__} has neither an absolute position table "
                "nor rotary embeddings; position_interpolation cannot extend it."
            )
        if method in ABSOLUTE_ONLY and self.kind != "absolute":
            raise OptionError(
                f"option method={method!r} rescales an absolute position table, but "
                f"{type(model).__name__} uses rotary positions; use method=linear or method=ntk."
            )
        if method in ROTARY_ONLY and self.kind != "rotary":
            raise OptionError(
                f"option method={method!r} rescales rotary embeddings, but {type(model).__name__} "
                "has an absolute position table; use linear, grouped, recurrent or parallel."
            )
        if target_length < self.positions:
            raise OptionError(
                f"option target_length={target_length} is below the model's own maximum of "
                f"{self.positions} positions; set it to at least {self.positions} (e.g. 4096)."
            )
        self.factor = target_length / self.positions
        self.hidden_size = self.inner.hidden_size
        self.num_layers = self.inner.num_layers
        self.causal = self.inner.causal
        self.takes_domain = self.inner.takes_domain
        self.max_length = target_length
        self.inner.max_length = target_length  # the inner tokenizer now truncates here

    @property
    def tokenizer(self) -> Any:
        """The inner backbone's tokenizer (training reads its pad token)."""
        return getattr(self.inner, "tokenizer", None)

    # -- the contract -----------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], prompt: str | None = None, truncate: bool = True) -> Features:
        return self.inner.tokenize(texts, prompt=prompt, truncate=truncate)

    def forward(
        self, features: Features, attention: Attention | None = None, num_layers: int | None = None
    ) -> Features:
        width = features.input_ids.shape[1]
        if width <= self.positions:  # it fits: the untouched model
            return self.inner(features, attention=attention, num_layers=num_layers)
        if width > self.target_length:
            raise embplex.errors.InputError(
                f"a batch of {width} tokens exceeds position_interpolation's target_length "
                f"{self.target_length}; tokenize with this backbone (it truncates there)."
            )
        if self.method == "parallel":
            return self._parallel(features, attention, num_layers)
        with self._extended(width):
            return self.inner(features, attention=attention, num_layers=num_layers)

    @contextlib.contextmanager
    def _extended(self, width: int) -> Iterator[None]:
        model = self.inner.model
        if self.kind == "rotary":
            saved = [(m, m.inv_freq) for m in self._rotary]
            try:
                for module, inv_freq in saved:
                    module.inv_freq = self._scaled_frequencies(inv_freq)
                yield
            finally:
                for module, inv_freq in saved:
                    module.inv_freq = inv_freq
            return
        owner, attribute, table = _find_position_table(model)  # type: ignore[misc]
        buffers = {}
        for name in ("position_ids", "token_type_ids"):  # BERT's buffers, sized by the table
            buffer = getattr(owner, name, None)
            if isinstance(buffer, torch.Tensor) and buffer.shape[-1] < self.target_length:
                buffers[name] = buffer
        try:
            setattr(owner, attribute, _Rows(self.table(table.weight)))
            if "position_ids" in buffers:
                owner.position_ids = torch.arange(self.target_length, device=table.weight.device)[None]
            if "token_type_ids" in buffers:
                owner.token_type_ids = torch.zeros(
                    1, self.target_length, dtype=buffers["token_type_ids"].dtype, device=table.weight.device
                )
            yield
        finally:
            setattr(owner, attribute, table)
            for name, buffer in buffers.items():
                setattr(owner, name, buffer)

    def table(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``[target_length, hidden]`` position table the method gives from the
        original ``[positions, hidden]`` one."""
        positions, target = weight.shape[0], self.target_length
        if self.method == "linear":
            # row p of the new table sits at p * (positions - 1) / (target - 1) of the old:
            # the first and last rows are kept, the rest interpolated between neighbours
            stretched = nn.functional.interpolate(
                weight.T[None], size=target, mode="linear", align_corners=True
            )
            return stretched[0].T
        ids = torch.arange(target, device=weight.device)
        if self.method == "grouped":
            return weight[ids // math.ceil(target / positions)]
        return weight[ids % positions]  # recurrent

    def _scaled_frequencies(self, inv_freq: torch.Tensor) -> torch.Tensor:
        if self.method == "ntk":
            dim = 2 * inv_freq.shape[0]
            exponents = torch.arange(0, dim, 2, device=inv_freq.device, dtype=torch.float64) / dim
            # base' = base * factor^(d/(d-2)); inv_freq_i = base^(-2i/d), so each frequency
            # is multiplied by (factor^(d/(d-2)))^(-2i/d)
            scale = (self.factor ** (dim / (dim - 2))) ** (-exponents)
            return (inv_freq.double() * scale).to(inv_freq.dtype)
        return inv_freq / self.factor

    def _parallel(self, features: Features, attention: Attention | None, num_layers: int | None) -> Features:
        window = self.positions
        rows, width = features.input_ids.shape
        count = math.ceil(width / window)
        padded = count * window

        def windows(value: torch.Tensor) -> torch.Tensor:
            value = nn.functional.pad(value, (0, padded - width))
            return value.reshape(rows * count, window)

        mask = windows(features.attention_mask)
        keep = mask.any(dim=1)  # a window of padding only is not run
        extra = {k: (windows(v)[keep] if isinstance(v, torch.Tensor) and v.shape == features.input_ids.shape else v)
                 for k, v in features.extra.items()}
        parts = Features(
            input_ids=windows(features.input_ids)[keep],
            attention_mask=mask[keep],
            instruction_mask=None if features.instruction_mask is None else windows(features.instruction_mask)[keep],
            padding_side=features.padding_side,
            extra=extra,
        )
        out = self.inner(parts, attention=attention, num_layers=num_layers)
        states = []
        for hidden in out.hidden_states:
            full = hidden.new_zeros(rows * count, window, hidden.shape[-1])
            full[keep] = hidden
            states.append(full.reshape(rows, padded, -1)[:, :width])
        return dataclasses.replace(features, hidden_states=tuple(states))

    # -- persistence ------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        self.inner.save(directory)  # the inner model as loaded: the extension is options only

    @classmethod
    def from_saved(cls, directory: Path, options: dict[str, Any]) -> "PositionInterpolation":
        registry = options["registry"]
        spec = options.get("inner", "hf_encoder")
        name, inner_options = (spec, {}) if isinstance(spec, str) else (
            spec["name"], {k: v for k, v in spec.items() if k != "name"}
        )
        info = registry.get("backbone", name)
        inner = info.factory.from_saved(directory, info.factory_arguments(inner_options))
        self = cls.__new__(cls)
        Backbone.__init__(self)
        self.inner = inner
        self._setup(int(options.get("target_length", 4096)), str(options.get("method", "linear")))
        return self


@embplex.hookimpl
def register_backbones(register: Any) -> None:
    register(
        "position_interpolation",
        PositionInterpolation,
        paper="LongEmbed: Extending Embedding Models for Long Context Retrieval (2024), arXiv:2404.12096",
    )
