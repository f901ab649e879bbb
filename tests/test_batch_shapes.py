"""The samplers task_homogeneous (one task per batch, stage schedules) and length_buckets
(a token budget per batch, little padding)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from embplex.components import Example, TrainingContext
from embplex.errors import OptionError
from embplex.training import make_training_batch

CONTEXT = TrainingContext()


@pytest.fixture
def make(registry):
    return lambda name, **options: registry.create("sampler", name, **options)


# -- task_homogeneous -----------------------------------------------------------------


def _multitask(rng: random.Random) -> list[Example]:
    tasks = [f"task{t}" for t in range(rng.randrange(1, 6))] + [None] * rng.randrange(0, 2)
    return [Example(f"a{i}", f"p{i}", task=rng.choice(tasks)) for i in range(rng.randrange(1, 90))]


@pytest.mark.parametrize("seed", range(40))
def test_every_batch_is_from_one_task_over_random_multitask_data(make, seed):
    rng = random.Random(seed)
    examples = _multitask(rng)
    batch_size, drop_last, epoch = rng.randrange(1, 10), rng.random() < 0.5, rng.randrange(3)
    sampler = make("task_homogeneous", drop_last=drop_last)
    batches = list(sampler.batches(examples, batch_size, seed, epoch, CONTEXT))
    for batch in batches:
        assert len({examples[i].task for i in batch}) == 1, "a batch mixes tasks"
        assert 0 < len(batch) <= batch_size and (len(batch) == batch_size or not drop_last)
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used)), "an example was used twice in an epoch"
    if not drop_last:
        assert sorted(used) == list(range(len(examples)))
    assert len(batches) == sampler.num_batches(examples, batch_size)
    assert batches == list(make("task_homogeneous", drop_last=drop_last).batches(examples, batch_size, seed, epoch, CONTEXT))


def test_batches_of_different_tasks_interleave(make):
    examples = [Example(f"a{i}", f"p{i}", task=f"t{i % 3}") for i in range(60)]
    tasks = [examples[b[0]].task for b in make("task_homogeneous").batches(examples, 4, 0, 0, CONTEXT)]
    assert tasks != sorted(tasks)  # not one task after the other


def test_stage_schedule_nv_embed_retrieval_first_then_blended(make):
    examples = [Example(f"a{i}", f"p{i}", task=t) for i, t in enumerate(["msmarco", "nq", "sts", "clf"] * 10)]
    sampler = make("task_homogeneous", stages=[{"tasks": ["msmarco", "nq"], "epochs": 2}, {"tasks": None}])
    for epoch, allowed in [(0, {"msmarco", "nq"}), (1, {"msmarco", "nq"}), (2, {"msmarco", "nq", "sts", "clf"}), (5, {"msmarco", "nq", "sts", "clf"})]:
        seen = {examples[i].task for b in sampler.batches(examples, 3, 0, epoch, CONTEXT) for i in b}
        assert seen == allowed, epoch


def test_bad_stages_are_refused(make):
    examples = [Example("a", "p", task="x")]
    for stages, message in [
        ([{"tasks": ["x"]}, {"tasks": None}], r"stages\[0\] needs 'epochs'"),
        ([{"tasks": "x", "epochs": 1}], r"stages\[0\].tasks must be a non-empty list"),
        ([{"tasks": ["x"], "epochs": 0}], r"stages\[0\].epochs must be"),
        ([{"task": ["x"], "epochs": 1}], r"stages\[0\] has keys \['task'\]"),
    ]:
        with pytest.raises(OptionError, match=message):
            make("task_homogeneous", stages=stages)
    sampler = make("task_homogeneous", stages=[{"tasks": ["y"], "epochs": 1}])
    with pytest.raises(OptionError, match=r"names tasks \['y'\] that no example has; the tasks are \['x'\]"):
        list(sampler.batches(examples, 2, 0, 0, CONTEXT))


# -- length_buckets -------------------------------------------------------------------


def _waste(model, examples, batches):
    """Padding in the training batches as built (every role padded to its longest text),
    and each batch's padded tokens."""
    real = padded = 0
    per_batch = []
    for batch in batches:
        built = make_training_batch(model.backbone, [examples[i] for i in batch])
        roles = [f for f in (built.anchors, built.positives, built.negatives) if f is not None]
        real += sum(int(f.attention_mask.sum()) for f in roles)
        tokens = sum(f.attention_mask.numel() for f in roles)
        padded += tokens
        per_batch.append(tokens)
    return 1 - real / padded, np.array(per_batch)


