"""Data-parallel training on 2 CPU processes (gloo) equals one process on the same global
batches; a process that dies ends the others with an error instead of a hang; a resumed
run continues exactly; what cannot run across processes is refused before training.

Each process is started as torchrun would start it (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), running ``tests/ddp_worker.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import embplex
from embplex.testing import WORDS
from embplex.training import TrainSettings, list_checkpoints, train

WORKER = Path(__file__).with_name("ddp_worker.py")
sys.path.insert(0, str(WORKER.parent))
import ddp_worker  # noqa: E402

#: every launch must end well within this (seconds)
LAUNCH_LIMIT = 90

# lr 1e-4: Adam divides each gradient by its own size, so float rounding in a tiny
# gradient grows with the learning rate; here the largest difference is ~1e-7, and the
# weights move by more than 1e-4 (checked below).
SETTINGS = dict(
    batch_size=8, max_steps=4, lr=1e-4, warmup_steps=0, log_every=1, progress_bar=False, tensorboard=False,
    seed=3, checkpoint_every=2, keep_checkpoints=0, distributed_timeout=20,
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A tiny BERT without dropout (dropout masks are drawn per process, so only a
    dropout-free model can match one process to the last digit), with a fixed
    vocabulary: the same model in every session, so the differences compared are too."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("ddp-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocabulary = {token: i for i, token in enumerate(specials + sorted(set(WORDS)))}
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocabulary), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(vocab=vocabulary, do_lower_case=True).save_pretrained(folder)
    return str(folder)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(mode: str, spec: dict, tmp: Path, processes: int = 2) -> list[subprocess.CompletedProcess]:
    """Run ``processes`` workers as torchrun would, each bounded in time."""
    spec_path = tmp / f"spec-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    port = _free_port()
    running = []
    for rank in range(processes):
        env = dict(
            os.environ,
            WORLD_SIZE=str(processes), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(processes),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        )
        running.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), mode, str(spec_path)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    done = []
    deadline = time.monotonic() + LAUNCH_LIMIT
    for process in running:
        try:
            out, err = process.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in running:
                other.kill()
            pytest.fail(f"a worker did not finish within {LAUNCH_LIMIT} s: it hangs")
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done


_REFERENCES: dict[tuple[str, str], tuple[list[float], dict]] = {}


def single_process(
    model_path: str, loss: dict, output: Path, settings: dict = SETTINGS, count: int = 16
) -> tuple[list[float], dict]:
    """The reference: one process, the same global batches, in this process (once per
    model, loss, settings and data in a session)."""
    key = (model_path, json.dumps([loss, settings, count], sort_keys=True))
    if key not in _REFERENCES:
        _REFERENCES[key] = _train_single(model_path, loss, output, settings, count)
    return _REFERENCES[key]


def _train_single(model_path: str, loss: dict, output: Path, settings: dict, count: int) -> tuple[list[float], dict]:
    # One thread, as every worker: with several, the CPU kernels' summation order (and
    # so the last bits) may change from run to run, and Adam divides tiny gradients by
    # their own size, which can turn a difference in the last bits into one above 1e-5.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_single_thread(model_path, loss, output, settings, count)
    finally:
        torch.set_num_threads(threads)


def _train_single_thread(
    model_path: str, loss: dict, output: Path, settings: dict, count: int
) -> tuple[list[float], dict]:
    registry = embplex.load_registry()
    model, loss_module, sampler = ddp_worker.build({"model": model_path, "loss": loss}, registry)
    losses: list[float] = []
    torch.manual_seed(0)
    train(
        model, ddp_worker.examples(count), loss_module, sampler, TrainSettings(**settings), output_dir=output,
        registry=registry, callbacks=[lambda info: losses.append(info.loss)],
    )
    return losses, model.state_dict()


def assert_same_weights(state: dict, reference: dict) -> None:
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_ok(runs: list[subprocess.CompletedProcess]) -> None:
    for rank, run in enumerate(runs):
        assert run.returncode == 0, f"rank {rank} failed:\n{run.stderr[-3000:]}"


LOSSES = {
    "infonce": {"name": "infonce", "options": {"symmetric": True}},
    # a wrapping loss around a gradient-caching one: the cached embeddings' gradients come
    # back through the gather, and the replay back-propagates them on each process
    "matryoshka+cached_infonce": {
        "name": "matryoshka",
        "options": {"dims": [32, 16], "inner": {"name": "cached_infonce", "mini_batch_size": 3}},
    },
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_two_processes_train_the_single_process_model(model_path, tmp_path, loss):
    reference_losses, reference = single_process(model_path, LOSSES[loss], tmp_path / "single")

    output = tmp_path / "ddp"
    runs = launch("train", {"model": model_path, "output": str(output), "loss": LOSSES[loss], "settings": SETTINGS}, tmp_path)
    assert_ok(runs)
    results = [torch.load(output / f"rank{rank}.pt") for rank in (0, 1)]
    # the loss of every step is the global batch's, logged once (callbacks run on rank 0)
    assert results[0]["losses"] == pytest.approx(reference_losses, abs=1e-5)
    assert results[1]["losses"] == []
    assert len(reference_losses) == SETTINGS["max_steps"]
    for result in results:
        assert_same_weights(result["state"], reference)
    # and the steps moved the weights far more than that tolerance
    initial = embplex.compose({"name": "hf_encoder", "path": model_path}, pooling="mean").state_dict()
    assert max(float((reference[n] - t).abs().max()) for n, t in initial.items()) > 1e-4
    # what one process leaves untouched (BERT's pooler: no gradient, so AdamW skips it,
    # weight decay included) every process leaves untouched, bit for bit
    untouched = [n for n, t in initial.items() if torch.equal(reference[n], t)]
    assert any("pooler" in n for n in untouched)
    for result in results:
        assert all(torch.equal(result["state"][n], initial[n]) for n in untouched)
    # rank 0 wrote the checkpoints and the model, once
    assert [p.name for p in list_checkpoints(output)] == ["step-2", "step-4"]
    saved = embplex.load(output / "model")
    assert_same_weights(saved.state_dict(), reference)
    rows = (output / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + SETTINGS["max_steps"]


def test_a_batch_that_does_not_split_evenly_is_weighted_by_each_slice(model_path, tmp_path):
    """19 examples in batches of 8: the last batch, 3 examples, splits 1 + 2. Each
    process's loss counts by its share of the rows, and the run still equals one process."""
    settings = {**SETTINGS, "max_steps": None, "epochs": 1, "checkpoint_every": 0}
    reference_losses, reference = single_process(model_path, LOSSES["infonce"], tmp_path / "single", settings, 19)
    output = tmp_path / "ddp"
    spec = {"model": model_path, "output": str(output), "loss": LOSSES["infonce"], "settings": settings, "examples": 19}
    assert_ok(launch("train", spec, tmp_path))
    result = torch.load(output / "rank0.pt")
    assert len(reference_losses) == 3
    assert result["losses"] == pytest.approx(reference_losses, abs=1e-5)
    assert_same_weights(result["state"], reference)


