"""LoRA through peft on ``hf_decoder`` and ``hf_encoder`` (the ``embplex[lora]`` extra):
only the adapters train, saving and loading keep what they learned, merging them gives the
same embeddings, and without peft the error says how to get it."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import embplex
from embplex.errors import OptionError

TEXTS = ["the quick brown fox jumps over the lazy dog", "a cat sat", "what is the capital of france"]
LORA = {"r": 4, "lora_alpha": 8}


@pytest.fixture(params=["hf_encoder", "hf_decoder"])
def backbone_spec(request, tiny_bert_path, decoders):
    path = tiny_bert_path if request.param == "hf_encoder" else decoders["llama"]
    return {"name": request.param, "path": path, "lora": LORA}


def trained(spec) -> embplex.EmbeddingModel:
    """The model after three optimizer steps on every parameter that asks for gradients."""
    model = embplex.compose(spec, pooling="mean")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        embeddings = model(model.backbone.tokenize(TEXTS))
        (-(embeddings[0] * embeddings[1]).sum() + (embeddings[0] * embeddings[2]).sum()).backward()
        optimizer.step()
    return model.eval()


def test_only_the_adapters_train(backbone_spec):
    model = embplex.compose(backbone_spec, pooling="mean")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable), sorted(trainable)[:5]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        embeddings = model(model.backbone.tokenize(TEXTS))
        (embeddings[0] * embeddings[1]).sum().backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and changed <= trainable
    assert any("lora_A" in name for name in changed) and any("lora_B" in name for name in changed)


def test_merging_and_saving_keep_the_embeddings(backbone_spec, tmp_path):
    model = trained(backbone_spec)
    tuned = model.encode(TEXTS)
    plain = embplex.compose({k: v for k, v in backbone_spec.items() if k != "lora"}, pooling="mean")
    assert abs(tuned - plain.encode(TEXTS)).max() > 1e-4, "the adapters learned something"
    # merged into the weights (what save writes): the same embeddings
    merged = model.backbone._plain_model()
    assert not type(merged).__module__.startswith("peft.")
    model.backbone.model, peft_model = merged, model.backbone.model
    np.testing.assert_allclose(model.encode(TEXTS), tuned, atol=1e-5)
    model.backbone.model = peft_model
    model.save(tmp_path / "model")
    loaded = embplex.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.encode(TEXTS), tuned, atol=1e-5)
    # loaded for more training: fresh adapters on the merged weights, nothing else trains
    trainable = [name for name, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # and the folder is a plain transformers model: composed without lora, still the same
    bare = embplex.compose({"name": backbone_spec["name"], "path": str(tmp_path / "model")}, pooling="mean")
    np.testing.assert_allclose(bare.encode(TEXTS), tuned, atol=1e-5)


@pytest.mark.parametrize("name", ["hf_encoder", "hf_decoder"])
def test_without_peft_the_error_says_how_to_install_it(tiny_bert_path, decoders, monkeypatch, name):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes "import peft" fail
    path = tiny_bert_path if name == "hf_encoder" else decoders["llama"]
    with pytest.raises(OptionError, match=r"pip install embplex\[lora\]"):
        embplex.compose({"name": name, "path": path, "lora": LORA})


def test_a_setting_peft_does_not_take_is_refused(tiny_bert_path):
    with pytest.raises(OptionError, match="LoraConfig"):
        embplex.compose({"name": "hf_encoder", "path": tiny_bert_path, "lora": {"rank": 4}})
