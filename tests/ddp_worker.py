"""One process of a data-parallel test run, started by tests/test_distributed.py with the
environment torchrun would give it (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ...).

    python tests/ddp_worker.py train SPEC.json      train; write rank<r>.pt (losses, weights)
    python tests/ddp_worker.py refusals SPEC.json   train, then build trainers that must be refused

``SPEC.json`` holds the model folder, the output folder, the loss and the settings; a
``die`` entry ``{"rank": r, "at_step": s}`` makes rank ``r`` exit abruptly (``os._exit``,
no clean-up, as a killed process) when it reaches the gradient exchange of step ``s``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import traceback
from pathlib import Path

import torch

import embplex
import embplex.distributed as distributed
from embplex.components import Example, Sampler
from embplex.errors import EmbplexError
from embplex.testing import WORDS
from embplex.training import TrainSettings, train


def examples(count: int = 16) -> list[Example]:
    import random

    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9)))  # noqa: E731
    return [Example(anchor=sentence(), positive=sentence(), negatives=[sentence(), sentence()]) for _ in range(count)]


def build(spec: dict, registry: embplex.Registry):
    model = embplex.compose({"name": "hf_encoder", "path": spec["model"]}, pooling="mean", registry=registry)
    loss = registry.create("loss", spec["loss"]["name"], **spec["loss"].get("options", {}))
    sampler = registry.create("sampler", "random")
    return model, loss, sampler


def die_at(rank: int, step: int) -> None:
    """Make this process vanish at the gradient exchange of ``step``, if it is ``rank``."""
    if distributed.rank() != rank:
        return
    original = distributed.average_gradients
    calls = {"n": 0}

    def exchange(parameters):
        calls["n"] += 1
        if calls["n"] == step:
            os._exit(17)  # no clean-up, no goodbye to the peers: as SIGKILL
        return original(parameters)

    distributed.average_gradients = exchange


def run_train(spec: dict) -> None:
    registry = embplex.load_registry()
    model, loss, sampler = build(spec, registry)
    settings = TrainSettings(**spec["settings"])
    losses: list[float] = []
    torch.manual_seed(0)
    trainer_args = dict(output_dir=spec["output"], registry=registry, callbacks=[lambda info: losses.append(info.loss)])
    distributed.setup(settings.distributed_timeout)
    if "die" in spec:
        die_at(spec["die"]["rank"], spec["die"]["at_step"])
    result = train(model, examples(spec.get("examples", 16)), loss, sampler, settings, **trainer_args)
    out = Path(spec["output"]) / f"rank{distributed.rank()}.pt"
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    torch.save({"losses": losses, "state": state, "step": result.step}, out)


class RankDependentSampler(Sampler):
    """Wrong on purpose: each process shuffles with its own rank."""

    def batches(self, examples, batch_size, seed, epoch, context):
        order = list(range(len(examples)))
        random.Random(distributed.rank()).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]

    def num_batches(self, examples, batch_size):
        return -(-len(examples) // batch_size)


def run_refusals(spec: dict) -> None:
    """Train (a checkpoint to resume from), then build trainers that must raise before
    training; record their messages (rank 0 writes them)."""
    run_train(spec)
    registry = embplex.load_registry()
    messages = {}
    cases = {
        "batch": ({}, {"batch_size": 3}),
        "loss": ({"name": "late_interaction"}, {}),
        "config": ({}, {"lr": 0.5}),  # the folder holds a checkpoint written with another lr
    }
    for case, (loss_spec, overrides) in cases.items():
        local = dict(spec, loss=loss_spec or spec["loss"])
        model, loss, sampler = build(local, registry)
        settings = TrainSettings(**{**spec["settings"], **overrides})
        try:
            train(model, examples(), loss, sampler, settings, output_dir=spec["output"], registry=registry)
            messages[case] = None
        except EmbplexError as error:
            messages[case] = f"{type(error).__name__}: {error}"
    # a sampler whose batches depend on the process: stopped at its first batch
    model, loss, _ = build(spec, registry)
    settings = TrainSettings(**{**spec["settings"], "resume": False})
    try:
        train(model, examples(), loss, RankDependentSampler(), settings, output_dir=Path(spec["output"]) / "rank-sampler")
        messages["sampler"] = None
    except EmbplexError as error:
        messages["sampler"] = f"{type(error).__name__}: {error}"
    if distributed.rank() == 0:
        (Path(spec["output"]) / "refusals.json").write_text(json.dumps(messages))


if __name__ == "__main__":
    mode, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    try:
        {"train": run_train, "refusals": run_refusals}[mode](spec)
    except EmbplexError as error:
        # as the CLI reports it: one line, exit status 2
        print(f"rank {os.environ.get('RANK')}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
