"""The training loop: batches from a sampler, a loss, AdamW, checkpoints that resume exactly.

::

    from embplex.training import TrainSettings, train
    result = train(model, examples, loss, sampler, TrainSettings(batch_size=32, epochs=1), "runs/x")

What makes resuming exact: the sampler is a pure function of ``(examples, batch_size,
seed, epoch)`` and of its own state, and a checkpoint (:mod:`embplex.checkpoints`) holds
everything else that changes during training. A run killed after checkpoint N and
started again with the same configuration ends with the same weights, bit for bit, as a
run that was never interrupted.

Under ``torchrun`` (``torchrun --nproc_per_node N -m embplex train ...``) the same loop
runs data-parallel: every process takes its slice of each global batch, gradients are
averaged (:mod:`embplex.distributed`), and only rank 0 writes files; the weights equal one
process's on the same global batch (``docs/concepts.md``, "Losses across processes").

A rerun whose newest checkpoint is the last step trains nothing and reports
``already_complete``; Ctrl-C raises :class:`~embplex.errors.TrainingInterrupted` naming
the last checkpoint; a new run deletes what killed saves left (``.model.tmp-<pid>@<host>-*``).

Output folder (``keep_checkpoints`` newest checkpoints, the last step's included)::

    checkpoints/step-N/model/              the model at step N (loadable with embplex.load)
    checkpoints/step-N/training_state.pt   optimizer, scheduler, sampler, RNG, position (tensors only)
    checkpoints/step-N/trainer_state.json  step, epoch and the run's config and its hash
    metrics.csv  tensorboard/  loss.png  model/
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .checkpoints import Checkpoints, Progress, Resumable, capture_rng, latest_checkpoint, list_checkpoints
from .components import Example, Features, Index, Loss, Sampler, TrainingBatch, TrainingContext
from .devices import is_out_of_memory
from .errors import InputError, OptionError, OutOfMemoryError, TrainingInterrupted
from .storage import atomic_write_text
from .teachers import teacher_for

if TYPE_CHECKING:
    from .model import EmbeddingModel
    from .registry import Registry
    from .teachers import Teacher

__all__ = [
    "StepInfo",
    "TrainResult",
    "TrainSettings",
    "Trainer",
    "latest_checkpoint",
    "list_checkpoints",
    "make_training_batch",
    "train",
]

METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ("step", "epoch", "loss", "lr", "elapsed")


# ---------------------------------------------------------------------------
# settings and results
# ---------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """How to train.

    :param batch_size: examples per micro-batch (what the sampler groups).
    :param epochs: passes over the data; ignored when ``max_steps`` is set.
    :param max_steps: optimizer steps to run; sets the length of the schedule.
    :param lr: peak learning rate of AdamW.
    :param weight_decay: AdamW decay, not applied to biases and norm weights.
    :param warmup_ratio: share of the steps with a linearly rising learning rate
        (``ceil(ratio × steps)`` steps, rising from 0: with any warm-up, step 1 runs at
        learning rate 0, which matters in very short runs).
    :param warmup_steps: the same as a step count; overrides ``warmup_ratio``.
    :param grad_accumulation: micro-batches per optimizer step.
    :param bf16: run forward passes under bfloat16 autocast.
    :param seed: seeds Python, NumPy and torch, and the sampler's order.
    :param max_grad_norm: clip the gradient norm to this; ``None`` or 0 turns it off.
    :param checkpoint_every: write a checkpoint every this many steps (0: never).
    :param keep_checkpoints: keep only the newest this many checkpoints (0 or ``None``: all).
    :param log_every: write metrics every this many steps.
    :param tensorboard: also write metrics for TensorBoard.
    :param progress_bar: show a tqdm progress bar.
    :param resume: continue from the newest checkpoint in the output folder; when off,
        existing checkpoints there are deleted.
    :param distributed_timeout: under ``torchrun``, seconds a process waits for the others
        at a collective before it stops with an error (a process that died).
    """

    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    grad_accumulation: int = 1
    bf16: bool = False
    seed: int = 42
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 0
    keep_checkpoints: int | None = 2
    log_every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    resume: bool = True
    distributed_timeout: float = 300.0

    # Settings that change how a run is recorded, not what it computes: resuming with a
    # different value is fine, so they stay out of the config hash.
    BOOKKEEPING: ClassVar[tuple[str, ...]] = (
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "tensorboard",
        "progress_bar",
        "resume",
        "distributed_timeout",
    )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainSettings":
        """Settings from a config section, rejecting unknown keys with a suggestion."""
        accepted = [f.name for f in dataclasses.fields(cls) if f.init]
        for key in values:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise OptionError(f"training has no setting '{key}'.{hint} Settings: {', '.join(accepted)}.")
        return cls(**values)

    def check(self) -> None:
        def positive(name: str, value: Any) -> None:
            if not isinstance(value, int) or value < 1:
                raise OptionError(f"training.{name} must be a whole number of at least 1, not {value!r}.")

        positive("batch_size", self.batch_size)
        positive("grad_accumulation", self.grad_accumulation)
        positive("log_every", self.log_every)
        if self.max_steps is not None:
            positive("max_steps", self.max_steps)
        else:
            positive("epochs", self.epochs)
        if not self.lr > 0:
            raise OptionError(f"training.lr must be positive, not {self.lr!r}.")
        if not 0 <= self.warmup_ratio <= 1:
            raise OptionError(f"training.warmup_ratio must be between 0 and 1, not {self.warmup_ratio!r}.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise OptionError(f"training.warmup_steps must be 0 or more, not {self.warmup_steps!r}.")
        if self.checkpoint_every < 0:
            raise OptionError("training.checkpoint_every must be 0 (off) or a number of steps.")
        if self.keep_checkpoints is not None and self.keep_checkpoints != 0:
            positive("keep_checkpoints", self.keep_checkpoints)
        if not (isinstance(self.distributed_timeout, (int, float)) and self.distributed_timeout > 0):
            raise OptionError(
                f"training.distributed_timeout must be a positive number of seconds, not {self.distributed_timeout!r}."
            )

    def computational(self) -> dict[str, Any]:
        """The settings that determine the trained weights (what the config hash covers)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and f.name not in self.BOOKKEEPING
        }


