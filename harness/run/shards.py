"""Sharded runs: which shard a sample belongs to, and what a shard's run directory records.

`run --shard i/N` (0-based: i in 0..N-1) generates, judges and scores only the samples of
shard i. A sample goes to shard int(sha256(its instruction text)[:16], 16) % N: the key is the
instruction alone, never the variant, task or sample id, so every variant's response to one
instruction (the reference's too) and its judgment land in the same shard, and a prompt shared
by two tasks is made once. A ranking item goes by its instruction the same way. The
assignment depends on nothing else (no order, no machine), so it is the same on every call.

A shard's config.json is the unsharded run's config plus a `shard` field (index, count, the
unsharded config's hash, and the request that `merge` re-resolves); `harness.run.merge` checks
that shards belong together by that hash.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.configs import project_dir
from harness.core.errors import ConfigError, HarnessError
from harness.core.hashing import content_hash
from harness.run.analyse import analyse_tasks
from harness.tasks import kinds
from harness.tasks.spec import Task

if TYPE_CHECKING:
    from harness.models.spec import ModelSpec
    from harness.run.runner import RunConfig
    from harness.store.records import GenerationRecord, JudgmentRecord, Where


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, instruction: str) -> bool:
        """Whether the sample with this instruction text belongs to this shard."""
        return shard_of(instruction, self.count) == self.index


def parse_shard(text: str) -> Shard:
    """`i/N` with 0 <= i < N as a Shard; anything else is one ConfigError line."""
    parts = str(text).strip().split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"expected i/N (0-based, 0 <= i < N), e.g. 0/4; got {text!r}"
                          ) from None
    if count < 1:
        raise ConfigError(f"{text}: the number of shards N must be at least 1")
    if not 0 <= index < count:
        raise ConfigError(f"{text}: shards are numbered 0 to {count - 1} (0-based)")
    return Shard(index, count)


def shard_of(instruction: str, count: int) -> int:
    """The shard (0-based, of `count`) that a sample with this instruction text belongs to."""
    return int(content_hash(instruction, 16), 16) % count


def in_shards(count: int, indices: Sequence[int]) -> Callable[[str], bool]:
    """Whether a sample's instruction belongs to any of these shards (of `count`)."""
    kept = frozenset(indices)
    return lambda instruction: shard_of(instruction, count) in kept


def select_samples(task: Task, keep: Callable[[str], bool]) -> Task:
    """The task with only the samples whose instruction `keep` accepts (ranking tasks are
    filtered when their items are built, see runner.score_all)."""
    return dataclasses.replace(task, instructions=tuple(i for i in task.instructions
                                                        if keep(i.instruction)))


def request_of(config: RunConfig) -> dict[str, Any]:
    """What `merge` needs to re-resolve a run's tasks and variants (paths made absolute)."""
    def absolute(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.suffix == ".toml" and path.is_file() else name

    return {"models": config.models, "tasks": [absolute(t) for t in config.tasks],
            "judge": absolute(config.judge), "limit": config.limit,
            "max_new_tokens": config.max_new_tokens,
            "registry": str(Path(config.registry_path).resolve()) if config.registry_path
            else None,
            "project": str(project_dir().resolve())}


def shard_field(config: RunConfig, base: dict[str, Any]) -> dict[str, Any]:
    """The `shard` field of a shard's config: which shard, the unsharded config's hash, and the
    request (which is not part of that hash)."""
    assert config.shard is not None
    return {"index": config.shard.index, "count": config.shard.count,
            "base_config_hash": content_hash(base), "request": request_of(config)}


def analyse_slice(specs: Sequence[ModelSpec], reference: ModelSpec, tasks: Sequence[Task],
                  generations: dict[Where, GenerationRecord],
                  judgments: dict[Where, JudgmentRecord], scores: dict[str, dict[str, Any]],
                  timings: dict[str, float] | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[dict[str, Any]]]]]:
    """runner.analyse_tasks on part of the samples: a task with none of them here, or too few
    for its analysis, is skipped with a note (its records are kept for the merge)."""
    rows: list[dict[str, Any]] = []
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task in tasks:
        empty = not scores.get(task.name, {}).get("items") if kinds.get(task.kind).scored \
            else not task.instructions
        if empty:
            print(f"task {task.name}: no samples in this part; nothing to analyse",
                  file=sys.stderr)
            continue
        try:
            got, table = analyse_tasks(specs, reference, [task], generations, judgments,
                                       scores, timings)
        except (HarnessError, ValueError, ZeroDivisionError) as e:
            print(f"task {task.name}: not analysed on this part alone ({e})", file=sys.stderr)
            continue
        rows += got
        tables.update(table)
    return rows, tables
