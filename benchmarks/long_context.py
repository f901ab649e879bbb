"""The long-context experiment of issue 9: training-free extension of all-MiniLM-L6-v2
judged on LongEmbed-style passkey and needle retrieval at 256…4096 tokens.

Configurations, each on both tasks (recipe: ``conf/experiment/long_context.yaml``):

* ``truncation``: ``hf_encoder`` cut at its 512 positions;
* ``pi``: ``position_interpolation`` (linear) to 4096;
* ``pi+temp``: with ``temp_scale``;
* ``pi+temp+lambda``: with ``[lambda_mask, temp_scale]``;
* ``pi+temp+lambda+sink``: with ``[lambda_mask, temp_scale, sink_calibration]``.

Writes ``<output_dir>/<task>.json`` (every configuration's scores per length, with 95%
bootstrap intervals) and ``<output_dir>/<task>.png`` (score against length, one line per
configuration).

    python benchmarks/long_context.py                 # the full experiment
    python benchmarks/long_context.py --smoke         # seconds: 2 lengths, 3 queries
    python benchmarks/long_context.py --smoke --model PATH --only truncation,pi output_dir=/tmp/x
    python benchmarks/long_context.py --tasks needle   # one task (its JSON and plot)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Sequence

# "truncation" is the recipe's inner encoder itself (its path and precision: see
# truncation_overrides), cut at its 512 positions.
CONFIGURATIONS: dict[str, list[str]] = {
    "truncation": ["backbone=hf_encoder", "~backbone.inner", "backbone.max_length=512"],
    "pi": [],
    "pi+temp": ["attention=temp_scale"],
    "pi+temp+lambda": ["attention=[lambda_mask,temp_scale]"],
    "pi+temp+lambda+sink": ["attention=[lambda_mask,temp_scale,sink_calibration]"],
}
TASKS = ("passkey", "needle")
SMOKE = ["data.eval.lengths=[256,512]", "data.eval.queries=3", "data.eval.candidates=4", "eval.bootstrap=20"]


def model_overrides(configuration: list[str], model: str | None) -> list[str]:
    if model is None:
        return configuration
    if "backbone=hf_encoder" in configuration:
        return [*configuration, f"backbone.path={model}"]
    return [*configuration, f"backbone.inner={{name: hf_encoder, path: '{model}'}}"]


def truncation_overrides(inner: Any) -> list[str]:
    """The recipe's inner encoder as the baseline's backbone: the same model folder and
    precision as the extended configurations, so only the extension differs."""
    if not isinstance(inner, dict):
        return []
    return [f"backbone.{key}={value}" for key, value in inner.items() if key in ("path", "precision")]


def run(
    overrides: Sequence[str] = (),
    smoke: bool = False,
    model: str | None = None,
    only: Sequence[str] | None = None,
    tasks: Sequence[str] = TASKS,
) -> dict[str, Any]:
    import embplex
    from embplex import long_context, storage
    from embplex.app import output_dir, run_eval
    from embplex.config import compose_config

    registry = embplex.load_registry()
    recipe = ["experiment=long_context", *(SMOKE if smoke else [])]
    inner = compose_config([*recipe, *overrides], registry=registry)["backbone"].get("inner")
    started = time.perf_counter()
    # evaluate_long_context logs one line per length (documents encoded, seconds)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    progress = logging.getLogger("embplex.long_context")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    summary: dict[str, Any] = {}
    try:
        for task in tasks:
            runs = {}
            for name, configuration in CONFIGURATIONS.items():
                if only and name not in only:
                    continue
                if name == "truncation":
                    configuration = [*configuration, *truncation_overrides(inner)]
                cfg = compose_config(
                    [*recipe, f"data={task}", *model_overrides(configuration, model), *overrides],
                    registry=registry,
                )
                print(f"[{_clock(started)}] {task} {name}: starting", flush=True)
                runs[name] = run_eval(cfg, registry, write=False)
                print(f"[{_clock(started)}] {task} {name}: " + ", ".join(
                    f"{n}: {v[runs[name]['metric']]:.1f}" for n, v in runs[name]["lengths"].items()), flush=True)
            folder = output_dir(cfg)
            storage.write_json(
                folder / f"{task}.json",
                {"task": task, "smoke": smoke, "configurations": {n: CONFIGURATIONS[n] for n in runs}, "runs": runs},
            )
            long_context.plot(runs, folder / f"{task}.png")
            summary[task] = runs
    finally:
        progress.removeHandler(handler)
    return summary


def _clock(started: float) -> str:
    seconds = int(time.perf_counter() - started)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 lengths, 3 queries, 4 candidates")
    parser.add_argument("--model", help="another hf_encoder model folder (tests use a tiny one)")
    parser.add_argument("--only", help="comma-separated configurations to run (default: all)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: both; each writes its own JSON and plot)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. output_dir=runs/x")
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or ()) - set(CONFIGURATIONS))
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGURATIONS)}")
    tasks = args.tasks.split(",")
    if set(tasks) - set(TASKS):
        parser.error(f"unknown task(s) {', '.join(sorted(set(tasks) - set(TASKS)))}; choose from {', '.join(TASKS)}")
    run(args.overrides, smoke=args.smoke, model=args.model, only=only, tasks=tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