@dataclass
class StepInfo:
    """Handed to callbacks after every optimizer step (and after its checkpoint).

    A callback that raises ends the run after this step; ``train`` called again with the
    same arguments resumes from the newest checkpoint.

    Under ``torchrun`` callbacks run in the rank-0 process only (the one that logs,
    saves and evaluates).

    :param step: the optimizer step just done, counting from 1.
    :param epoch: the epoch it belongs to, counting from 0.
    :param loss: the step's loss, the mean over its micro-batches.
    :param lr: the learning rate the step used (0 at step 1 under the default warm-up).
    :param checkpoint: the checkpoint folder written at this step, or ``None``.
    """

    step: int
    epoch: int
    loss: float
    lr: float
    checkpoint: Path | None


@dataclass
class TrainResult:
    """What a run ended with.

    ``already_complete`` is true when the output folder held a checkpoint of this run at
    its last step: nothing was trained, the model was saved from that checkpoint and
    ``loss`` is the last one the metrics recorded.
    """

    step: int
    epoch: int
    loss: float | None
    model_path: Path
    metrics_path: Path
    plot_path: Path | None
    resumed_from: Path | None
    already_complete: bool = False


# ---------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------


def _pad_id(backbone: Any) -> int:
    tokenizer = getattr(backbone, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _merge_features(parts: list[Features], rows: list[list[int]], pad_id: int) -> Features:
    """Features tokenized in groups stacked back into one batch in the original row order.

    ``rows[g]`` lists the original positions of group ``g``'s texts.
    """
    width = max(part.input_ids.shape[1] for part in parts)
    left = parts[0].padding_side == "left"

    def pad(tensor: Tensor, value: int) -> Tensor:
        missing = width - tensor.shape[1]
        if missing == 0:
            return tensor
        filler = tensor.new_full((tensor.shape[0], missing), value)
        return torch.cat([filler, tensor] if left else [tensor, filler], dim=1)

    order = torch.tensor([position for group in rows for position in group])
    restore = torch.argsort(order)

    def stacked(value: int, tensors: list[Tensor]) -> Tensor:
        return torch.cat([pad(t, value) for t in tensors])[restore]

    extra: dict[str, Any] = {}
    for key, first in parts[0].extra.items():
        values = [part.extra.get(key) for part in parts]
        if isinstance(first, Tensor) and first.dim() == 2 and first.shape[0] == parts[0].input_ids.shape[0]:
            extra[key] = stacked(0, values)
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            extra[key] = sum(values)
        else:
            extra[key] = first
    instruction = None
    if all(part.instruction_mask is not None for part in parts):
        instruction = stacked(0, [p.instruction_mask for p in parts])
    return Features(
        input_ids=stacked(pad_id, [p.input_ids for p in parts]),
        attention_mask=stacked(0, [p.attention_mask for p in parts]),
        instruction_mask=instruction,
        padding_side=parts[0].padding_side,
        extra=extra,
    )


def tokenize_with_prompts(backbone: Any, texts: Sequence[str], prompts: Sequence[str | None]) -> Features:
    """Tokenize texts that may carry different prompts (one tokenizer call per prompt)."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) == 1:
        return backbone.tokenize(list(texts), prompt=distinct[0])
    groups = [[i for i, p in enumerate(prompts) if p == prompt] for prompt in distinct]
    parts = [backbone.tokenize([texts[i] for i in group], prompt=prompt) for group, prompt in zip(groups, distinct)]
    return _merge_features(parts, groups, _pad_id(backbone))


def make_training_batch(
    backbone: Any, examples: Sequence[Example], slice_of: Sequence[Example] | None = None
) -> TrainingBatch:
    """Tokenize a batch per role.

    Anchors get their example's ``prompt``. Every anchor keeps the same number of hard
    negatives, the smallest count in the batch (the first ones of each example), flattened
    anchor-major. ``scores`` (positive then negatives) is set when every example has them.
    ``slice_of``: the global batch that ``examples`` are one process's slice of; the
    negatives count and whether scores are set follow it, so that the slices of every
    process put together are the batch one process would build.
    """
    examples = list(examples)
    if not examples:
        raise InputError("cannot build a training batch from no examples.")
    whole = list(slice_of) if slice_of is not None else examples
    anchors = tokenize_with_prompts(backbone, [e.anchor for e in examples], [e.prompt for e in examples])
    positives = backbone.tokenize([e.positive for e in examples])
    per_anchor = min(len(e.negatives) for e in whole)
    negatives = None
    if per_anchor:
        negatives = backbone.tokenize([text for e in examples for text in e.negatives[:per_anchor]])
    if any(e.task is not None for e in whole):  # the domain label of each text
        anchors.domain = positives.domain = [e.task for e in examples]
        if negatives is not None:
            negatives.domain = [e.task for e in examples for _ in range(per_anchor)]
    scores = None
    if all(e.scores is not None and len(e.scores) >= 1 + per_anchor for e in whole):
        scores = torch.tensor([list(e.scores[: 1 + per_anchor]) for e in examples], dtype=torch.float32)
    return TrainingBatch(
        examples=examples,
        anchors=anchors,
        positives=positives,
        negatives=negatives,
        negatives_per_anchor=per_anchor,
        scores=scores,
    )


def _batch_to(batch: TrainingBatch, device: torch.device) -> TrainingBatch:
    return dataclasses.replace(
        batch,
        anchors=batch.anchors.to(device, non_blocking=True),
        positives=batch.positives.to(device, non_blocking=True),
        negatives=batch.negatives.to(device, non_blocking=True) if batch.negatives is not None else None,
        scores=batch.scores.to(device) if batch.scores is not None else None,
    )


# ---------------------------------------------------------------------------
# random state
# ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------
# the run's identity
# ---------------------------------------------------------------------------


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def describe_component(component: Any) -> dict[str, Any]:
    """A component's class and the constructor options it kept as attributes."""
    cls = type(component)
    options = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(component, name, None)
        if _plain(value):
            options[name] = value
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "options": options}


