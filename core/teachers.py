"""Teachers: where the target scores of distillation losses come from.

A loss that learns from a teacher (``score_distill``, ``listwise_distill``, ``soft_label``)
says which scores it reads with :attr:`embplex.components.Loss.teacher_scores`; it never
builds a teacher itself. The scores come from one of two places, chosen by the ``teacher``
section of the config (``docs/concepts.md``, "Teachers"):

* **the training file**: ``Example.scores`` (the scored ``flagembedding`` and the ``sts``
  formats fill them), delivered as ``TrainingBatch.scores``. Before the first step every
  example must have one score for its positive and one per negative, or training is
  refused (:func:`check_file_scores`).
* **a model**: any saved (``teacher.load``) or composed (``teacher.backbone``, ...)
  embplex model. :class:`Teacher` embeds each batch's texts with it, without gradient, on
  the student's device, and fills ``TrainingBatch.scores`` and ``TrainingBatch.teacher_matrix``
  (every anchor against every candidate of the batch). Its tokenizer and width may differ
  from the student's: it only scores.

A model teacher keeps the vectors it computed, keyed by the text (and its prompt); with
``teacher.cache`` set they are saved to that file, together with the teacher's
fingerprint (:func:`embplex.app.model_fingerprint`), and a later run with the same teacher
reuses them instead of running the teacher again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from .components import Example, TrainingBatch
from .errors import EmbplexError, InputError, ModelFileError, OptionError, UnknownComponentError

if TYPE_CHECKING:
    from .components import Loss
    from .model import EmbeddingModel
    from .registry import Registry

__all__ = [
    "Teacher",
    "build_teacher",
    "check_file_scores",
    "check_teacher_config",
    "own_columns",
    "student_matrix",
    "teacher_for",
    "teacher_targets",
]

CACHE_FORMAT = "embplex-teacher-cache/1"
# What a loss may ask for in Loss.teacher_scores.
KINDS_OF_SCORES = (None, "pairs", "matrix")


@dataclasses.dataclass
class TeacherSection:
    """The ``teacher`` section of the config (defaults in ``conf/embplex.yaml``)."""

    load: str | None = None
    backbone: str | dict[str, Any] | None = None
    pooling: str | dict[str, Any] | None = None
    attention: str | dict[str, Any] | None = None
    normalize: bool = True
    batch_size: int = 64
    cache: str | None = None


# ---------------------------------------------------------------------------
# building a teacher from its config
# ---------------------------------------------------------------------------


def _has_model(spec: Mapping[str, Any]) -> bool:
    load, backbone = spec.get("load"), spec.get("backbone")
    if load and backbone:
        raise OptionError(
            "teacher.load and teacher.backbone are both set; the teacher is either a saved model "
            "(teacher.load) or a composed one (teacher.backbone, teacher.pooling, ...), not both."
        )
    if load or backbone:
        return True
    stray = [key for key in ("pooling", "attention", "cache") if spec.get(key) is not None]
    if stray:
        raise OptionError(
            f"teacher.{stray[0]} is set but the teacher has no model: set teacher.load=<saved model "
            "folder> or teacher.backbone=<plugin> (with neither, the scores come from the training file)."
        )
    return False


def check_teacher_config(spec: Mapping[str, Any] | None, registry: "Registry") -> None:
    """Refuse a ``teacher`` section that could not build a teacher, before any work: both
    ``load`` and ``backbone``, a model option without a model, an unknown plugin or option."""
    from .model import component_spec
    from .registry import check_options

    if not spec or not _has_model(spec):
        return
    if spec.get("batch_size", 64) < 1:
        raise OptionError(f"teacher.batch_size must be at least 1, not {spec['batch_size']!r}.")
    for kind in ("backbone", "pooling", "attention"):
        value = spec.get(kind)
        if value is None or spec.get("load"):
            continue
        part = component_spec(value)
        try:
            info = registry.get(kind, part["name"])
        except UnknownComponentError as exc:
            raise UnknownComponentError(f"teacher.{kind}: {exc.args[0]}") from None
        check_options(info, part["options"], prefix=f"teacher.{kind}")


def build_teacher(spec: Mapping[str, Any] | None, registry: "Registry | None" = None) -> "Teacher | None":
    """The teacher a ``teacher`` section describes; ``None`` when it names no model (the
    training file's scores are the teacher then).

    :raises ModelFileError: ``teacher.load`` names a folder that cannot be loaded (the
        message names it and says why).
    :raises OptionError: both ``load`` and ``backbone``, or a bad part of the composition.
    """
    from .app import saved_model_folder
    from .model import EmbeddingModel
    from .registry import load_registry

    spec = dict(spec or {})
    if not _has_model(spec):
        return None
    registry = registry or load_registry()
    check_teacher_config(spec, registry)
    if spec.get("load"):
        try:
            model = EmbeddingModel.load(saved_model_folder(spec["load"]), registry=registry)
        except (EmbplexError, OSError) as exc:
            raise ModelFileError(f"teacher.load={spec['load']}: the teacher cannot be loaded: {exc}") from exc
        name = f"teacher.load={spec['load']}"
    else:
        try:
            model = EmbeddingModel.compose(
                backbone=spec["backbone"],
                pooling=spec.get("pooling") or "mean",
                attention=spec.get("attention"),
                registry=registry,
            )
        except EmbplexError as exc:
            exc.args = (f"teacher: {exc.args[0] if exc.args else exc}", *exc.args[1:])
            raise
        name = f"teacher.backbone={json.dumps(spec['backbone'], sort_keys=True, default=str)}"
    model.normalize = bool(spec.get("normalize", True))
    return Teacher(model, cache=spec.get("cache"), batch_size=int(spec.get("batch_size", 64)), name=name)


# ---------------------------------------------------------------------------
# the teacher
# ---------------------------------------------------------------------------


def _key(prompt: str | None, text: str) -> bytes:
    return hashlib.sha256(json.dumps([prompt, text], ensure_ascii=False).encode("utf-8")).digest()


class Teacher:
    """A model that scores each batch's candidates, without gradient.

    Scores are dot products of the teacher's vectors (cosine when ``model.normalize``):
    the anchor (with its example's prompt) against the positive and the negatives. The
    vectors are kept by text; :attr:`computed` counts the texts the model embedded.

    :param model: the teacher; it is put in eval mode, its parameters frozen.
    :param cache: a file to read vectors from and save them to (:meth:`save_cache`).
    :param batch_size: texts per forward pass of the teacher.
    :param name: how messages name it.
    """

    def __init__(
        self, model: "EmbeddingModel", cache: str | Path | None = None, batch_size: int = 64, name: str = "teacher"
    ) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.cache_path = Path(cache).expanduser() if cache else None
        self.batch_size = batch_size
        self.name = name
        self.computed = 0
        self._vectors: dict[bytes, Tensor] = {}
        self._unsaved = 0
        self._fingerprint: str | None = None
        self._loaded = False

    @property
    def fingerprint(self) -> str:
        """The SHA-256 of the teacher's components, options and parameters."""
        if self._fingerprint is None:
            from .app import model_fingerprint

            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def to(self, device: torch.device | str) -> "Teacher":
        self.model.to(device)
        return self

    # -- vectors ---------------------------------------------------------------------

    def vectors(self, texts: Sequence[str], prompts: Sequence[str | None] | None = None) -> Tensor:
        """``[len(texts), dim]`` float32 vectors on the CPU, from the cache where known."""
        self._load_cache()
        prompts = list(prompts) if prompts is not None else [None] * len(texts)
        keys = [_key(p, t) for p, t in zip(prompts, texts)]
        missing: dict[str | None, dict[bytes, str]] = {}
        for key, prompt, text in zip(keys, prompts, texts):
            if key not in self._vectors:
                missing.setdefault(prompt, {})[key] = text
        for prompt, wanted in missing.items():
            computed = self.model.encode(
                list(wanted.values()),
                batch_size=self.batch_size,
                prompt=prompt,
                convert_to="torch",
                show_progress=False,
                truncation="silent",
            )
            # a copy made outside inference mode: these become targets of a backward pass
            computed = computed.float().clone()
            for key, row in zip(wanted, computed):
                self._vectors[key] = row
            self.computed += len(wanted)
            self._unsaved += len(wanted)
        return torch.stack([self._vectors[key] for key in keys])

    def score(self, batch: TrainingBatch) -> TrainingBatch:
        """``batch`` with the teacher's ``scores`` ``[b, 1 + k]`` (positive, then the
        anchor's negatives) and ``teacher_matrix`` ``[b, b + b * k]`` (every positive of
        the batch, then every negative, anchor by anchor: ``infonce``'s candidates)."""
        examples = batch.examples
        k = batch.negatives_per_anchor
        rows = len(examples)
        anchors = self.vectors([e.anchor for e in examples], [e.prompt for e in examples])
        candidates = [e.positive for e in examples] + [text for e in examples for text in e.negatives[:k]]
        others = self.vectors(candidates)
        matrix = anchors @ others.T
        scores = matrix.gather(1, own_columns(rows, k))
        device = batch.anchors.input_ids.device
        return dataclasses.replace(batch, scores=scores.to(device), teacher_matrix=matrix.to(device))

    # -- the cache file ------------------------------------------------------------

    def _load_cache(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = self.cache_path
        if path is None or not path.exists():
            return
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                keys, vectors = handle.get_tensor("keys"), handle.get_tensor("vectors")
        except Exception as exc:  # a truncated or foreign file: say which, never guess
            raise ModelFileError(
                f"teacher.cache={path} cannot be read ({type(exc).__name__}: {exc}); delete it to rebuild it."
            ) from exc
        if metadata.get("format") != CACHE_FORMAT:
            raise ModelFileError(f"teacher.cache={path} is not an embplex teacher cache; point it at another file.")
        if metadata.get("teacher") != self.fingerprint:
            warnings.warn(
                f"teacher.cache={path} holds the vectors of another teacher; they are not used, and "
                "the file will be replaced with this teacher's.",
                UserWarning,
                stacklevel=3,
            )
            return
        if metadata.get("sha256") != _digest(keys, vectors):
            raise ModelFileError(
                f"teacher.cache={path} does not match its recorded checksum (a damaged file); delete it to rebuild it."
            )
        if not bool(torch.isfinite(vectors).all()):
            raise ModelFileError(f"teacher.cache={path} holds non-finite vectors; delete it to rebuild it.")
        raw = keys.contiguous().numpy().tobytes()
        for i, row in enumerate(vectors):
            self._vectors[raw[32 * i : 32 * (i + 1)]] = row
        self._unsaved = 0

    def save_cache(self) -> Path | None:
        """Write every vector known to ``teacher.cache`` (atomically), when set and when
        there is something new; returns the file written."""
        if self.cache_path is None or not self._unsaved:
            return None
        from safetensors.torch import save

        from .storage import atomic_file

        keys = torch.frombuffer(bytearray(b"".join(self._vectors)), dtype=torch.uint8).reshape(-1, 32)
        vectors = torch.stack(list(self._vectors.values())).contiguous()
        metadata = {"format": CACHE_FORMAT, "teacher": self.fingerprint, "sha256": _digest(keys, vectors)}
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.cache_path) as handle:
            handle.write(save({"keys": keys, "vectors": vectors}, metadata=metadata))
        self._unsaved = 0
        return self.cache_path


def _digest(keys: Tensor, vectors: Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(keys.contiguous().numpy().tobytes())
    digest.update(vectors.contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# what the trainer does with a loss and a teacher, before the first step
# ---------------------------------------------------------------------------


def check_file_scores(examples: Sequence[Example], loss_name: str) -> None:
    """Refuse examples without a teacher score for their positive and each negative.

    :raises InputError: naming the first rows (counting from 0) and how many there are.
    """
    missing = [
        i for i, e in enumerate(examples) if e.scores is None or len(e.scores) < 1 + len(e.negatives)
    ]
    if not missing:
        return
    shown = ", ".join(str(i) for i in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise InputError(
        f"{loss_name} learns from teacher scores, but {len(missing)} of {len(examples)} training examples "
        f"(rows {shown}) lack a score for their positive or for one of their negatives. Give every row "
        "its scores (FlagEmbedding's pos_scores and neg_scores), or let a model score them: "
        "teacher.load=<saved model folder> or teacher.backbone=<plugin>."
    )


def teacher_for(loss: "Loss", teacher: Teacher | None, examples: Sequence[Example]) -> Teacher | None:
    """The teacher training should run for ``loss``, after checking that the loss will get
    the scores it reads (``loss.teacher_scores``). ``None``: no teacher runs.

    A teacher the loss does not read is not run (with a warning); a loss that reads scores
    with no model teacher gets the training file's, which every example must have; scores
    of every pair of the batch (``"matrix"``) need a model teacher.
    """
    wants = getattr(loss, "teacher_scores", None)
    name = f"loss '{getattr(loss, 'name', None) or type(loss).__name__}'"
    if wants not in KINDS_OF_SCORES:
        raise OptionError(f"{name}: teacher_scores must be one of {KINDS_OF_SCORES}, not {wants!r}.")
    if wants is None:
        if teacher is not None:
            warnings.warn(
                f"{teacher.name} is configured, but {name} reads no teacher scores: the teacher is not run.",
                UserWarning,
                stacklevel=3,
            )
        return None
    if teacher is not None:
        return teacher
    if wants == "matrix":
        raise OptionError(
            f"{name} reads teacher scores for every pair of anchor and candidate in the batch (in_batch), "
            "which a training file does not hold: let a model score them (teacher.load=<saved model "
            "folder> or teacher.backbone=<plugin>), or set loss.in_batch=false."
        )
    check_file_scores(examples, name)
    return None


# ---------------------------------------------------------------------------
# helpers for the losses that read teacher scores
# ---------------------------------------------------------------------------


def own_columns(rows: int, k: int, device: torch.device | str | None = None) -> Tensor:
    """``[rows, 1 + k]`` column indices, into a ``[rows, rows * (1 + k)]`` matrix laid out
    as ``teacher_matrix``, of each anchor's own positive then its own negatives."""
    own = torch.arange(rows, device=device)[:, None]
    if not k:
        return own
    return torch.cat([own, rows + own * k + torch.arange(k, device=device)[None, :]], dim=1)


def student_matrix(embeddings: Mapping[str, Tensor]) -> Tensor:
    """Cosine similarity, in float32, of every anchor with every candidate of the batch:
    all positives, then all negatives, the layout of ``TrainingBatch.teacher_matrix``."""
    from torch.nn import functional

    anchors = functional.normalize(embeddings["anchors"].float(), dim=-1)
    candidates = [functional.normalize(embeddings["positives"].float(), dim=-1)]
    negatives = embeddings.get("negatives")
    if negatives is not None and negatives.shape[0] > 0:
        candidates.append(functional.normalize(negatives.float(), dim=-1))
    return anchors @ torch.cat(candidates).T


def teacher_targets(batch: TrainingBatch, in_batch: bool, loss_name: str) -> Tensor:
    """The teacher's scores a loss learns from: ``teacher_matrix`` when ``in_batch``, else
    ``scores``. A batch without them is an error naming the loss, never a silent zero."""
    if in_batch:
        if batch.teacher_matrix is None:
            raise InputError(
                f"loss '{loss_name}' with in_batch=true needs the teacher's score of every pair in the "
                "batch, which only a model teacher gives: set teacher.load or teacher.backbone, or "
                "in_batch=false."
            )
        return batch.teacher_matrix.float()
    if batch.scores is None:
        raise InputError(
            f"loss '{loss_name}' needs teacher scores, and this batch has none: some of its examples lack "
            "Example.scores for the positive and each negative (a sampler that rewrites negatives must "
            "rescore them), and no model teacher is configured (teacher.load or teacher.backbone)."
        )
    return batch.scores.float()
