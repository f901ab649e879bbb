"""The sampler contract's Example items and the mining samplers: hard_negatives,
adaptive_margin, refresh_mining (embplex.mining.MiningSampler)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import embplex
from embplex.components import Example, Sampler, TrainingContext
from embplex.errors import InputError, OptionError
from embplex.training import TrainSettings, make_training_batch, train


class VectorModel:
    """Stands in for the model being trained: each text's vector is looked up, so a test
    decides every similarity and therefore every rank."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def encode(self, texts, batch_size=32, prompt=None, normalize=True, convert_to="numpy", **_):
        rows = np.stack([self.vectors[t] for t in texts]).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _data(seed: int, anchors: int = 8, extra_positives: int = 2, dim: int = 6):
    """Anchors with one to three positives each (queries repeat, as in SciFact) and vectors
    that put an anchor's positives near it, so they sit at the top of its search."""
    rng = np.random.default_rng(seed)
    vectors, examples = {}, []
    for a in range(anchors):
        anchor = f"q{a}"
        vectors[anchor] = rng.normal(size=dim)
        for p in range(1 + int(rng.integers(0, extra_positives + 1))):
            positive = f"d{a}-{p}"
            vectors[positive] = vectors[anchor] + 0.3 * rng.normal(size=dim)
            examples.append(Example(anchor, positive))
    return examples, vectors


@pytest.fixture
def make(registry):
    return lambda name, **options: registry.create("sampler", name, **options)


@pytest.fixture
def exact(registry):
    return lambda dim: registry.create("index", "exact", dim=dim)


def _epoch(sampler, examples, context, batch_size=4, seed=0, epoch=0):
    return [sampler.examples_of(examples, batch) for batch in sampler.batches(examples, batch_size, seed, epoch, context)]


def _unit(vector):
    return vector / np.linalg.norm(vector)


def _sim(vectors, a, b):
    return float(_unit(vectors[a]) @ _unit(vectors[b]))


# -- the contract: a batch may hold Examples ------------------------------------------


def test_examples_of_takes_positions_and_examples_and_refuses_the_rest():
    examples = [Example("a", "b"), Example("c", "d")]
    mined = Example("a", "b", ["x"])
    sampler = Sampler()
    assert sampler.examples_of(examples, [1, mined, np.int64(0)]) == [examples[1], mined, examples[0]]
    assert sampler.examples_of(examples, np.array([1, 0])) == [examples[1], examples[0]]  # as before: any iterable
    assert sampler.examples_of(examples, (i for i in [0])) == [examples[0]]
    for bad, error, message in [
        ([2], IndexError, "position 2, but there are 2 examples"),
        ([-1], IndexError, "position -1"),
        ([True], TypeError, "True"),
        (["a"], TypeError, "'a'"),
        ([], TypeError, "non-empty list"),
        ("ab", TypeError, "non-empty list"),
        (examples[0], TypeError, "non-empty list"),
        (3, TypeError, "non-empty list"),
    ]:
        with pytest.raises(error, match=message):
            sampler.examples_of(examples, bad)


class GivesNegatives(Sampler):
    """Yields every example as an Example object carrying a negative it made up."""

    def batches(self, examples, batch_size, seed, epoch, context):
        for start in range(0, len(examples), batch_size):
            yield [Example(e.anchor, e.positive, [f"not {e.positive}"]) for e in examples[start : start + batch_size]]


def test_the_trainer_trains_on_the_examples_a_sampler_yields(tiny_encoder_path, registry, tmp_path, monkeypatch):
    import embplex.training as training

    seen = []
    monkeypatch.setattr(training, "make_training_batch", lambda backbone, batch: seen.append(batch) or make_training_batch(backbone, batch))
    model = embplex.compose({"name": "hf_encoder", "path": tiny_encoder_path}, pooling="mean")
    examples = [Example(f"anchor {i}", f"positive {i}") for i in range(4)]
    settings = TrainSettings(batch_size=2, max_steps=2, log_every=1, progress_bar=False, tensorboard=False)
    train(model, examples, registry.create("loss", "infonce"), GivesNegatives(), settings, tmp_path)
    assert [[e.negatives for e in batch] for batch in seen] == [[["not positive 0"], ["not positive 1"]], [["not positive 2"], ["not positive 3"]]]


