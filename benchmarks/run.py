"""Run one benchmark by name: ``python benchmarks/run.py encode --json``.

``encode``, ``train``, ``length``, ``indexes`` and ``serve`` are ``bench_encode.py``,
``bench_train.py``, ``bench_length.py``, ``bench_indexes.py`` and ``bench_serve.py`` next to
this file, and each study's name is its script (``late_interaction.py``); every option after the name goes to that script
(``--smoke``, ``--json``, ``--output PATH``, and its own, listed by ``--help``). Each
writes its JSON result under ``benchmarks/results/``; ``docs/benchmarks.md`` explains
them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "encode": "bench_encode",
    "train": "bench_train",
    "length": "bench_length",
    "indexes": "bench_indexes",
    "late_interaction": "late_interaction",  # the study of conf/experiment/late_interaction.yaml
    "serve": "bench_serve",
    "ddp": "ddp",  # 1 vs 2 processes under torchrun: training and bulk encoding
    "long_context_cost": "long_context_cost",  # issue 9, experiment 3: tokens/s and memory against length
    "gradcache_memory": "gradcache_memory",  # issue 16: peak training memory against batch size, infonce vs cached_infonce
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        names = ", ".join(BENCHMARKS)
        print(f"usage: python benchmarks/run.py {{{names}}} [--smoke] [--json] [--output PATH] ...", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    module = importlib.import_module(BENCHMARKS[argv[0]])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
