"""Sampler ``task_homogeneous``: every batch from one task, with stage schedules.

From "NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models"
(Lee et al., 2024, arXiv:2405.17428), whose two-stage instruction tuning first trains on
retrieval data sets only and then blends in the non-retrieval ones, and
"KaLM-Embedding-V2: Superior Training Techniques and Data Inspire A Versatile Embedding
Model" (Zhao et al., 2025, arXiv:2506.20923); both draw each batch from a single data set,
so in-batch negatives are of the same kind as the positive (a classification label is no
negative for a retrieval query). Examples are grouped by ``Example.task`` (the loaders set
it to the file or folder name), shuffled within their task, cut into batches, and the
batches of all tasks are shuffled together. ``stages`` restricts epochs to some tasks:
``[{tasks: [a, b], epochs: 1}, {tasks: null}]`` is NV-Embed's schedule. Our stages count
epochs (NV-Embed's count steps); the batches are a pure function of ``(seed, epoch)``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

import embplex
from embplex.components import Example, Sampler, TrainingContext
from embplex.errors import OptionError


class TaskHomogeneous(Sampler):
    def __init__(self, stages: Sequence[Mapping[str, Any]] | None = None, drop_last: bool = False) -> None:
        self.drop_last = bool(drop_last)
        self.stages = [dict(stage) for stage in stages] if stages else None
        for number, stage in enumerate(self.stages or []):
            where = f"stages[{number}]"
            unknown = set(stage) - {"tasks", "epochs"}
            if unknown:
                raise OptionError(f"{where} has keys {sorted(unknown)}; a stage takes 'tasks' (a list, or null for all) and 'epochs'.")
            tasks = stage.get("tasks")
            if tasks is not None and (isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks):
                raise OptionError(f"{where}.tasks must be a non-empty list of task names, or null for every task; got {tasks!r}.")
            epochs = stage.get("epochs")
            last = number == len(self.stages) - 1
            if epochs is None and not last:
                raise OptionError(f"{where} needs 'epochs': only the last stage may run for the remaining epochs.")
            if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
                raise OptionError(f"{where}.epochs must be a whole number of at least 1, not {epochs!r}.")

    def stage(self, epoch: int) -> list[Any] | None:
        """The tasks epoch ``epoch`` draws from (``None``: all)."""
        if not self.stages:
            return None
        start = 0
        for stage in self.stages:
            epochs = stage.get("epochs")
            if epochs is None or epoch < start + epochs:
                return stage.get("tasks")
            start += epochs
        return self.stages[-1].get("tasks")  # after the schedule the last stage goes on

    def batches(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        epoch: int,
        context: TrainingContext,
    ) -> Iterator[list[int]]:
        if batch_size < 1:
            raise OptionError(f"batch_size must be at least 1, not {batch_size}.")
        by_task: dict[Any, list[int]] = {}
        for index, example in enumerate(examples):
            by_task.setdefault(example.task, []).append(index)
        chosen = self.stage(epoch)
        if chosen is not None:
            missing = [task for task in chosen if task not in by_task]
            if missing:
                raise OptionError(
                    f"the stage of epoch {epoch} names tasks {missing} that no example has; the tasks "
                    f"are {sorted(map(str, by_task))} (Example.task: the training file or folder name)."
                )
            by_task = {task: by_task[task] for task in chosen}
        rng = np.random.default_rng([seed, epoch])
        planned: list[list[int]] = []
        for task in sorted(by_task, key=str):  # a fixed order, so the draws depend only on (seed, epoch)
            members = [by_task[task][i] for i in rng.permutation(len(by_task[task]))]
            for start in range(0, len(members), batch_size):
                batch = members[start : start + batch_size]
                if len(batch) == batch_size or not self.drop_last:
                    planned.append(batch)
        for i in rng.permutation(len(planned)):
            yield planned[i]

    def num_batches(self, examples: Sequence[Example], batch_size: int) -> int:
        """The count for an epoch over every task (a stage over fewer tasks has fewer)."""
        sizes: dict[Any, int] = {}
        for example in examples:
            sizes[example.task] = sizes.get(example.task, 0) + 1
        count = math.floor if self.drop_last else math.ceil
        return sum(count(size / batch_size) for size in sizes.values())


@embplex.hookimpl
def register_samplers(register: Any) -> None:
    register(
        "task_homogeneous",
        TaskHomogeneous,
        paper="NV-Embed: Improved Techniques for Training LLMs as Generalist Embedding Models (2024), arXiv:2405.17428",
    )
