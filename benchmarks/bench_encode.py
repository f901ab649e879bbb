"""Encoding speed and quality: embplex against sentence-transformers, side by side.

Five encoders of all-MiniLM-L6-v2 embed the same 1000 real sentences (batch size 64), in
turns (see ``common.interleaved``):

* ``st_fp32`` / ``st_bf16``: sentence-transformers, float32 and
  ``model_kwargs={"dtype": torch.bfloat16}``;
* ``ours_fp32``: hf_encoder + mean pooling, the default (``precision=fp32``);
* ``ours_fast``: the same with ``precision=fast`` (the one switch of the fast path);
* ``ours_bf16``: ``precision=bf16`` forced, whatever the hardware.

Reported: throughput (median of the repetitions), speed ratios from the interleaved
runs, the largest difference between ours_fp32 and st_fp32, each encoder's minimum
cosine to ours_fp32, STS-B test Spearman, padding, and a compute roofline (FLOPs per
token of the model against measured and theoretical peak FLOP/s of this CPU).

    python benchmarks/bench_encode.py            # about 3-5 minutes on 2 cores
    python benchmarks/bench_encode.py --smoke    # seconds
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import numpy as np

import common

NAME = "encode"
ENCODERS = ("st_fp32", "ours_fp32", "st_bf16", "ours_fast", "ours_bf16")


def flops_per_text(tokens: int, hidden: int, intermediate: int, layers: int) -> float:
    """Multiply-add FLOPs of one BERT-style forward pass over ``tokens`` tokens.

    Per layer and token: the Q, K, V and output projections (4 H^2 multiply-adds) and the
    two feed-forward matrices (2 H I), 2 FLOPs each; attention scores Q K^T and the
    weighted sum of V add 2 * 2 * tokens * H per token. Embedding lookups, layer norms,
    GELU, softmax and pooling are left out (under 1% here).
    """
    linear = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 4 * tokens * hidden
    return float(layers * tokens * (linear + attention))


def gemm_peak(dtype: Any, size: int, repeats: int) -> float:
    """Best FLOP/s of a ``size``-cubed matrix product in ``dtype`` (all threads)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def theoretical_peaks(machine: dict[str, Any]) -> dict[str, Any]:
    """Peak FLOP/s from the clock and the vector units, with the assumptions spelled out."""
    ghz = (machine.get("cpu_mhz") or 0) / 1000
    cores = machine["usable_cpus"]
    flags = machine["cpu_flags"]
    fp32_per_cycle = 64 if flags.get("avx512f") else 32  # 2 FMA units x 16 (8) lanes x 2
    bf16_per_cycle = 2 * fp32_per_cycle if flags.get("avx512_bf16") else fp32_per_cycle
    if flags.get("amx_bf16"):
        bf16_per_cycle = 1024  # one AMX tile unit: 16x32 bf16 x 16 rows per 16 cycles x 2
    return {
        "clock_ghz": ghz,
        "cores": cores,
        "fp32_flop_per_cycle_per_core": fp32_per_cycle,
        "bf16_flop_per_cycle_per_core": bf16_per_cycle,
        "fp32_flops": cores * ghz * 1e9 * fp32_per_cycle,
        "bf16_flops": cores * ghz * 1e9 * bf16_per_cycle,
        "assumptions": (
            "nominal clock from /proc/cpuinfo (turbo may be higher); fp32: two 512-bit FMA "
            "units = 64 FLOP/cycle/core; bf16: VDPBF16PS on both units = 128 FLOP/cycle/core "
            "(2x fp32), 1024 with AMX"
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--count", type=int, default=1000, help="sentences to embed")
    parse.add_argument("--batch-size", type=int, default=64)
    parse.add_argument("--repetitions", type=int, default=7, help="timed runs of each encoder")
    parse.add_argument("--sts-pairs", type=int, default=None, help="STS-B test pairs for Spearman (all)")
    parse.add_argument("--quiet-wait", type=float, default=60.0, help="seconds to wait for a quiet machine per repetition")
    parse.add_argument(
        "--quality-only",
        action="store_true",
        help="measure only the quality columns (cosines, STS-B Spearman) into encode-quality.json; "
        "they do not depend on machine load, unlike the timings",
    )
    args = parse.parse_args(argv)
    if args.smoke:
        args.count, args.repetitions, args.sts_pairs, args.quiet_wait = 48, 1, 24, 0.0
    gemm_size, gemm_repeats = (256, 1) if args.smoke else (2048, 10)

    import torch
    from sentence_transformers import SentenceTransformer

    import embplex
    from embplex import model as embplex_model
    from embplex.hf import bf16_matmul_is_fast

    machine = common.machine_info()
    path = common.minilm_path()
    sentences = common.benchmark_sentences(args.count)
    batch_size = args.batch_size

    st_fp32 = SentenceTransformer(path, device="cpu")
    st_bf16 = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    ours = {
        precision: embplex.compose({"name": "hf_encoder", "path": path, "precision": precision}, pooling="mean")
        for precision in ("fp32", "fast", "bf16")
    }

    def sentence_transformers(model: Any) -> Callable[[list[str]], np.ndarray]:
        def encode(texts: list[str]) -> np.ndarray:
            out = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True)
            return out.float().cpu().numpy()

        return encode

    def embplex_encoder(model: Any) -> Callable[[list[str]], np.ndarray]:
        return lambda texts: model.encode(texts, batch_size=batch_size, show_progress=False)

    encoders = {
        "st_fp32": sentence_transformers(st_fp32),
        "ours_fp32": embplex_encoder(ours["fp32"]),
        "st_bf16": sentence_transformers(st_bf16),
        "ours_fast": embplex_encoder(ours["fast"]),
        "ours_bf16": embplex_encoder(ours["bf16"]),
    }

    # -- quality ---------------------------------------------------------------------
    embeddings = {name: encode(sentences) for name, encode in encoders.items()}
    reference = embeddings["ours_fp32"]
    quality: dict[str, Any] = {
        "ours_fp32_vs_st_fp32_max_abs_diff": float(np.abs(reference - embeddings["st_fp32"]).max()),
        "min_cosine_to_ours_fp32": {
            name: float((vectors * reference).sum(axis=1).min()) for name, vectors in embeddings.items()
        },
    }
    first, second, gold = common.stsb_test(args.sts_pairs)
    quality["stsb_pairs"] = len(gold)
    quality["stsb_spearman"] = {}
    for name, encode in encoders.items():
        a, b = encode(first), encode(second)
        quality["stsb_spearman"][name] = 100 * common.spearman((a * b).sum(axis=1), gold)
    if args.quality_only:
        if args.output is None:
            args.output = common.RESULTS / f"{NAME}-quality{'-smoke' if args.smoke else ''}.json"
        result = {
            "benchmark": NAME,
            "command": "python benchmarks/run.py encode --quality-only" + (" --smoke" if args.smoke else ""),
            "smoke": args.smoke,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine,
            "settings": {"model": common.MODEL_NAME, "batch_size": batch_size},
            "quality": quality,
        }
        return common.finish(result, args, NAME)

    # -- speed -----------------------------------------------------------------------
    runs = {name: (lambda encode=encode: encode(sentences)) for name, encode in encoders.items()}
    seconds, foreign = common.interleaved(runs, args.repetitions, warmup=1, quiet_wait=args.quiet_wait)
    speed = {name: common.throughput(times, len(sentences), foreign[name]) for name, times in seconds.items()}

    def versus(baseline: str, ours_name: str) -> dict[str, Any]:
        return common.ratio(seconds[baseline], seconds[ours_name], foreign[baseline], foreign[ours_name])

    best_st = [min(a, b) for a, b in zip(seconds["st_fp32"], seconds["st_bf16"])]
    best_st_foreign = [max(a, b) for a, b in zip(foreign["st_fp32"], foreign["st_bf16"])]
    ratios = {
        "ours_fp32_vs_st_fp32": versus("st_fp32", "ours_fp32"),
        "ours_fast_vs_st_bf16": versus("st_bf16", "ours_fast"),
        "ours_fast_vs_st_fp32": versus("st_fp32", "ours_fast"),
        "ours_fast_vs_best_st": common.ratio(best_st, seconds["ours_fast"], best_st_foreign, foreign["ours_fast"]),
        "ours_bf16_vs_st_bf16": versus("st_bf16", "ours_bf16"),
    }

    # -- padding and roofline --------------------------------------------------------
    config = ours["fp32"].backbone.model.config
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    backbone = ours["fast"].backbone
    lengths = [int(n) for n in backbone.tokenize(sentences).attention_mask.sum(dim=1)]
    order = np.argsort([-len(t) for t in sentences], kind="stable")

    # sentence-transformers' batching: sorted by characters, batch_size texts at a time,
    # each batch padded to its longest text
    padded_text_count = sum(
        int(backbone.tokenize([sentences[i] for i in order[start : start + batch_size]]).input_ids.numel())
        for start in range(0, len(order), batch_size)
    )
    padded_token_budget = sum(
        int(f.input_ids.numel())
        for _, f, _ in embplex_model._token_budget_batches(backbone, sentences, order, batch_size, None)
    )
    useful_flops = sum(flops_per_text(n, hidden, intermediate, layers) for n in lengths)
    fast_uses_bf16 = bf16_matmul_is_fast("cpu")
    # the peak is a best case: measure it on a quiet machine (a busy core halves it)
    if args.quiet_wait:
        common.wait_for_quiet(args.quiet_wait)
    with common.ForeignLoad() as gemm_load:
        measured = {
            "fp32_flops": gemm_peak(torch.float32, gemm_size, gemm_repeats),
            "bf16_flops": gemm_peak(torch.bfloat16, gemm_size, gemm_repeats),
            "gemm_size": gemm_size,
        }
    measured["foreign_cpu_share"] = gemm_load.share
    theory = theoretical_peaks(machine)
    achieved = {name: useful_flops / value["median_seconds"] for name, value in speed.items()}
    fast_dtype = "bf16" if fast_uses_bf16 else "fp32"
    roofline = {
        "formula": "FLOPs(text of n tokens) = layers * n * (2*(4*H^2 + 2*H*I) + 4*n*H)",
        "hidden": hidden,
        "intermediate": intermediate,
        "layers": layers,
        "matmul_flops_per_token": layers * 2 * (4 * hidden * hidden + 2 * hidden * intermediate),
        "useful_flops_per_token_mean": useful_flops / sum(lengths),
        "useful_flops_total": useful_flops,
        "measured_peak": measured,
        "theoretical_peak": theory,
        "achieved_useful_flops": achieved,
        "fast_path_matmul_dtype": fast_dtype,
        "fast_fraction_of_measured_peak": achieved["ours_fast"] / measured[f"{fast_dtype}_flops"],
        "fast_fraction_of_theoretical_peak": (
            achieved["ours_fast"] / theory[f"{fast_dtype}_flops"] if theory["clock_ghz"] else None
        ),
        "fast_fraction_of_best_measured_peak": achieved["ours_fast"] / max(measured["fp32_flops"], measured["bf16_flops"]),
    }

    cosines = quality["min_cosine_to_ours_fp32"]
    spearmans = quality["stsb_spearman"]
    targets = {
        "fp32_speed_vs_st_fp32": {"target": 1.0, "measured": ratios["ours_fp32_vs_st_fp32"]["median_of_paired"]},
        "fp32_max_abs_diff_vs_st": {"target": 1e-5, "measured": quality["ours_fp32_vs_st_fp32_max_abs_diff"]},
        "fast_speed_vs_st_bf16": {"target": 1.25, "measured": ratios["ours_fast_vs_st_bf16"]["median_of_paired"]},
        "fast_min_cosine": {"target": 0.9999, "measured": cosines["ours_fast"]},
        "fast_stsb_spearman_drop": {"target": 0.05, "measured": abs(spearmans["ours_fp32"] - spearmans["ours_fast"])},
    }
    for name, target in targets.items():
        lower_is_better = name.endswith(("diff_vs_st", "spearman_drop"))
        target["met"] = target["measured"] < target["target"] if lower_is_better else target["measured"] >= target["target"]

    result = {
        "benchmark": NAME,
        "command": "python benchmarks/run.py encode --json" + (" --smoke" if args.smoke else ""),
        "smoke": args.smoke,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "settings": {
            "model": common.MODEL_NAME,
            "batch_size": batch_size,
            "repetitions": args.repetitions,
            "warmup_runs": 1,
            "interleaved": True,
            "quiet_wait_seconds": args.quiet_wait,
            "quiet_share": common.QUIET_SHARE,
            "tokens_per_text_budget": embplex_model.TOKENS_PER_TEXT,
            "fast_path": "hf_encoder precision=fast",
        },
        "inputs": {
            "source": "sentences of the Paul Graham essays (shared/data/long), 5-60 words, ordered by SHA-256",
            "sentences": len(sentences),
            "words_mean": statistics.mean(len(s.split()) for s in sentences),
            "tokens_total": sum(lengths),
            "tokens_mean": sum(lengths) / len(lengths),
            "tokens_max": max(lengths),
        },
        "throughput": speed,
        "ratios": ratios,
        "quality": quality,
        "padding": {
            "real_tokens": sum(lengths),
            "padded_tokens_text_count_batches": padded_text_count,
            "padded_tokens_token_budget_batches": padded_token_budget,
            "waste_text_count": padded_text_count / sum(lengths) - 1,
            "waste_token_budget": padded_token_budget / sum(lengths) - 1,
        },
        "roofline": roofline,
        "targets": targets,
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return common.finish(result, args, NAME)


if __name__ == "__main__":
    main()