def _spec_summary(spec: Any) -> Any:
    """A component's name and options for the run's config (a list for an attention list)."""
    if isinstance(spec, list):
        return [_spec_summary(member) for member in spec]
    return {"name": spec.get("name"), "options": spec.get("options", {})}


def data_fingerprint(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(dataclasses.astuple(example), ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------


class Trainer:
    """Runs one training job; see :func:`train` for the parameters."""

    def __init__(
        self,
        model: "EmbeddingModel",
        examples: Sequence[Example],
        loss: Loss,
        sampler: Sampler,
        settings: TrainSettings,
        output_dir: str | Path,
        make_index: Callable[[int], Index] | None = None,
        registry: "Registry | None" = None,
        run_config: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callable[[StepInfo], None]] = (),
        teacher: "Teacher | None" = None,
    ) -> None:
        settings.check()
        model.check_saveable()  # the run ends by saving the model: refuse now, not after training
        self.examples = list(examples)
        if not self.examples:
            raise InputError("no training examples; check the data config.")
        self.model = model
        self.loss = loss
        loss.bind(model)  # a prefix wider than the model, a layer it lacks: refused now
        self.sampler = sampler
        self.settings = settings
        self.output_dir = Path(output_dir)
        self.make_index = make_index
        self.registry = registry
        self.callbacks = list(callbacks)
        self.device = model.device
        # under torchrun: the process group, and what a data-parallel run needs, checked now
        distributed.setup(settings.distributed_timeout, self.device)
        self.processes, self.rank = distributed.world_size(), distributed.rank()
        self.main = self.rank == 0
        if self.processes > 1:
            self._check_distributed()
        # the scores the loss reads are checked now, not at the batch that lacks them
        self.teacher = teacher_for(loss, teacher, self.examples)
        self.config = _normalised(
            {
                "model": {
                    "components": {
                        kind: _spec_summary(spec)
                        for kind, spec in model.specs.items()
                    },
                    "normalize": model.normalize,
                },
                "loss": describe_component(loss),
                "sampler": describe_component(sampler),
                "settings": settings.computational(),
                "data": {"examples": len(self.examples), "sha256": data_fingerprint(self.examples)},
                **({"run": dict(run_config)} if run_config else {}),
                **({"teacher": self.teacher.fingerprint} if self.teacher is not None else {}),
                # each process draws its own dropout masks: a run resumes with as many
                **({"processes": self.processes} if self.processes > 1 else {}),
            }
        )
        self.config_hash = config_hash(self.config)
        self.checkpoints = Checkpoints(self.output_dir, self.config, self.config_hash, settings.keep_checkpoints, registry)
        self.batches_per_epoch = max(1, sampler.num_batches(self.examples, settings.batch_size))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / settings.grad_accumulation)
        self.total_steps = settings.max_steps or settings.epochs * self.steps_per_epoch
        warmup = settings.warmup_steps
        self.warmup_steps = warmup if warmup is not None else math.ceil(settings.warmup_ratio * self.total_steps)

    # -- data parallelism ------------------------------------------------------------

    def _check_distributed(self) -> None:
        """Refuse, before any work, what would not train the single-process model."""
        if self.settings.batch_size % self.processes:
            raise OptionError(
                f"train.batch_size={self.settings.batch_size} does not split evenly over {self.processes} "
                f"processes (the world size torchrun started); use a multiple of {self.processes}, or "
                "another --nproc_per_node."
            )
        problem = self.loss.distributed_problem()
        if problem:
            name = type(self.loss).__name__
            raise OptionError(
                f"loss {name} cannot train across {self.processes} processes: {problem}. Train it in one "
                "process, or use a loss that is distributed-correct (docs/concepts.md, 'Losses across "
                "processes')."
            )

    def _check_same_batch(self, batch: list[Example], epoch: int, position: int) -> None:
        """Refuse a sampler that yields different batches on different processes: the
        slices would then come from different batches, silently not the global one."""
        digest = hashlib.sha256(json.dumps([dataclasses.astuple(e) for e in batch], default=str).encode("utf-8"))
        if not distributed.same_on_every_process(digest.digest(), self.device):
            raise InputError(
                f"sampler {type(self.sampler).__name__} yielded different batches on different processes "
                f"(epoch {epoch}, batch {position}); under torchrun every process runs the sampler and takes its "
                "slice, so batches must be a pure function of (examples, batch_size, seed, epoch) and the "
                "sampler's state, never of the process (its rank, its own random state)."
            )

    def _slice(self, batch: list[Example]) -> list[Example]:
        """This process's contiguous slice of a global batch."""
        rows, world = len(batch), self.processes
        if rows < world:
            raise InputError(
                f"the sampler yielded a batch of {rows} examples, fewer than the {world} processes; "
                "every process needs at least one (turn the sampler's drop_last on, or use fewer processes)."
            )
        return batch[self.rank * rows // world : (self.rank + 1) * rows // world]

    # -- optimisation --------------------------------------------------------------

    def _out_of_memory(self, error: BaseException, step: int) -> OutOfMemoryError:
        """Training that ran out of accelerator memory: which settings trade memory away."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        settings = self.settings
        saved = latest_checkpoint(self.output_dir)
        resume = f" The run can resume from {saved}." if saved is not None else ""
        return OutOfMemoryError(
            f"out of {self.device.type} memory at step {step + 1} with train.batch_size="
            f"{settings.batch_size}: lower train.batch_size (raise train.grad_accumulation to keep "
            "the number of examples per update, though in-batch negatives then come from the "
            "smaller batch), use a gradient-caching loss such as loss=cached_infonce, whose memory "
            f"does not grow with the batch, or set train.bf16=true.{resume}"
        )

    def _parameters(self) -> list[torch.nn.Parameter]:
        seen: set[int] = set()
        unique = []
        for module in (self.model, self.loss):
            for parameter in module.parameters():
                if parameter.requires_grad and id(parameter) not in seen:
                    seen.add(id(parameter))
                    unique.append(parameter)
        return unique

    def _optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        # Biases and norm weights (1-D) are not decayed, as in BERT and HF's Trainer.
        decayed = [p for p in parameters if p.dim() >= 2]
        kept = [p for p in parameters if p.dim() < 2]
        groups = [
            {"params": decayed, "weight_decay": self.settings.weight_decay},
            {"params": kept, "weight_decay": 0.0},
        ]
        # the fused kernel is several times faster per step than the default one
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.settings.lr, fused=True)

    def _schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        warmup, total = self.warmup_steps, self.total_steps

        def factor(step: int) -> float:  # linear warmup, then linear decay to 0 (as HF's)
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, (total - step) / max(1, total - warmup))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # -- checkpoints ---------------------------------------------------------------

    def check_checkpoint(self, checkpoint: Path) -> dict[str, Any]:
        """The checkpoint's trainer state, or an error when another config wrote it."""
        return self.checkpoints.check(checkpoint)

    def _already_complete(self, progress: Progress, checkpoint: Path) -> TrainResult:
        """The result of a run whose last step is already checkpointed: nothing to train."""
        if self.main:
            self.model.save(self.output_dir / "model")  # the checkpoint's weights, also if the final save was killed
        distributed.barrier()
        rows = self._metric_rows(progress.step)
        plot = self.output_dir / "loss.png"
        return self._result(
            progress,
            float(rows[-1]["loss"]) if rows else None,
            plot if plot.exists() else None,
            checkpoint,
            already_complete=True,
        )

    def _result(
        self,
        progress: Progress,
        loss: float | None,
        plot_path: Path | None,
        resumed_from: Path | None,
        already_complete: bool = False,
    ) -> TrainResult:
        return TrainResult(
            step=progress.step,
            epoch=progress.epoch,
            loss=loss,
            model_path=self.output_dir / "model",
            metrics_path=self.metrics_path,
            plot_path=plot_path,
            resumed_from=resumed_from,
            already_complete=already_complete,
        )

    def _interrupted(self, step: int) -> TrainingInterrupted:
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            where = "no checkpoint was written (set train.checkpoint_every to make a run resumable)"
        else:
            where = f"the last checkpoint is {checkpoint}"
        return TrainingInterrupted(f"training interrupted after step {step} of {self.total_steps}; {where}", checkpoint)

    # -- metrics -------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def _start_metrics(self, up_to_step: int) -> None:
        """A fresh metrics file, or on resume the old one without rows past the checkpoint."""
        rows = self._metric_rows(up_to_step) if up_to_step else []
        lines = [",".join(METRICS_COLUMNS)]
        lines += [",".join(row[c] for c in METRICS_COLUMNS) for row in rows]
        atomic_write_text(self.metrics_path, "\n".join(lines) + "\n")

    def _metric_rows(self, up_to_step: int) -> list[dict[str, str]]:
        if not self.metrics_path.exists():
            return []
        with self.metrics_path.open(newline="", encoding="utf-8") as handle:
            return [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to_step]

    def _log(self, writer: Any, step: int, epoch: int, loss: float, lr: float, elapsed: float) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(f"{step},{epoch},{loss!r},{lr!r},{elapsed:.3f}\n")
        if writer is not None:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/epoch", epoch, step)

    def _plot(self) -> Path | None:
        from matplotlib.figure import Figure

        with self.metrics_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            return None
        figure = Figure(figsize=(6, 4))
        axes = figure.add_subplot()
        axes.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], marker="." if len(rows) < 50 else None)
        axes.set_xlabel("step")
        axes.set_ylabel("training loss")
        axes.set_title("Training loss")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        path = self.output_dir / "loss.png"
        figure.savefig(path, dpi=100)
        return path

    # -- the loop ------------------------------------------------------------------

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        settings = self.settings
        main = self.main  # under torchrun, only rank 0 writes files, logs and evaluates
        checkpoint = self.checkpoints.prepare(settings.resume) if main else None
        checkpoint = distributed.broadcast_object(checkpoint)  # every process resumes from rank 0's pick
        seed_everything(settings.seed)
        parameters = self._parameters()
        optimizer = self._optimizer(parameters)
        scheduler = self._schedule(optimizer)
        parts = Resumable(self.model, self.loss, self.sampler, optimizer, scheduler)
        progress = Progress()
        if checkpoint is not None:
            progress = self.checkpoints.restore(checkpoint, parts, process=self.rank)
            if progress.step >= self.total_steps:
                return self._already_complete(progress, checkpoint)
        # weights that a process initialised on its own (a new head) start as rank 0's
        distributed.broadcast_parameters([self.model, self.loss])
        writer = None
        if main:
            self._start_metrics(progress.step)
            if settings.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a killed run logged after its last checkpoint
                writer = SummaryWriter(
                    str(self.output_dir / "tensorboard"), purge_step=progress.step + 1 if progress.step else None
                )

        # Every process runs the sampler alike (same seed, same weights: a sampler that
        # mines with the model mines the same on each), and takes its slice of each batch.
        context = TrainingContext(model=self.model, make_index=self.make_index, step=progress.step)
        if settings.bf16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError(
                f"train.bf16=true, but {torch.cuda.get_device_name(self.device)} has no bfloat16 "
                "support; set train.bf16=false (embplex does not train in float16, which needs "
                "loss scaling to stay finite)."
            )
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=settings.bf16)
        bar = tqdm(
            total=self.total_steps,
            initial=progress.step,
            desc="Training",
            unit="step",
            disable=not (settings.progress_bar and main),
        )
        started = time.monotonic() - progress.elapsed
        last_loss: float | None = None
        micro_losses: list[float] = []

        def optimizer_step(epoch_of_batch: int) -> None:
            nonlocal last_loss
            # the mean over the processes of gradients scaled as in the loop below: the
            # gradient of the single-process loss on the global batch
            distributed.average_gradients(parameters)
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            context.step = progress.step
            progress.elapsed = time.monotonic() - started
            # each micro-loss is this process's share of the global batch's mean loss
            # (on the model's device: NCCL reduces CUDA tensors only)
            last_loss = float(distributed.all_reduce_sum(float(np.sum(micro_losses)), self.device)) / len(micro_losses)
            micro_losses.clear()
            progress.log_window.append(last_loss)
            if main and (progress.step % settings.log_every == 0 or progress.step == self.total_steps):
                mean_loss = float(np.mean(progress.log_window))
                self._log(writer, progress.step, epoch_of_batch, mean_loss, lr, progress.elapsed)
            if progress.step % settings.log_every == 0 or progress.step == self.total_steps:
                progress.log_window.clear()
            saved = None
            if settings.checkpoint_every and progress.step % settings.checkpoint_every == 0:
                saved = self._save_checkpoint(progress, parts)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            info = StepInfo(progress.step, epoch_of_batch, last_loss, lr, saved)
            if main:
                for callback in self.callbacks:
                    callback(info)

        self.model.train()
        self.loss.train()
        if self.teacher is not None:
            self.teacher.to(self.device)  # it scores on the student's device
        optimizer.zero_grad(set_to_none=True)
        try:
            while progress.step < self.total_steps:
                epoch = progress.epoch
                produced = 0
                pending = 0
                batches = self.sampler.batches(
                    self.examples, settings.batch_size, settings.seed, epoch, context
                )
                for position, indices in enumerate(batches):
                    produced += 1
                    if position < progress.position:
                        continue  # done before the checkpoint we resumed from
                    everything = self.sampler.examples_of(self.examples, indices)
                    if self.processes > 1:
                        self._check_same_batch(everything, epoch, position)
                        mine = self._slice(everything)
                        batch = make_training_batch(self.model.backbone, mine, slice_of=everything)
                    else:
                        mine = everything
                        batch = make_training_batch(self.model.backbone, mine)
                    batch = _batch_to(batch, self.device)
                    if self.teacher is not None:
                        batch = self.teacher.score(batch)
                    # The loss is a mean over this process's rows; weighted by its share of
                    # the batch (times the processes, which the gradient mean divides out)
                    # the processes' gradients add up to the single-process one.
                    share = len(mine) / len(everything)
                    try:
                        with autocast:
                            value = self.loss(self.model, batch)
                        (value * (share * self.processes / settings.grad_accumulation)).backward()
                    except Exception as error:
                        if is_out_of_memory(error):
                            raise self._out_of_memory(error, progress.step) from error
                        raise
                    micro_losses.append(float(value.detach()) * share)
                    pending += 1
                    progress.position = position + 1
                    if pending == settings.grad_accumulation:
                        pending = 0
                        optimizer_step(epoch)
                        if progress.step >= self.total_steps:
                            break
                else:
                    if produced == 0:
                        raise InputError(
                            f"the sampler produced no batches in epoch {epoch} (batch_size "
                            f"{settings.batch_size}, {len(self.examples)} examples); use a smaller "
                            "batch_size or turn drop_last off."
                        )
                    progress.epoch, progress.position = epoch + 1, 0
                    if pending:
                        # a short final accumulation: rescale to the mean over what was seen
                        for parameter in parameters:
                            if parameter.grad is not None:
                                parameter.grad.mul_(settings.grad_accumulation / pending)
                        optimizer_step(epoch)
                    if settings.max_steps is None and progress.epoch >= settings.epochs:
                        break
        except KeyboardInterrupt:
            raise self._interrupted(progress.step) from None
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            if self.teacher is not None and main:
                self.teacher.save_cache()  # what it computed stays valid, interrupted or not

        try:
            if settings.checkpoint_every and progress.step % settings.checkpoint_every:
                # the last step is checkpointed too, so a rerun knows the run is complete
                self._save_checkpoint(progress, parts)
            sizes = self.loss.recommended_sizes(self.model)
            self.model.recommended_sizes = [tuple(p) for p in sizes] if sizes else self.model.recommended_sizes
            plot = None
            if main:
                self.model.save(self.output_dir / "model")
                plot = self._plot()
            distributed.barrier()  # train() returns once the model is saved, on every process
        except KeyboardInterrupt:
            raise self._interrupted(progress.step) from None
        return self._result(progress, last_loss, plot, checkpoint)

    def _save_checkpoint(self, progress: Progress, parts: Resumable) -> Path:
        """Rank 0 writes the checkpoint, with every process's random state; the others
        wait until it is complete."""
        states = distributed.gather_object(capture_rng())
        path = self.checkpoints.root / f"step-{progress.step}"
        if self.main:
            path = self.checkpoints.save(progress, parts, self.total_steps, rng_states=states)
        distributed.barrier()
        return path