# -- hard_negatives -------------------------------------------------------------------


def _reference(examples, vectors, corpus, anchor, skip):
    """An anchor's ranking by brute force, without its known positives and itself."""
    known = {e.positive for e in examples if e.anchor == anchor} | {anchor}
    ranked = sorted((t for t in corpus if t not in known), key=lambda t: -_sim(vectors, anchor, t))
    return ranked[skip:]


@pytest.mark.parametrize("seed", range(12))
def test_no_mined_negative_is_a_known_positive_and_ranks_follow_skip(make, exact, seed):
    examples, vectors = _data(seed)
    rng = random.Random(seed)
    skip, negatives, batch_size = rng.randrange(0, 4), rng.randrange(1, 4), rng.randrange(2, 5)
    sampler = make("hard_negatives", negatives=negatives, skip=skip)
    corpus = list(dict.fromkeys(e.positive for e in examples))
    context = TrainingContext(model=VectorModel(vectors), make_index=exact)
    batches = _epoch(sampler, examples, context, batch_size=batch_size, seed=seed)
    assert sorted(e.positive for b in batches for e in b) == sorted(e.positive for e in examples)
    for batch in batches:
        others = {e.positive for e in batch}
        for example in batch:
            known = {e.positive for e in examples if e.anchor == example.anchor}
            assert not set(example.negatives) & known, "a mined negative is a positive of its anchor"
            assert not set(example.negatives) & others, "a mined negative is another example's positive in the batch"
            expected = [t for t in _reference(examples, vectors, corpus, example.anchor, skip) if t not in others]
            assert example.negatives == expected[:negatives]


def test_the_top_ranks_are_positives_so_exclusion_is_needed(make, exact):
    """The data put positives at the top: mining without exclusion would return them."""
    examples, vectors = _data(0)
    corpus = list(dict.fromkeys(e.positive for e in examples))
    for anchor in {e.anchor for e in examples}:
        top = max(corpus, key=lambda t: _sim(vectors, anchor, t))
        assert top in {e.positive for e in examples if e.anchor == anchor}


def test_same_seed_same_negatives_and_pool_draws_depend_on_it(make, exact):
    examples, vectors = _data(3, anchors=12)
    context = TrainingContext(model=VectorModel(vectors), make_index=exact)
    run = lambda seed, **o: [[(e.anchor, e.negatives) for e in b] for b in _epoch(make("hard_negatives", **o), examples, context, seed=seed)]  # noqa: E731
    assert run(5, negatives=2) == run(5, negatives=2)
    assert run(5, negatives=2, pool=8) == run(5, negatives=2, pool=8)
    mined = lambda seed: {a: n for b in run(seed, negatives=2, pool=8, batching="random") for a, n in b}  # noqa: E731
    assert mined(5) != mined(6)  # the pool draw follows the seed (the order alone could not change this map)


def test_mined_examples_drop_teacher_scores(make, exact):
    examples, vectors = _data(1)
    examples = [Example(e.anchor, e.positive, scores=[1.0]) for e in examples]
    context = TrainingContext(model=VectorModel(vectors), make_index=exact)
    assert all(e.scores is None for b in _epoch(make("hard_negatives", negatives=1), examples, context) for e in b)


def test_a_corpus_file_adds_texts_to_mine_from(make, exact, tmp_path):
    examples, vectors = _data(2, anchors=4)
    vectors.update({f"extra {i}": vectors["q0"] + 0.01 * i for i in range(3)})  # closest to q0 of all
    (tmp_path / "corpus.jsonl").write_text("".join(f'{{"_id": "{i}", "title": "", "text": "extra {i}"}}\n' for i in range(3)))
    context = TrainingContext(model=VectorModel(vectors), make_index=exact)
    sampler = make("hard_negatives", negatives=3, corpus=str(tmp_path / "corpus.jsonl"), batching="random")
    for batch in _epoch(sampler, examples, context, batch_size=1):
        if batch[0].anchor == "q0":
            assert batch[0].negatives == ["extra 0", "extra 1", "extra 2"]


