"""The losses that learn from a teacher: score_distill (the student's scores come to
correlate with the teacher's), listwise_distill (against a hand-written reference) and
soft_label (exactly infonce with one-hot targets)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import embplex
from embplex.components import Example, Features, TrainingBatch
from embplex.errors import InputError, OptionError
from embplex.teachers import Teacher
from embplex.testing import LossContract
from embplex.training import TrainSettings, train

BATCH, NEGATIVES, DIM = 4, 2, 8


@pytest.fixture(scope="module")
def losses():
    return embplex.load_registry()


class TestScoreDistillContract(LossContract):
    needs_scores = True

    @pytest.fixture
    def loss(self, losses):
        return losses.create("loss", "score_distill")


class TestListwiseDistillContract(LossContract):
    needs_scores = True
    negatives_per_anchor = (2,)  # a list of one candidate is refused (tested below)

    @pytest.fixture
    def loss(self, losses):
        return losses.create("loss", "listwise_distill")


class TestSoftLabelContract(LossContract):
    needs_scores = True

    @pytest.fixture
    def loss(self, losses):
        return losses.create("loss", "soft_label")


# -- a fixed batch, and references written with loops ----------------------------------


def _batch(negatives: int, seed: int = 0, scores: bool = True, matrix: bool = False) -> tuple[dict, TrainingBatch]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = {
        "anchors": torch.randn(BATCH, DIM, generator=generator),
        "positives": torch.randn(BATCH, DIM, generator=generator),
    }
    if negatives:
        embeddings["negatives"] = torch.randn(BATCH * negatives, DIM, generator=generator)
    dummy = Features(input_ids=torch.zeros(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1))
    batch = TrainingBatch(
        examples=[],
        anchors=dummy,
        positives=dummy,
        negatives=dummy if negatives else None,
        negatives_per_anchor=negatives,
        scores=torch.rand(BATCH, 1 + negatives, generator=generator) if scores else None,
        teacher_matrix=torch.rand(BATCH, BATCH * (1 + negatives), generator=generator) * 2 - 1 if matrix else None,
    )
    return embeddings, batch


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _candidates(embeddings: dict) -> list[list[float]]:
    """infonce's candidates: every positive, then every negative (anchor by anchor)."""
    return embeddings["positives"].tolist() + (embeddings["negatives"].tolist() if "negatives" in embeddings else [])


def _own(i: int, negatives: int) -> list[int]:
    return [i] + [BATCH + i * negatives + n for n in range(negatives)]


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _listwise_reference(embeddings, batch, temperature, teacher_temperature, in_batch) -> float:
    """KL(teacher || student) per anchor over its list, averaged over the anchors."""
    candidates = _candidates(embeddings)
    k = batch.negatives_per_anchor
    total = 0.0
    for i, anchor in enumerate(embeddings["anchors"].tolist()):
        columns = range(len(candidates)) if in_batch else _own(i, k)
        if in_batch:
            teacher = batch.teacher_matrix[i].tolist()
        else:
            teacher = batch.scores[i].tolist()
        student = [_cosine(anchor, candidates[c]) / temperature for c in columns]
        p = _softmax(student)
        q = _softmax([t / teacher_temperature for t in teacher])
        total += sum(qc * (math.log(qc) - math.log(pc)) for qc, pc in zip(q, p))
    return total / BATCH


# -- score_distill ---------------------------------------------------------------------


