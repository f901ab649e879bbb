"""The training loop on a tiny random BERT: learning, schedule, outputs, exact resume."""

from __future__ import annotations

import csv
import math
import shutil
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import embplex
from embplex.components import Example, Sampler
from embplex.errors import CheckpointMismatchError, ModelFileError, OptionError, TrainingInterrupted
from embplex.training import (
    TrainSettings,
    latest_checkpoint,
    list_checkpoints,
    make_training_batch,
    tokenize_with_prompts,
    train,
)

WORDS = (
    "a the cat dog sits runs on mat rug park kitten puppy plays sleeps in garden house "
    "car road drives fast slow red blue big small man woman child reads book eats food"
).split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with a word-level vocabulary, saved to disk."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocabulary = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = BertTokenizerFast(vocab=vocabulary, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(specials) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _model(path: str):
    return embplex.compose({"name": "hf_encoder", "path": path}, pooling="mean")


def _examples(count: int = 12, negatives: bool = True) -> list[Example]:
    import random

    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 7)))  # noqa: E731
    return [
        Example(anchor=sentence(), positive=sentence(), negatives=[sentence()] if negatives else [])
        for _ in range(count)
    ]


def _settings(**overrides) -> TrainSettings:
    values = dict(
        batch_size=4, epochs=2, lr=1e-3, warmup_ratio=0.2, log_every=1, progress_bar=False, seed=7
    )
    values.update(overrides)
    return TrainSettings(**values)


def _run(path, examples, output, registry, settings, callbacks=(), sampler="random"):
    return train(
        _model(path),
        examples,
        registry.create("loss", "infonce"),
        registry.create("sampler", sampler),
        settings,
        output,
        registry=registry,
        callbacks=callbacks,
    )


def _metrics(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class Killed(Exception):
    """Stands in for the process dying."""


def _kill_at(step: int):
    def callback(info):
        if info.step == step:
            raise Killed

    return callback


# -- batches -------------------------------------------------------------------------


def test_training_batch_layout(tiny_bert):
    model = _model(tiny_bert)
    examples = [
        Example("cat sits", "kitten sits", ["car drives", "road", "red"], scores=[0.9, 0.1, 0.2, 0.3]),
        Example("dog runs", "puppy plays", ["book", "food"], scores=[0.8, 0.3, 0.1]),
    ]
    batch = make_training_batch(model.backbone, examples)
    assert batch.negatives_per_anchor == 2  # the smallest count in the batch
    expected = model.backbone.tokenize(["car drives", "road", "book", "food"])  # anchor-major
    assert torch.equal(batch.negatives.input_ids, expected.input_ids)
    assert torch.equal(batch.scores, torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.3, 0.1]]))
    no_negatives = make_training_batch(model.backbone, [Example("a", "b"), Example("c", "d", ["e"])])
    assert no_negatives.negatives is None and no_negatives.negatives_per_anchor == 0
    assert no_negatives.scores is None


def test_anchors_with_different_prompts_embed_as_if_alone(tiny_bert):
    model = _model(tiny_bert).eval()
    texts = ["cat sits on mat", "dog", "the man reads a big book"]
    prompts = ["a red car", None, "a red car"]
    merged = tokenize_with_prompts(model.backbone, texts, prompts)
    assert merged.input_ids.shape[0] == 3
    with torch.no_grad():
        together = model(merged)
        for row, (text, prompt) in enumerate(zip(texts, prompts)):
            alone = model(model.backbone.tokenize([text], prompt=prompt))
            torch.testing.assert_close(together[row], alone[0], rtol=1e-5, atol=1e-5)
    assert merged.instruction_mask[0].sum() == 3 and merged.instruction_mask[1].sum() == 0


