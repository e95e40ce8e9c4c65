"""`merge`: shard run directories into one run, as if the run had not been sharded.

The shards' records are unioned (they are content-keyed, so nothing is duplicated or lost) and
the run's tasks and variants are re-resolved from the request the shards recorded (task files
and registry only: no model, tokenizer or judge is loaded). Then the tables, summary and report
are computed by the runner's own functions from the records alone. Refused with one line:
a directory that is missing, not a run, not a shard or not finished; shards of different
configs or splits; a record a sample needs that no shard holds; and an incomplete set of
shards, unless `allow_partial`, which merges the shards present and marks the run partial.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.configs import PROJECT_ENV, path_component, read_json
from harness.core.errors import ConfigError, DataError
from harness.core.hashing import canonical_json, content_hash
from harness.report.html import write_report
from harness.run.analyse import analyse_tasks, task_reference
from harness.run.runner import (
    RESERVED_RUN_IDS,
    RunConfig,
    RunResult,
    mean_logprobs,
    ranking_items,
    resolve_tasks,
)
from harness.run.shards import Shard, analyse_slice, in_shards, select_samples, shard_of
from harness.store.logs import RecordLog, RunLock, by_row
from harness.store.records import GenerationRecord, JudgmentRecord, Record, ScoreRecord, Where
from harness.store.rundir import (
    claim_run_dir,
    git_commit,
    package_versions,
    write_tables,
    write_text,
)
from harness.tasks import kinds

#: The record logs a run directory holds, and their record types.
LOGS = (("generations", GenerationRecord), ("judgments", JudgmentRecord), ("scores", ScoreRecord))


@dataclass(frozen=True)
class ShardRun:
    """One shard's run directory as read back: its config, which shard, and its summary meta."""

    path: Path
    config: dict[str, Any]
    shard: Shard
    base_hash: str
    meta: dict[str, Any]



