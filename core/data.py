"""Reading training and evaluation data from the standard file formats.

Training loaders return ``list[Example]``; evaluation readers return plain Python
containers. Every loader takes ``limit`` (keep the first N examples, for quick runs).

Formats (``load_training_data`` picks one by ``spec["format"]``):

* ``pairs``: TSV ``sentence1, sentence2, label`` (keep label 1) or
  ``sentence1, sentence2, score`` (keep score >= ``min_score``, 4.0 by default).
* ``triplets``: TSV ``anchor, positive, negative``.
* ``beir``: a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``);
  one example per relevant (query, document) pair, the document as title + " " + text.
* ``flagembedding``: FlagEmbedding's JSONL (``query``, ``pos`` list, ``neg`` list and
  optional ``pos_scores``, ``neg_scores``, ``prompt``), a file or a folder of files.
* ``sts``: TSV ``sentence1, sentence2, score`` keeping every pair with its score in
  ``Example.scores`` (for losses that learn from scores).

What is refused rather than guessed (an :class:`~embplex.errors.InputError` naming the
file and line): a score, label or teacher score that is not a finite number (``nan``,
``inf``); a qrels score that is not a whole number, or a (query, document) pair judged
twice; a BEIR document or query ``_id`` that appears twice (the first line is named); a
FlagEmbedding line whose ``pos`` list is empty. Any of these would otherwise change a
result without a word (a ``nan`` gold score ranks first; a repeated ``_id`` keeps only
the last document).

:func:`read_texts` reads the input of ``embplex encode``: one text per line, blank lines
refused, so row ``i`` of the embeddings is always line ``i + 1`` of the file.

TSV quoting, per file kind (``quoting`` option, see :data:`QUOTING`):

* STS files (``sts`` training format and :func:`load_sts`) are plain TSV: no quoting, a
  ``"`` is part of the text wherever it stands, the first character included. This is how
  STS-B is distributed and read across the ecosystem (sentence-transformers, MTEB).
* Pairs and triplets files (``pairs``, ``triplets``) are CSV-quoted TSV by default, as the
  MRPC files are: a field wrapped in quotes with inner quotes doubled comes back as the
  original text. Pass ``quoting="none"`` to read a plain TSV file of pairs or triplets as
  written.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .components import Example
from .errors import InputError, ModelFileError, OptionError

__all__ = [
    "FORMATS",
    "load_beir",
    "load_beir_pairs",
    "load_flagembedding_jsonl",
    "load_pairs_tsv",
    "load_sts",
    "load_sts_pairs",
    "load_training_data",
    "load_triplets_tsv",
    "read_texts",
]

DEFAULT_MIN_SCORE = 4.0

# How a TSV file's fields are read: "csv" unquotes CSV-quoted fields, "none" keeps every
# character as written (plain TSV).
QUOTING = {"csv": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}


# ---------------------------------------------------------------------------
# file helpers
# ---------------------------------------------------------------------------


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"{what} not found: {path} does not exist; check the data path.")
    return path


def _read_tsv(
    path: str | Path, what: str, quoting: str = "csv"
) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """The header and the rows (with their line numbers) of a TSV file.

    ``quoting="none"`` keeps quote characters as text; ``"csv"`` unquotes CSV-quoted fields.
    """
    if quoting not in QUOTING:
        raise OptionError(f"quoting must be one of {', '.join(QUOTING)}, not {quoting!r} (reading {path}).")
    path = _existing(path, what)
    handle = path.open(newline="", encoding="utf-8")
    reader = csv.reader(handle, delimiter="\t", quoting=QUOTING[quoting])
    header = [column.strip() for column in next(reader, [])]
    if not header:
        handle.close()
        raise InputError(f"{path} is empty; a {what} needs a header line.")

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        with handle:
            for line, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise InputError(
                        f"{path}, line {line}: {len(row)} fields where the header has "
                        f"{len(header)}; fix the line or quote fields that contain tabs."
                    )
                yield line, dict(zip(header, row))

    return header, rows()


def _require_columns(path: str | Path, header: list[str], *options: tuple[str, ...]) -> tuple[str, ...]:
    """The first column set in ``options`` that the header has, else a clear error."""
    for columns in options:
        if all(column in header for column in columns):
            return columns
    wanted = " or ".join("(" + ", ".join(columns) + ")" for columns in options)
    raise InputError(f"{path} has columns ({', '.join(header)}); expected {wanted}.")


def _number(value: str, path: str | Path, line: int, column: str) -> float:
    """A TSV field as a finite float, else an error naming the file, line and column."""
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{path}, line {line}: {column} {value!r} is not a number.") from None
    return _finite(number, f"{path}, line {line}", column, value)


def _finite(number: float, where: str, column: str, written: Any) -> float:
    # float() reads "nan" and "inf", and so does json; a nan gold score would rank first.
    if not math.isfinite(number):
        raise InputError(f"{where}: {column} {written!r} is not a finite number; fix or remove the line.")
    return number


def _json_number(value: Any, where: str, column: str) -> float:
    """A number read from JSON (not a bool, not text), finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: {column} {value!r} is not a number.")
    return _finite(float(value), where, column, value)