def train(
    model: "EmbeddingModel",
    examples: Sequence[Example],
    loss: Loss,
    sampler: Sampler,
    settings: TrainSettings | None = None,
    output_dir: str | Path = "runs/train",
    make_index: Callable[[int], Index] | None = None,
    registry: "Registry | None" = None,
    run_config: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    teacher: "Teacher | None" = None,
) -> TrainResult:
    """Train ``model`` on ``examples`` and save it to ``output_dir/model``.

    :param loss: called as ``loss(model, batch)``; its parameters are trained too.
    :param sampler: groups examples into batches; gets a :class:`TrainingContext`.
    :param make_index: builds an empty index for a dimension, for mining samplers.
    :param registry: resolves the plugins of a checkpoint's model when resuming.
    :param run_config: anything else that defines the run (e.g. the CLI's data config);
        it joins the config hash that a resumed run must match.
    :param callbacks: called with a :class:`StepInfo` after every optimizer step.
    :param teacher: a model that scores each batch for a loss that reads teacher scores
        (:func:`embplex.teachers.build_teacher`); without one, such a loss reads the
        training file's ``Example.scores``, which every example must have.
    :raises CheckpointMismatchError: the checkpoint to resume from has another config.
    :raises ModelFileError: the checkpoint to resume from is corrupt.
    """
    return Trainer(
        model,
        examples,
        loss,
        sampler,
        settings or TrainSettings(),
        output_dir,
        make_index=make_index,
        registry=registry,
        run_config=run_config,
        callbacks=callbacks,
        teacher=teacher,
    ).run()
