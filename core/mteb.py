"""MTEB for embplex models: an encoder implementing MTEB's encoder protocol, and MTEB tasks
that read local files.

    import mteb, embplex.mteb

    encoder = embplex.mteb.model("runs/latest/model")              # saved, or an EmbeddingModel
    results = mteb.evaluate(encoder, mteb.get_tasks(["STSBenchmark", "SciFact"]), cache=None)

MTEB hands the encoder a task's metadata and the kind of text (query or document); the
encoder turns them into an instruction through ``prompts`` (MTEB's ``model_prompts``: keys
are task names, task types, ``query``/``document`` or ``<task>-<query|document>``) or, with
``task_instructions=True``, the task's own instruction, and passes it to
:meth:`EmbeddingModel.encode(prompt=...) <embplex.model.EmbeddingModel.encode>`, which flags
its tokens so pooling can leave them out.

Without hub access, :func:`local_sts_task` and :func:`local_retrieval_task` give MTEB's own
STSBenchmark and SciFact tasks (their metadata and metrics) the local files embplex's
``eval`` reads, so the two evaluations can be compared on the same data.

mteb is imported inside the functions (``pip install 'embplex[mteb]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import InputError, OptionError


def model(
    source: Any,
    *,
    prompts: Mapping[str, str] | None = None,
    task_instructions: bool = False,
    instruction_template: str | None = None,
    batch_size: int = 64,
    name: str | None = None,
) -> Any:
    """An MTEB encoder for ``source``: an :class:`~embplex.model.EmbeddingModel`, a saved
    model folder (:func:`embplex.load`), or a backbone config to compose with mean pooling.

    :param prompts: MTEB's ``model_prompts``: instruction per task name, task type,
        prompt type (``query``, ``document``) or ``<task name or type>-<prompt type>``.
    :param task_instructions: use the task's own instruction (MTEB's task metadata
        ``prompt``) when ``prompts`` has none for it, for instruction-tuned models.
    :param instruction_template: formats such an instruction, e.g.
        ``"Instruct: {instruction}\\nQuery: "``; ``None`` uses it as it is.
    :param batch_size: texts per forward pass; MTEB's ``encode_kwargs`` batch size wins.
    :param name: the model's name in MTEB's results (default: the folder's or backbone's name).
    """
    from . import load
    from .model import EmbeddingModel
    from .serve import require

    require("mteb", "mteb")

    if isinstance(source, EmbeddingModel):
        embedding_model = source
    elif isinstance(source, (str, Path)):
        embedding_model = load(str(source))
    elif isinstance(source, Mapping):
        embedding_model = EmbeddingModel.compose(source, pooling="mean")
    else:
        raise InputError(
            f"embplex.mteb.model takes an EmbeddingModel, a saved model folder or a backbone config, "
            f"not {type(source).__name__}."
        )
    if instruction_template is not None and "{instruction}" not in instruction_template:
        raise OptionError(
            f"instruction_template={instruction_template!r} has no '{{instruction}}' placeholder; "
            "write where the task's instruction goes, e.g. 'Instruct: {instruction}\\nQuery: '."
        )
    return _encoder_class()(
        embedding_model,
        prompts=dict(prompts) if prompts else None,
        task_instructions=task_instructions,
        instruction_template=instruction_template,
        batch_size=batch_size,
        name=name,
    )


_ENCODER: Any = None


def _encoder_class() -> Any:
    """The encoder class, built on first use so that importing this module imports no mteb."""
    global _ENCODER
    if _ENCODER is not None:
        return _ENCODER
    from mteb.models import ModelMeta
    from mteb.models.model_meta import ScoringFunction
    from mteb.models.abs_encoder import AbsEncoder, get_prompt

    class EmbplexEncoder(AbsEncoder):
        """MTEB's encoder protocol over an embplex model."""

        def __init__(
            self,
            embedding_model: Any,
            *,
            prompts: dict[str, str] | None,
            task_instructions: bool,
            instruction_template: str | None,
            batch_size: int,
            name: str | None,
        ) -> None:
            from .serve import served_name

            self.model = embedding_model
            if prompts:
                try:  # MTEB's own check of the keys: task names, task types, prompt types
                    self.validate_task_to_prompt_name(prompts)
                except KeyError as exc:
                    messages = "; ".join(sorted(exc.args[0])) if exc.args and isinstance(exc.args[0], set) else str(exc)
                    raise OptionError(f"prompts has a key MTEB does not know: {messages}") from None
            self.model_prompts = prompts
            self.task_instructions = task_instructions
            self.instruction_template = instruction_template
            self.batch_size = batch_size
            model_name = name or served_name(embedding_model)
            self.mteb_model_meta = ModelMeta.create_empty(
                overwrites={
                    "name": model_name if "/" in model_name else f"embplex/{model_name}",
                    "revision": "local",
                    "embed_dim": embedding_model.dim,
                    "similarity_fn_name": ScoringFunction.COSINE,  # what embplex eval scores with
                    "framework": ["PyTorch"],
                    "max_tokens": embedding_model.backbone.max_length,
                }
            )

        def instruction(self, task_metadata: Any, prompt_type: Any) -> str | None:
            """The instruction for this task and kind of text: ``prompts`` first, then (with
            ``task_instructions``) the task's own."""
            prompt = get_prompt(self.model_prompts, task_metadata, prompt_type)
            if prompt:
                return prompt
            if self.task_instructions:
                text = self.get_instruction(task_metadata, prompt_type)
                if text:
                    return self.instruction_template.format(instruction=text) if self.instruction_template else text
            return None

        def encode(
            self,
            inputs: Any,
            *,
            task_metadata: Any,
            hf_split: str,
            hf_subset: str,
            prompt_type: Any = None,
            **kwargs: Any,
        ) -> np.ndarray:
            texts = [text for batch in inputs for text in batch["text"]]
            if not texts:
                return np.zeros((0, self.model.dim), dtype=np.float32)
            return self.model.encode(
                texts,
                batch_size=int(kwargs.get("batch_size") or self.batch_size),
                prompt=self.instruction(task_metadata, prompt_type),
                show_progress=bool(kwargs.get("show_progress_bar", False)),
                truncation="silent",  # as sentence-transformers, which MTEB's scores are made with
            )

    _ENCODER = EmbplexEncoder
    return _ENCODER