@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("in_batch", [False, True])
def test_score_distill_is_the_mean_squared_error_to_the_scaled_teacher_scores(losses, negatives, in_batch):
    embeddings, batch = _batch(negatives, matrix=True)
    loss = losses.create("loss", "score_distill", target_scale=0.5, in_batch=in_batch)
    candidates = _candidates(embeddings)
    errors = []
    for i, anchor in enumerate(embeddings["anchors"].tolist()):
        columns = range(len(candidates)) if in_batch else _own(i, negatives)
        teacher = batch.teacher_matrix[i].tolist() if in_batch else batch.scores[i].tolist()
        errors += [(_cosine(anchor, candidates[c]) - 0.5 * t) ** 2 for c, t in zip(columns, teacher)]
    assert float(loss.compute(embeddings, batch)) == pytest.approx(sum(errors) / len(errors), rel=1e-5)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def test_score_distill_makes_the_student_agree_with_its_teacher(losses, minilm_path, tmp_path):
    """A tiny random student learns all-MiniLM-L6-v2's scores: the correlation of its
    cosines with the teacher's, over every pair of 16 anchors and 16 positives, rises."""
    from embplex.testing import WORDS, build_encoder

    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 7)))  # noqa: E731
    examples = [Example(anchor=sentence(), positive=sentence()) for _ in range(16)]
    teacher = Teacher(embplex.compose({"name": "hf_encoder", "path": minilm_path}, pooling="mean"))
    student = embplex.compose({"name": "hf_encoder", "path": build_encoder(tmp_path / "student", layers=2)})
    targets = teacher.vectors([e.anchor for e in examples]) @ teacher.vectors([e.positive for e in examples]).T

    def agreement() -> float:
        anchors = student.encode([e.anchor for e in examples], convert_to="torch")
        positives = student.encode([e.positive for e in examples], convert_to="torch")
        return _pearson((anchors @ positives.T).flatten(), targets.flatten())

    before = agreement()
    settings = TrainSettings(
        batch_size=8, epochs=5, lr=5e-3, warmup_ratio=0.0, log_every=5, progress_bar=False,
        tensorboard=False, seed=0,
    )
    train(student, examples, losses.create("loss", "score_distill", in_batch=True),
          losses.create("sampler", "random"), settings, tmp_path / "run", registry=losses, teacher=teacher)
    after = agreement()
    # measured: 0.19 -> 0.51 on an AMD EPYC, 0.20 -> 0.44 on an Intel Xeon with AMX (the CPU's
    # kernels change the trajectory): the rise is the property, not where it ends
    assert after > before + 0.2, (before, after)


# -- listwise_distill --------------------------------------------------------------------


@pytest.mark.parametrize(("negatives", "in_batch"), [(2, False), (0, True), (2, True)])
@pytest.mark.parametrize("temperatures", [(0.05, 0.05), (0.1, 1.0)])
def test_listwise_distill_equals_a_hand_written_reference(losses, negatives, in_batch, temperatures):
    embeddings, batch = _batch(negatives, seed=3, matrix=True)
    loss = losses.create(
        "loss", "listwise_distill", temperature=temperatures[0], teacher_temperature=temperatures[1], in_batch=in_batch
    )
    expected = _listwise_reference(embeddings, batch, *temperatures, in_batch)
    assert float(loss.compute(embeddings, batch)) == pytest.approx(expected, rel=1e-5)


def test_listwise_distill_is_zero_when_the_student_ranks_as_the_teacher(losses):
    embeddings, batch = _batch(2, seed=1)
    loss = losses.create("loss", "listwise_distill", temperature=0.1, teacher_temperature=0.1)
    own = torch.stack([torch.tensor(_own(i, 2)) for i in range(BATCH)])
    from embplex.teachers import student_matrix

    batch.scores = student_matrix(embeddings).gather(1, own)
    assert float(loss.compute(embeddings, batch)) == pytest.approx(0.0, abs=1e-6)


def test_listwise_distill_refuses_lists_of_one_candidate(losses):
    embeddings, batch = _batch(0)
    with pytest.raises(InputError, match="always 0"):
        losses.create("loss", "listwise_distill").compute(embeddings, batch)


# -- soft_label --------------------------------------------------------------------------


@pytest.mark.parametrize("negatives", [0, 2])
def test_soft_label_with_one_hot_targets_is_infonce(losses, negatives):
    embeddings, batch = _batch(negatives, seed=5)
    batch.scores = torch.tensor([[1.0] + [0.0] * negatives] * BATCH)
    for temperature in (0.05, 0.2):
        soft = losses.create("loss", "soft_label", temperature=temperature, targets="normalize")
        infonce = losses.create("loss", "infonce", temperature=temperature, gather_across_processes=False)
        assert torch.allclose(soft.compute(embeddings, batch), infonce.compute(embeddings, batch), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("negatives", "in_batch"), [(0, False), (2, False), (2, True)])
