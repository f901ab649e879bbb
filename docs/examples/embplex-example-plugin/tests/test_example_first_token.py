"""Tests of the example plugin: the behaviour that defines it, and its registration.

Each test builds its own registry with ``embplex.load_registry``; nothing global is
shared, so no test can leak a plugin into another.
"""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from torch import Tensor

import embplex
import embplex_example_plugin
from embplex.components import Features
from embplex.testing import PoolingContract
from embplex_example_plugin import FirstTokenPooling


class TestFollowsThePoolingContract(PoolingContract):
    """embplex's checks for every pooling: output shape, padding never read, the layer
    asked for. They caught this plugin reading padding for a text that was all prompt."""

    @pytest.fixture(params=[True, False], ids=["exclude_instruction", "keep_instruction"])
    def pooling(self, request):
        return FirstTokenPooling(exclude_instruction=request.param)


def features(
    attention_mask: list[list[int]],
    instruction_mask: list[list[int]] | None = None,
    padding_side: str = "right",
) -> Features:
    mask = torch.tensor(attention_mask)
    # Token t of row b has the state [b, t]: the pooled vector says which token was taken.
    batch, tokens = mask.shape
    states = torch.stack(
        [torch.stack([torch.tensor([b, t], dtype=torch.float32) for t in range(tokens)]) for b in range(batch)]
    )
    return Features(
        input_ids=torch.zeros_like(mask),
        attention_mask=mask,
        instruction_mask=None if instruction_mask is None else torch.tensor(instruction_mask),
        padding_side=padding_side,
        hidden_states=(states,),
    )


def taken_positions(pooled: Tensor) -> list[int]:
    return pooled[:, 1].int().tolist()


def test_takes_first_real_token_under_right_and_left_padding():
    pooling = FirstTokenPooling()
    right = features([[1, 1, 1], [1, 1, 0]])
    left = features([[1, 1, 1], [0, 1, 1]], padding_side="left")
    assert taken_positions(pooling(right)) == [0, 0]
    assert taken_positions(pooling(left)) == [0, 1]


def test_skips_instruction_tokens_only_when_asked():
    batch = features([[1, 1, 1, 1]], instruction_mask=[[1, 1, 0, 0]])
    assert taken_positions(FirstTokenPooling(exclude_instruction=True)(batch)) == [2]
    assert taken_positions(FirstTokenPooling(exclude_instruction=False)(batch)) == [0]


def test_registers_in_process_without_installing(embplex_registry):
    # Handy while developing: register the module directly, no entry point needed.
    registry = embplex_registry(embplex_example_plugin)
    info = registry.get("pooling", "example_first_token")
    assert info.factory is FirstTokenPooling
    assert info.option_names() == ["exclude_instruction"]
    assert registry.config_paths == ["pkg://embplex_example_plugin.conf"]


def test_installed_entry_point_is_attributed_to_this_distribution():
    info = embplex.load_registry().get("pooling", "example_first_token")
    assert info.plugin == "pooling.example_first_token"
    assert info.requirement == f"embplex-example-plugin=={importlib.metadata.version('embplex-example-plugin')}"
