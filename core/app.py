"""What the CLI commands do, as plain functions of a composed config (a dict).

Each function takes the config produced by :func:`embplex.config.compose_config` and a
registry, so the same runs are available from Python.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import distributed, storage
from .components import Index
from .config import component_config, options_of
from .errors import DimensionError, InputError, ModelFileError
from .model import EmbeddingModel
from .registry import Registry


def build_model(cfg: dict[str, Any], registry: Registry) -> EmbeddingModel:
    """Load ``model.load`` when set, else compose the configured plugins."""
    if cfg["model"].get("load"):
        # backbone.trust_remote_code=true is the user's consent to run the folder's code
        trusted = bool((cfg.get("backbone") or {}).get("trust_remote_code"))
        return EmbeddingModel.load(
            saved_model_folder(cfg["model"]["load"]),
            registry=registry,
            trust_remote_code=trusted,
            device=cfg.get("device", "auto"),
        )
    return EmbeddingModel.compose(
        backbone=component_config(cfg, "backbone"),
        attention=component_config(cfg, "attention"),
        pooling=component_config(cfg, "pooling"),
        normalize=cfg["model"]["normalize"],
        registry=registry,
        device=cfg.get("device", "auto"),
    )


def saved_model_folder(path: str | Path) -> Path:
    """The saved model ``model.load`` names: the folder itself, or the ``model/`` folder of
    a run folder (what ``embplex train`` writes to ``output_dir``).

    :raises ModelFileError: a run folder that holds no saved model.
    """
    from .model import CONFIG_FILE
    from .training import latest_checkpoint

    root = Path(path)
    if (root / CONFIG_FILE).exists() or not root.is_dir():
        return root  # a model folder, or nothing: EmbeddingModel.load says which
    if (root / "model" / CONFIG_FILE).exists():
        return root / "model"
    checkpoint = latest_checkpoint(root)
    hint = (
        f"; its newest checkpoint holds one: model.load={checkpoint / 'model'}"
        if checkpoint is not None and (checkpoint / "model" / CONFIG_FILE).exists()
        else "; train into it first (embplex train output_dir=...), or pass a model folder"
    )
    raise ModelFileError(
        f"model.load={root} holds no saved model: neither {root / CONFIG_FILE} nor "
        f"{root / 'model' / CONFIG_FILE} exists (a run that failed or has not finished){hint}."
    )


def index_factory(cfg: dict[str, Any], registry: Registry) -> Callable[[int], Index]:
    """A callable building an empty index of the configured kind for a dimension."""
    node = component_config(cfg, "index")
    if node is None:
        raise InputError("no index configured; choose one with index=<name> (see `embplex plugins --kind index`).")
    options = {k: v for k, v in options_of(node).items() if k != "dim"}
    info = registry.get("index", node["name"])
    info.create(dim=1, **options)  # fail early on a bad option, before any encoding

    def make(dim: int) -> Index:
        return info.create(dim=dim, **options)

    return make


def output_dir(cfg: dict[str, Any]) -> Path:
    return storage.output_folder(cfg["output_dir"])


# -- commands ----------------------------------------------------------------------------


def run_train(cfg: dict[str, Any], registry: Registry, model: EmbeddingModel | None = None) -> Any:
    from .data import load_training_data
    from .training import TrainSettings, train

    model = model or build_model(cfg, registry)
    examples = load_training_data(cfg["data"]["train"])
    loss_node = component_config(cfg, "loss")
    sampler_node = component_config(cfg, "sampler")
    if loss_node is None or sampler_node is None:
        raise InputError("training needs a loss and a sampler: set loss=<name> and sampler=<name>.")
    loss = registry.create("loss", loss_node["name"], **options_of(loss_node))
    sampler = registry.create("sampler", sampler_node["name"], **options_of(sampler_node))
    settings = TrainSettings.from_dict({"seed": cfg["seed"], **cfg["train"]})
    from .teachers import build_teacher

    teacher = build_teacher(cfg.get("teacher"), registry)
    return train(
        model,
        examples,
        loss,
        sampler,
        settings,
        output_dir=output_dir(cfg),
        make_index=index_factory(cfg, registry),
        run_config={"data": cfg["data"]["train"]},
        teacher=teacher,
    )


def run_eval(
    cfg: dict[str, Any],
    registry: Registry,
    model: EmbeddingModel | None = None,
    write: bool = True,
    keep_index: Callable[[Index], None] | None = None,
) -> dict[str, Any]:
    """Evaluate on ``data.eval``; ``keep_index`` receives the retrieval index it built."""
    from . import evaluation

    model = model or build_model(cfg, registry)
    spec = cfg["data"]["eval"]
    settings = cfg["eval"]
    if spec["task"] != "limit" and not spec.get("path"):
        raise InputError(f"data.eval.path is not set; say where the {spec['task']} data is.")
    model.check_domain(settings.get("domain"), "eval.domain")
    # every text of the evaluation (queries, documents, sentence pairs) gets the one label
    encode_options = {} if settings.get("domain") is None else {"domain": settings["domain"]}
    if spec["task"] == "sts":
        from .data import load_sts

        s1, s2, gold = load_sts(spec["path"])
        results = evaluation.evaluate_sts(
            model, s1, s2, gold, batch_size=settings["batch_size"], bootstrap=settings["bootstrap"],
            encode_options=encode_options,
        )
    elif spec["task"] in ("retrieval", "limit"):
        if spec["task"] == "limit":  # generated, not read (embplex.limit)
            from .limit import generate

            options = ("documents", "queries", "relevant", "distractors", "items_per_document", "seed")
            corpus, queries, qrels = generate(**{key: spec[key] for key in options if spec.get(key) is not None})
        else:
            from .data import load_beir

            corpus, queries, qrels = load_beir(spec["path"], spec["split"])
        make_index = index_factory(cfg, registry)

        def make_and_keep(dim: int) -> Index:
            index = make_index(dim)
            if keep_index is not None:
                keep_index(index)
            return index

        results = evaluation.evaluate_retrieval(
            model,
            corpus,
            queries,
            qrels,
            make_and_keep,
            batch_size=settings["batch_size"],
            bootstrap=settings["bootstrap"],
            encode_options=encode_options,
            **({"recall_at": (2, 10)} if spec["task"] == "limit" else {}),
        )
    elif spec["task"] in ("passkey", "needle"):
        from . import long_context

        results = long_context.evaluate_long_context(
            model,
            spec["task"],
            spec["path"],
            index_factory(cfg, registry),
            lengths=spec.get("lengths") or long_context.LENGTHS,
            queries=spec.get("queries", 50),
            candidates=spec.get("candidates", 100),
            seed=spec.get("seed", 0),
            filler=spec.get("filler", "essay"),
            batch_size=settings["batch_size"],
            bootstrap=settings["bootstrap"],
            encode_options=encode_options,
        )
    else:
        raise InputError(
            f"unknown evaluation task {spec['task']!r}; use 'sts', 'retrieval', 'limit', 'passkey' or 'needle'."
        )
    results["data"] = cfg["data"]["name"]
    if write:
        target = output_dir(cfg) / settings["output"]
        evaluation.write_results(target, results)
        if spec["task"] in ("passkey", "needle"):  # score against length, beside the JSON
            from . import long_context

            long_context.plot({long_context.label(model.specs): results}, target.with_suffix(".png"))
    return results


def run_encode(cfg: dict[str, Any], registry: Registry) -> Path:
    """Embed ``encode.input`` into ``encode.output``.

    An output name ending in ``.npy``: one text per line (no blank lines) into one
    ``.npy`` file; row ``i`` is line ``i + 1`` of the input, and the line numbers are
    written beside it (:func:`ids_path`). Both files are written atomically. Any other
    name: a folder of Parquet shards, streamed, resumable and split over ``torchrun``'s
    processes (:mod:`embplex.bulk`).
    """
    from .data import read_texts

    settings = cfg["encode"]
    if not settings.get("input"):
        raise InputError("say what to encode: encode.input=<file with one text per line, .jsonl file or BEIR folder>.")
    if not str(settings["output"]).endswith(".npy"):
        return _encode_shards(cfg, registry)
    if distributed.launched_by_torchrun():
        raise InputError(
            f"encode.output={settings['output']} is one .npy file, which one process writes; under torchrun "
            "write shards instead: encode.output=<folder name>."
        )
    texts = read_texts(settings["input"])
    model = build_model(cfg, registry)
    model.check_domain(settings.get("domain"), "encode.domain")
    vectors = model.encode(
        texts,
        batch_size=settings["batch_size"],
        prompt=settings.get("prompt"),
        truncation=settings["truncation"],
        show_progress=True,
        layer=settings.get("layer"),
        dim=settings.get("dim"),
        domain=settings.get("domain"),
    )
    target = output_dir(cfg) / settings["output"]
    # The vectors (the large file, the likely one to fail) replace theirs first; the ids
    # are staged alongside and replace theirs only once the vectors are in place.
    with storage.atomic_file(ids_path(target)) as ids_file, storage.atomic_file(target) as vectors_file:
        ids_file.write("".join(f"{line}\n" for line in range(1, len(texts) + 1)).encode("utf-8"))
        np.save(vectors_file, vectors, allow_pickle=False)
    return target


def _encode_shards(cfg: dict[str, Any], registry: Registry) -> Path:
    from .bulk import EncodeJob, encode_to_shards

    settings = cfg["encode"]
    target = output_dir(cfg) / settings["output"]
    model = build_model(cfg, registry)
    model.check_domain(settings.get("domain"), "encode.domain")
    distributed.setup(settings["distributed_timeout"], model.device)
    job = EncodeJob(
        batch_size=settings["batch_size"],
        shard_size=settings["shard_size"],
        prompt=settings.get("prompt"),
        truncation=settings["truncation"],
        layer=settings.get("layer"),
        dim=settings.get("dim"),
        domain=settings.get("domain"),
    )
    encode_to_shards(model, settings["input"], target, job, model_fingerprint(model), overwrite=settings["overwrite"])
    return target


def ids_path(embeddings: Path) -> Path:
    """The file beside ``embeddings`` naming each row's source: ``embeddings.ids.txt`` next
    to ``embeddings.npy``, one id per line; for ``embplex encode`` the id is the input line number."""
    stem = embeddings.name[: -len(".npy")] if embeddings.name.endswith(".npy") else embeddings.name
    return embeddings.with_name(f"{stem}.ids.txt")


def run_index(
    cfg: dict[str, Any],
    registry: Registry,
    model: EmbeddingModel | None = None,
    vectors: np.ndarray | None = None,
) -> tuple[Index, dict[str, str]]:
    """The configured corpus in the configured index, saved under ``output_dir/index``.

    A saved index built from the same model, corpus and index settings (its
    ``built_from``) is loaded, verified, and reused instead of encoding the corpus again;
    ``search.rebuild=true`` builds it anyway. A stale one is rebuilt, saying why.
    """
    from .data import load_beir

    spec = cfg["data"]["eval"]
    if spec["task"] != "retrieval":
        raise InputError(f"data={cfg['data']['name']} has no corpus to index; use a retrieval data set (e.g. data=scifact).")
    corpus, _, _ = load_beir(spec["path"], spec["split"])
    model = model or build_model(cfg, registry)
    make_index = index_factory(cfg, registry)
    target = output_dir(cfg) / "index"
    built_from = index_provenance(cfg, model)
    if cfg["search"].get("rebuild"):
        print(f"building the index (search.rebuild=true): {target} is replaced", flush=True)
    else:
        saved, why_not = _saved_index(target, built_from, registry, model.dim)
        if saved is not None:
            print(
                f"reusing the saved index at {target}: same model, corpus and index settings, checksums "
                "verified (search.rebuild=true builds it again)",
                flush=True,
            )
            return saved, corpus
        print(f"building the index: {why_not}", flush=True)
    ids = list(corpus)
    if vectors is None and cfg["search"].get("embeddings"):
        ids, vectors = _vectors_from_shards(cfg, model, built_from["corpus"])
    elif vectors is None:
        vectors = model.encode([corpus[i] for i in ids], batch_size=cfg["eval"]["batch_size"], show_progress=True)
    index = make_index(model.dim)
    index.add(ids, vectors)
    index.built_from = built_from
    index.save(target)
    return index, corpus


def _vectors_from_shards(cfg: dict[str, Any], model: EmbeddingModel, corpus_sha256: str) -> tuple[list[str], np.ndarray]:
    """The corpus's vectors from ``search.embeddings`` (``embplex encode`` shards), checked:
    complete, every shard's checksum, the configured model's fingerprint, the corpus file."""
    from .bulk import read_shards, verify_output

    folder = Path(cfg["search"]["embeddings"]).expanduser()
    manifest = verify_output(folder, model_fingerprint(model))
    if manifest["input"]["sha256"] != corpus_sha256:
        raise InputError(
            f"search.embeddings={folder} was encoded from {manifest.get('input_path')}, not from the corpus of "
            f"data={cfg['data']['name']} (their SHA-256 differ); encode that corpus (encode.input=<its folder>), "
            "or configure the data set the shards come from."
        )
    settings = manifest["settings"]
    if settings.get("prompt") or settings.get("layer") or settings.get("dim"):
        raise InputError(
            f"search.embeddings={folder} was encoded with prompt/layer/dim settings ({settings}); the index "
            "searches with the model's plain embeddings, so encode the corpus without them."
        )
    print(f"building the index from the verified shards in {folder} (nothing encoded again)", flush=True)
    return read_shards(folder, manifest=manifest)


def index_provenance(cfg: dict[str, Any], model: EmbeddingModel) -> dict[str, Any]:
    """What an index of the configured corpus is built from: the model's fingerprint, the
    corpus file's SHA-256 and the index plugin with its options (stored as ``built_from``)."""
    node = component_config(cfg, "index") or {}
    return {
        "model": model_fingerprint(model),
        "corpus": storage.sha256_file(Path(cfg["data"]["eval"]["path"]).expanduser() / "corpus.jsonl"),
        "index": {"name": node.get("name"), "options": {k: v for k, v in options_of(node).items() if k != "dim"}},
    }