def test_soft_label_equals_a_hand_written_reference(losses, negatives, in_batch):
    embeddings, batch = _batch(negatives, seed=7, matrix=True)
    loss = losses.create("loss", "soft_label", temperature=0.1, teacher_temperature=0.5, in_batch=in_batch)
    candidates = _candidates(embeddings)
    total = 0.0
    for i, anchor in enumerate(embeddings["anchors"].tolist()):
        p = _softmax([_cosine(anchor, c) / 0.1 for c in candidates])
        if in_batch:
            q = _softmax([t / 0.5 for t in batch.teacher_matrix[i].tolist()])
        else:
            q = [0.0] * len(candidates)
            for column, weight in zip(_own(i, negatives), _softmax([t / 0.5 for t in batch.scores[i].tolist()])):
                q[column] = weight
        total -= sum(qc * math.log(pc) for qc, pc in zip(q, p))
    assert float(loss.compute(embeddings, batch)) == pytest.approx(total / BATCH, rel=1e-5)


def test_soft_label_normalize_refuses_negative_scores(losses):
    embeddings, batch = _batch(2)
    batch.scores[0, 1] = -0.5
    with pytest.raises(InputError, match="targets=softmax"):
        losses.create("loss", "soft_label", targets="normalize").compute(embeddings, batch)


# -- what every teacher-reading loss refuses ---------------------------------------------


@pytest.mark.parametrize("name", ["score_distill", "listwise_distill", "soft_label"])
def test_a_batch_without_teacher_scores_is_an_error_not_a_zero(losses, name):
    embeddings, batch = _batch(2, scores=False)
    with pytest.raises(InputError, match="needs teacher scores"):
        losses.create("loss", name).compute(embeddings, batch)
    with pytest.raises(InputError, match="in_batch=true needs"):
        losses.create("loss", name, in_batch=True).compute(embeddings, batch)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("score_distill", {"target_scale": 0.0}),
        ("listwise_distill", {"temperature": 0.0}),
        ("listwise_distill", {"teacher_temperature": -1.0}),
        ("soft_label", {"teacher_temperature": 0.0}),
        ("soft_label", {"targets": "onehot"}),
    ],
)
def test_bad_options_are_refused(losses, name, options):
    with pytest.raises(OptionError):
        losses.create("loss", name, **options)


def test_what_each_loss_reads(losses):
    assert losses.create("loss", "infonce").teacher_scores is None
    for name in ("score_distill", "listwise_distill", "soft_label"):
        assert losses.create("loss", name).teacher_scores == "pairs"
        assert losses.create("loss", name, in_batch=True).teacher_scores == "matrix"


def test_file_scores_reach_the_loss(losses, tmp_path):
    """With no model teacher, the training file's scores are the targets: perfect scores
    for one pair order and their reverse give different losses."""
    rng = random.Random(0)
    words = "a cat dog sits on mat runs park".split()
    texts = lambda: " ".join(rng.choice(words) for _ in range(4))  # noqa: E731
    examples = [Example(anchor=texts(), positive=texts(), negatives=[texts()], scores=[0.9, 0.1]) for _ in range(4)]
    settings = TrainSettings(batch_size=4, max_steps=1, progress_bar=False, tensorboard=False, warmup_ratio=0.0)
    from embplex.testing import build_encoder

    path = build_encoder(tmp_path / "student", layers=1)
    model = embplex.compose({"name": "hf_encoder", "path": path}, pooling="mean")
    first = train(model, examples, losses.create("loss", "score_distill"), losses.create("sampler", "random"),
                  settings, tmp_path / "a", registry=losses)
    for e in examples:
        e.scores = [0.1, 0.9]
    model = embplex.compose({"name": "hf_encoder", "path": path}, pooling="mean")
    second = train(model, examples, losses.create("loss", "score_distill"), losses.create("sampler", "random"),
                   settings, tmp_path / "b", registry=losses)
    assert first.loss != pytest.approx(second.loss)
