"""Teachers (embplex.teachers): scores from the training file or from any embplex model,
scored per batch without gradient, cached by text and teacher fingerprint, and the
refusals before training (teacher unloadable, scores missing, in-batch scores without a
model teacher)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import embplex
from embplex.components import Example
from embplex.errors import CheckpointMismatchError, InputError, ModelFileError, OptionError
from embplex.teachers import Teacher, build_teacher, own_columns
from embplex.training import TrainSettings, make_training_batch, train

WORDS = (
    "a the cat dog sits runs on mat rug park kitten puppy plays sleeps in garden house "
    "car road drives fast slow red blue big small man woman child reads book eats food"
).split()


def _tiny_bert(folder, seed: int, hidden: int, words: list[str]) -> str:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(specials + words)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(specials) + len(words), hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def student_path(tmp_path_factory) -> str:
    return _tiny_bert(tmp_path_factory.mktemp("student"), seed=0, hidden=32, words=WORDS)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> str:
    """Another width and another tokenizer (the vocabulary in reverse order): it only scores."""
    return _tiny_bert(tmp_path_factory.mktemp("teacher"), seed=1, hidden=48, words=WORDS[::-1])


def _model(path: str):
    return embplex.compose({"name": "hf_encoder", "path": path}, pooling="mean")


def _examples(count: int = 8, negatives: int = 1, scores: bool = False) -> list[Example]:
    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 7)))  # noqa: E731
    return [
        Example(
            anchor=sentence(),
            positive=sentence(),
            negatives=[sentence() for _ in range(negatives)],
            scores=[1.0] + [0.0] * negatives if scores else None,
        )
        for _ in range(count)
    ]


def _settings(**overrides) -> TrainSettings:
    values = dict(
        batch_size=4, epochs=1, lr=1e-3, warmup_ratio=0.0, log_every=1, progress_bar=False, tensorboard=False, seed=3
    )
    values.update(overrides)
    return TrainSettings(**values)


def _forward_counter(teacher: Teacher) -> list[int]:
    calls = [0]
    teacher.model.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# -- scoring a batch -------------------------------------------------------------------


def test_a_model_teacher_scores_every_candidate_of_the_batch(student_path, teacher_path):
    teacher = Teacher(_model(teacher_path))
    examples = _examples(3, negatives=2)
    examples[1].prompt = "query: "
    batch = make_training_batch(_model(student_path).backbone, examples)
    scored = teacher.score(batch)

    encode = teacher.model.encode
    anchors = torch.tensor(
        [encode(e.anchor, prompt=e.prompt).tolist() for e in examples]  # each with its own prompt
    )
    candidates = torch.tensor(encode([e.positive for e in examples] + [n for e in examples for n in e.negatives]))
    expected = anchors @ candidates.T  # cosines: the teacher normalises
    assert scored.teacher_matrix.shape == (3, 3 * (1 + 2))
    assert torch.allclose(scored.teacher_matrix, expected, atol=1e-5)
    for i in range(3):  # own positive, then own negatives
        own = [expected[i, i]] + [expected[i, 3 + 2 * i + n] for n in range(2)]
        assert torch.allclose(scored.scores[i], torch.stack(own), atol=1e-5)
    assert torch.equal(own_columns(3, 2), torch.tensor([[0, 3, 4], [1, 5, 6], [2, 7, 8]]))
    assert not scored.scores.requires_grad and not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.model.dim != _model(student_path).dim  # another width, another tokenizer: fine


def test_teacher_scores_overrule_the_files_and_texts_are_embedded_once(student_path, teacher_path):
    teacher = Teacher(_model(teacher_path))
    examples = _examples(4, negatives=1, scores=True)
    batch = make_training_batch(_model(student_path).backbone, examples)
    scored = teacher.score(batch)
    assert not torch.equal(scored.scores, batch.scores)
    assert teacher.computed == 12
    teacher.score(batch)
    assert teacher.computed == 12


# -- the cache file --------------------------------------------------------------------


def _distill(student_path, teacher, output, registry, examples=None, loss="score_distill"):
    return train(
        _model(student_path),
        examples or _examples(8),
        registry.create("loss", loss),
        registry.create("sampler", "random"),
        _settings(),
        output,
        registry=registry,
        teacher=teacher,
    )


def test_a_second_run_reuses_the_cached_scores(student_path, teacher_path, registry, tmp_path):
    cache = tmp_path / "teacher.safetensors"
    first = build_teacher({"backbone": {"name": "hf_encoder", "path": teacher_path}, "cache": str(cache)}, registry)
    calls = _forward_counter(first)
    result = _distill(student_path, first, tmp_path / "one", registry)
    assert calls[0] > 0 and first.computed == 24 and cache.exists()

    second = build_teacher({"backbone": {"name": "hf_encoder", "path": teacher_path}, "cache": str(cache)}, registry)
    calls = _forward_counter(second)
    again = _distill(student_path, second, tmp_path / "two", registry)
    assert calls[0] == 0 and second.computed == 0  # not one teacher forward pass
    one, two = embplex.load(result.model_path), embplex.load(again.model_path)
    for a, b in zip(one.state_dict().values(), two.state_dict().values()):
        assert torch.equal(a, b)  # the same scores, so the same training


def test_a_cache_of_another_teacher_is_not_used(student_path, teacher_path, registry, tmp_path):
    cache = tmp_path / "teacher.safetensors"
    teacher = Teacher(_model(teacher_path), cache=cache)
    teacher.vectors(["a cat"])
    teacher.save_cache()
    other = Teacher(_model(student_path), cache=cache)  # another model: another fingerprint
    with pytest.warns(UserWarning, match="another teacher"):
        other.vectors(["a cat"])
    assert other.computed == 1
    other.save_cache()
    again = Teacher(_model(student_path), cache=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.vectors(["a cat"])
    assert again.computed == 0


def test_a_damaged_cache_is_refused(teacher_path, tmp_path):
    cache = tmp_path / "teacher.safetensors"
    teacher = Teacher(_model(teacher_path), cache=cache)
    teacher.vectors(["a cat", "the dog"])
    teacher.save_cache()
    data = bytearray(cache.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in a float still parses
    cache.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        Teacher(_model(teacher_path), cache=cache).vectors(["a cat"])
    cache.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match="cannot be read"):
        Teacher(_model(teacher_path), cache=cache).vectors(["a cat"])


# -- building a teacher from the config --------------------------------------------------


def test_a_saved_model_teaches(student_path, teacher_path, registry, tmp_path):
    _model(teacher_path).save(tmp_path / "teacher")
    teacher = build_teacher({"load": str(tmp_path / "teacher")}, registry)
    direct = Teacher(_model(teacher_path))
    assert torch.allclose(teacher.vectors(["a red car"]), direct.vectors(["a red car"]), atol=1e-6)
    assert build_teacher({"load": None, "backbone": None, "normalize": True, "batch_size": 64}, registry) is None


def test_a_teacher_that_cannot_be_loaded_is_named(registry, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelFileError, match=f"teacher.load={missing}: the teacher cannot be loaded"):
        build_teacher({"load": str(missing)}, registry)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "embplex.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="teacher.load=.*broken"):
        build_teacher({"load": str(tmp_path / "broken")}, registry)


def test_bad_teacher_configs_are_refused(registry, teacher_path):
    with pytest.raises(OptionError, match="both set"):
        build_teacher({"load": "x", "backbone": "hf_encoder"}, registry)
    with pytest.raises(OptionError, match="teacher.pooling is set but the teacher has no model"):
        build_teacher({"pooling": "cls"}, registry)
    with pytest.raises(Exception, match="teacher.pooling"):
        build_teacher({"backbone": {"name": "hf_encoder", "path": teacher_path}, "pooling": "no_such_pooling"}, registry)


def test_the_cli_refuses_an_unloadable_teacher_before_training(tmp_path, capsys):
    from embplex.cli import main

    code = main([
        "train", "loss=score_distill", f"teacher.load={tmp_path / 'gone'}", f"output_dir={tmp_path / 'run'}",
        "data=flagembedding", "data.train.limit=4", "train.max_steps=1",
    ])
    assert code == 2
    assert f"teacher.load={tmp_path / 'gone'}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.csv").exists()


# -- what the trainer checks before the first step -----------------------------------------


def test_missing_file_scores_are_refused_before_training(student_path, registry, tmp_path):
    examples = _examples(8, scores=True)
    examples[5].scores = None
    examples[6].scores = [1.0]  # no score for its negative
    with pytest.raises(InputError, match=r"2 of 8 training examples \(rows 5, 6\)"):
        _distill(student_path, None, tmp_path, registry, examples=examples)
    assert not (tmp_path / "metrics.csv").exists()


def test_in_batch_scores_need_a_model_teacher(student_path, registry, tmp_path):
    with pytest.raises(OptionError, match="in_batch"):
        train(
            _model(student_path), _examples(8, scores=True),
            registry.create("loss", "listwise_distill", in_batch=True), registry.create("sampler", "random"),
            _settings(), tmp_path, registry=registry,
        )


def test_a_teacher_the_loss_does_not_read_is_not_run(student_path, teacher_path, registry, tmp_path):
    teacher = Teacher(_model(teacher_path))
    with pytest.warns(UserWarning, match="reads no teacher scores"):
        _distill(student_path, teacher, tmp_path, registry, loss="infonce")
    assert teacher.computed == 0


def test_file_scores_train_without_a_model_teacher(student_path, registry, tmp_path):
    result = _distill(student_path, None, tmp_path, registry, examples=_examples(8, scores=True))
    assert result.step == 2 and result.loss > 0


def test_resuming_with_another_teacher_is_refused(student_path, teacher_path, registry, tmp_path):
    def run(teacher_model_path):
        return train(
            _model(student_path), _examples(8), registry.create("loss", "score_distill"),
            registry.create("sampler", "random"), _settings(checkpoint_every=1, max_steps=2), tmp_path,
            registry=registry, teacher=Teacher(_model(teacher_model_path)),
        )

    run(teacher_path)
    assert run(teacher_path).already_complete  # the same teacher: the same run
    with pytest.raises(CheckpointMismatchError):
        run(student_path)  # another teacher: another run