def _first_seen(seen: dict[str, int], key: str, line: int, where: str, what: str) -> None:
    """Remember that ``key`` is on ``line``; refuse a key seen on an earlier line."""
    if key in seen:
        raise InputError(
            f"{where}, line {line}: {what} {key!r} already appeared on line {seen[key]}; "
            "each must appear once (keeping either would silently drop the other)."
        )
    seen[key] = line


def jsonl_record(path: Path, line: int, text: str) -> dict[str, Any]:
    """Line ``line`` of the JSONL file ``path`` as a JSON object, or an error naming it."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}, line {line} is not valid JSON ({exc}).") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}, line {line}: expected a JSON object, got {type(record).__name__}.")
    return record


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if text.strip():
                yield line, jsonl_record(path, line, text)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise OptionError(f"limit must be a positive number of examples or None, not {limit!r}.")


def _limited(examples: list[Example], limit: int | None) -> list[Example]:
    _check_limit(limit)
    return examples if limit is None else examples[:limit]


# ---------------------------------------------------------------------------
# training data
# ---------------------------------------------------------------------------


def load_pairs_tsv(
    path: str | Path,
    min_score: float | None = None,
    limit: int | None = None,
    task: str | None = None,
    quoting: str = "csv",
) -> list[Example]:
    """Positive pairs from a TSV with a header.

    ``sentence1, sentence2, label``: rows with label 1 are kept.
    ``sentence1, sentence2, score``: rows with score >= ``min_score`` are kept
    (4.0 by default, the usual cut for STS-B's 0-5 scale). Fields are CSV-unquoted unless
    ``quoting="none"`` (a plain TSV file such as STS-B's).
    """
    header, rows = _read_tsv(path, "pairs file", quoting)
    columns = _require_columns(
        path, header, ("sentence1", "sentence2", "label"), ("sentence1", "sentence2", "score")
    )
    by_label = columns[2] == "label"
    if by_label and min_score is not None:
        raise OptionError(f"{path} has labels, not scores; min_score applies only to scored pairs.")
    threshold = DEFAULT_MIN_SCORE if min_score is None else float(min_score)
    task = task or Path(path).stem
    examples = []
    for line, row in rows:
        value = _number(row[columns[2]], path, line, columns[2])
        keep = value == 1 if by_label else value >= threshold
        if keep:
            examples.append(Example(anchor=row["sentence1"], positive=row["sentence2"], task=task))
        if limit is not None and len(examples) >= limit:
            break
    return _limited(examples, limit)


def load_sts_pairs(
    path: str | Path,
    min_score: float | None = None,
    limit: int | None = None,
    task: str | None = None,
) -> list[Example]:
    """Every scored pair of an STS TSV, its score in ``Example.scores`` (``[score]``).
    Fields are read as written (plain TSV), exactly as :func:`load_sts` reads them for
    evaluation, so training and evaluation see the same text."""
    header, rows = _read_tsv(path, "STS file", quoting="none")
    _require_columns(path, header, ("sentence1", "sentence2", "score"))
    task = task or Path(path).stem
    examples = []
    for line, row in rows:
        score = _number(row["score"], path, line, "score")
        if min_score is None or score >= min_score:
            examples.append(
                Example(anchor=row["sentence1"], positive=row["sentence2"], scores=[score], task=task)
            )
        if limit is not None and len(examples) >= limit:
            break
    return _limited(examples, limit)


def load_triplets_tsv(
    path: str | Path, limit: int | None = None, task: str | None = None, quoting: str = "csv"
) -> list[Example]:
    """(anchor, positive, one hard negative) from a TSV ``anchor, positive, negative``.
    Fields are CSV-unquoted unless ``quoting="none"``."""
    header, rows = _read_tsv(path, "triplets file", quoting)
    _require_columns(path, header, ("anchor", "positive", "negative"))
    task = task or Path(path).stem
    examples = []
    for _, row in rows:
        examples.append(
            Example(anchor=row["anchor"], positive=row["positive"], negatives=[row["negative"]], task=task)
        )
        if limit is not None and len(examples) >= limit:
            break
    return _limited(examples, limit)


def load_beir_pairs(
    folder: str | Path, split: str = "train", limit: int | None = None, task: str | None = None
) -> list[Example]:
    """One example per relevant (score > 0) qrel: the query and its document's
    title + " " + text. Follows the qrels file's order."""
    corpus, queries, qrels = load_beir(folder, split)
    task = task or Path(folder).name
    examples = []
    for query_id, judged in qrels.items():
        for doc_id, score in judged.items():
            if score <= 0:
                continue
            if doc_id not in corpus:
                raise InputError(
                    f"qrels/{split}.tsv in {folder} names document {doc_id!r}, which is not in corpus.jsonl."
                )
            examples.append(Example(anchor=queries[query_id], positive=corpus[doc_id], task=task))
            if limit is not None and len(examples) >= limit:
                return examples
    return _limited(examples, limit)


def load_flagembedding_jsonl(
    path: str | Path,
    max_negatives: int | None = None,
    limit: int | None = None,
) -> list[Example]:
    """FlagEmbedding's fine-tuning JSONL: a file, or a folder searched for ``*.jsonl``.

    Each line has ``query``, ``pos`` (list) and ``neg`` (list), optionally
    ``pos_scores``/``neg_scores`` (teacher scores), ``prompt`` (the query instruction)
    and ``type``. One example per (query, positive) with the line's negatives (the first
    ``max_negatives`` when set) and scores ``[pos_score, *neg_scores]`` when both are
    given. The task is the file's name without ``.jsonl``. ``type`` and other fields
    (``category``) are read but not kept: :class:`Example` has no place for them.
    A line whose ``pos`` list is empty, or with a score that is not a finite number, is
    refused with its file and line (it is never skipped silently).
    """
    path = _existing(path, "FlagEmbedding data")
    _check_limit(limit)
    if max_negatives is not None and max_negatives < 0:
        raise OptionError(f"max_negatives must be 0 or more, not {max_negatives}.")
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise ModelFileError(f"no .jsonl files under {path}; point the path at FlagEmbedding data.")
    examples: list[Example] = []
    for file in files:
        for line, record in _read_jsonl(file):
            examples.extend(_flagembedding_examples(record, file, line, max_negatives))
            if limit is not None and len(examples) >= limit:
                return examples[:limit]
    return examples


def _flagembedding_examples(
    record: dict[str, Any], file: Path, line: int, max_negatives: int | None
) -> list[Example]:
    where = f"{file}, line {line}"
    query = record.get("query")
    positives = record.get("pos")
    negatives = record.get("neg", [])
    if not isinstance(query, str) or not isinstance(positives, list) or not isinstance(negatives, list):
        raise InputError(f"{where}: needs 'query' (text), 'pos' (list of texts) and optionally 'neg' (list).")
    if not positives:
        raise InputError(f"{where}: 'pos' is empty, so the line gives no training example; add a positive or remove the line.")
    if max_negatives is not None:
        negatives = negatives[:max_negatives]
    positive_scores = record.get("pos_scores")
    negative_scores = record.get("neg_scores")
    has_scores = positive_scores is not None and negative_scores is not None
    if has_scores and (len(positive_scores) != len(positives) or len(negative_scores) < len(negatives)):
        raise InputError(f"{where}: pos_scores/neg_scores must have one score per text in pos/neg.")
    prompt = record.get("prompt") or None
    examples = []
    for i, positive in enumerate(positives):
        scores = None
        if has_scores:
            scores = [
                _json_number(positive_scores[i], where, "pos_scores"),
                *(_json_number(s, where, "neg_scores") for s in negative_scores[: len(negatives)]),
            ]
        examples.append(
            Example(
                anchor=query,
                positive=positive,
                negatives=list(negatives),
                scores=scores,
                task=file.stem,
                prompt=prompt,
            )
        )
    return examples


# ---------------------------------------------------------------------------
# evaluation data
# ---------------------------------------------------------------------------


def load_sts(path: str | Path) -> tuple[list[str], list[str], list[float]]:
    """``(sentences1, sentences2, scores)`` from a TSV ``sentence1, sentence2, score``.

    Fields are read as written (plain TSV, quote characters are text): that is how the
    reference scores in ``../shared/data/README.md`` were measured (and how
    sentence-transformers' STS-B examples and MTEB read the file).
    """
    header, rows = _read_tsv(path, "STS file", quoting="none")
    _require_columns(path, header, ("sentence1", "sentence2", "score"))
    first, second, scores = [], [], []
    for line, row in rows:
        first.append(row["sentence1"])
        second.append(row["sentence2"])
        scores.append(_number(row["score"], path, line, "score"))
    return first, second, scores


def load_beir(
    folder: str | Path, split: str = "test"
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """A BEIR data set: ``(corpus, queries, qrels)``.

    ``corpus`` maps document id to ``(title + " " + text).strip()``; ``queries`` holds only
    the queries judged in ``split``; ``qrels`` maps query id to ``{doc id: score}`` with
    every judgement of the split (zeros included), as BEIR's loader keeps them.

    Refused with file, line and id: a document or query ``_id`` that appears twice, a line
    without ``_id``, a qrels score that is not a whole number, a (query, document) pair
    judged twice.
    """
    folder = _existing(folder, "BEIR folder")
    qrels_path = _existing(folder / "qrels" / f"{split}.tsv", f"qrels of split '{split}'")
    header, rows = _read_tsv(qrels_path, "qrels file")
    _require_columns(qrels_path, header, ("query-id", "corpus-id", "score"))
    qrels: dict[str, dict[str, int]] = {}
    judged: dict[str, int] = {}
    for line, row in rows:
        score = _number(row["score"], qrels_path, line, "score")
        if not score.is_integer():
            raise InputError(f"{qrels_path}, line {line}: score {row['score']!r} is not a whole-number relevance grade.")
        pair = f"{row['query-id']} -> {row['corpus-id']}"
        _first_seen(judged, pair, line, str(qrels_path), "the judgement")
        qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(score)

    corpus_path = _existing(folder / "corpus.jsonl", "BEIR corpus")
    corpus = {}
    for doc_id, record in _records_by_id(corpus_path, "document"):
        title = record.get("title") or ""
        corpus[doc_id] = (title + " " + (record.get("text") or "")).strip()

    queries_path = _existing(folder / "queries.jsonl", "BEIR queries")
    all_queries = {query_id: record.get("text", "") for query_id, record in _records_by_id(queries_path, "query")}
    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise InputError(
            f"qrels/{split}.tsv in {folder} judges {len(missing)} queries missing from "
            f"queries.jsonl (first: {missing[0]!r})."
        )
    queries = {qid: all_queries[qid] for qid in qrels}
    return corpus, queries, qrels


def _records_by_id(path: Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(str(_id), record)`` per line of a BEIR JSONL file; every ``_id`` present and unique."""
    seen: dict[str, int] = {}
    for line, record in _read_jsonl(path):
        if "_id" not in record:
            raise InputError(f"{path}, line {line} has no '_id'.")
        record_id = str(record["_id"])
        _first_seen(seen, record_id, line, str(path), f"{what} _id")
        yield record_id, record


# ---------------------------------------------------------------------------
# texts to encode
# ---------------------------------------------------------------------------


def read_texts(path: str | Path) -> list[str]:
    """The texts of a UTF-8 file with one text per line, in order (``embplex encode``'s input).

    Lines end at ``\n`` only (a trailing ``\r`` is dropped), so the count matches
    ``wc -l`` even when a text holds other Unicode line separators. A blank or
    whitespace-only line is refused with its line number rather than skipped: skipping
    it would shift every later row of the output away from its line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"input file {path} does not exist; encode.input must be a text file, one text per line.")
    try:
        content = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8.") from None
    lines = content.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no new one
    texts = [line[:-1] if line.endswith("\r") else line for line in lines]
    blank = [number for number, text in enumerate(texts, start=1) if not text.strip()]
    if blank:
        shown = ", ".join(str(n) for n in blank[:10]) + (f" and {len(blank) - 10} more" if len(blank) > 10 else "")
        raise InputError(
            f"{path}: {'line' if len(blank) == 1 else 'lines'} {shown} {'is' if len(blank) == 1 else 'are'} "
            "blank; every line is one text and one "
            "row of the output, so remove blank lines or put a text on them."
        )
    if not texts:
        raise InputError(f"{path} is empty; write one text per line.")
    return texts


# ---------------------------------------------------------------------------
# dispatch by config
# ---------------------------------------------------------------------------


def _beir_loader(path: str, split: str = "train", limit: int | None = None, task: str | None = None) -> list[Example]:
    return load_beir_pairs(path, split=split, limit=limit, task=task)


_LOADERS: dict[str, Callable[..., list[Example]]] = {
    "pairs": load_pairs_tsv,
    "triplets": load_triplets_tsv,
    "beir": _beir_loader,
    "flagembedding": load_flagembedding_jsonl,
    "sts": load_sts_pairs,
}
FORMATS = tuple(_LOADERS)


def training_loader(data_format: Any) -> Callable[..., list[Example]]:
    """The loader of a training data format; its parameters after the path are the
    format's options (checked against ``data.train`` before any work starts)."""
    if data_format not in _LOADERS:
        raise OptionError(
            f"unknown data format {data_format!r}; data.train.format must be one of: {', '.join(FORMATS)}."
        )
    return _LOADERS[data_format]


def load_training_data(spec: Mapping[str, Any]) -> list[Example]:
    """Training examples described by a data config such as
    ``{"format": "beir", "path": ".../scifact", "split": "train", "limit": 200}``.

    Keys besides ``format`` and ``path`` are the chosen loader's options:
    ``pairs``: ``min_score``, ``limit``, ``task``, ``quoting``; ``sts``: ``min_score``,
    ``limit``, ``task``; ``triplets``: ``limit``, ``task``, ``quoting``; ``beir``: ``split``, ``limit``, ``task``; ``flagembedding``:
    ``max_negatives``, ``limit``. A ``name`` key (the config's own name) is ignored.
    """
    import inspect

    spec = dict(spec)
    spec.pop("name", None)
    data_format = spec.pop("format", None)
    loader = training_loader(data_format)
    path = spec.pop("path", None)
    if not path:
        raise OptionError(f"data.path is not set; say where the {data_format} data is.")
    accepted = [name for name in inspect.signature(loader).parameters if name != "path" and name != "folder"]
    options = {key: value for key, value in spec.items() if value is not None}
    for key in options:
        if key not in accepted:
            raise OptionError(
                f"data format '{data_format}' has no option '{key}'; its options are: {', '.join(accepted)}."
            )
    examples = loader(path, **options)
    if not examples:
        raise InputError(f"{path} gave no {data_format} training examples; check the file and its filters.")
    return examples
