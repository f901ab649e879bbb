"""Tiny randomly initialised decoder LLMs of every supported family, for tests.

They ship with embplex (``embplex.testing``) so that plugin packages can build the same
models in their own tests; this module keeps the old import path for the suite.
"""

from embplex.testing.models import FAMILIES, WORDS, build_config, build_decoder, build_encoder, build_tokenizer

__all__ = ["FAMILIES", "WORDS", "build_config", "build_decoder", "build_encoder", "build_tokenizer"]