# -- the loop ------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_its_outputs(tiny_bert, registry, tmp_path):
    examples = _examples(8, negatives=False)
    before = _model(tiny_bert)
    result = _run(tiny_bert, examples, tmp_path, registry, _settings(epochs=15, batch_size=8, warmup_ratio=0.0, lr=5e-3))
    rows = _metrics(result.metrics_path)
    assert [int(r["step"]) for r in rows] == list(range(1, 16))
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.2 * losses[0], losses

    trained = embplex.load(result.model_path, registry=registry)
    assert result.step == 15 and result.loss == pytest.approx(losses[-1])
    changed = any(
        not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), before.state_dict().values())
    )
    assert changed
    assert result.plot_path.exists() and result.plot_path.stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_learning_rate_warms_up_then_decays_linearly(tiny_bert, registry, tmp_path):
    # 12 examples, batch 4: 3 steps per epoch, 4 epochs = 12 steps, 3 warmup steps
    result = _run(tiny_bert, _examples(), tmp_path, registry, _settings(epochs=4, warmup_ratio=0.25, lr=1e-3))
    lrs = [float(r["lr"]) for r in _metrics(result.metrics_path)]
    expected = [1e-3 * s / 3 for s in range(3)] + [1e-3 * (12 - s) / 9 for s in range(3, 12)]
    assert lrs == pytest.approx(expected)
    assert [int(r["epoch"]) for r in _metrics(result.metrics_path)] == [e for e in range(4) for _ in range(3)]


def test_max_steps_sets_the_run_length(tiny_bert, registry, tmp_path):
    result = _run(tiny_bert, _examples(), tmp_path, registry, _settings(max_steps=5, epochs=1))
    assert result.step == 5 and result.epoch == 1  # ran into a second epoch
    assert len(_metrics(result.metrics_path)) == 5


def test_gradient_accumulation_counts_optimizer_steps(tiny_bert, registry, tmp_path):
    # 3 micro-batches per epoch with accumulation 2: steps after batch 2 and after the short tail
    result = _run(tiny_bert, _examples(), tmp_path, registry, _settings(epochs=2, grad_accumulation=2))
    assert result.step == 4
    assert [int(r["epoch"]) for r in _metrics(result.metrics_path)] == [0, 0, 1, 1]


def test_bf16_autocast_trains(tiny_bert, registry, tmp_path):
    result = _run(tiny_bert, _examples(), tmp_path, registry, _settings(max_steps=2, bf16=True))
    assert result.step == 2 and math.isfinite(result.loss)


def test_unknown_setting_is_refused():
    with pytest.raises(OptionError, match="Did you mean 'batch_size'"):
        TrainSettings.from_dict({"batchsize": 8})
    with pytest.raises(OptionError, match="grad_accumulation"):
        TrainSettings(grad_accumulation=0).check()


# -- checkpoints and exact resume -------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, accumulation, kill_at",
    [
        ("random", 1, 5),  # checkpoint at step 4: mid-way through the second epoch
        ("no_duplicates", 2, 3),  # checkpoint at step 2: the end of the first epoch
    ],
)
def test_resumed_run_ends_with_the_same_weights(tiny_bert, registry, tmp_path, sampler, accumulation, kill_at):
    examples = _examples()
    settings = _settings(epochs=3, checkpoint_every=2, grad_accumulation=accumulation)

    straight = _run(tiny_bert, examples, tmp_path / "straight", registry, settings, sampler=sampler)

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Killed):
        _run(tiny_bert, examples, interrupted, registry, settings, [_kill_at(kill_at)], sampler=sampler)
    checkpoint = latest_checkpoint(interrupted)
    assert checkpoint is not None and checkpoint.name == f"step-{kill_at - 1}"
    assert not (interrupted / "model").exists()

    resumed = _run(tiny_bert, examples, interrupted, registry, settings, sampler=sampler)
    assert resumed.resumed_from == checkpoint and resumed.step == straight.step

    expected = embplex.load(straight.model_path, registry=registry).state_dict()
    actual = embplex.load(resumed.model_path, registry=registry).state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    # the metrics were trimmed back to the checkpoint and continue identically
    assert _metrics(resumed.metrics_path) == [
        {**row, "elapsed": other["elapsed"]}
        for row, other in zip(_metrics(straight.metrics_path), _metrics(resumed.metrics_path))
    ]
    assert len(_metrics(resumed.metrics_path)) == straight.step


def test_without_rng_state_dropout_would_differ(tiny_bert):
    """The resume test is meaningful: dropout draws depend on the random state."""
    model = _model(tiny_bert).train()
    features = model.backbone.tokenize(["the cat sits on the mat"])
    torch.manual_seed(1)
    first = model(features)
    second = model(features)
    assert not torch.equal(first, second)