@pytest.fixture(scope="module")
def scifact(data_dir):
    from embplex.data import load_beir_pairs

    return load_beir_pairs(data_dir / "retrieval" / "scifact", split="train", limit=300)


@pytest.fixture(scope="module")
def snli(data_dir):
    from embplex.data import load_triplets_tsv

    return load_triplets_tsv(data_dir / "pairs" / "snli" / "dev_triplets.tsv", limit=1500)


def test_scifact_padding_waste_under_5_percent_and_batches_near_the_budget(make, minilm, scifact):
    budget = 8192
    sampler = make("length_buckets", max_tokens=budget)
    batches = list(sampler.batches(scifact, 32, 0, 0, TrainingContext(model=minilm)))
    assert sorted(i for b in batches for i in b) == list(range(len(scifact)))
    waste, tokens = _waste(minilm, scifact, batches)
    baseline, _ = _waste(minilm, scifact, list(make("no_duplicates").batches(scifact, 32, 0, 0, CONTEXT)))
    assert waste < 0.05 and waste < baseline
    assert tokens.max() <= budget
    assert tokens.mean() >= 0.75 * budget


def test_snli_padding_waste_is_far_below_no_duplicates(make, minilm, snli):
    """SNLI's three roles vary in length independently: no split of 1500 triplets into
    ~40-example batches pads every role tightly. The measured figures are in the docs."""
    budget = 2048
    batches = list(make("length_buckets", max_tokens=budget).batches(snli, 32, 0, 0, TrainingContext(model=minilm)))
    waste, tokens = _waste(minilm, snli, batches)
    baseline, _ = _waste(minilm, snli, list(make("no_duplicates").batches(snli, 32, 0, 0, CONTEXT)))
    assert waste < 0.6 * baseline
    assert tokens.max() <= budget and tokens.mean() >= 0.6 * budget
    sizes = [len(b) for b in batches]
    assert max(sizes) > 1.5 * min(sizes)  # the batch size varies with the length


class _WordCounter:
    """A stand-in tokenizer: a text's token count is its number of words."""

    class backbone:  # noqa: N801 - mimics ``model.backbone``
        @staticmethod
        def tokenize(texts, prompt=None):
            import torch

            counts = torch.tensor([len(t.split()) for t in texts])
            return SimpleNamespace(attention_mask=(torch.arange(int(counts.max()))[None, :] < counts[:, None]).long())


def _snli_like(count: int, seed: int) -> tuple[list[Example], np.ndarray]:
    """Triplets with SNLI's token lengths (all-MiniLM-L6-v2 on SNLI dev: premise mean 17.8,
    sd 7.0; hypotheses 9.7 and 10.5, sd 3; correlations 0.24, 0.15, 0.41), log-normal, at
    the size of a training set rather than dev's 2,943 rows."""
    rng = np.random.default_rng(seed)
    z = rng.multivariate_normal(np.zeros(3), [[1, 0.24, 0.15], [0.24, 1, 0.41], [0.15, 0.41, 1]], size=count)
    mu, sigma = np.array([2.807, 2.226, 2.304]), np.array([0.379, 0.302, 0.307])
    lengths = np.clip(np.round(np.exp(mu + sigma * z)), 4, 64).astype(int)
    words = [" ".join(["w"] * n) for n in range(65)]
    return [Example(words[a], words[p], negatives=[words[n]]) for a, p, n in lengths], lengths


