"""After a sweep (``embplex <command> -m ...``): one record per job, one summary per sweep.

Every job of a sweep writes ``job.json`` into its own folder: its overrides, whether it
finished, its headline metrics or its error. When the sweep ends, the :class:`SweepSummary`
Hydra callback (``hydra.callbacks.sweep_summary`` in ``conf/embplex.yaml``) gathers this
sweep's records, prints one table and writes ``multirun_summary.json`` into the sweep
folder. Records are read from files because a launcher may run jobs in other processes
(joblib) or on other machines (submitit); a file in the sweep folder names the sweep, so
folders left there by an earlier sweep are not counted.

A job that fails records its error and the sweep goes on with the next job (the command
line catches the error; Hydra alone would stop the sweep and write no summary); the
command then exits with status 1.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from .storage import read_json, write_json

JOB_RECORD = "job.json"
SUMMARY_FILE = "multirun_summary.json"
SWEEP_ID_FILE = ".embplex_sweep"

# The summary of the sweep that ended last in this process: the command line reads it to
# choose its exit status.
last_summary: dict[str, Any] | None = None


def sweep_id(sweep_dir: str | Path) -> str | None:
    path = Path(sweep_dir) / SWEEP_ID_FILE
    return path.read_text().strip() if path.exists() else None


def write_job_record(
    output_dir: str | Path,
    *,
    command: str,
    num: int | None,
    overrides: list[str],
    sweep_dir: str | Path | None,
    metrics: dict[str, Any] | None = None,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """Write ``job.json`` into the job's folder and return it."""
    record = {
        "num": num,
        "command": command,
        "overrides": list(overrides),
        "status": "failed" if error is not None else "completed",
        "metrics": metrics or {},
        "error": f"{type(error).__name__}: {error}" if error is not None else None,
        "output_dir": str(output_dir),
        "sweep": sweep_id(sweep_dir) if sweep_dir is not None else None,
    }
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(output_dir) / JOB_RECORD, record)
    return record


def collect(sweep_dir: str | Path) -> dict[str, Any]:
    """The records of the sweep that last started in ``sweep_dir``, by job number."""
    root = Path(sweep_dir)
    current = sweep_id(root)
    jobs = []
    for path in sorted(root.glob(f"**/{JOB_RECORD}")):
        record = read_json(path, "embplex job record")
        if isinstance(record, dict) and record.get("sweep") == current:
            jobs.append(record)
    jobs.sort(key=lambda job: (job["num"] is None, job["num"] or 0))
    failed = [job["num"] for job in jobs if job["status"] != "completed"]
    return {"sweep_dir": str(root), "jobs": jobs, "failed": failed}


def write_summary(sweep_dir: str | Path) -> dict[str, Any]:
    summary = collect(sweep_dir)
    write_json(Path(sweep_dir) / SUMMARY_FILE, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """One row per job: number, status, every headline metric, overrides."""
    from .cli import _table

    metric_names: list[str] = []
    for job in summary["jobs"]:
        metric_names += [name for name in job["metrics"] if name not in metric_names]
    # the overrides every job shares say nothing about the differences: the JSON keeps them
    shared = set.intersection(*(set(job["overrides"]) for job in summary["jobs"])) if len(summary["jobs"]) > 1 else set()
    rows = [
        {
            "job": str(job["num"]),
            "status": job["status"],
            **{name: _number(job["metrics"].get(name)) for name in metric_names},
            "overrides": " ".join(o for o in job["overrides"] if o not in shared) or "(none)",
        }
        for job in summary["jobs"]
    ]
    lines = [_table(rows, ("job", "status", *metric_names, "overrides"))]
    for job in summary["jobs"]:
        if job["error"]:
            lines.append(f"job {job['num']} failed: {job['error']}")
    count, failed = len(summary["jobs"]), len(summary["failed"])
    lines.append(
        f"{count} jobs, {failed} failed; job N's folder is {summary['sweep_dir']}/N; "
        f"this table is {Path(summary['sweep_dir']) / SUMMARY_FILE}"
    )
    return "\n".join(lines)


def _number(value: Any) -> str | None:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return None if value is None else str(value)


class SweepSummary(Callback):
    """Hydra callback: names the sweep when it starts, summarises it when it ends."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        root.mkdir(parents=True, exist_ok=True)
        (root / SWEEP_ID_FILE).write_text(uuid.uuid4().hex)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        global last_summary
        last_summary = write_summary(str(config.hydra.sweep.dir))
        print(format_summary(last_summary), flush=True)
