"""Length collapse (issue 9, experiment 2): the mean pairwise cosine of the embeddings of
unrelated essay excerpts against their length, with and without ``temp_scale``.

Excerpts of at most ``L`` tokens of the model's tokenizer (the longest cut that fits) are
taken from different Paul Graham essays, one per essay, each from a seeded random word,
for L in 128…4096. The model is all-MiniLM-L6-v2 extended by ``position_interpolation``
(linear, 4096; texts up to 512 tokens run through the untouched model). Length-Induced
Embedding Collapse (Zhou et al., 2024, arXiv:2410.24200) predicts that the cosine rises
with length and that a temperature below 1 lowers it. Writes
``<output>/length_collapse.json`` and ``<output>/length_collapse.png``.

    python benchmarks/length_collapse.py                 # 16 excerpts per length
    python benchmarks/length_collapse.py --smoke         # 4 excerpts at 128 and 256 tokens
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

LENGTHS = (128, 256, 512, 1024, 2048, 4096)
TEMPERATURES = (None, 0.9)
ESSAYS = Path(os.environ.get("EMBPLEX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "long" / "paul-graham-essays"


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    sims = vectors @ vectors.T
    count = len(vectors)
    return float((sims.sum() - np.trace(sims)) / (count * (count - 1)))


def bootstrap_interval(vectors: np.ndarray, resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean pairwise cosine, resampling the excerpts
    (pairs of two draws of the same excerpt are left out: they are not two texts)."""
    sims = vectors @ vectors.T
    rng = np.random.default_rng(seed)
    count = len(vectors)
    values = []
    for _ in range(resamples):
        drawn = rng.integers(count, size=count)
        block = sims[np.ix_(drawn, drawn)]
        distinct = drawn[:, None] != drawn[None, :]
        if distinct.any():  # a resample of one excerpt drawn every time has no pair to measure
            values.append(float(block[distinct].mean()))
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def run(
    output: Path,
    model_path: str = "all-MiniLM-L6-v2",
    lengths: Sequence[int] = LENGTHS,
    count: int = 16,
    seed: int = 0,
    essays_dir: Path = ESSAYS,
) -> dict[str, Any]:
    import embplex
    from embplex import storage
    from embplex.long_context import _token_count, essays, fit_to_length

    backbone = {"name": "position_interpolation", "inner": {"name": "hf_encoder", "path": model_path}, "target_length": 4096}
    models = {
        ("plain" if t is None else f"temp_scale {t}"): embplex.compose(
            backbone, pooling="mean", attention=None if t is None else {"name": "temp_scale", "temperature": t}
        )
        for t in TEMPERATURES
    }
    tokenizer_owner = next(iter(models.values())).backbone
    # an essay qualifies when it holds more than the longest excerpt; each excerpt starts at a
    # seeded random word early enough that the longest one still fits before the essay ends
    longest = max(lengths)
    texts_by_essay, spans = [], []
    for words in essays(essays_dir):
        tokens = _token_count(tokenizer_owner, " ".join(words))
        needed = int(np.ceil(longest * len(words) / tokens * 1.15))  # words holding `longest` tokens, with slack
        if len(words) > needed:
            texts_by_essay.append(words)
            spans.append(len(words) - needed)
        if len(texts_by_essay) == count:
            break
    if len(texts_by_essay) < 2:
        raise SystemExit(f"fewer than 2 essays in {essays_dir} hold {longest} tokens")
    rng = np.random.default_rng(seed)
    starts = [int(rng.integers(span + 1)) for span in spans]
    curves: dict[str, dict[str, float]] = {name: {} for name in models}
    intervals: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for length in lengths:
        excerpts = [
            fit_to_length(tokenizer_owner, words[start : start + 2 * length], "", 1.0, length)
            for words, start in zip(texts_by_essay, starts)
        ]
        for name, model in models.items():
            vectors = model.encode(excerpts, batch_size=4, truncation="error")
            curves[name][str(length)] = mean_pairwise_cosine(vectors)
            intervals[name][str(length)] = bootstrap_interval(vectors, seed=seed)
            low, high = intervals[name][str(length)]
            print(f"{length:>5} {name}: {curves[name][str(length)]:.4f} (95% CI {low:.4f}-{high:.4f})", flush=True)
    result = {
        "excerpts": len(texts_by_essay), "seed": seed, "model": model_path,
        "mean_pairwise_cosine": curves, "mean_pairwise_cosine_ci": intervals,
    }
    output.mkdir(parents=True, exist_ok=True)
    storage.write_json(output / "length_collapse.json", result)
    _plot(curves, output / "length_collapse.png", intervals)
    return result


def _plot(curves: dict[str, dict[str, float]], path: Path, intervals: dict[str, dict[str, list[float]]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from embplex.storage import atomic_file

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        lengths = sorted(int(n) for n in curve)
        axes.plot(lengths, [curve[str(n)] for n in lengths], marker="o", label=name)
        if intervals:
            axes.fill_between(
                lengths, [intervals[name][str(n)][0] for n in lengths], [intervals[name][str(n)][1] for n in lengths], alpha=0.2
            )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("excerpt length (tokens)")
    axes.set_ylabel("mean pairwise cosine (95% CI)")
    axes.set_title("length collapse")
    axes.legend()
    figure.tight_layout()
    with atomic_file(path) as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="4 excerpts at 128 and 256 tokens")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="an hf_encoder model folder")
    parser.add_argument("--output", default="runs/length_collapse", help="where the JSON and plot go")
    args = parser.parse_args(argv)
    if args.smoke:
        run(Path(args.output), args.model, lengths=(128, 256), count=4)
    else:
        run(Path(args.output), args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
