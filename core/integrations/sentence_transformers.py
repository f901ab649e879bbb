"""A sentence-transformers module that loads a folder saved by embplex through embplex.

``EmbeddingModel.save`` names :class:`EmbplexModule` as the only entry of ``modules.json``
when no chain of sentence-transformers' own modules computes the model's vectors (a decoder
backbone, an attention policy, a pooling that declares no export; see docs/concepts.md).
sentence-transformers imports a module class from outside its own package only with
``trust_remote_code=True``:

* ``SentenceTransformer(path)`` refuses the folder, with an error naming this class;
* ``SentenceTransformer(path, trust_remote_code=True)`` imports this class from the
  installed embplex (its dotted path has two dots, so no file of the folder is imported)
  and gets exactly ``embplex.load(path).encode``'s vectors: this module hands the texts and
  the prompt to :meth:`EmbeddingModel.encode`.

Loading goes through :func:`embplex.load`: checksums verified, safetensors only, plugins
resolved through the registry (a plugin that is not installed is named with its
distribution).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from sentence_transformers.base.modules import InputModule

from ..errors import InputError
from ..model import EmbeddingModel


class EmbplexModule(InputModule):
    """The whole embplex model as one sentence-transformers input module."""

    save_in_root = True

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs: Any) -> "EmbplexModule":
        from sentence_transformers.util import load_dir_path

        hub_options = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        folder = load_dir_path(model_name_or_path, subfolder, **hub_options)
        if folder is None:
            raise InputError(
                f"{model_name_or_path!r} is neither a local folder nor a model on the Hub; load it "
                "with embplex.load(path) from a local copy."
            )
        # sentence-transformers' trust_remote_code: the user's consent to run code the
        # folder's config selects, which is what embplex.load asks for too
        return cls(EmbeddingModel.load(Path(folder), trust_remote_code=bool(kwargs.get("trust_remote_code"))))

    # -- what sentence-transformers asks of an input module ---------------------------

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model.backbone, "tokenizer", None)

    @property
    def max_seq_length(self) -> int:
        return self.model.backbone.max_length

    def get_embedding_dimension(self) -> int:
        return self.model.dim

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        # EmbeddingModel.encode tokenizes and batches itself; the texts travel as they are
        # so that the vectors are exactly encode's.
        return {"texts": list(inputs), "prompt": prompt or None}

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        vectors = self.model.encode(
            features["texts"],
            prompt=features.get("prompt"),
            batch_size=len(features["texts"]),
            convert_to="torch",
            show_progress=False,
        )
        if not isinstance(vectors, torch.Tensor):
            raise InputError(
                f"{self.model.describe()} gives a set of vectors per text, which sentence-transformers "
                "cannot hold; use embplex.load(path).encode instead."
            )
        features["sentence_embedding"] = vectors.to(self.model.device)
        return features

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        self.model.save(output_path)