def test_checkpoint_layout_and_loadable_model(tiny_bert, registry, tmp_path):
    settings = _settings(max_steps=4, checkpoint_every=2, keep_checkpoints=1)
    _run(tiny_bert, _examples(), tmp_path, registry, settings)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4"]
    checkpoint = tmp_path / "checkpoints" / "step-4"
    assert {p.name for p in checkpoint.iterdir()} == {"model", "training_state.pt", "trainer_state.json"}
    state = embplex.storage.read_json(checkpoint / "trainer_state.json", "trainer state")
    assert state["step"] == 4 and len(state["config_hash"]) == 64
    assert state["config"]["settings"]["lr"] == 1e-3 and "resume" not in state["config"]["settings"]
    # tensors and plain containers only: loads with weights_only=True
    assert embplex.storage.load_torch_state(checkpoint / "training_state.pt")["progress"]["step"] == 4
    embplex.load(checkpoint / "model", registry=registry)


def test_resuming_with_another_config_says_what_differs(tiny_bert, registry, tmp_path):
    examples = _examples()
    _run(tiny_bert, examples, tmp_path, registry, _settings(max_steps=2, checkpoint_every=2))
    with pytest.raises(CheckpointMismatchError, match=r"settings\.lr: 0\.001 in the checkpoint, 0\.002 now"):
        _run(tiny_bert, examples, tmp_path, registry, _settings(max_steps=2, checkpoint_every=2, lr=2e-3))
    with pytest.raises(CheckpointMismatchError, match=r"data\.examples"):
        _run(tiny_bert, examples[:8], tmp_path, registry, _settings(max_steps=2, checkpoint_every=2))
    # bookkeeping settings may change between runs
    _run(tiny_bert, examples, tmp_path, registry, _settings(max_steps=2, checkpoint_every=1, log_every=5))


def test_resume_off_starts_over(tiny_bert, registry, tmp_path):
    examples = _examples()
    _run(tiny_bert, examples, tmp_path, registry, _settings(max_steps=2, checkpoint_every=2))
    with pytest.warns(UserWarning, match="deleting the existing checkpoints"):
        result = _run(tiny_bert, examples, tmp_path, registry, _settings(max_steps=2, lr=2e-3, resume=False))
    assert result.resumed_from is None and latest_checkpoint(tmp_path) is None


def test_corrupt_checkpoint_is_reported(tiny_bert, registry, tmp_path):
    examples = _examples()
    settings = _settings(max_steps=2, checkpoint_every=2)
    _run(tiny_bert, examples, tmp_path, registry, settings)
    (tmp_path / "checkpoints" / "step-2" / "training_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="training_state.pt is corrupt"):
        _run(tiny_bert, examples, tmp_path, registry, settings)


# -- runs that end badly -------------------------------------------------------------


def test_rerunning_a_finished_run_reports_it_complete(tiny_bert, registry, tmp_path):
    examples = _examples()
    settings = _settings(max_steps=3, checkpoint_every=2)
    first = _run(tiny_bert, examples, tmp_path, registry, settings)
    assert not first.already_complete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]  # the last step too
    again = _run(tiny_bert, examples, tmp_path, registry, settings)
    assert again.already_complete and again.step == 3 and again.resumed_from == tmp_path / "checkpoints" / "step-3"
    assert again.loss == pytest.approx(first.loss)  # the last loss the metrics recorded
    assert len(_metrics(again.metrics_path)) == 3  # nothing was trained or logged again
    expected = embplex.load(first.model_path, registry=registry).state_dict()
    for name, tensor in embplex.load(again.model_path, registry=registry).state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_ctrl_c_names_the_last_checkpoint(tiny_bert, registry, tmp_path):
    def interrupt_at(step):
        def callback(info):
            if info.step == step:
                raise KeyboardInterrupt

        return callback

    settings = _settings(max_steps=4, checkpoint_every=2)
    with pytest.raises(TrainingInterrupted, match=r"after step 3 of 4; the last checkpoint is .*step-2") as caught:
        _run(tiny_bert, _examples(), tmp_path / "with", registry, settings, [interrupt_at(3)])
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.checkpoint == tmp_path / "with" / "checkpoints" / "step-2"
    with pytest.raises(TrainingInterrupted, match="after step 1 of 4; no checkpoint was written") as caught:
        _run(tiny_bert, _examples(), tmp_path / "without", registry, _settings(max_steps=4), [interrupt_at(1)])
    assert caught.value.checkpoint is None