def test_waste_under_5_percent_on_snli_like_lengths_at_training_set_scale(make):
    """The defining claim of Dataset Decomposition: batches of one length, a constant token
    budget. 100,000 SNLI-like triplets in ~4,000 batches (fewer batches than SNLI train's
    ~550,000 triplets at the study's 4096-token budget make, so a harder case)."""
    examples, lengths = _snli_like(100_000, seed=0)
    budget = 1024
    batches = list(make("length_buckets", max_tokens=budget).batches(examples, 32, 0, 0, TrainingContext(model=_WordCounter)))
    assert sorted(i for b in batches for i in b) == list(range(len(examples)))
    padded = np.array([len(b) * int(lengths[b].max(axis=0).sum()) for b in batches])
    waste = 1 - lengths.sum() / padded.sum()
    assert waste < 0.05, f"padding waste {waste:.1%}"
    assert padded.max() <= budget and padded.mean() >= 0.85 * budget
    # the same examples in shuffled batches of 32 pad far more: the lengths do vary
    plain = np.array_split(np.random.default_rng(0).permutation(len(examples)), len(examples) // 32)
    assert 1 - lengths.sum() / sum(len(b) * int(lengths[b].max(axis=0).sum()) for b in plain) > 0.2


def test_equal_lengths_share_batches_differently_each_epoch_and_replay_exactly(make):
    examples, _ = _snli_like(3000, seed=1)
    context = TrainingContext(model=_WordCounter)
    sampler = make("length_buckets", max_tokens=1024)
    epoch0, epoch1 = (list(sampler.batches(examples, 32, 7, e, context)) for e in (0, 1))
    assert epoch0 == list(make("length_buckets", max_tokens=1024).batches(examples, 32, 7, 0, context))
    # which examples share a batch (their in-batch negatives) changes with the epoch
    assert {frozenset(b) for b in epoch0} != {frozenset(b) for b in epoch1}


def test_the_budget_counts_only_the_negatives_a_batch_keeps(make):
    """A batch keeps each example's first k negatives, k the smallest count in it: with
    1 to 3 negatives per example, no batch as built goes over the budget."""
    rng = np.random.default_rng(3)
    words = lambda n: " ".join(["w"] * int(n))  # noqa: E731
    examples = [
        Example(words(rng.integers(4, 30)), words(rng.integers(4, 20)), negatives=[words(rng.integers(4, 60)) for _ in range(rng.integers(1, 4))])
        for _ in range(2000)
    ]
    budget = 1024
    for batch in make("length_buckets", max_tokens=budget).batches(examples, 32, 0, 0, TrainingContext(model=_WordCounter)):
        chosen = [examples[i] for i in batch]
        k = min(len(e.negatives) for e in chosen)
        padded = len(chosen) * (max(len(e.anchor.split()) for e in chosen) + max(len(e.positive.split()) for e in chosen))
        padded += len(chosen) * k * max(len(t.split()) for e in chosen for t in e.negatives[:k])
        assert padded <= budget


def test_short_to_long_curriculum_orders_batches_by_length(make, minilm, snli):
    examples = snli[:300]
    sampler = make("length_buckets", max_tokens=1024, curriculum="short_to_long")
    lengths = sampler.lengths(examples, TrainingContext(model=minilm))
    means = [float(lengths[b].sum(axis=1).mean()) for b in sampler.batches(examples, 32, 0, 0, TrainingContext(model=minilm))]
    assert means == sorted(means) and means[0] < means[-1]
    shuffled = make("length_buckets", max_tokens=1024).batches(examples, 32, 0, 0, TrainingContext(model=minilm))
    assert [float(lengths[b].sum(axis=1).mean()) for b in shuffled] != means


def test_a_budget_below_the_longest_example_is_refused(make, minilm, scifact):
    with pytest.raises(OptionError, match=r"max_tokens=200 is smaller than example \d+ alone \(\d+ tokens.*raise max_tokens to at least \d+"):
        list(make("length_buckets", max_tokens=200).batches(scifact[:50], 32, 0, 0, TrainingContext(model=minilm)))
    with pytest.raises(OptionError, match="max_tokens must be a positive"):
        make("length_buckets", max_tokens=0)
