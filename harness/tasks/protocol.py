"""The task-kind contract: what one kind of evaluation parses, computes and shows.

A kind is one module of this package with a module-level `KIND` implementing TaskKind, named
in harness.tasks.kinds.KINDS. The runner gathers the records a task needs (generations,
judgments, scores) into Evidence; the kind turns them into one row per variant and its tables;
the report and the printed table ask the kind for its headline text and figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.models.spec import ModelSpec
from harness.store.records import GenerationRecord, JudgmentRecord, Where
from harness.tasks.spec import Task

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Evidence:
    """What a task's analysis reads: its variants, the variant judged against (None for the
    stored outputs, or when the task is not judged), and the run's records."""

    task: Task
    specs: Sequence[ModelSpec]
    reference: str | None
    reference_label: str
    generations: dict[Where, GenerationRecord]
    judgments: dict[Where, JudgmentRecord]
    scores: dict[str, Any] = field(default_factory=dict)


class TaskKind(Protocol):
    """One kind of evaluation."""

    #: variants answer the task's instructions (generations are made and shown)
    generating: bool
    #: the task needs log-likelihoods (every variant's backend must give them)
    scored: bool
    #: the row column compared between runs (report --compare)
    metric: str
    #: its rows name the reference they were compared with (report header)
    compares: bool
    #: its rows are win rates with a leaderboard table in the report
    leaderboard: bool

    def parse_options(self, table: dict[str, Any], where: str, base: Path) -> Any:
        """The kind's own fields of a task file (all but name, kind, description,
        instructions) as its frozen settings; one ConfigError line if anything is wrong."""

    def judged(self, options: Any) -> bool:
        """Whether a task with these settings needs head-to-head judgments."""

    def limited(self, options: Any, limit: int | None) -> Any:
        """A kind that reads its own items (not generating): its settings with at most
        `limit` items (--limit); the settings have `n` and `source`."""

    def analyse(self, evidence: Evidence) -> tuple[Rows, dict[str, Rows]]:
        """One row per variant (task, kind, model, role and the kind's figures) and the
        task's tables by name (the summary is added by the caller)."""

    def headline(self, row: dict[str, Any]) -> str:
        """The row's result in one line of text."""

    def figures(self, name: str, tables: dict[str, Rows], caps: dict[str, Any]) -> list[Any]:
        """The report's figures for the task (harness.tasks.figures.Figure)."""


def clean(row: dict[str, Any]) -> dict[str, Any]:
    """NaN becomes None (undefined values print as "–")."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}


def variant_rows(evidence: Evidence, headline: dict[str, dict[str, Any]]) -> Rows:
    """One row per variant from a kind's per-variant figures."""
    task = evidence.task
    return [clean({"task": task.name, "kind": task.kind, "model": spec.name,
                   "role": "reference" if spec.name == evidence.reference else "variant",
                   **headline[spec.name]}) for spec in evidence.specs]


def fmt(value: Any, spec: str = ".1f") -> str:
    """A number for a table, or "–" where it is undefined (None)."""
    return "–" if value is None else format(value, spec)


def pct(value: Any, spec: str = ".0f") -> str:
    """A share as a percentage, or "–"."""
    return "–" if value is None else format(100 * value, spec) + "%"