def local_sts_task(path: str | Path, task: str = "STSBenchmark", split: str = "test") -> Any:
    """MTEB's STS task ``task`` reading the STS TSV ``path`` (``sentence1, sentence2,
    score``: the file ``embplex eval data=stsb`` reads) as its ``split``, with no download."""
    import mteb
    from datasets import Dataset

    from .data import load_sts

    loaded = mteb.get_task(task, eval_splits=[split])
    _only_split(loaded, split, task)
    first, second, gold = load_sts(path)
    rows = Dataset.from_dict({"sentence1": first, "sentence2": second, "score": [float(g) for g in gold]})
    loaded.dataset = {"default": {split: rows}}
    loaded.data_loaded = True
    return loaded


def local_retrieval_task(
    path: str | Path, task: str = "SciFact", split: str = "test", queries: int | None = None
) -> Any:
    """MTEB's retrieval task ``task`` reading the BEIR folder ``path`` (``corpus.jsonl``,
    ``queries.jsonl``, ``qrels/<split>.tsv``: what ``embplex eval data=scifact`` reads).

    :param queries: keep only the first ``queries`` queries that have relevant documents
        (the whole corpus stays), for a quick run.
    """
    import mteb
    from datasets import Dataset

    from .data import load_beir

    corpus, query_texts, qrels = load_beir(str(path), split)
    judged = [qid for qid in query_texts if qid in qrels]
    if queries is not None:
        judged = judged[:queries]
    loaded = mteb.get_task(task, eval_splits=[split])
    _only_split(loaded, split, task)
    titles, texts = _titles_and_texts(Path(path) / "corpus.jsonl", corpus)
    ids = list(corpus)
    loaded.dataset = {
        "default": {
            split: {
                "corpus": Dataset.from_dict({"id": ids, "title": [titles[i] for i in ids], "text": [texts[i] for i in ids]}),
                "queries": Dataset.from_dict({"id": judged, "text": [query_texts[q] for q in judged]}),
                "relevant_docs": {q: {d: int(s) for d, s in qrels[q].items()} for q in judged},
                "top_ranked": None,
            }
        }
    }
    loaded.data_loaded = True
    return loaded


def _only_split(task: Any, split: str, name: str) -> None:
    if split not in task.metadata.eval_splits:
        raise InputError(f"MTEB's task {name} has no split {split!r}; its splits: {task.metadata.eval_splits}.")


def _titles_and_texts(corpus_file: Path, joined: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each document's title and text apart, as MTEB wants them (it joins them with a space,
    as embplex does); read from the file ``load_beir`` read."""
    import json

    titles: dict[str, str] = {}
    texts: dict[str, str] = {}
    with open(corpus_file, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                key = str(row["_id"])
                if key in joined:
                    titles[key] = row.get("title") or ""
                    texts[key] = row.get("text") or ""
    return titles, texts


def evaluate(encoder: Any, tasks: Any, **kwargs: Any) -> dict[str, dict[str, float]]:
    """Run ``mteb.evaluate`` without a results cache and return each task's scores on its
    first split and subset, in percent (as embplex's ``eval`` reports them)."""
    import mteb

    kwargs.setdefault("cache", None)
    kwargs.setdefault("show_progress_bar", False)
    result = mteb.evaluate(encoder, tasks, **kwargs)
    scores: dict[str, dict[str, float]] = {}
    for task_result in result.task_results:
        split = next(iter(task_result.scores))
        values = task_result.scores[split][0]
        scores[task_result.task_name] = {
            key: 100 * float(value) for key, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return scores