def test_checkpoints_keep_the_newest_two_by_default(tiny_bert, registry, tmp_path):
    assert TrainSettings().keep_checkpoints == 2
    _run(tiny_bert, _examples(), tmp_path / "default", registry, _settings(max_steps=3, checkpoint_every=1))
    assert [p.name for p in list_checkpoints(tmp_path / "default")] == ["step-2", "step-3"]
    _run(tiny_bert, _examples(), tmp_path / "all", registry, _settings(max_steps=3, checkpoint_every=1, keep_checkpoints=0))
    assert [p.name for p in list_checkpoints(tmp_path / "all")] == ["step-1", "step-2", "step-3"]
    with pytest.raises(OptionError, match="keep_checkpoints"):
        TrainSettings(keep_checkpoints=-1).check()


def test_stale_staging_folders_are_removed_when_a_run_starts(tiny_bert, registry, tmp_path):
    # a process killed inside an atomic save (as by SIGKILL during the final model save)
    code = (
        "import os, signal, sys\n"
        "from embplex.storage import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as staging:\n"
        "    (staging / 'weights').write_bytes(b'0' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")])
    assert killed.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".model.tmp-*"))
    assert len(leftovers) == 1
    _run(tiny_bert, _examples(), tmp_path, registry, _settings(max_steps=1))
    assert not leftovers[0].exists() and (tmp_path / "model").is_dir()



def test_the_next_save_of_a_folder_removes_what_a_killed_save_of_it_left(tmp_path):
    from embplex.storage import atomic_directory

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in ("index", "other"):
        (tmp_path / f".{name}.tmp-{gone.pid}@{socket.gethostname()}-abcd1234").mkdir()
    with atomic_directory(tmp_path / "index") as staging:
        (staging / "data").write_text("saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{gone.pid}@{socket.gethostname()}-abcd1234", "index"]


def test_staging_folders_of_live_writers_are_kept(tmp_path):
    from embplex.storage import STALE_UNOWNED_SECONDS, atomic_directory, remove_stale_staging

    host = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".model.tmp-{gone.pid}@{host}-abcd1234",
            "alive": f".model.tmp-{alive.pid}@{host}-abcd1234",
            "other host": f".model.tmp-{gone.pid}@not-{host}-abcd1234",
            "old name, old": ".model.tmp-k3j4h5g6",
            "old name, fresh": ".model.tmp-a1b2c3d4",
            "swap": f".step-2.old-{gone.pid}@{host}",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
        (tmp_path / ".metrics.csv.tmp-1@x-abcd1234").write_text("")  # a file left by atomic_write_text
        (tmp_path / ".notes.tmp-mine").write_text("")  # not a name embplex writes
        long_ago = time.time() - STALE_UNOWNED_SECONDS - 60
        for name in (names["old name, old"], ".metrics.csv.tmp-1@x-abcd1234", ".notes.tmp-mine"):
            os.utime(tmp_path / name, (long_ago, long_ago))
        with atomic_directory(tmp_path / "saving") as staging:  # a save in progress in this process
            removed = {p.name for p in remove_stale_staging(tmp_path)}
            assert staging.exists()
    finally:
        alive.kill()
        alive.wait()
    assert removed == {names["dead"], names["old name, old"], names["swap"], ".metrics.csv.tmp-1@x-abcd1234"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["alive"], names["other host"], names["old name, fresh"], ".notes.tmp-mine", "saving"]
    )


# -- samplers that read the model ------------------------------------------------------


class HardestNegativeSampler(Sampler):
    """Mines with the live model at the start of each epoch: every batch is an anchor plus
    the examples whose positives the model finds closest to it (in-batch hard negatives)."""

    def __init__(self) -> None:
        self.plan: dict | None = None  # {"epoch": e, "batches": [[i, j], ...]}

    def batches(self, examples, batch_size, seed, epoch, context):
        if self.plan is None or self.plan["epoch"] != epoch:
            self.plan = {"epoch": epoch, "batches": self._mine(examples, batch_size, seed, epoch, context.model)}
        yield from (list(batch) for batch in self.plan["batches"])

    def _mine(self, examples, batch_size, seed, epoch, model):
        anchors = model.encode([e.anchor for e in examples], convert_to="torch")
        positives = model.encode([e.positive for e in examples], convert_to="torch")
        similarity = anchors @ positives.T
        unused = set(range(len(examples)))
        plan = []
        for first in self.permutation(len(examples), seed, epoch):
            if first not in unused:
                continue
            unused.discard(first)
            batch = [first]
            while unused and len(batch) < batch_size:
                hardest = max(unused, key=lambda j: float(similarity[first, j]))
                unused.discard(hardest)
                batch.append(hardest)
            plan.append(batch)
        return plan

    def state_dict(self):
        return {"plan": self.plan}

    def load_state_dict(self, state):
        if set(state) != {"plan"}:
            raise ValueError(f"not a HardestNegativeSampler state: keys {sorted(state)}")
        self.plan = state["plan"]


