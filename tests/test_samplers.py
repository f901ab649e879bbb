"""The random and no_duplicates samplers: coverage, purity (exact resume), no repeated text."""

from __future__ import annotations

import math
import random

import pytest

from embplex.components import Example, TrainingContext
from embplex.errors import OptionError
from embplex.plugins.sampler.no_duplicates import example_texts

CONTEXT = TrainingContext()


def _examples(count: int, vocabulary: int, seed: int, negatives: int = 2) -> list[Example]:
    """Examples drawn from a small vocabulary, so texts repeat a lot across examples."""
    rng = random.Random(seed)
    word = lambda: f"text-{rng.randrange(vocabulary)}"  # noqa: E731
    return [
        Example(word(), word(), [word() for _ in range(rng.randrange(negatives + 1))]) for _ in range(count)
    ]


@pytest.fixture
def make(registry):
    return lambda name, **options: registry.create("sampler", name, **options)


@pytest.mark.parametrize("name", ["random", "no_duplicates"])
def test_every_example_once_per_epoch(make, name):
    examples = [Example(f"a{i}", f"p{i}", [f"n{i}"]) for i in range(23)]
    batches = list(make(name).batches(examples, 5, seed=1, epoch=0, context=CONTEXT))
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(23))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert len(batches) == make(name).num_batches(examples, 5)


@pytest.mark.parametrize("name", ["random", "no_duplicates"])
def test_pure_function_of_seed_and_epoch(make, name):
    examples = _examples(60, 40, seed=0)
    run = lambda sampler, seed, epoch: list(sampler.batches(examples, 8, seed, epoch, CONTEXT))  # noqa: E731
    first, second = make(name), make(name)
    assert run(first, 3, 2) == run(second, 3, 2)  # a fresh sampler: same batches
    assert run(first, 3, 2) == run(first, 3, 2)  # no hidden state carried between calls
    assert run(first, 3, 2) != run(first, 3, 3)  # a new epoch reshuffles
    assert run(first, 3, 2) != run(first, 4, 2)  # so does a new seed


@pytest.mark.parametrize("name", ["random", "no_duplicates"])
def test_drop_last(make, name):
    examples = [Example(f"a{i}", f"p{i}") for i in range(23)]
    sampler = make(name, drop_last=True)
    batches = list(sampler.batches(examples, 5, seed=0, epoch=0, context=CONTEXT))
    assert [len(b) for b in batches] == [5, 5, 5, 5]
    assert sampler.num_batches(examples, 5) == 4


def test_random_order_is_a_shuffle(make):
    examples = [Example(f"a{i}", f"p{i}") for i in range(50)]
    flat = [i for b in make("random").batches(examples, 50, 0, 0, CONTEXT) for i in b]
    assert flat != list(range(50)) and sorted(flat) == list(range(50))


@pytest.mark.parametrize("seed", range(40))
def test_no_duplicates_property_over_random_data(make, seed):
    rng = random.Random(seed)
    count = rng.randrange(20, 120)
    vocabulary = rng.randrange(max(count // 2, 8), count * 4)  # heavy duplication
    batch_size = rng.randrange(2, 12)
    drop_last = rng.random() < 0.5
    examples = _examples(count, vocabulary, seed=seed)
    sampler = make("no_duplicates", drop_last=drop_last)
    batches = list(sampler.batches(examples, batch_size, seed=seed, epoch=rng.randrange(3), context=CONTEXT))

    seen_indices = [i for batch in batches for i in batch]
    assert len(seen_indices) == len(set(seen_indices)), "an example was used twice in one epoch"
    for batch in batches:
        assert 0 < len(batch) <= batch_size
        if drop_last:
            assert len(batch) == batch_size
        texts_in_batch = [text for i in batch for text in example_texts(examples[i])]
        assert len(texts_in_batch) == len(set(texts_in_batch)), "a text appears in two examples of a batch"
    if not drop_last:
        assert sorted(seen_indices) == list(range(count)), "without drop_last every example is used"


def test_no_duplicates_checks_negatives_too(make):
    examples = [
        Example("q1", "shared passage"),
        Example("q2", "other passage", ["shared passage"]),
        Example("q3", "third passage"),
    ]
    for seed in range(10):
        for batch in make("no_duplicates").batches(examples, 3, seed, 0, CONTEXT):
            assert not {0, 1} <= set(batch)


def test_no_duplicates_splits_repeated_queries(make):
    # one query with four positives: the four examples can never share a batch
    examples = [Example("same query", f"passage {i}") for i in range(4)]
    batches = list(make("no_duplicates").batches(examples, 4, 0, 0, CONTEXT))
    assert sorted(len(b) for b in batches) == [1, 1, 1, 1]


def test_batch_size_must_be_positive(make):
    with pytest.raises(OptionError):
        list(make("random").batches([Example("a", "b")], 0, 0, 0, CONTEXT))


def test_num_batches_estimate(make):
    examples = [Example(f"a{i}", f"p{i}") for i in range(10)]
    assert make("no_duplicates").num_batches(examples, 3) == math.ceil(10 / 3)


@pytest.mark.parametrize("name", ["random", "no_duplicates"])
def test_first_party_samplers_keep_no_state(make, name):
    sampler = make(name)
    list(sampler.batches(_examples(20, 10, seed=0), 4, 0, 0, CONTEXT))
    assert sampler.state_dict() == {}
    sampler.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state, but got one with keys \\['plan'\\]"):
        sampler.load_state_dict({"plan": [[0, 1]]})
