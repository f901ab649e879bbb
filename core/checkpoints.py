"""Checkpoints: everything exact resume stands on, written, checked and restored in one place.

A checkpoint holds what changes during training — the weights (``model.save``), the loss's
own parameters, the optimizer and scheduler states, the sampler's state (what it derived
from the model, e.g. mined negatives), the Python / NumPy / torch random generators
(dropout) and the position in the epoch — and the run's config with its hash, so that a
run started again with the same configuration ends with the same weights, bit for bit,
and one started with another configuration is refused with what differs::

    checkpoints/step-N/model/              the model at step N (loadable with embplex.load)
    checkpoints/step-N/training_state.pt   optimizer, scheduler, sampler, RNG, position (tensors only)
    checkpoints/step-N/trainer_state.json  step, epoch and the run's config and its hash

``training_state.pt`` is read with ``torch.load(weights_only=True)``: nothing in a
checkpoint is ever unpickled as an object.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from torch import Tensor

from .components import Loss, Sampler
from .errors import CheckpointMismatchError, EmbplexError, ModelFileError, OptionError
from .storage import atomic_directory, load_torch_state, read_json, remove_stale_staging, write_json

if TYPE_CHECKING:
    from .model import EmbeddingModel
    from .registry import Registry

__all__ = ["Checkpoints", "Progress", "Resumable", "latest_checkpoint", "list_checkpoints"]

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"


@dataclass
class Progress:
    """Where the run is: ``position`` micro-batches of epoch ``epoch`` are done."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    elapsed: float = 0.0
    log_window: list[float] = field(default_factory=list)


@dataclass
class Resumable:
    """The objects whose state a checkpoint saves and restores."""

    model: "EmbeddingModel"
    loss: Loss
    sampler: Sampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


# ---------------------------------------------------------------------------
# finding checkpoints
# ---------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    if not path.is_dir() or path.name.startswith(".") or not path.name.startswith("step-"):
        return None
    suffix = path.name[len("step-") :]
    return int(suffix) if suffix.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(step, path) for path in root.iterdir() if (step := _checkpoint_step(path)) is not None]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


# ---------------------------------------------------------------------------
# random state
# ---------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------
# what may be saved, and what differs
# ---------------------------------------------------------------------------


