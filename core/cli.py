"""The ``embplex`` command line.

    embplex train    [overrides...]   fine-tune a model on data.train
    embplex eval     [overrides...]   evaluate on data.eval (STS or BEIR retrieval)
    embplex encode   encode.input=texts.txt [overrides...]
    embplex index    [search.query="..."] [overrides...]
    embplex serve    [overrides...]   serve the model over HTTP (OpenAI and TEI APIs, /search)
    embplex quickstart [overrides...] evaluate, fine-tune briefly, evaluate, index, search
    embplex plugins  [--kind KIND] [--json] [--requirements]
    embplex config   [overrides...]   print the composed configuration

Overrides are Hydra's: ``pooling=cls``, ``loss.temperature=0.02``, ``experiment=<recipe>``.
Each command but plugins is a Hydra application: ``-m`` sweeps comma-separated values
(``-m pooling=mean,cls``, one folder per job and a summary), ``hydra/launcher=joblib`` runs
the jobs in parallel, ``--cfg job``, ``--info``, ``--help`` (config groups and their
options), ``--shell-completion install=bash``. A run writes to output_dir, with Hydra's
.hydra/ folder. Exit status: 0 done, 1 a sweep job failed, 2 bad input (nothing ran).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import EmbplexError

if TYPE_CHECKING:
    from .config import Job

COMMANDS = ("train", "eval", "encode", "index", "serve", "quickstart", "plugins", "config")
# what runs across torchrun's processes (docs/scaling.md); the others refuse it
PARALLEL_COMMANDS = ("train", "encode", "plugins", "config")
QUICKSTART_DEFAULTS = ["experiment=quickstart"]

# Each command's body takes the plain config and the registry and returns the job's
# headline metrics (numbers), which a sweep's summary tabulates. OBJECTIVES names the one
# a command returns to an optimising sweeper (hydra/sweeper=optuna); None: the first.
Headline = dict[str, Any]
OBJECTIVES = {"train": "loss", "eval": None, "quickstart": None}


def cmd_train(cfg: dict[str, Any], registry: Any) -> Headline:
    from .app import run_train

    from .distributed import is_main_process

    result = run_train(cfg, registry)
    if not is_main_process():  # under torchrun, rank 0 reports for all
        pass
    elif result.already_complete:
        print(
            f"the run in {result.model_path.parent} is already complete ({result.step} steps); model saved "
            f"to {result.model_path}. To train further, start from it with model.load={result.model_path} "
            "and another output_dir; to train again, train.resume=false."
        )
    else:
        print(f"trained {result.step} steps; final loss {result.loss:.4f}; model saved to {result.model_path}")
    return {"loss": result.loss, "steps": result.step}


def cmd_eval(cfg: dict[str, Any], registry: Any) -> Headline:
    from .app import metric_names, output_dir, run_eval

    results = run_eval(cfg, registry)
    for name in metric_names(results):
        low, high = results[f"{name}_ci"]
        print(f"{name:>12}: {results[name]:.2f}  (95% CI {low:.2f}-{high:.2f})")
    print(f"results written to {output_dir(cfg) / cfg['eval']['output']}")
    return {name: results[name] for name in metric_names(results)}


def cmd_encode(cfg: dict[str, Any], registry: Any) -> Headline:
    from .app import run_encode

    print(f"embeddings written to {run_encode(cfg, registry)}")
    return {}


def cmd_index(cfg: dict[str, Any], registry: Any) -> Headline:
    from .app import output_dir, run_index, search

    from .app import build_model

    model = build_model(cfg, registry)
    index, corpus = run_index(cfg, registry, model=model)
    print(f"indexed {len(index)} documents into {output_dir(cfg) / 'index'}")
    if cfg["search"].get("query"):
        for rank, (doc_id, score) in enumerate(search(model, index, cfg["search"]["query"], cfg["search"]["k"]), 1):
            print(f"{rank:>3}. [{score:.3f}] {doc_id}: {corpus[doc_id][:100]}")
    return {"documents": len(index)}


def cmd_serve(cfg: dict[str, Any], registry: Any) -> Headline:
    from .serve import run_serve

    return run_serve(cfg, registry)


def cmd_quickstart(cfg: dict[str, Any], registry: Any) -> Headline:
    from .app import metric_names, run_quickstart

    outcome = run_quickstart(cfg, registry)
    return {name: outcome["after"][name] for name in metric_names(outcome["after"])}


def cmd_config(cfg: dict[str, Any], registry: Any) -> Headline:
    print(json.dumps(cfg, indent=2))
    return {}


def cmd_plugins(argv: Sequence[str]) -> int:
    from .registry import KINDS, load_registry

    parser = argparse.ArgumentParser(prog="embplex plugins", description="List the registered components.")
    parser.add_argument("--kind", choices=KINDS, help="only this kind")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--requirements", action="store_true", help="print pip requirements of the plugin distributions")
    args = parser.parse_args(argv)
    registry = load_registry()
    rows = [
        {
            "kind": info.kind,
            "name": info.name,
            "plugin": info.plugin,
            "distribution": info.distribution.name if info.distribution else None,
            "version": info.distribution.version if info.distribution else None,
            "paper": info.paper,
        }
        for info in registry
        if args.kind in (None, info.kind)
    ]
    failed = [
        {"plugin": f.name, "distribution": f.distribution.name if f.distribution else None, "error": f.error}
        for f in registry.failed
    ]
    conflicts = [
        {
            "kind": kind,
            "name": name,
            "plugins": [
                {"plugin": info.plugin, "disable": info.selector, "distribution": info.distribution.name if info.distribution else None}
                for info in sides
            ],
            "error": registry.conflict_message(kind, name),
        }
        for (kind, name), sides in registry.conflicts.items()
        if args.kind in (None, kind)
    ]
    if args.requirements:
        requirements = sorted({f"{r['distribution']}=={r['version']}" for r in rows if r["distribution"]})
        print("\n".join(requirements))
    elif args.json:
        print(json.dumps({"components": rows, "failed": failed, "conflicts": conflicts}, indent=2))
    else:
        print(_table(rows, ("kind", "name", "plugin", "distribution", "version", "paper")))
        for f in failed:
            print(f"FAILED to load plugin {f['plugin']} ({f['distribution']}): {f['error']}")
        for conflict in conflicts:
            print(f"CONFLICT {conflict['error']}")
    return 0


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [list(columns)] + [[str(row[c] if row[c] is not None else "-") for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


HANDLERS: dict[str, Callable[[dict[str, Any], Any], Headline]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "encode": cmd_encode,
    "index": cmd_index,
    "serve": cmd_serve,
    "quickstart": cmd_quickstart,
    "config": cmd_config,
}
COMMAND_DEFAULTS = {"quickstart": QUICKSTART_DEFAULTS}
SHELL_COMPLETION = ("-sc", "--shell-completion")


def run_command(command: str, argv: Sequence[str]) -> int:
    """``embplex <command> <argv>``: one Hydra run, or a sweep with ``-m``."""
    from . import sweep
    from .config import compose_config, run_hydra_app
    from .registry import load_registry

    registry = load_registry()
    argv = [*COMMAND_DEFAULTS.get(command, ()), *argv]
    if command == "config" and not any(arg.startswith("-") for arg in argv):
        # plain `embplex config`: print the composed config; no run folder is made
        cmd_config(compose_config(argv, registry=registry), registry)
        return 0
    sweep.last_summary = None
    run_hydra_app(command, argv, lambda cfg, job: _run_job(command, cfg, registry, job), registry)
    if sweep.last_summary is not None and sweep.last_summary["failed"]:
        return 1
    return 0


def _run_job(command: str, cfg: dict[str, Any], registry: Any, job: "Job") -> float | None:
    """One job. Alone, its errors propagate (exit 2 with the message). In a sweep, an error
    is recorded in the job's ``job.json`` and the sweep goes on."""
    from .sweep import write_job_record

    if not job.multirun:
        return _objective(command, HANDLERS[command](cfg, registry))
    label = " ".join(job.overrides) or "(no overrides)"
    print(f"job {job.num} [{label}] -> {job.output_dir}", flush=True)
    record = {"command": command, "num": job.num, "overrides": job.overrides, "sweep_dir": job.sweep_dir}
    try:
        metrics = HANDLERS[command](cfg, registry)
    except Exception as exc:  # any job's failure, a bug included: the others still run
        print(f"embplex {command}: job {job.num} failed: {exc}", file=sys.stderr, flush=True)
        write_job_record(job.output_dir, error=exc, **record)
        return float("nan")
    write_job_record(job.output_dir, metrics=metrics, **record)
    return _objective(command, metrics)


