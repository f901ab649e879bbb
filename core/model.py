"""An embedding model composed of registered components, and its save format."""

from __future__ import annotations

import numbers
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .components import (
    Attention,
    AttentionChain,
    Backbone,
    Features,
    Pooling,
    SentenceTransformersModule,
    TrainingBatch,
)
from .devices import is_out_of_memory, resolve_device
from .errors import (
    InputError,
    OutOfMemoryError,
    MissingPluginError,
    ModelFileError,
    NonFiniteError,
    UnknownComponentError,
    UnsafeConfigError,
)
from .registry import ComponentInfo, Registry, load_registry
from .storage import atomic_directory, checksum_tree, read_json, verify_checksums, write_json

CONFIG_FILE = "embplex.json"
# 2: embplex.json records every file's SHA-256 (key "sha256"), verified on load
FORMAT_VERSION = 2
MODEL_KINDS = ("backbone", "attention", "pooling")
# The sentence-transformers module that loads a folder through embplex.load. Its dotted
# path has two dots on purpose: sentence-transformers then imports it from the installed
# embplex and never looks for a modeling file of that name inside the folder.
SENTENCE_TRANSFORMERS_DELEGATE = "embplex.integrations.sentence_transformers.EmbplexModule"
# Written for sentence-transformers, which rewrites them when it saves the model itself;
# they are not checksummed (embplex never reads them).
SENTENCE_TRANSFORMERS_METADATA = ("modules.json", "config_sentence_transformers.json", "README.md")