def check_storable(value: Any, where: str, path: str = "") -> None:
    """Refuse what a checkpoint cannot hold without pickling arbitrary objects."""
    if value is None or isinstance(value, (str, int, float, bool, Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            check_storable(item, where, f"{path}[{position}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise OptionError(f"{where} has a non-string key {key!r} at {path or 'the top'}; use string keys.")
            check_storable(item, where, f"{path}.{key}" if path else key)
        return
    raise OptionError(
        f"{where} holds a {type(value).__name__} at {path or 'the top'}; a checkpoint keeps only tensors, "
        "numbers, strings, None, and lists, tuples and dicts of these."
    )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    old, new = _flatten(dict(saved)), _flatten(dict(current))
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            show = lambda v: "(not set)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: {show(before)} in the checkpoint, {show(after)} now")
    return lines


# ---------------------------------------------------------------------------
# the checkpoints of one run
# ---------------------------------------------------------------------------


class Checkpoints:
    """Writes, prunes, checks and restores the checkpoints of one run.

    :param config: the run's config (plain values); its ``sampler.class`` and
        ``data.sha256`` / ``data.examples`` identify whose sampler state a checkpoint holds.
    :param keep: keep only the newest this many checkpoints (0 or ``None``: all).
    :param registry: resolves the plugins of a checkpoint's model.
    """

    def __init__(
        self,
        output_dir: str | Path,
        config: Mapping[str, Any],
        config_hash: str,
        keep: int | None = None,
        registry: "Registry | None" = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / CHECKPOINTS
        self.config = config
        self.config_hash = config_hash
        self.keep = keep
        self.registry = registry

    def prepare(self, resume: bool) -> Path | None:
        """Clean staging leftovers and pick the checkpoint to resume from, if any."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.output_dir, self.root):  # what killed saves left (model, checkpoints)
            remove_stale_staging(folder)
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is not None and not resume:
            warnings.warn(
                f"resume is off: deleting the existing checkpoints in {self.root} and starting over.",
                UserWarning,
                stacklevel=3,
            )
            shutil.rmtree(self.root)
            return None
        return checkpoint

    # -- writing -------------------------------------------------------------------

    def save(
        self, progress: Progress, parts: Resumable, total_steps: int, rng_states: list[dict[str, Any]] | None = None
    ) -> Path:
        """Write ``step-N`` atomically, then delete the oldest beyond ``keep``.

        :param rng_states: under data-parallel training, every process's random state in
            rank order (:func:`capture_rng` on each); by default this process's.
        """
        import embplex

        path = self.root / f"step-{progress.step}"
        sampler_state = self._sampler_state(parts.sampler)
        with atomic_directory(path) as staging:
            parts.model.save(staging / "model")
            state = {
                "optimizer": parts.optimizer.state_dict(),
                "scheduler": parts.scheduler.state_dict(),
                "loss": parts.loss.state_dict(),
                "sampler": sampler_state,
                "rng": rng_states[0] if rng_states else capture_rng(),
                **({"rng_processes": rng_states} if rng_states and len(rng_states) > 1 else {}),
                "progress": {
                    "step": progress.step,
                    "epoch": progress.epoch,
                    "position": progress.position,
                    "elapsed": progress.elapsed,
                    "log_window": torch.tensor(progress.log_window, dtype=torch.float64),
                },
            }
            torch.save(state, staging / STATE_FILE)
            write_json(
                staging / TRAINER_STATE_FILE,
                {
                    "step": progress.step,
                    "epoch": progress.epoch,
                    "position": progress.position,
                    "total_steps": total_steps,
                    "config_hash": self.config_hash,
                    "config": self.config,
                    "embplex_version": embplex.__version__,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
        if self.keep:  # 0 or None keeps them all
            for old in list_checkpoints(self.output_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def _sampler_state(self, sampler: Sampler) -> dict[str, Any]:
        """The sampler's state with what identifies whom it belongs to, checked storable."""
        name = self.config["sampler"]["class"]
        state = sampler.state_dict()
        if not isinstance(state, dict):
            raise OptionError(f"sampler {name}: state_dict() must return a dict, not {type(state).__name__}.")
        check_storable(state, f"sampler {name}: state_dict()")
        return {"class": name, "data_sha256": self.config["data"]["sha256"], "state": state}

    # -- reading -------------------------------------------------------------------

    def check(self, checkpoint: Path) -> dict[str, Any]:
        """The checkpoint's trainer state, or an error when another config wrote it."""
        saved = read_json(checkpoint / TRAINER_STATE_FILE, "trainer state")
        if not isinstance(saved, dict) or "config_hash" not in saved:
            raise ModelFileError(
                f"{checkpoint / TRAINER_STATE_FILE} is not a trainer state; delete {checkpoint} to "
                "resume from an earlier checkpoint."
            )
        if saved["config_hash"] != self.config_hash:
            differences = describe_differences(saved.get("config", {}), self.config)
            detail = "; ".join(differences) if differences else "the config hashes differ"
            raise CheckpointMismatchError(
                f"{checkpoint} was written by a run with another configuration ({detail}). "
                "Use the same configuration to resume, or another output folder (or resume=False) "
                "to start over."
            )
        return saved

    def restore(self, checkpoint: Path, parts: Resumable, process: int = 0) -> Progress:
        """Put every part back in its state at ``checkpoint``; return where the run was.

        :param process: this process's rank, whose random state it takes back (the
            config hash has made sure the checkpoint had as many processes).
        """
        from .model import EmbeddingModel, spec_entries

        self.check(checkpoint)
        state = load_torch_state(checkpoint / STATE_FILE)
        required = ("optimizer", "scheduler", "loss", "rng", "progress")
        if not isinstance(state, dict) or any(key not in state for key in required):
            raise ModelFileError(
                f"{checkpoint / STATE_FILE} is incomplete; delete {checkpoint} to resume from an "
                "earlier checkpoint."
            )
        self._restore_sampler(checkpoint, parts.sampler, state.get("sampler"))
        # the run's own config (its backbone's trust_remote_code) is the consent to run code
        trusted = any((spec.get("options") or {}).get("trust_remote_code") for _, spec in spec_entries(parts.model.specs))
        saved_model = EmbeddingModel.load(checkpoint / "model", registry=self.registry, trust_remote_code=trusted)
        try:
            parts.model.load_state_dict(saved_model.state_dict(), strict=True)
            parts.loss.load_state_dict(state["loss"], strict=True)
            parts.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointMismatchError(
                f"{checkpoint} does not fit this model, loss or optimizer ({exc}); resume with the "
                "configuration that wrote it."
            ) from exc
        parts.scheduler.load_state_dict(state["scheduler"])
        per_process = state.get("rng_processes")
        if process and (not isinstance(per_process, list) or process >= len(per_process)):
            raise CheckpointMismatchError(
                f"{checkpoint / STATE_FILE} holds no random state for process {process}; resume with as "
                "many processes as the run that wrote it."
            )
        restore_rng(per_process[process] if process else state["rng"])
        saved = state["progress"]
        return Progress(
            step=int(saved["step"]),
            epoch=int(saved["epoch"]),
            position=int(saved["position"]),
            elapsed=float(saved["elapsed"]),
            log_window=[float(v) for v in saved["log_window"].tolist()],
        )

    def _restore_sampler(self, checkpoint: Path, sampler: Sampler, saved: Any) -> None:
        """Give the sampler its state back, or refuse a state that is not this run's."""
        name = self.config["sampler"]["class"]
        where = checkpoint / STATE_FILE
        if saved is None:
            if type(sampler).state_dict is Sampler.state_dict:
                return  # a checkpoint from before samplers had a state; this one keeps none
            raise ModelFileError(
                f"{where} holds no sampler state, which sampler {name} needs to resume exactly; "
                "start over with train.resume=false (or another output folder)."
            )
        if not isinstance(saved, dict) or not {"class", "data_sha256", "state"} <= set(saved):
            raise ModelFileError(
                f"{where}: the sampler state is incomplete; delete {checkpoint} to resume from an earlier checkpoint."
            )
        if saved["class"] != name:
            raise CheckpointMismatchError(
                f"{where} holds the state of sampler {saved['class']}, not of {name} that this run "
                "uses; resume with the sampler that wrote it, or start over with train.resume=false."
            )
        if saved["data_sha256"] != self.config["data"]["sha256"]:
            raise CheckpointMismatchError(
                f"{where} holds a sampler state derived from other training data than this run's "
                f"{self.config['data']['examples']} examples; resume with the data that wrote it, or "
                "start over with train.resume=false."
            )
        try:
            sampler.load_state_dict(saved["state"])
        except (EmbplexError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointMismatchError(
                f"sampler {name} refused the state in {where} ({exc}); resume with the configuration "
                "that wrote it, or start over with train.resume=false."
            ) from exc
