"""Turn a run's records into one row per (task, variant) and each task's tables, through the
task's kind (harness.tasks.kinds)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from harness.models.spec import ModelSpec
from harness.store.records import GenerationRecord, JudgmentRecord, Where
from harness.tasks import kinds
from harness.tasks.protocol import Evidence
from harness.tasks.spec import STORED, Task


def task_reference(task: Task, reference: ModelSpec) -> str | None:
    """The variant a task's variants are judged against; None for the stored outputs."""
    if task.reference == STORED:
        return None
    return task.reference or reference.name


def reference_name(task: Task, reference: ModelSpec) -> str:
    """What the report calls a task's reference: a variant's name or the stored outputs'."""
    return task_reference(task, reference) or task.reference_label


def analyse_tasks(specs: Sequence[ModelSpec], reference: ModelSpec, tasks: Sequence[Task],
                  generations: dict[Where, GenerationRecord],
                  judgments: dict[Where, JudgmentRecord], scores: dict[str, dict[str, Any]],
                  timings: dict[str, float] | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[dict[str, Any]]]]]:
    """One headline row per (task, variant), and each task's tables by name.

    A value that is undefined for the data (the SE of one sample, LC without enough pairs for
    its fit) is None, and prints as "–".
    """
    rows: list[dict[str, Any]] = []
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task in tasks:
        started = time.time()
        try:
            kind = kinds.get(task.kind)
            evidence = Evidence(
                task=task, specs=specs,
                reference=task_reference(task, reference) if task.judged else None,
                reference_label=reference_name(task, reference), generations=generations,
                judgments=judgments, scores=scores.get(task.name, {}))
            task_rows, task_tables = kind.analyse(evidence)
            rows.extend(task_rows)
            tables[task.name] = {"summary": task_rows, **task_tables}
            if kind.generating:
                tables[task.name]["instructions"] = instruction_rows(task)
        finally:
            if timings is not None:
                timings[task.name] = round(time.time() - started, 2)
    return rows, tables


def instruction_rows(task: Task) -> list[dict[str, Any]]:
    """A task's samples as a table (id, source, category, instruction) for the report."""
    return [{"id": i.id, "source": i.source, "category": i.category,
             "instruction": i.instruction} for i in task.instructions]