def test_a_dead_process_stops_the_others_and_the_run_resumes_exactly(model_path, tmp_path):
    loss = LOSSES["infonce"]
    _, reference = single_process(model_path, loss, tmp_path / "single")
    output = tmp_path / "ddp"
    spec = {"model": model_path, "output": str(output), "loss": loss, "settings": SETTINGS}

    started = time.monotonic()
    runs = launch("train", {**spec, "die": {"rank": 1, "at_step": 3}}, tmp_path)
    assert runs[1].returncode == 17  # the process that died
    # the survivor stopped on its own, with an error that says what happened
    assert runs[0].returncode == 2, runs[0].stderr[-3000:]
    assert "across processes failed" in runs[0].stderr and "Another process probably stopped" in runs[0].stderr
    assert time.monotonic() - started < SETTINGS["distributed_timeout"] + 40
    assert [p.name for p in list_checkpoints(output)] == ["step-2"]

    # launched again, the run resumes from step 2 and ends with the uninterrupted weights
    runs = launch("train", spec, tmp_path)
    assert_ok(runs)
    for rank in (0, 1):
        assert_same_weights(torch.load(output / f"rank{rank}.pt")["state"], reference)


def test_what_cannot_run_across_processes_is_refused_before_training(model_path, tmp_path):
    output = tmp_path / "ddp"
    spec = {"model": model_path, "output": str(output), "loss": LOSSES["infonce"], "settings": {**SETTINGS, "max_steps": 2}}
    assert_ok(launch("refusals", spec, tmp_path))
    messages = json.loads((output / "refusals.json").read_text())
    assert "train.batch_size=3 does not split evenly over 2 processes" in messages["batch"]
    assert "LateInteraction cannot train across 2 processes" in messages["loss"]
    assert messages["config"].startswith("CheckpointMismatchError") and "settings.lr: 0.0001" in messages["config"]
    assert "RankDependentSampler yielded different batches on different processes (epoch 0, batch 0)" in messages["sampler"]


def test_every_loss_says_whether_it_is_distributed_correct(registry):
    """One mechanism for all: a loss whose value is not a mean over local anchors with
    gathered candidates says why; a wrapper answers for its inner loss."""
    answers = {}
    for name in ["infonce", "focal_infonce", "hard_negative_mixing", "progressive", "cached_infonce", "matryoshka"]:
        answers[name] = registry.create("loss", name).distributed_problem()
    assert set(answers.values()) == {None}
    assert "in-batch candidates are only this process's" in registry.create("loss", "late_interaction").distributed_problem()
    for name in ["score_distill", "listwise_distill", "soft_label"]:
        assert registry.create("loss", name).distributed_problem() is None
        assert "in_batch=true" in registry.create("loss", name, in_batch=True).distributed_problem()
    wrapped = registry.create("loss", "matryoshka", dims=[16], inner={"name": "late_interaction"})
    assert wrapped.distributed_problem() == registry.create("loss", "late_interaction").distributed_problem()
    assert embplex.Loss().distributed_problem() is not None  # unchecked: refused


def test_torchrun_launches_the_embplex_command(tmp_path, tiny_bert_path, data_dir):
    """The documented launch form: `torchrun --nproc_per_node 2 -m embplex train ...`;
    the run reports, logs and saves once."""
    out = tmp_path / "run"
    command = [
        str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "embplex", "train", f"backbone.path={tiny_bert_path}", f"data.root={data_dir}", "data=stsb",
        "data.train.limit=32", "train.batch_size=8", "train.max_steps=2", "train.checkpoint_every=1",
        "train.progress_bar=false", "train.tensorboard=false", f"output_dir={out}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", EMBPLEX_DATA=str(data_dir))
    done = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_LIMIT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 2 steps") == 1
    assert [p.name for p in list_checkpoints(out)] == ["step-1", "step-2"]
    trainer_state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert trainer_state["config"]["processes"] == 2
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    embplex.load(out / "model")
