"""Backbone ``hf_encoder``: any local Hugging Face encoder (BERT, RoBERTa, MiniLM, ...).

Baseline: BERT-style encoders as used by Sentence-BERT (Reimers & Gurevych, 2019,
arXiv:1908.10084). Returns every layer's hidden states. ``num_layers`` keeps only the
first k transformer blocks (elastic depth, as 2D Matryoshka and Starbucks models are
meant to be served); the saved model then has k blocks. ``precision`` picks the inference
fast path (``fast``: bf16 matrix products where the hardware runs them faster, token-budget
batching); the default ``fp32`` gives sentence-transformers' embeddings exactly. ``lora``
trains peft LoRA adapters only (LoRA: Low-Rank Adaptation of Large Language Models, Hu et
al., 2021, arXiv:2106.09685); the saved model has them merged into its weights.
"""

from __future__ import annotations

from typing import Any

import torch

import embplex
from embplex.components import Backbone, SentenceTransformersModule
from embplex.hf import TransformersBackbone


class HFEncoder(TransformersBackbone, Backbone):
    auto_class = "AutoModel"

    def __init__(
        self,
        path: str = "all-MiniLM-L6-v2",
        num_layers: int | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        dtype: str = "float32",
        precision: str = "fp32",
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.trust_remote_code = trust_remote_code
        self._load(path, max_length, num_layers, trust_remote_code, dtype)
        if lora:
            self._add_lora(lora)
        self._set_precision(precision)

    def sentence_transformers_export(self, hidden_size: int) -> SentenceTransformersModule | None:
        # sentence-transformers' Transformer runs the float32 weights through the model's
        # own forward: the same vectors only at fp32 precision on float32 weights, and
        # without code of the model's own (which it would refuse without trust_remote_code).
        if self.precision != "fp32" or self.model.dtype != torch.float32 or self.trust_remote_code:
            return None
        return SentenceTransformersModule(
            type="sentence_transformers.models.Transformer",
            config={"max_seq_length": self.max_length, "do_lower_case": False},
            config_file="sentence_bert_config.json",
            in_root=True,
        )


@embplex.hookimpl
def register_backbones(register: Any) -> None:
    register("hf_encoder", HFEncoder, paper="Sentence-BERT (2019), arXiv:1908.10084")