def _recorded_batches(monkeypatch) -> list[list[str]]:
    """The anchors of every batch the trainer trains on, in order."""
    import embplex.training as training

    seen: list[list[str]] = []

    def recording(backbone, examples):
        seen.append([e.anchor for e in examples])
        return make_training_batch(backbone, examples)

    monkeypatch.setattr(training, "make_training_batch", recording)
    return seen


def _mining_run(path, examples, output, registry, callbacks=(), sampler=None):
    settings = _settings(batch_size=2, max_steps=4, checkpoint_every=2, lr=5e-3)
    return train(
        _model(path), examples, registry.create("loss", "infonce"), sampler or HardestNegativeSampler(),
        settings, output, registry=registry, callbacks=callbacks,
    )


def test_a_mining_sampler_resumes_exactly(tiny_bert, registry, tmp_path, monkeypatch):
    examples = _examples(6, negatives=False)
    seen = _recorded_batches(monkeypatch)
    straight = _mining_run(tiny_bert, examples, tmp_path / "straight", registry)
    straight_batches = list(seen)
    seen.clear()
    with pytest.raises(Killed):
        _mining_run(tiny_bert, examples, tmp_path / "resumed", registry, [_kill_at(3)])
    assert latest_checkpoint(tmp_path / "resumed").name == "step-2"
    del seen[2:]  # the step the kill threw away is trained again after the resume
    resumed = _mining_run(tiny_bert, examples, tmp_path / "resumed", registry)
    assert resumed.resumed_from is not None
    assert seen == straight_batches  # batch by batch, the restored plan and not a re-mined one
    expected = embplex.load(straight.model_path, registry=registry).state_dict()
    for name, tensor in embplex.load(resumed.model_path, registry=registry).state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_sampler_state_from_another_run_is_refused_before_training(tiny_bert, registry, tmp_path, monkeypatch):
    examples = _examples(12, negatives=False)
    for name, sampler, data in [
        ("sampler", registry.create("sampler", "random"), examples[:6]),
        ("data", HardestNegativeSampler(), examples[6:]),
    ]:
        with pytest.raises(Killed):
            _mining_run(tiny_bert, data, tmp_path / name, registry, [_kill_at(3)], sampler=sampler)
    target = tmp_path / "target"
    with pytest.raises(Killed):
        _mining_run(tiny_bert, examples[:6], target, registry, [_kill_at(3)])
    checkpoint = target / "checkpoints" / "step-2"
    seen = _recorded_batches(monkeypatch)
    for name, message in [("sampler", "holds the state of sampler .*RandomSampler"), ("data", "holds a sampler state derived from other training data")]:
        shutil.copyfile(tmp_path / name / "checkpoints" / "step-2" / "training_state.pt", checkpoint / "training_state.pt")
        with pytest.raises(CheckpointMismatchError, match=f"{checkpoint / 'training_state.pt'} {message}"):
            _mining_run(tiny_bert, examples[:6], target, registry)
        assert seen == [] and latest_checkpoint(target) == checkpoint  # nothing trained, nothing lost
    # a checkpoint with no sampler state at all (as older embplex wrote them)
    state = embplex.storage.load_torch_state(checkpoint / "training_state.pt")
    del state["sampler"]
    torch.save(state, checkpoint / "training_state.pt")
    with pytest.raises(ModelFileError, match="holds no sampler state, which sampler .*HardestNegativeSampler needs"):
        _mining_run(tiny_bert, examples[:6], target, registry)
    assert seen == []


def test_a_sampler_state_that_a_checkpoint_cannot_hold_is_refused(tiny_bert, registry, tmp_path):
    class Unstorable(HardestNegativeSampler):
        def state_dict(self):
            return {"plan": {"epoch": 0, "index": object()}}

    with pytest.raises(OptionError, match=r"state_dict\(\) holds a object at plan.index"):
        _mining_run(tiny_bert, _examples(6, negatives=False), tmp_path, registry, sampler=Unstorable())
    assert latest_checkpoint(tmp_path) is None
