"""The ``embplex`` command line.

    embplex train    [overrides...]   fine-tune a model on data.train
    embplex eval     [overrides...]   evaluate on data.eval (STS or BEIR retrieval)
    embplex encode   encode.input=texts.txt [overrides...]
    embplex index    [search.query="..."] [overrides...]
    embplex quickstart [overrides...] evaluate, fine-tune briefly, evaluate, index, search
    embplex plugins  [--kind KIND] [--json] [--requirements]
    embplex config   [overrides...]   print the composed configuration

Overrides are Hydra's: ``pooling=cls``, ``loss.temperature=0.02``, ``experiment=<recipe>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, Callable, Sequence

from .errors import EmbplexError

COMMANDS = ("train", "eval", "encode", "index", "quickstart", "plugins", "config")
QUICKSTART_DEFAULTS = ["experiment=quickstart"]


def _configured(argv: Sequence[str], defaults: Sequence[str] = ()) -> tuple[dict[str, Any], Any]:
    from .config import compose_config
    from .registry import load_registry

    registry = load_registry()
    return compose_config([*defaults, *argv], registry=registry), registry


def cmd_train(argv: Sequence[str]) -> int:
    from .app import run_train

    cfg, registry = _configured(argv)
    result = run_train(cfg, registry)
    if result.already_complete:
        print(
            f"the run in {result.model_path.parent} is already complete ({result.step} steps); model saved "
            f"to {result.model_path}. To train further, start from it with model.load={result.model_path} "
            "and another output_dir; to train again, train.resume=false."
        )
    else:
        print(f"trained {result.step} steps; final loss {result.loss:.4f}; model saved to {result.model_path}")
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    from .app import metric_names, output_dir, run_eval

    cfg, registry = _configured(argv)
    results = run_eval(cfg, registry)
    for name in metric_names(results):
        low, high = results[f"{name}_ci"]
        print(f"{name:>12}: {results[name]:.2f}  (95% CI {low:.2f}-{high:.2f})")
    print(f"results written to {output_dir(cfg) / cfg['eval']['output']}")
    return 0


def cmd_encode(argv: Sequence[str]) -> int:
    from .app import run_encode

    cfg, registry = _configured(argv)
    print(f"embeddings written to {run_encode(cfg, registry)}")
    return 0


def cmd_index(argv: Sequence[str]) -> int:
    from .app import output_dir, run_index, search

    cfg, registry = _configured(argv)
    from .app import build_model

    model = build_model(cfg, registry)
    index, corpus = run_index(cfg, registry, model=model)
    print(f"indexed {len(index)} documents into {output_dir(cfg) / 'index'}")
    if cfg["search"].get("query"):
        for rank, (doc_id, score) in enumerate(search(model, index, cfg["search"]["query"], cfg["search"]["k"]), 1):
            print(f"{rank:>3}. [{score:.3f}] {doc_id}: {corpus[doc_id][:100]}")
    return 0


def cmd_quickstart(argv: Sequence[str]) -> int:
    from .app import run_quickstart

    cfg, registry = _configured(argv, defaults=QUICKSTART_DEFAULTS)
    run_quickstart(cfg, registry)
    return 0


def cmd_config(argv: Sequence[str]) -> int:
    cfg, _ = _configured(argv)
    print(json.dumps(cfg, indent=2))
    return 0


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
    if args.requirements:
        requirements = sorted({f"{r['distribution']}=={r['version']}" for r in rows if r["distribution"]})
        print("\n".join(requirements))
    elif args.json:
        print(json.dumps({"components": rows, "failed": failed}, indent=2))
    else:
        print(_table(rows, ("kind", "name", "plugin", "distribution", "version", "paper")))
        for f in failed:
            print(f"FAILED to load plugin {f['plugin']} ({f['distribution']}): {f['error']}")
    return 0


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [list(columns)] + [[str(row[c] if row[c] is not None else "-") for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


HANDLERS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "encode": cmd_encode,
    "index": cmd_index,
    "quickstart": cmd_quickstart,
    "plugins": cmd_plugins,
    "config": cmd_config,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"embplex: unknown command '{command}'. Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    if command != "plugins" and any(arg in ("-h", "--help") for arg in rest):
        print(__doc__)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return HANDLERS[command](rest)
    except EmbplexError as exc:
        print(f"embplex {command}: error: {exc}", file=sys.stderr)
        return 2
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
