"""What the CLI commands do, as plain functions of a composed config (a dict).

Each function takes the config produced by :func:`embplex.config.compose_config` and a
registry, so the same runs are available from Python.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .components import Index
from .config import component_config, options_of
from .errors import InputError
from .model import EmbeddingModel
from .registry import Registry


def build_model(cfg: dict[str, Any], registry: Registry) -> EmbeddingModel:
    """Load ``model.load`` when set, else compose the configured plugins."""
    if cfg["model"].get("load"):
        # backbone.trust_remote_code=true is the user's consent to run the folder's code
        trusted = bool((cfg.get("backbone") or {}).get("trust_remote_code"))
        return EmbeddingModel.load(cfg["model"]["load"], registry=registry, trust_remote_code=trusted)
    return EmbeddingModel.compose(
        backbone=component_config(cfg, "backbone"),
        attention=component_config(cfg, "attention"),
        pooling=component_config(cfg, "pooling"),
        normalize=cfg["model"]["normalize"],
        registry=registry,
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
    path = Path(cfg["output_dir"])
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    return train(
        model,
        examples,
        loss,
        sampler,
        settings,
        output_dir=output_dir(cfg),
        make_index=index_factory(cfg, registry),
        run_config={"data": cfg["data"]["train"]},
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
    if spec["task"] == "sts":
        from .data import load_sts

        s1, s2, gold = load_sts(spec["path"])
        results = evaluation.evaluate_sts(
            model, s1, s2, gold, batch_size=settings["batch_size"], bootstrap=settings["bootstrap"]
        )
    elif spec["task"] == "retrieval":
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
        )
    else:
        raise InputError(f"unknown evaluation task {spec['task']!r}; use 'sts' or 'retrieval'.")
    results["data"] = cfg["data"]["name"]
    if write:
        evaluation.write_results(output_dir(cfg) / settings["output"], results)
    return results


def run_encode(cfg: dict[str, Any], registry: Registry) -> Path:
    settings = cfg["encode"]
    if not settings.get("input"):
        raise InputError("say what to encode: encode.input=<file with one text per line>.")
    source = Path(settings["input"])
    if not source.exists():
        raise InputError(f"input file {source} does not exist.")
    texts = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = build_model(cfg, registry)
    vectors = model.encode(
        texts,
        batch_size=settings["batch_size"],
        prompt=settings.get("prompt"),
        truncation=settings["truncation"],
        show_progress=True,
    )
    target = output_dir(cfg) / settings["output"]
    np.save(target, vectors)
    return target


def run_index(
    cfg: dict[str, Any],
    registry: Registry,
    model: EmbeddingModel | None = None,
    vectors: np.ndarray | None = None,
) -> tuple[Index, dict[str, str]]:
    """Encode the configured corpus into the configured index and save it."""
    from .data import load_beir

    spec = cfg["data"]["eval"]
    if spec["task"] != "retrieval":
        raise InputError(f"data={cfg['data']['name']} has no corpus to index; use a retrieval data set (e.g. data=scifact).")
    corpus, _, _ = load_beir(spec["path"], spec["split"])
    model = model or build_model(cfg, registry)
    ids = list(corpus)
    if vectors is None:
        vectors = model.encode([corpus[i] for i in ids], batch_size=cfg["eval"]["batch_size"], show_progress=True)
    index = index_factory(cfg, registry)(model.dim)
    index.add(ids, vectors)
    index.save(output_dir(cfg) / "index")
    return index, corpus


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

    evaluation.write_results(output_dir(cfg) / "quickstart.json", {"before": before, "after": after})
    print("4/4 saving the index of the corpus and answering a sample query", flush=True)
    index = built[0]  # the evaluation already embedded the whole corpus: reuse it
    index.save(output_dir(cfg) / "index")
    corpus, _, _ = load_beir(cfg["data"]["eval"]["path"], cfg["data"]["eval"]["split"])
    query = cfg["search"].get("query") or "Vitamin D deficiency is associated with a higher risk of infection."
    hits = search(model, index, query, cfg["search"]["k"])
    print()
    print(format_comparison(before, after))
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


def format_comparison(before: dict[str, Any], after: dict[str, Any]) -> str:
    rows = [("metric", "before", "after", "change")]
    for name in metric_names(before):
        old, new = before[name], after[name]
        rows.append((name, f"{old:.2f}", f"{new:.2f}", f"{new - old:+.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