def model_fingerprint(model: EmbeddingModel) -> str:
    """A SHA-256 of what decides a model's vectors: its components (names, options,
    versions), normalisation, and every parameter and buffer."""
    digest = hashlib.sha256()
    description = {"components": model.specs, "normalize": model.normalize}
    digest.update(json.dumps(description, sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode("utf-8"))
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def load_index(path: str | Path, registry: Registry, name: str | None = None, dim: int | None = None) -> Index:
    """Load a saved index through the plugin that saved it, after checking it.

    Refuses an index saved by another plugin than ``name`` or of another dimension than
    ``dim`` (when given), and one whose files differ from the checksums recorded when it
    was saved; the core checks this for every index plugin, whatever its own ``load`` does.
    """
    manifest = storage.read_index_manifest(path)
    name = name or manifest["index"]
    storage.verify_index(path, name, dim)
    loader = getattr(registry.get("index", name).factory, "load", None)
    if loader is None:
        raise ModelFileError(f"index plugin '{name}' has no load(path); it cannot read the index saved at {path}.")
    index = loader(path)
    if index.dim != manifest["dim"]:
        raise DimensionError(
            f"index plugin '{name}' loaded {path} with dimension {index.dim}, but it was saved with "
            f"dimension {manifest['dim']}; build the index again."
        )
    index.built_from = manifest["built_from"]
    return index


def _saved_index(
    target: Path, built_from: dict[str, Any], registry: Registry, dim: int
) -> tuple[Index | None, str]:
    """The index saved at ``target`` when it was built from ``built_from``, else why not.

    A saved index that matches but fails its checksums is an error, not a silent rebuild.
    """
    if not target.exists():
        return None, f"no index saved at {target} yet"
    try:
        manifest = storage.read_index_manifest(target)
    except ModelFileError as exc:
        return None, f"the folder there cannot be reused ({exc})"
    saved_from = manifest.get("built_from") or {}
    changed = [part for part in ("model", "corpus", "index") if saved_from.get(part) != built_from[part]]
    if changed:
        what = {"model": "another model", "corpus": "another corpus", "index": "other index settings"}
        return None, f"the index saved at {target} was built from {' and '.join(what[c] for c in changed)}"
    try:
        return load_index(target, registry, name=built_from["index"]["name"], dim=dim), ""
    except ModelFileError as exc:
        raise ModelFileError(f"{exc} `embplex index search.rebuild=true` replaces it.") from exc


def search(model: EmbeddingModel, index: Index, query: str, k: int) -> list[tuple[str, float]]:
    result = index.search(model.encode([query]), k)
    return list(zip(result.ids[0], result.scores[0].tolist()))


def run_quickstart(cfg: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """The README's main job: evaluate, fine-tune briefly, evaluate again, index, search."""
    started = time.perf_counter()
    model = build_model(cfg, registry)
    print("1/4 evaluating the base model on", cfg["data"]["name"], flush=True)
    before = run_eval(cfg, registry, model=model, write=False)
    print("2/4 fine-tuning", flush=True)
    trained = run_train(cfg, registry, model=model)
    print("3/4 evaluating the fine-tuned model", flush=True)
    built: list[Index] = []
    after = run_eval(cfg, registry, model=model, write=False, keep_index=built.append)
    from . import evaluation
    from .data import load_beir

    change = evaluation.paired_change(before, after, n=cfg["eval"]["bootstrap"])
    evaluation.write_results(output_dir(cfg) / "quickstart.json", {"before": before, "after": after, "change": change})
    print("4/4 saving the index of the corpus and answering a sample query", flush=True)
    index = built[0]  # the evaluation already embedded the whole corpus: reuse it
    index.built_from = index_provenance(cfg, model)
    index.save(output_dir(cfg) / "index")
    corpus, _, _ = load_beir(cfg["data"]["eval"]["path"], cfg["data"]["eval"]["split"])
    query = cfg["search"].get("query") or "Vitamin D deficiency is associated with a higher risk of infection."
    hits = search(model, index, query, cfg["search"]["k"])
    print()
    print(format_comparison(before, after, change))
    print()
    print(f"query: {query}")
    for rank, (doc_id, score) in enumerate(hits[:5], 1):
        print(f"  {rank}. [{score:.3f}] {doc_id}: {corpus[doc_id][:90]}")
    print()
    print(f"model saved to {Path(trained.model_path)}; index saved to {output_dir(cfg) / 'index'}")
    print(f"finished in {time.perf_counter() - started:.0f}s")
    return {"before": before, "after": after, "hits": hits}


def metric_names(results: dict[str, Any]) -> list[str]:
    """The headline metrics of an evaluation: those reported with a confidence interval."""
    return [name for name in results if f"{name}_ci" in results]


def format_comparison(
    before: dict[str, Any], after: dict[str, Any], change: dict[str, dict[str, Any]] | None = None
) -> str:
    """The before/after table; with ``change`` (:func:`embplex.evaluation.paired_change`),
    the paired 95% interval of each change, which says whether it exceeds the noise."""
    header = ("metric", "before", "after", "change", "change 95% CI (paired)")
    rows = [header if change else header[:4]]
    for name in metric_names(before):
        old, new = before[name], after[name]
        row = (name, f"{old:.2f}", f"{new:.2f}", f"{new - old:+.2f}")
        if change:
            low, high = change[name]["change_ci"]
            row += (f"[{low:+.2f}, {high:+.2f}]",)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