def _objective(command: str, metrics: Headline) -> float | None:
    if command not in OBJECTIVES or not metrics:
        return None
    name = OBJECTIVES[command] or next(iter(metrics))
    return float(metrics[name])


def _complete_shell(argv: Sequence[str]) -> int:
    """Answer the bash completion script (``embplex -sc query=bash``, the line in COMP_LINE):
    command names first, then the command's Hydra completion of overrides."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split(" ")
    if len(words) <= 2:  # still typing the command
        print(" ".join(c for c in COMMANDS if c.startswith(words[-1] if len(words) == 2 else "")))
        return 0
    command = words[1]
    if command not in HANDLERS:
        return 0
    # Hydra completes the words after the program name: leave the command out of the line
    os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
    return run_command(command, argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS and command not in SHELL_COMPLETION:
        print(f"embplex: unknown command '{command}'. Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if command not in PARALLEL_COMMANDS and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        print(
            f"embplex {command}: error: this command runs in one process; launch it without torchrun "
            f"(under torchrun: {', '.join(PARALLEL_COMMANDS)}).",
            file=sys.stderr,
        )
        return 2
    try:
        if command == "plugins":
            return cmd_plugins(rest)
        if command in SHELL_COMPLETION:
            return _complete_shell(argv)
        status = run_command(command, rest)
        from .distributed import shutdown

        shutdown()  # under torchrun: leave the process group cleanly
        return status
    except EmbplexError as exc:
        print(f"embplex {command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a file: a bug worth its traceback
            raise
        # A file the command could not read or write (permissions, a full disk) that no
        # embplex check turned into an EmbplexError first: still one line, naming it.
        print(f"embplex {command}: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # Hydra's --help, a flag argparse rejects
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except KeyboardInterrupt as exc:  # one line, not a traceback; 130 is the shell's code for Ctrl-C
        resume = f"; to resume, run: {_resume_command(command, rest)}" if getattr(exc, "checkpoint", None) else ""
        print(f"embplex {command}: {str(exc) or 'interrupted'}{resume}", file=sys.stderr)
        return 130


def _resume_command(command: str, argv: Sequence[str]) -> str:
    """The same command line, with resuming switched on if it was switched off."""
    kept = [arg for arg in argv if arg.lstrip("+").partition("=")[0] != "train.resume"]
    if len(kept) < len(argv):
        kept.append("train.resume=true")
    return shlex.join(["embplex", command, *kept])


if __name__ == "__main__":
    raise SystemExit(main())