def read_shard(path: Path) -> ShardRun:
    """A finished shard's run directory, or one line saying why it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"merge: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise DataError(f"merge: {path} is not a run directory (no config.json)")
    config = read_json(path / "config.json", "run config")
    shard = config.get("shard") if isinstance(config, dict) else None
    if not isinstance(shard, dict) or not {"index", "count", "base_config_hash",
                                           "request"} <= set(shard):
        raise DataError(f"merge: {path} is not a shard (its run was not made with --shard)")
    if not (path / "summary.json").is_file():
        raise DataError(f"merge: shard {shard['index']}/{shard['count']} in {path} is not "
                        f"finished (no summary.json); run it again to complete it")
    summary = read_json(path / "summary.json", "run summary")
    meta = summary.get("meta", {}) if isinstance(summary, dict) else {}
    base = {k: v for k, v in config.items() if k != "shard"}
    if content_hash(base) != shard["base_config_hash"]:
        raise DataError(f"merge: {path}/config.json was changed after its run (its hash does "
                        f"not match the one recorded)")
    return ShardRun(path, config, Shard(shard["index"], shard["count"]),
                    shard["base_config_hash"], meta)


def check_set(runs: Sequence[ShardRun], allow_partial: bool) -> list[int]:
    """The shard indices present; refuses mixed configs or splits, and (unless allowed) gaps."""
    first = runs[0]
    for run in runs[1:]:
        if run.base_hash != first.base_hash:
            raise ConfigError(f"merge: {first.path} and {run.path} are shards of different "
                              f"configs (config hash {first.base_hash} vs {run.base_hash})")
        if run.shard.count != first.shard.count:
            raise ConfigError(f"merge: {first.path} is one of {first.shard.count} shards but "
                              f"{run.path} one of {run.shard.count}")
    present = sorted({r.shard.index for r in runs})
    missing = [i for i in range(first.shard.count) if i not in present]
    if missing:
        which = ", ".join(f"{i}/{first.shard.count}" for i in missing)
        if not allow_partial:
            raise ConfigError(f"merge: incomplete set, missing shard(s) {which}; run them, or "
                              f"pass --allow-partial to merge the others")
        print(f"merge: missing shard(s) {which}; the merged run covers only the others",
              file=sys.stderr)
    return present


@contextmanager
def _project(folder: str | None) -> Iterator[None]:
    """Resolve configs as the shards did: in the project folder they ran in."""
    old = os.environ.get(PROJECT_ENV)
    if folder:
        os.environ[PROJECT_ENV] = folder
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PROJECT_ENV, None)
        else:
            os.environ[PROJECT_ENV] = old


def _plain(obj: Any) -> Any:
    return json.loads(canonical_json(obj))


def reresolve(run: ShardRun) -> tuple[list[Any], Any, list[Any]]:
    """The run's specs, reference and full tasks from the recorded request, checked against
    the recorded config (a registry or task file changed since is one line)."""
    req = run.config["shard"]["request"]
    # the variants by name, as resolved then: `all` may hold a variant tuned since
    names = ",".join(m.get("name", "") for m in run.config.get("models", []))
    config = RunConfig(models=names or req["models"], tasks=tuple(req["tasks"]), judge=req["judge"],
                       limit=req["limit"], max_new_tokens=req["max_new_tokens"],
                       registry_path=Path(req["registry"]) if req.get("registry") else None)
    with _project(req.get("project")):
        specs, reference, tasks = resolve_tasks(config)
    base = run.config
    for what, now, then in (
            ("variants", _plain([s.as_dict() for s in specs]), base.get("models")),
            ("reference", reference.name, base.get("reference")),
            ("tasks", _plain([t.describe() for t in tasks]), base.get("tasks"))):
        if now != then:
            raise ConfigError(f"merge: the {what} no longer resolve as when the shards ran "
                              f"(a registry or task file changed); merge with those files "
                              f"restored, or rerun the shards")
    return specs, reference, tasks


def _union(runs: Sequence[ShardRun], name: str, record_type: type[Record]
           ) -> dict[Where, Record]:
    """Every shard's records of one kind by (task, variant, sample); a sample with two
    different records is refused (the shards did not compute the same thing)."""
    out: dict[Where, Record] = {}
    for run in runs:
        path = run.path / f"{name}.jsonl"
        if not path.exists():
            continue
        for rec in RecordLog(path, record_type, by_row):
            where = (rec.task, rec.model, rec.instruction_id)
            old = out.get(where)
            if old is not None and old.key != rec.key:
                raise DataError(f"merge: two different {name} for task {rec.task}, variant "
                                f"{rec.model}, sample {rec.instruction_id} (in {run.path} "
                                f"and an earlier shard)")
            out.setdefault(where, rec)
    return out


def _need(records: dict[Where, Record], where: Where, what: str, instruction: str,
          runs: Sequence[ShardRun]) -> Record:
    """The record a sample needs, or one line naming the shard that should hold it."""
    rec = records.get(where)
    if rec is None:
        shard = shard_of(instruction, runs[0].shard.count)
        dirs = [str(r.path) for r in runs if r.shard.index == shard]
        raise DataError(f"merge: no {what} for task {where[0]}, variant {where[1]}, sample "
                        f"{where[2]} in shard {shard}/{runs[0].shard.count} "
                        f"({', '.join(dirs) or 'missing'}); run that shard again")
    return rec


def merge(dirs: Sequence[Path], out: Path | None = None, run_id: str | None = None,
          results_dir: Path | None = None, allow_partial: bool = False) -> RunResult:
    """Merge shard run directories into one run directory and return it like `run` does.

    The run goes to `out`, else results_dir/run_id, where results_dir defaults to the first
    shard's parent and run_id to the id the unsharded run would have had.
    """
    start = time.time()
    if not dirs:
        raise ConfigError("merge: give the shard run directories to merge")
    if run_id is not None:  # one folder in the results directory, checked before any work
        path_component(run_id, "--run-id", RESERVED_RUN_IDS)
    runs = [read_shard(Path(d)) for d in dirs]
    present = check_set(runs, allow_partial)
    count = runs[0].shard.count
    specs, reference, tasks = reresolve(runs[0])
    resolved = {k: v for k, v in runs[0].config.items() if k != "shard"}
    keep: Callable[[str], bool] | None = None
    if len(present) < count:
        resolved["shard"] = {"count": count, "indices": present,
                             "base_config_hash": runs[0].base_hash}
        keep = in_shards(count, present)
        tasks = [select_samples(t, keep) for t in tasks]
    records = {name: _union(runs, name, rtype) for name, rtype in LOGS}

    generations: dict[Where, Any] = {}
    judgments: dict[Where, Any] = {}
    for task in tasks:
        if not kinds.get(task.kind).generating:
            continue
        ref_variant = task_reference(task, reference)
        for spec in specs:
            for ins in task.instructions:
                where = (task.name, spec.name, ins.id)
                gen = _need(records["generations"], where, "generation", ins.instruction, runs)
                if gen.instruction != ins.instruction:
                    raise ConfigError(f"merge: sample {ins.id} of task {task.name} is not the "
                                      f"instruction the shards answered (the instruction set "
                                      f"changed); rerun the shards")
                generations[where] = gen
                if task.judged and spec.name != ref_variant:
                    judgments[where] = _need(records["judgments"], where, "judgment",
                                             ins.instruction, runs)
    scores: dict[str, dict[str, Any]] = {}
    scored: dict[Where, Any] = {}
    for name, items in ranking_items(specs, tasks, keep).items():
        task = next(t for t in tasks if t.name == name)
        for spec in specs:
            for item in items:
                for c in range(len(item.candidates)):
                    where = (name, spec.name, f"{item.id}#{c}")
                    scored[where] = _need(records["scores"], where, "log-likelihood",
                                          item.instruction, runs)
        scores[name] = {"items": items,
                        "scores": {s.name: mean_logprobs(task, s.name, items, scored)
                                   for s in specs}}

    run_id = run_id or "run-" + content_hash(resolved, 10)
    run_dir = Path(out) if out is not None else \
        Path(results_dir or runs[0].path.parent) / run_id
    claim_run_dir(run_dir, resolved)
    with RunLock(run_dir):
        for (name, rtype), wanted in zip(LOGS, (generations, judgments, scored), strict=True):
            log = RecordLog(run_dir / f"{name}.jsonl", rtype, by_row)
            for rec in wanted.values():
                log.append(rec)
        t = time.time()
        task_seconds: dict[str, float] = {}
        analyse = analyse_tasks if keep is None else analyse_slice
        summary, tables = analyse(specs, reference, tasks, generations, judgments, scores,
                                  task_seconds)
        write_tables(run_dir, tables)
        analysed = time.time() - t
        seconds = time.time() - start
        shards = {r.shard.index: r for r in reversed(runs)}  # one per index: the first given
        metas = [shards[i].meta for i in present]
        commits = sorted({m.get("git_commit", "") for m in metas})
        meta = {"run_id": run_dir.name, "judge": resolved["judge"]["name"],
                "reference": resolved["reference"],
                "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "git_commit": ", ".join(commits) if any(commits) else git_commit(),
                "packages": metas[0].get("packages") or package_versions(),
                "generated": sum(m.get("generated", 0) for m in metas),
                "judged": sum(m.get("judged", 0) for m in metas),
                "scored": sum(m.get("scored", 0) for m in metas),
                "seconds": round(seconds, 1),
                "judge_validity": metas[0].get("judge_validity") or {"measured": False},
                "stage_seconds": {"merge": round(seconds - analysed, 1),
                                  "analyse": round(analysed, 1)},
                "analysis_seconds": task_seconds,
                "merged_from": [{"dir": str(shards[i].path), "shard": str(shards[i].shard),
                                 "seconds": shards[i].meta.get("seconds")} for i in present]}
        if keep is not None:
            meta["partial"] = f"shards {', '.join(map(str, present))} of {count}"
        write_text(run_dir / "summary.json", canonical_json({"meta": meta, "rows": summary})
                    + "\n")
        report = write_report(run_dir)
    return RunResult(run_dir=run_dir, summary=summary, report_path=report,
                     seconds=time.time() - start)
