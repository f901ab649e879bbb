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
    from embplex.long_context import essays, fit_to_length

    backbone = {"name": "position_interpolation", "inner": {"name": "hf_encoder", "path": model_path}, "target_length": 4096}
    models = {
        ("plain" if t is None else f"temp_scale {t}"): embplex.compose(
            backbone, pooling="mean", attention=None if t is None else {"name": "temp_scale", "temperature": t}
        )
        for t in TEMPERATURES
    }
    texts_by_essay = [words for words in essays(essays_dir) if len(words) > 3 * max(lengths)][:count]
    if len(texts_by_essay) < 2:
        raise SystemExit(f"fewer than 2 essays in {essays_dir} hold {3 * max(lengths)} words")
    rng = np.random.default_rng(seed)
    starts = [int(rng.integers(len(words) - 2 * max(lengths))) for words in texts_by_essay]
    tokenizer_owner = next(iter(models.values())).backbone
    curves: dict[str, dict[str, float]] = {name: {} for name in models}
    for length in lengths:
        excerpts = [
            fit_to_length(tokenizer_owner, words[start : start + 2 * length], "", 1.0, length)
            for words, start in zip(texts_by_essay, starts)
        ]
        for name, model in models.items():
            vectors = model.encode(excerpts, batch_size=4, truncation="error")
            curves[name][str(length)] = mean_pairwise_cosine(vectors)
            print(f"{length:>5} {name}: {curves[name][str(length)]:.4f}", flush=True)
    result = {"excerpts": len(texts_by_essay), "seed": seed, "model": model_path, "mean_pairwise_cosine": curves}
    output.mkdir(parents=True, exist_ok=True)
    storage.write_json(output / "length_collapse.json", result)
    _plot(curves, output / "length_collapse.png")
    return result


def _plot(curves: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from embplex.storage import atomic_file

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        lengths = sorted(int(n) for n in curve)
        axes.plot(lengths, [curve[str(n)] for n in lengths], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("excerpt length (tokens)")
    axes.set_ylabel("mean pairwise cosine")
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