def component_spec(value: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Normalise ``"mean"`` or ``{"name": "mean", **options}`` to ``{"name", "options"}``."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"name": value, "options": {}}
    if "name" not in value:
        raise InputError(f"component config {dict(value)!r} has no 'name'; say which plugin to use.")
    options = {k: v for k, v in value.items() if k != "name"}
    return {"name": value["name"], "options": dict(options.get("options", options))}


def is_policy_list(value: Any) -> bool:
    """Whether a component value is a list of attention policies (``attention=[a, b]``)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, Mapping))


def spec_entries(specs: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, spec)`` for every component of a model's specs, the members of an
    attention list one by one (``"attention[1]"``)."""
    for kind, spec in specs.items():
        if isinstance(spec, list):
            yield from ((f"{kind}[{i}]", member) for i, member in enumerate(spec))
        else:
            yield kind, spec


class EmbeddingModel(nn.Module):
    """backbone -> (attention inside it) -> pooling -> optional L2 normalisation."""

    def __init__(
        self,
        backbone: Backbone,
        pooling: Pooling,
        attention: Attention | None = None,
        normalize: bool = True,
        specs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.attention = attention
        self.normalize = normalize
        self.specs = specs or {}
        if attention is not None:  # refuse a policy's bad layers before any work
            attention.bind(backbone.num_layers, backbone.causal)
        pooling.attach(backbone)  # a trainable pooling builds (and loads) its weights now
        self.source: str | None = None  # the folder it was loaded from, for messages
        # the (layer, dim) pairs an elastic loss trained it to serve, smallest first (saved
        # in embplex.json); None: only the full model
        self.recommended_sizes: list[tuple[int, int]] | None = None
        self.eval()  # like transformers' from_pretrained: training is opted into

    # -- composition -------------------------------------------------------------------

    @classmethod
    def compose(
        cls,
        backbone: str | Mapping[str, Any] | Backbone,
        pooling: str | Mapping[str, Any] | Pooling = "mean",
        attention: str | Mapping[str, Any] | Attention | None = None,
        normalize: bool = True,
        registry: Registry | None = None,
        device: str | torch.device | None = "auto",
    ) -> "EmbeddingModel":
        """Build a model from plugin names and options, the same ones the CLI takes::

            EmbeddingModel.compose({"name": "hf_encoder", "path": "..."}, pooling="mean")

        Each part may also be a component already built (``attention=MyPolicy(window=4)``);
        such a model encodes, but ``save`` and ``train`` refuse it up front, since embplex
        does not know the options the part was built with.

        :param device: where the model runs: ``auto`` (CUDA, then MPS, then the CPU),
            ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (see :mod:`embplex.devices`).
        """
        target = resolve_device(device)  # a device the machine lacks fails before any loading
        registry = registry or load_registry()
        given = {"backbone": backbone, "attention": attention, "pooling": pooling}
        specs: dict[str, Any] = {}
        parts: dict[str, Any] = {}
        for kind, value in given.items():
            if value is None:
                continue
            if kind == "attention" and is_policy_list(value):
                # a list of policies, applied in order (docs/concepts.md, "Attention lists")
                built = [_compose_part(kind, member, registry, f"attention[{i}]") for i, member in enumerate(value)]
                parts[kind] = AttentionChain([part for part, _ in built])
                specs[kind] = [spec for _, spec in built]
            else:
                parts[kind], specs[kind] = _compose_part(kind, value, registry, kind)
        return cls(
            backbone=parts["backbone"],
            pooling=parts["pooling"],
            attention=parts.get("attention"),
            normalize=normalize,
            specs=specs,
        ).to(target)

    @property
    def dim(self) -> int:
        return self.pooling.output_dim(self.backbone.hidden_size)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    # -- forward -----------------------------------------------------------------------

    def embed(
        self, features: Features, layers: Sequence[int | None] = (None,)
    ) -> dict[int | None, Tensor]:
        """Embeddings at each requested layer from one backbone pass.

        ``None`` stands for the last layer. Layers count like ``hidden_states``: layer
        ``k`` is the output of the ``k``-th transformer block, 1..depth.
        """
        for layer in layers:
            self.check_layer(layer, "layers")
        lengths = features.attention_mask.sum(dim=1)
        groups = length_groups(lengths, _group_overhead_tokens(features.input_ids.device))
        if len(groups) == 1:
            return self._embed_rows(features, layers)
        # Texts never interact inside the encoder, so rows of similar length can run
        # apart with less padding: same embeddings and gradients, less work and memory.
        width = features.input_ids.shape[1]
        widths = [int(lengths[rows].max()) for rows in groups]
        parts = [self._embed_rows(_take_rows(features, rows, w), layers) for rows, w in zip(groups, widths)]
        restore = torch.argsort(torch.cat(groups))
        out = {}
        for layer in layers:
            pooled = [part[layer] for part in parts]
            # per-token vectors (late interaction) go back to the batch's width; a fixed
            # number of vectors per text cannot match every group's (distinct) width
            if all(p.dim() == 3 and p.shape[1] == w for p, w in zip(pooled, widths)):
                pooled = [_to_width(p, width, features.padding_side) for p in pooled]
            out[layer] = torch.cat(pooled)[restore]
        return out

    def check_domain(self, domain: Any, option: str = "domain") -> None:
        """Refuse, before any work, a domain label for a backbone that does not route by
        domain (``Backbone.takes_domain``): it would be ignored, and the results would
        look like the domain's when they are not."""
        if domain is not None and not getattr(self.backbone, "takes_domain", False):
            name = (self.specs.get("backbone") or {}).get("name") or type(self.backbone).__name__
            raise InputError(
                f"{option}={domain!r} was given, but backbone '{name}' does not route by domain, so the "
                f"label would change nothing; leave {option} unset (null), or use a backbone that takes a "
                "domain (domain_moe)."
            )

    def check_layer(self, layer: int | None, option: str = "layer") -> None:
        """Refuse a layer the backbone does not have, before any layer runs. Layers count
        1..depth (layer ``k`` is the ``k``-th transformer block); ``None`` is the last."""
        depth = self.backbone.num_layers
        if layer is None:
            return
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 1 <= layer <= depth:
            raise InputError(
                f"{option}={layer!r} is not a layer of this model: its backbone has {depth} layers, "
                f"numbered 1 (the first transformer block) to {depth}; None is the last."
            )

    def check_saveable(self) -> None:
        """Refuse, before any work, a model that :meth:`save` could not write: one with a
        part built outside the registry, whose options embplex does not know."""
        known = dict(spec_entries({kind: self.specs.get(kind) or {} for kind in self._parts()}))
        for kind, spec in known.items():
            if spec.get("name") is None or spec.get("options") is None:
                name = spec.get("name")
                how = f"{{'name': '{name}', ...its options}}" if name else "a registered plugin name"
                raise InputError(
                    f"the model's {kind} was passed to compose() already built (or to "
                    "EmbeddingModel directly), so embplex does not know the options it was built "
                    f"with and cannot save it; compose it from {how} to save or train the model."
                )

    def _embed_rows(self, features: Features, layers: Sequence[int | None]) -> dict[int | None, Tensor]:
        deepest = None if any(layer is None for layer in layers) else max(layers)
        features = self.backbone(features, attention=self.attention, num_layers=deepest)
        out: dict[int | None, Tensor] = {}
        for layer in layers:
            pooled = self.pooling(features.at_layer(layer))
            out[layer] = nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
        return out

    def forward(self, features: Features) -> Tensor:
        return self.embed(features)[None]

    def embed_roles(
        self, batch: TrainingBatch, layers: Sequence[int | None] = (None,)
    ) -> dict[str, dict[int | None, Tensor]]:
        """Each role's embeddings (``anchors``, ``positives``, ``negatives``) per layer."""
        return {role: self.embed(features, layers) for role, features in batch.roles().items()}

    # -- inference ---------------------------------------------------------------------

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        normalize: bool | None = None,
        prompt: str | None = None,
        convert_to: str = "numpy",
        show_progress: bool | None = None,
        truncation: str = "warn",
        layer: int | None = None,
        dim: int | None = None,
        domain: str | int | Sequence[str | int] | None = None,
    ) -> np.ndarray | Tensor:
        """Embed texts.

        :param texts: a string or a list of non-empty strings.
        :param normalize: L2-normalise; ``None`` uses the model's setting.
        :param prompt: an instruction prepended to every text; its tokens are flagged so
            pooling can leave them out.
        :param convert_to: ``"numpy"`` or ``"torch"``.
        :param truncation: what to do with texts longer than the model accepts:
            ``"warn"`` (truncate and warn), ``"silent"`` or ``"error"``.
        :param layer: pool at this layer (elastic depth), 1..depth; ``None`` is the last.
        :param dim: keep the first ``dim`` dimensions (Matryoshka), renormalised.
        :param domain: the texts' domain label (one for all, or one per text), handed to
            the backbone in ``Features.domain`` (a backbone routing by domain needs it;
            one that does not, ``Backbone.takes_domain`` false, refuses it).
        :returns: ``[texts, dim]``; for a multi-vector pooling (one that returns
            ``[batch, tokens, dim]``) a list with one ``[tokens_i, dim]`` array per text.
        """
        single = isinstance(texts, str)
        texts = check_texts([texts] if single else texts)
        self.check_domain(domain)
        domains = _domains_for(domain, len(texts))
        self.check_layer(layer)
        if truncation not in ("warn", "silent", "error"):
            raise InputError(f"truncation must be 'warn', 'silent' or 'error', not {truncation!r}.")
        if convert_to not in ("numpy", "torch"):
            raise InputError(f"convert_to must be 'numpy' or 'torch', not {convert_to!r}.")
        if dim is not None and not 0 < dim <= self.dim:
            raise InputError(f"dim must be between 1 and the model's {self.dim}, not {dim}.")
        normalize = self.normalize if normalize is None else normalize
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, not {batch_size}.")
        order = np.argsort([-len(t) for t in texts], kind="stable")
        batches = _token_budget_batches(self.backbone, texts, order, batch_size, prompt, domains)
        if show_progress is None:
            show_progress = len(texts) > 4 * batch_size
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        chunks: list[Tensor] = []
        positions: list[np.ndarray] = []
        truncated = 0
        # The most texts a forward pass may hold: halved each time the accelerator runs
        # out of memory, so one oversized batch does not end a long encode.
        rows_that_fit = batch_size
        try:
            with torch.inference_mode(), tqdm(
                total=len(texts), desc="Encoding", unit="text", disable=not show_progress
            ) as bar:
                for batch, features, newly_truncated in batches:
                    truncated += newly_truncated
                    if truncated and truncation == "error":
                        raise InputError(
                            f"{truncated} text(s) exceed the model's maximum of "
                            f"{self.backbone.max_length} tokens; shorten them or pass "
                            "truncation='warn' to truncate."
                        )
                    pending = [(batch, features)]
                    while pending:
                        part, part_features = pending.pop(0)
                        if len(part) > rows_that_fit:
                            pending[:0] = _split_rows(part, part_features, rows_that_fit)
                            continue
                        try:
                            vectors = self._encode_batch(part_features, layer, dim, normalize)
                        except Exception as error:
                            if not is_out_of_memory(error):
                                raise
                            rows_that_fit = self._fewer_rows_after_oom(error, len(part))
                            pending[:0] = _split_rows(part, part_features, rows_that_fit)
                            continue
                        pooled, keep = vectors
                        self._refuse_non_finite(pooled, keep, part, texts)
                        if keep is not None:  # a set of vectors per text (late interaction)
                            chunks.extend(rows[mask] for rows, mask in zip(pooled, keep))
                        else:
                            chunks.extend(pooled)
                        positions.append(part)
                        bar.update(len(part))
        finally:
            self.train(was_training)
        if truncated and truncation == "warn":
            warnings.warn(
                f"{truncated} text(s) were longer than {self.backbone.max_length} tokens and "
                "were truncated; pass truncation='error' to refuse them instead.",
                UserWarning,
                stacklevel=2,
            )
        in_input_order = [chunks[i] for i in np.argsort(np.concatenate(positions), kind="stable")]
        if in_input_order[0].dim() == 2:  # sets of vectors: one [tokens, dim] per text
            vectors = in_input_order if convert_to == "torch" else [v.numpy() for v in in_input_order]
            return vectors[0] if single else vectors
        embeddings = torch.stack(in_input_order)
        if single:
            embeddings = embeddings[0]
        return embeddings if convert_to == "torch" else embeddings.numpy()

    def _encode_batch(
        self, features: Features, layer: int | None, dim: int | None, normalize: bool
    ) -> tuple[Tensor, Tensor | None]:
        """One forward pass: the batch's vectors on the CPU, and for a multi-vector
        pooling the mask of the vectors each text keeps (``None`` otherwise)."""
        features = self.backbone(
            features.to(self.device, non_blocking=True), attention=self.attention, num_layers=layer
        )
        pooled = self.pooling(features.at_layer(layer)).float()
        if dim is not None:
            pooled = pooled[..., :dim]
        if normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        keep = self.pooling.vector_mask(features).cpu() if pooled.dim() == 3 else None
        return pooled.cpu(), keep

    def _fewer_rows_after_oom(self, error: BaseException, rows: int) -> int:
        """How many texts to try per pass after ``rows`` ran out of memory."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if rows <= 1:
            raise OutOfMemoryError(
                f"{self.describe()} ran out of {self.device.type} memory on a single text "
                f"({error}). Lower backbone.max_length, use backbone.precision=fast, or run "
                "on a device with more memory."
            ) from error
        warnings.warn(
            f"out of {self.device.type} memory encoding {rows} texts in one pass; continuing "
            f"with at most {rows // 2} (lower encode.batch_size to avoid the retries).",
            UserWarning,
            stacklevel=3,
        )
        return rows // 2

    def _refuse_non_finite(
        self, vectors: Tensor, keep: Tensor | None, positions: np.ndarray, texts: list[str]
    ) -> None:
        """Raise when a batch's vectors hold NaN or infinity (corrupt weights, overflow in
        half precision): a wrong vector must never reach an index or a score. One
        ``isfinite`` over the batch: 0.16 ms for 64 MiniLM vectors, which take ~100 ms."""
        finite = torch.isfinite(vectors).all(dim=-1)
        if keep is not None:  # sets of vectors: padding positions may hold anything
            finite = (finite | ~keep.to(finite.device)).all(dim=-1)
        if bool(finite.all()):
            return
        bad = [int(positions[row]) for row in torch.nonzero(~finite).flatten().tolist()]
        first = texts[bad[0]]
        excerpt = first if len(first) <= 60 else first[:57] + "..."
        raise NonFiniteError(
            f"{self.describe()} gave a non-finite embedding (NaN or infinity) for text {bad[0]} "
            f"({excerpt!r})" + (f" and {len(bad) - 1} more text(s) of its batch" if len(bad) > 1 else "")
            + ". Its weights are probably corrupt or overflow in this precision: load it again "
            "from a verified folder, or use dtype float32."
        )

    # -- persistence -------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the model to ``path`` atomically.

        Layout: the backbone at the root (sentence-transformers' place for it), every other
        component in a folder named after its kind, and ``embplex.json`` recording plugin
        names, options, distribution versions and the SHA-256 of every file, which
        :meth:`load` verifies. ``SentenceTransformer(path)`` never loads it as another
        model: when every part exports a sentence-transformers module the folder gets
        that layout and loads there with the same vectors; otherwise its ``modules.json``
        names :class:`embplex.integrations.sentence_transformers.EmbplexModule`, which
        sentence-transformers loads only with ``trust_remote_code=True`` (and then through
        embplex), and the save warns.
        """
        import embplex

        self.check_saveable()
        with atomic_directory(path) as root:
            parts = self._parts()
            for kind, part in parts.items():
                part.save(root if kind == "backbone" else root / kind)
            self._save_sentence_transformers(root, Path(path))
            config = {
                "format": FORMAT_VERSION,
                "embplex_version": embplex.__version__,
                "normalize": self.normalize,
                "dim": self.dim,
                "components": self.specs,
                **({"recommended_sizes": [list(p) for p in self.recommended_sizes]} if self.recommended_sizes else {}),
                "sha256": checksum_tree(root, skip=(CONFIG_FILE, *SENTENCE_TRANSFORMERS_METADATA)),
            }
            write_json(root / CONFIG_FILE, config)

    def _parts(self) -> dict[str, nn.Module]:
        parts = {"backbone": self.backbone, "pooling": self.pooling}
        if self.attention is not None:
            parts["attention"] = self.attention
        return parts

    def sentence_transformers_modules(self) -> list[SentenceTransformersModule] | None:
        """The model as sentence-transformers modules (transformer, pooling, normalize),
        or ``None`` when a part has no export (see ``Component.sentence_transformers_export``)."""
        parts = self._parts()
        ordered = [(kind, parts[kind]) for kind in MODEL_KINDS if kind in parts]
        modules = []
        for kind, part in ordered:
            module = part.sentence_transformers_export(self.backbone.hidden_size)
            if module is None:
                return None
            if not module.type.startswith("sentence_transformers."):
                raise TypeError(
                    f"the {kind} plugin '{self.specs.get(kind, {}).get('name')}' exports the "
                    f"sentence-transformers module {module.type!r}; only sentence_transformers.* "
                    "classes load without running other code: return None instead."
                )
            modules.append(module)
        if not modules[0].in_root:
            return None  # sentence-transformers reads its transformer from the root only
        if self.normalize:
            modules.append(SentenceTransformersModule("sentence_transformers.models.Normalize", config_file=None))
        return modules

    def _save_sentence_transformers(self, root: Path, destination: Path) -> None:
        modules = self.sentence_transformers_modules()
        if modules is None:
            # Without a modules.json sentence-transformers would read the transformer at
            # the root with mean pooling: another model. Name a module that loads it
            # through embplex instead, or fails saying so.
            entries = [{"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_DELEGATE}]
            warnings.warn(
                f"{destination}: no sentence-transformers module computes what "
                f"{self.describe()} computes, so SentenceTransformer('{destination}') loads it "
                "only with trust_remote_code=True, through embplex (which must be installed); "
                "embplex.load loads it as usual.",
                UserWarning,
                stacklevel=3,
            )
        else:
            entries = []
            for idx, module in enumerate(modules):
                folder = "" if module.in_root else f"{idx}_{module.type.rsplit('.', 1)[-1]}"
                (root / folder).mkdir(parents=True, exist_ok=True)
                if module.config_file is not None:
                    write_json(root / folder / module.config_file, module.config)
                entries.append({"idx": idx, "name": str(idx), "path": folder, "type": module.type})
        write_json(root / "modules.json", entries)
        write_json(
            root / "config_sentence_transformers.json",
            {"model_type": "SentenceTransformer", "similarity_fn_name": "cosine"},
        )

    def describe(self) -> str:
        """Which model this is, for messages: its folder when loaded, else its plugins."""
        if self.source is not None:
            return f"the model at {self.source}"
        names = [
            f"{where} '{spec['name']}'"
            for where, spec in spec_entries({k: self.specs[k] for k in MODEL_KINDS if k in self.specs})
        ]
        return "the model with " + ", ".join(names) if names else "the model"

    @classmethod
    def load(
        cls,
        path: str | Path,
        registry: Registry | None = None,
        trust_remote_code: bool = False,
        device: str | torch.device | None = "auto",
    ) -> "EmbeddingModel":
        """Load a model saved by :meth:`save`, resolving its plugins through the registry.

        Every file is checked against the SHA-256 recorded at save time first; a folder
        saved before checksums existed (format 1) loads with a warning. A folder whose
        config sets a component option ``trust_remote_code`` (the convention of every
        plugin that can run a model's own code) is refused unless ``trust_remote_code``
        is passed: loading never runs code from the folder by itself. ``device`` is as
        for :meth:`compose`.
        """
        target = resolve_device(device)
        root = Path(path)
        if not root.is_dir():
            raise ModelFileError(f"no saved model at {root}: the folder does not exist.")
        config = read_json(root / CONFIG_FILE, "embplex model config")
        if not isinstance(config, dict) or "components" not in config:
            raise ModelFileError(f"{root / CONFIG_FILE} is not an embplex model config; save the model again.")
        _verify_saved_files(root, config)
        registry = registry or load_registry()
        specs = config["components"]
        _refuse_remote_code(root, specs, trust_remote_code)
        parts: dict[str, Any] = {}
        for kind, spec in specs.items():
            if isinstance(spec, list):  # an attention list: member i saved in attention/i
                parts[kind] = AttentionChain(
                    [_load_part(kind, member, root / kind / str(i), registry, root) for i, member in enumerate(spec)]
                )
            else:
                parts[kind] = _load_part(kind, spec, root if kind == "backbone" else root / kind, registry, root)
        model = cls(
            backbone=parts["backbone"],
            pooling=parts["pooling"],
            attention=parts.get("attention"),
            normalize=bool(config.get("normalize", True)),
            specs=specs,
        )
        model.source = str(root)
        sizes = config.get("recommended_sizes")
        model.recommended_sizes = [(int(layer), int(dim)) for layer, dim in sizes] if sizes else None
        return model.to(target)


def _load_part(kind: str, spec: dict[str, Any], folder: Path, registry: Registry, root: Path) -> Any:
    try:
        info = registry.get(kind, spec["name"])
    except UnknownComponentError:
        raise MissingPluginError(_missing_plugin_message(kind, spec, root)) from None
    return info.factory.from_saved(folder, info.factory_arguments(spec.get("options", {})))


def _compose_part(kind: str, value: Any, registry: Registry, where: str) -> tuple[Any, dict[str, Any]]:
    """One part for ``compose`` from a name, a config or a built component, and its spec.
    ``where`` names it in errors (``attention[1]`` for a member of a list)."""
    if isinstance(value, (str, Mapping)):
        spec = component_spec(value)
        try:
            info = registry.get(kind, spec["name"])
        except UnknownComponentError as exc:
            if where == kind:
                raise
            raise UnknownComponentError(f"{where}: {exc}") from None
        part = info.create(**spec["options"])
    else:
        part, info = _built_part(kind, value, registry)
        spec = {"name": info.name if info else None, "options": None}
    spec["plugin"] = info.plugin if info else None
    spec["distribution"] = info.distribution.name if info and info.distribution else None
    spec["version"] = info.distribution.version if info and info.distribution else None
    return part, spec


def _asks_remote_code(options: Any) -> bool:
    """Whether options set ``trust_remote_code``, at any depth: a wrapping component's
    inner part (``backbone.inner``) counts as much as the component itself."""
    if isinstance(options, Mapping):
        return bool(options.get("trust_remote_code") is True) or any(_asks_remote_code(v) for v in options.values())
    if isinstance(options, (list, tuple)):
        return any(_asks_remote_code(v) for v in options)
    return False


def _refuse_remote_code(root: Path, specs: dict[str, Any], trusted: bool) -> None:
    asking = [kind for kind, spec in spec_entries(specs) if _asks_remote_code(spec.get("options") or {})]
    if asking and not trusted:
        raise UnsafeConfigError(
            f"{root / CONFIG_FILE} sets {asking[0]}.trust_remote_code=true: loading it would run "
            "Python code from the model folder (or from a repository its config names). Only if "
            "you trust where it came from, pass trust_remote_code=True to embplex.load (on the "
            "command line: backbone.trust_remote_code=true)."
        )


def _verify_saved_files(root: Path, config: dict[str, Any]) -> None:
    version = config.get("format", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{root / CONFIG_FILE} has format {version!r}, newer than this embplex reads "
            f"({FORMAT_VERSION}); upgrade embplex (pip install -U embplex) to load it."
        )
    recorded = config.get("sha256")
    if recorded is None and version < 2:
        warnings.warn(
            f"{root} was saved by an embplex without checksums, so its files cannot be "
            "verified; save it again (embplex.load(path).save(path)) to record them.",
            UserWarning,
            stacklevel=3,
        )
        return
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        raise ModelFileError(
            f"{root / CONFIG_FILE} lists no valid checksums (key 'sha256'), so the model's files "
            "cannot be verified; save the model again."
        )
    verify_checksums(root, recorded, root / CONFIG_FILE)


# Texts tokenized per call in encode; sorting by token count happens within such a chunk.
_TOKENIZE_CHUNK = 4096
# encode's token budget per batch is batch_size times this (padding included): about
# 2048 tokens at batch_size 64, which keeps matrix products efficient on a CPU while
# leaving 8% padding on the benchmark sentences (docs/benchmarks.md).
TOKENS_PER_TEXT = 32


def _domains_for(domain: Any, count: int) -> list[str | int] | None:
    """``encode``'s ``domain`` as one label per text (``None``: no label)."""
    if domain is None:
        return None
    if isinstance(domain, (str, numbers.Integral)) and not isinstance(domain, bool):
        return [domain] * count
    if isinstance(domain, Sequence) and not isinstance(domain, (str, bytes)):
        labels = list(domain)
        if len(labels) != count:
            raise InputError(f"domain has {len(labels)} labels for {count} texts; give one label, or one per text.")
        return labels
    raise InputError(f"domain must be a label (a name or an index) or a list of them, not {type(domain).__name__}.")


def _token_budget_batches(
    backbone: Backbone,
    texts: list[str],
    order: np.ndarray,
    batch_size: int,
    prompt: str | None,
    domains: list[str | int] | None = None,
) -> Iterator[tuple[np.ndarray, Features, int]]:
    """Batches of texts with nearly equal token counts: at most ``batch_size`` texts and
    ``batch_size * TOKENS_PER_TEXT`` tokens (padding included) each.

    Padding is wasted work: batching sentence-transformers' way (64 texts sorted by
    characters) pads the benchmark sentences by 38%, sorting by tokens under a token
    budget by 8%. Texts are tokenized once, a chunk at a time (a chunk holds texts of
    similar character counts, since ``order`` sorts by them), then sorted by token count
    and sliced into batches. Only float rounding depends on how texts are grouped (the
    embeddings stay within 1e-7 of sentence-transformers'), so every precision batches
    this way.

    Yields each batch's positions in ``texts``, its features and how many of its texts
    were truncated.
    """
    budget = batch_size * TOKENS_PER_TEXT
    for start in range(0, len(order), _TOKENIZE_CHUNK):
        chunk = order[start : start + _TOKENIZE_CHUNK]
        features = backbone.tokenize([texts[i] for i in chunk], prompt=prompt)
        if domains is not None:
            features.domain = [domains[i] for i in chunk]
        truncated = int(features.extra.get("truncated", 0))
        lengths = features.attention_mask.sum(dim=1)
        by_length = torch.argsort(lengths, descending=True, stable=True)
        position = 0
        while position < len(chunk):
            longest = max(int(lengths[by_length[position]]), 1)
            picked = by_length[position : position + max(1, min(batch_size, budget // longest))]
            yield chunk[picked.numpy()], _take_rows(features, picked, longest), truncated
            truncated = 0
            position += len(picked)


# What running one more group costs in embed, in tokens of padding it must save to be
# worth it: a pass's fixed costs (Python, operator dispatch, smaller matrices). On a CPU
# a token of a MiniLM forward and backward costs about 0.4 ms, so 256 tokens (~100 ms) is
# a conservative bound on that fixed work; accelerators pay more per pass and less per
# token, and 2048 there is a guess. Neither was tuned.
_GROUP_OVERHEAD_TOKENS = {"cpu": 256}
_DEFAULT_GROUP_OVERHEAD_TOKENS = 2048


def _group_overhead_tokens(device: torch.device) -> int:
    return _GROUP_OVERHEAD_TOKENS.get(device.type, _DEFAULT_GROUP_OVERHEAD_TOKENS)


def length_groups(lengths: Tensor, overhead: int) -> list[Tensor]:
    """Split a batch's rows into groups of similar length, each to be padded only to its
    own longest row.

    Minimises ``sum(rows_in_group * longest_in_group + overhead)`` over the groups: each
    group costs its padded tokens plus ``overhead`` for running at all. Groups are
    contiguous runs of the rows sorted by length, and only break where the length
    changes, which makes the search (dynamic programming) quadratic in the number of
    distinct lengths, not rows. Returns row-index tensors, longest group first.
    """
    lengths = lengths.cpu()
    order = torch.argsort(lengths, descending=True, stable=True)
    ordered = lengths[order].numpy().astype(np.int64)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    bounds = np.r_[starts, len(ordered)]
    # cost[j]: cheapest split of the rows before bounds[j]; cut[j]: where its last group starts
    cost = np.zeros(len(bounds), dtype=np.int64)
    cut = np.zeros(len(bounds), dtype=np.int64)
    for j in range(1, len(bounds)):
        candidates = cost[:j] + (bounds[j] - starts[:j]) * ordered[starts[:j]] + overhead
        cut[j] = int(np.argmin(candidates))
        cost[j] = candidates[cut[j]]
    groups: list[Tensor] = []
    j = len(bounds) - 1
    while j > 0:
        groups.append(order[int(bounds[cut[j]]) : int(bounds[j])])
        j = int(cut[j])
    return groups[::-1]


def _to_width(vectors: Tensor, width: int, padding_side: str) -> Tensor:
    """A group's per-token vectors (``[rows, tokens, dim]``) padded back to the batch's
    token width on the padding side, so positions line up with the unsplit batch."""
    filler = vectors.new_zeros(vectors.shape[0], width - vectors.shape[1], vectors.shape[2])
    return torch.cat([filler, vectors] if padding_side == "left" else [vectors, filler], dim=1)


def _split_rows(
    positions: np.ndarray, features: Features, most: int
) -> list[tuple[np.ndarray, Features]]:
    """A tokenized batch cut into consecutive parts of at most ``most`` texts, each with
    its positions in the input, so the outputs can be put back in input order."""
    width = features.input_ids.shape[1]
    return [
        (positions[start : start + most], _take_rows(features, torch.arange(start, min(start + most, len(positions))), width))
        for start in range(0, len(positions), most)
    ]


def _take_rows(features: Features, rows: Tensor, width: int) -> Features:
    """The given rows of a tokenized batch, cut to ``width`` tokens (padding removed)."""
    columns = slice(-width, None) if features.padding_side == "left" else slice(0, width)
    count, full_width = features.input_ids.shape

    def take(value: Any) -> Any:
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != count:
            return value
        value = value[rows]
        return value[:, columns] if value.dim() == 2 and value.shape[1] == full_width else value

    return Features(
        input_ids=take(features.input_ids),
        attention_mask=take(features.attention_mask),
        instruction_mask=take(features.instruction_mask),
        padding_side=features.padding_side,
        extra={key: take(value) for key, value in features.extra.items()},
        domain=None if features.domain is None else [features.domain[int(row)] for row in rows],
    )


_BASE_CLASSES = {"backbone": Backbone, "attention": Attention, "pooling": Pooling}


def _built_part(kind: str, part: Any, registry: Registry) -> tuple[Any, ComponentInfo | None]:
    """A component given to ``compose`` already built, and the registry entry of its
    class (``None`` for a class no plugin registered)."""
    if not isinstance(part, _BASE_CLASSES[kind]):
        raise InputError(
            f"{kind} must be a plugin name, a config {{'name': ..., **options}} or a built "
            f"{_BASE_CLASSES[kind].__name__}, not {type(part).__name__}."
        )
    for info in registry.components[kind].values():
        if info.factory is type(part):
            return part, info
    return part, None


def _missing_plugin_message(kind: str, spec: dict[str, Any], root: Path) -> str:
    dist = spec.get("distribution")
    install = f"install it with: pip install '{dist}=={spec.get('version')}'" if dist else (
        "it was registered in-process, not by an installed distribution; register it again"
    )
    return (
        f"The model at {root} needs the {kind} plugin '{spec['name']}', which is not installed; "
        f"{install}."
    )


def check_texts(texts: Any) -> list[str]:
    """Refuse what cannot be embedded, naming the offending position."""
    if texts is None or isinstance(texts, (bytes, Mapping)) or not isinstance(texts, Sequence):
        raise InputError(f"texts must be a string or a list of strings, not {type(texts).__name__}.")
    texts = list(texts)
    if not texts:
        raise InputError("no texts to encode: pass at least one non-empty string.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(
                f"text {i} is {type(text).__name__}, not a string; convert it (or drop it) first."
            )
        if not text.strip():
            raise InputError(f"text {i} is empty; every text needs some content to embed.")
    return texts


_ST_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken", "weightedmean_tokens")


def sentence_transformers_pooling(mode: str, hidden_size: int) -> SentenceTransformersModule:
    """sentence-transformers' ``Pooling`` module in ``mode`` (``mean``, ``cls``, ``max``,
    ``lasttoken``, ``weightedmean``), for a pooling's ``sentence_transformers_export``.
    It pools over every real token, a prompt's included."""
    wanted = {"mean": "mean_tokens", "cls": "cls_token", "max": "max_tokens"}.get(mode, mode)
    wanted = {"weightedmean": "weightedmean_tokens"}.get(wanted, wanted)
    if wanted not in _ST_POOLING_MODES:
        raise ValueError(f"sentence-transformers has no pooling mode {mode!r}")
    # the pooling_mode_* keys are read by every sentence-transformers version
    return SentenceTransformersModule(
        type="sentence_transformers.models.Pooling",
        config={"word_embedding_dimension": hidden_size, **{f"pooling_mode_{m}": m == wanted for m in _ST_POOLING_MODES}},
    )