def test_bad_mining_input_is_refused_before_any_step(make, exact, tmp_path):
    examples, vectors = _data(0, anchors=3, extra_positives=0)
    context = TrainingContext(model=VectorModel(vectors), make_index=exact)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(OptionError, match="corpus: .*empty.txt is empty"):
        make("hard_negatives", corpus=str(tmp_path / "empty.txt"))
    with pytest.raises(OptionError, match="is not a file"):
        make("hard_negatives", corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(OptionError, match="skip=3 leaves nothing to mine: the corpus .* has 3 distinct texts"):
        _epoch(make("hard_negatives", skip=3), examples, context)
    with pytest.raises(OptionError, match="pool=1 is smaller than negatives=2"):
        make("hard_negatives", negatives=2, pool=1)
    with pytest.raises(OptionError, match="negatives must be a whole number of at least 1"):
        make("hard_negatives", negatives=0)
    with pytest.raises(OptionError, match="batching must group examples"):
        make("hard_negatives", batching="refresh_mining")
    with pytest.raises(embplex.errors.UnknownComponentError, match="sampler.batching"):
        make("hard_negatives", batching="no_such_sampler")
    with pytest.raises(InputError, match="needs model and make_index"):
        _epoch(make("hard_negatives"), examples, TrainingContext())


def test_too_few_candidates_warn(make, exact):
    examples, vectors = _data(0, anchors=3, extra_positives=0)
    context = TrainingContext(model=VectorModel(vectors), make_index=exact)
    with pytest.warns(UserWarning, match="3 of 3 examples got fewer than 5 negatives"):
        _epoch(make("hard_negatives", negatives=5), examples, context)


# -- adaptive_margin ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.filterwarnings("ignore:sampler AdaptiveMargin")
def test_no_kept_negative_violates_the_margin(make, exact, seed):
    examples, vectors = _data(seed, anchors=10)
    # near-duplicates of positives, labelled as nothing: the false negatives the margin is for
    for e in list(examples)[::2]:
        vectors[f"copy of {e.positive}"] = vectors[e.positive] + 0.05
        examples.append(Example(f"other {e.positive}", f"copy of {e.positive}"))
        vectors[f"other {e.positive}"] = np.random.default_rng(seed).normal(size=6)
    margin = 0.9
    context = TrainingContext(model=VectorModel(vectors), make_index=exact)
    plain = [e for b in _epoch(make("hard_negatives", negatives=3), examples, context) for e in b]
    violations = lambda es: [(e, n) for e in es for n in e.negatives if _sim(vectors, e.anchor, n) >= margin * _sim(vectors, e.anchor, e.positive)]  # noqa: E731
    assert violations(plain), "the data must hold negatives that break the margin, or the test proves nothing"
    batches = _epoch(make("adaptive_margin", margin=margin, negatives=3), examples, context)
    assert not violations([e for b in batches for e in b])
    corpus = list(dict.fromkeys(e.positive for e in examples))
    for batch in batches:  # it searched deeper rather than keep fewer than the margin allows
        others = {e.positive for e in batch}
        for e in batch:
            threshold = margin * _sim(vectors, e.anchor, e.positive)
            passing = [t for t in _reference(examples, vectors, corpus, e.anchor, 0) if t not in others and _sim(vectors, e.anchor, t) < threshold]
            assert e.negatives == passing[:3]


@pytest.mark.parametrize("margin", [0, -0.5, 1.5, float("nan")])
def test_a_margin_outside_its_range_is_refused(make, margin):
    with pytest.raises(OptionError, match=r"margin must be in \(0, 1\]"):
        make("adaptive_margin", margin=margin)


# -- refresh_mining -------------------------------------------------------------------


def test_negatives_change_as_the_model_changes(make, exact):
    examples, old = _data(4, anchors=10)
    rng = np.random.default_rng(99)
    new = {text: rng.normal(size=6) for text in old}  # the "trained" model: other vectors
    model = VectorModel(dict(old))
    context = TrainingContext(model=model, make_index=exact)
    sampler = make("refresh_mining", every=2, negatives=2, batching="random")
    stream = sampler.batches(examples, 2, 0, 0, context)
    first = [next(stream), next(stream)]  # steps 0 and 1: mined with the starting model
    model.vectors, context.step = new, 2  # two optimizer steps later the model has moved
    rest = list(stream)

    def mined_with(vectors):
        fresh = make("hard_negatives", negatives=2, batching="random")
        plan = _epoch(fresh, examples, TrainingContext(model=VectorModel(vectors), make_index=exact), batch_size=2)
        return [[(e.anchor, e.negatives) for e in b] for b in plan]

    as_pairs = lambda bs: [[(e.anchor, e.negatives) for e in b] for b in bs]  # noqa: E731
    assert as_pairs(first) == mined_with(old)[:2]
    assert as_pairs(rest) == mined_with(new)[2:]
    assert as_pairs(rest) != mined_with(old)[2:]


def test_refresh_every_must_be_positive(make):
    with pytest.raises(OptionError, match="every must be a number of optimizer steps"):
        make("refresh_mining", every=0)


def _recording(monkeypatch):
    import embplex.training as training

    seen = []

    def record(backbone, batch):
        seen.append([(e.anchor, tuple(e.negatives)) for e in batch])
        return make_training_batch(backbone, batch)

    monkeypatch.setattr(training, "make_training_batch", record)
    return seen


class Killed(Exception):
    pass


def _refresh_run(path, registry, examples, output, kill_at=None):
    def kill(info):
        if info.step == kill_at:
            raise Killed

    model = embplex.compose({"name": "hf_encoder", "path": path}, pooling="mean")
    settings = TrainSettings(
        batch_size=3, max_steps=6, checkpoint_every=2, lr=5e-3, log_every=1, progress_bar=False,
        tensorboard=False, seed=3, warmup_steps=0,
    )
    sampler = registry.create("sampler", "refresh_mining", every=2, negatives=2, batching="random")
    return train(
        model, examples, registry.create("loss", "infonce"), sampler, settings, output,
        make_index=lambda dim: registry.create("index", "exact", dim=dim), registry=registry, callbacks=[kill],
    )


def test_a_resumed_run_re_mines_exactly_as_the_uninterrupted_one(tiny_encoder_path, registry, tmp_path, monkeypatch):
    from embplex.mining import MiningSampler

    rng = random.Random(0)
    words = "cell protein gene virus tumor blood brain drug dose risk trial mouse".split()
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randrange(3, 8)))  # noqa: E731
    examples = [Example(sentence(), sentence()) for _ in range(9)]
    seen = _recording(monkeypatch)
    mined_at = []
    original = MiningSampler.mine
    monkeypatch.setattr(MiningSampler, "mine", lambda self, e, context, *a: mined_at.append(context.step) or original(self, e, context, *a))
    straight = _refresh_run(tiny_encoder_path, registry, examples, tmp_path / "straight")
    straight_batches = list(seen)
    assert mined_at == [0, 2, 4]
    seen.clear(), mined_at.clear()
    with pytest.raises(Killed):
        _refresh_run(tiny_encoder_path, registry, examples, tmp_path / "resumed", kill_at=3)
    del seen[2:]  # step 3 is trained again after resuming from step 2
    resumed = _refresh_run(tiny_encoder_path, registry, examples, tmp_path / "resumed")
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step-2"
    # the checkpoint at step 2 was written before the step-2 mining: the resumed run mines
    # again at once, with the step-2 weights, then at step 4
    assert mined_at == [0, 2, 2, 4]
    assert seen == straight_batches
    expected = embplex.load(straight.model_path, registry=registry).state_dict()
    for name, tensor in embplex.load(resumed.model_path, registry=registry).state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_state_mined_from_another_corpus_file_is_refused(make, exact, tmp_path):
    examples, vectors = _data(0, anchors=3)
    vectors.update({"extra a": vectors["q0"], "extra b": vectors["q1"]})
    (tmp_path / "a.txt").write_text("extra a\n")
    (tmp_path / "b.txt").write_text("extra b\n")
    sampler = make("hard_negatives", negatives=1, corpus=str(tmp_path / "a.txt"))
    _epoch(sampler, examples, TrainingContext(model=VectorModel(vectors), make_index=exact))
    state = sampler.state_dict()
    assert state["table"].dtype == torch.int64 and state["mined_at"] == 0 and state["rounds"] == 1
    make("hard_negatives", negatives=1, corpus=str(tmp_path / "a.txt")).load_state_dict(state)
    with pytest.raises(ValueError, match="mined from another corpus file"):
        make("hard_negatives", negatives=1, corpus=str(tmp_path / "b.txt")).load_state_dict(state)
    with pytest.raises(ValueError, match="not a HardNegatives state"):
        make("hard_negatives").load_state_dict({"plan": None})
