"""Backbone ``hf_decoder``: a decoder-only LLM (Llama, Mistral, Qwen2, Gemma, GPT-2) as encoder.

Papers: NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models
(Lee et al., 2024, arXiv:2405.17428) and the survey LLMs are Also Effective Embedding
Models: An In-depth Overview (Tao et al., 2024, arXiv:2412.12591). A decoder LLM becomes
an embedding model by appending EOS to every text (so the last token has read the whole
text under causal attention), padding on either side with correct position ids, and
optionally training LoRA adapters. Our version keeps the model's own causal attention
under every attention policy except one that declares otherwise (``bidirectional``), applies
the model's final norm to every layer's output (transformers applies it to the last
only), so pooling at layer k gives the same vector however the depth was cut, and saves
LoRA-trained models with the adapters merged into the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import torch

import embplex
from embplex.components import Backbone, Features
from embplex.errors import OptionError
from embplex.hf import TransformersBackbone


class HFDecoder(TransformersBackbone, Backbone):
    auto_class = "AutoModel"
    causal = True  # the model's own attention: an attention policy keeps it unless it says otherwise

    def __init__(
        self,
        path: str,
        num_layers: int | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        dtype: str = "float32",
        padding_side: str = "right",
        append_eos: bool = True,
        lora: dict[str, Any] | None = None,
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
    ) -> None:
        super().__init__()
        if not path or path == "???":  # "???" is Hydra's mark for a value nobody gave
            raise OptionError(
                "hf_decoder needs a model: set backbone.path to a local decoder LLM folder."
            )
        if padding_side not in ("left", "right"):
            raise OptionError(f"padding_side must be 'left' or 'right', not {padding_side!r}.")
        self.append_eos = append_eos
        if attn_implementation not in ("sdpa", "eager"):
            raise OptionError(f"attn_implementation must be 'sdpa' or 'eager', not {attn_implementation!r}.")
        self._load(path, max_length, num_layers, trust_remote_code, dtype, padding_side, attn_implementation)
        _refuse_non_decoder(self.model.config, path)
        self._prepare_special_tokens()
        if lora:
            self._add_lora(lora)

    # -- tokens ----------------------------------------------------------------------

    def _prepare_special_tokens(self) -> None:
        tokenizer = self.tokenizer
        if self.append_eos and tokenizer.eos_token_id is None:
            raise OptionError(
                "the tokenizer has no EOS token to append; give it one (eos_token in "
                "tokenizer_config.json) or set backbone.append_eos=false."
            )
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise OptionError(
                    "the tokenizer has neither a pad nor an EOS token; add a pad_token to its "
                    "tokenizer_config.json."
                )
            # Padding is masked out everywhere, so reusing EOS as pad changes no result.
            tokenizer.pad_token = tokenizer.eos_token
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        bare = tokenizer("x", add_special_tokens=False)["input_ids"]
        self._suffix_specials = len(probe) - self._prefix_specials - len(bare)
        self._tokenizer_appends_eos = self._suffix_specials > 0 and probe[-1] == tokenizer.eos_token_id

    def _fit(self, ids: list[int], truncate: bool) -> tuple[list[int], int, bool]:
        """Cut ``ids`` to ``max_length`` keeping the special tokens around the text, and
        end it with EOS. Returns the ids, the number of text tokens kept, and whether the
        text was cut."""
        prefix_end = self._prefix_specials
        suffix_start = len(ids) - self._suffix_specials
        prefix, body, suffix = ids[:prefix_end], ids[prefix_end:suffix_start], ids[suffix_start:]
        if self.append_eos and not self._tokenizer_appends_eos:
            suffix = suffix + [self.tokenizer.eos_token_id]
        budget = max(self.max_length - len(prefix) - len(suffix), 1)
        cut = truncate and len(body) > budget
        if cut:
            body = body[:budget]
        return prefix + body + suffix, len(body), cut

    def tokenize(
        self, texts: Sequence[str], prompt: str | None = None, truncate: bool = True
    ) -> Features:
        texts = [(prompt or "") + text for text in texts]
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        fitted = [self._fit(ids, truncate) for ids in encoded["input_ids"]]
        batch = self.tokenizer.pad(
            {"input_ids": [ids for ids, _, _ in fitted]}, padding=True, return_tensors="pt"
        )
        attention_mask = batch["attention_mask"]
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        instruction = torch.zeros_like(attention_mask)
        width = attention_mask.shape[1]
        left = self.tokenizer.padding_side == "left"
        for row, (ids, kept, _) in enumerate(fitted):
            start = (width - len(ids) if left else 0) + self._prefix_specials
            body = ids[self._prefix_specials : self._prefix_specials + kept]
            instruction[row, start : start + _shared_prefix(prompt_ids, body)] = 1
        return Features(
            input_ids=batch["input_ids"],
            attention_mask=attention_mask,
            instruction_mask=instruction,
            padding_side=self.tokenizer.padding_side,
            extra={"truncated": sum(cut for _, _, cut in fitted)},
        )

    def _model_inputs(self, features: Features) -> dict[str, Any]:
        # transformers numbers positions 0..n-1 from the first column, which under left
        # padding starts the text at a position > 0; count real tokens instead.
        positions = (features.attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        return {"input_ids": features.input_ids, "position_ids": positions}

    # -- forward ---------------------------------------------------------------------

    def forward(
        self, features: Features, attention: Any = None, num_layers: int | None = None
    ) -> Features:
        features = super().forward(features, attention=attention, num_layers=num_layers)
        norm = self._final_norm()
        states = features.hidden_states
        if norm is None or states is None or len(states) < 3:
            return features
        # transformers puts the final norm on the last layer only, so layer k of a full
        # pass would differ from the last layer of a pass stopped after k blocks (or of a
        # model saved with k blocks). Normalising every block's output the same way
        # keeps the three equal; pooling then always reads normalised states.
        inner = tuple(norm(state) for state in states[1:-1])
        return dataclasses.replace(features, hidden_states=(states[0], *inner, states[-1]))

    def _final_norm(self) -> torch.nn.Module | None:
        owner, _ = self._layer_list()
        for attribute in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
            module = getattr(owner, attribute, None)
            if isinstance(module, torch.nn.Module):
                return module
        return None

    # -- layers ----------------------------------------------------------------------

    def _layer_list(self) -> tuple[Any, str]:
        network = self._network()
        for attribute in ("layers", "h"):
            if isinstance(getattr(network, attribute, None), torch.nn.ModuleList):
                return network, attribute
        return super()._layer_list()



def _refuse_non_decoder(config: Any, path: str) -> None:
    """Refuse an encoder (BERT, RoBERTa) or encoder-decoder (T5) model: under
    ``hf_decoder`` it would be read with EOS appended and causal-by-default semantics
    (``Backbone.causal``), silently giving other vectors than the encoder it is."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    if (
        getattr(config, "is_encoder_decoder", False)
        or kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        raise OptionError(
            f"backbone.path={path!r} holds a {kind!r} model, which is not a decoder-only LLM; "
            "use backbone=hf_encoder for encoders (BERT, RoBERTa, MiniLM, ...)."
        )


def _shared_prefix(prompt_ids: list[int], body: list[int]) -> int:
    """How many leading tokens of ``body`` are the prompt's. A prompt's last token may
    merge with the text's first one (``"query: "`` + ``"cat"``); that token is text."""
    count = 0
    for prompt_id, body_id in zip(prompt_ids, body):
        if prompt_id != body_id:
            break
        count += 1
    return count


@embplex.hookimpl
def register_backbones(register: Any) -> None:
    register(
        "hf_decoder",
        HFDecoder,
        paper="NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models (2024), arXiv:2405.17428",
    )
