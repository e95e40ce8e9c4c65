"""Win-rate regression gate: baselines from runs, and a statistical check of a run against one.

A baseline holds, per task x variant, the win rate, its standard error, n, the LC win rate,
every per-instruction preference, and the content hashes of what produced them. `check`
compares a run with it: a paired bootstrap on the per-instruction preferences when both
judged the same instructions, else |delta| > z * sqrt(SE_base^2 + SE_now^2); either way a
change must also reach a minimum meaningful size. Rows whose producing config changed are
flagged, not silently compared.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from harness.core.configs import read_json
from harness.core.errors import ConfigError, DataError
from harness.core.hashing import content_hash
from harness.store.logs import RecordLog, by_row
from harness.store.records import GenerationRecord, JudgmentRecord
from harness.tasks import kinds

BASELINE_VERSION = 1
#: Verdicts that fail the gate (exit code 1).
FAILING = ("regression", "changed")


@dataclass(frozen=True)
class Rule:
    """The decision rule: test level, z for the unpaired rule, smallest delta that matters."""

    alpha: float = 0.05
    z: float = 1.96
    min_delta: float = 1.0  # win-rate points
    n_boot: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"--alpha must lie in (0, 1), got {self.alpha}")
        if self.z <= 0 or self.min_delta < 0 or self.n_boot < 100:
            raise ConfigError("--z must be positive, --min-delta non-negative, n_boot >= 100")


@dataclass(frozen=True)
class Row:
    """One task x variant of a baseline (or of a run, read the same way)."""

    task: str
    model: str
    n: int
    win_rate: float | None
    standard_error: float | None
    length_controlled_winrate: float | None
    outcomes: dict[str, float | None]  # instruction id -> preference in [1, 2]
    hashes: dict[str, str]  # output identity, reference identity, prompts, judge


@dataclass(frozen=True)
class Comparison:
    """The verdict on one task x variant."""

    task: str
    model: str
    verdict: str  # ok, regression, improvement, changed, missing, new
    rule: str = ""
    baseline: float | None = None
    now: float | None = None
    delta: float | None = None
    interval: tuple[float, float] | None = None
    changed: tuple[str, ...] = ()
    note: str = ""


def _judgments(run_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    path = run_dir / "judgments.jsonl"
    out: dict[tuple[str, str], dict[str, Any]] = {}
    if path.exists():
        for j in RecordLog(path, JudgmentRecord, by_row):
            out.setdefault((j.task, j.model), {})[j.instruction_id] = j
    return out


def _prompts(run_dir: Path) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for g in RecordLog(run_dir / "generations.jsonl", GenerationRecord, by_row):
        out.setdefault((g.task, g.model), []).append(f"{g.instruction_id}\x1f{g.prompt}")
    return out


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, what)


def rows_from_run(run_dir: Path) -> tuple[list[Row], dict[str, Any]]:
    """Every judged task x variant of a finished run, with its outcomes and hashes."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json", "run summary (is the run finished?)")
    config = _read_json(run_dir / "config.json", "run config")
    try:
        meta, summary_rows = summary["meta"], summary["rows"]
        identities, reference = config["output_identities"], config["reference"]
        judge_hash = content_hash({k: v for k, v in config["judge"].items() if k != "name"})
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"{run_dir} holds no run of this harness version (re-run it)") from None
    judgments, prompts = _judgments(run_dir), _prompts(run_dir)
    rows = []
    for r in summary_rows:
        if r.get("role") == "reference" or not kinds.get(r.get("kind", "head_to_head")).leaderboard:
            continue
        where = (r["task"], r["model"])
        outcomes = {i: j.preference for i, j in sorted(judgments.get(where, {}).items())}
        rows.append(_checked(run_dir / "summary.json", Row(
            task=r["task"], model=r["model"], n=r["n"], win_rate=r.get("win_rate"),
            standard_error=r.get("standard_error"),
            length_controlled_winrate=r.get("length_controlled_winrate"), outcomes=outcomes,
            hashes={"output_identity": content_hash(identities.get(r["model"])),
                    "reference_identity": r.get("reference_outputs_hash") or content_hash(
                        identities.get(r.get("reference") or reference)),
                    "prompts": content_hash(sorted(prompts.get(where, []))),
                    "judge": judge_hash})))
    return rows, {"run_id": meta.get("run_id"), "judge": meta.get("judge"),
                  "reference": reference}


def _checked(path: Path, row: Row) -> Row:
    """row, or one DataError naming the file and what is impossible about it."""
    problem = row_problem(row)
    if problem:
        raise DataError(f"{path} ({row.task}/{row.model}): {problem}")
    return row


def write_baseline(run_dir: Path, out: Path) -> Path:
    """Write a baseline file from a finished run."""
    rows, meta = rows_from_run(run_dir)
    data = {"version": BASELINE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **meta, "rows": [asdict(r) for r in rows]}
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror}") from None
    return out


def read_baseline(path: Path) -> list[Row]:
    """The rows of a baseline file; one DataError line if it is missing or malformed."""
    data = _read_json(Path(path), "baseline")
    if not isinstance(data, dict) or data.get("version") != BASELINE_VERSION \
            or not isinstance(data.get("rows"), list):
        raise DataError(f"{path} is not a harness baseline (version {BASELINE_VERSION})")
    rows = []
    for i, r in enumerate(data["rows"]):
        try:
            row = Row(**r)
            ok = (isinstance(row.task, str) and isinstance(row.model, str)
                  and isinstance(row.outcomes, dict) and isinstance(row.hashes, dict))
        except TypeError:
            ok = False
        if not ok:
            raise DataError(f"{path}: row {i + 1} is malformed")
        problem = row_problem(row)
        if problem:
            raise DataError(f"{path}: row {i + 1} ({row.task}/{row.model}): {problem}")
        rows.append(row)
    return rows


def _number(v: Any, low: float, high: float) -> bool:
    """A finite int or float (not a bool) in [low, high]."""
    return isinstance(v, int | float) and not isinstance(v, bool) \
        and (isinstance(v, int) or math.isfinite(v)) and low <= v <= high


def row_problem(row: Row) -> str:
    """What makes a row's numbers impossible ("" if none): a gate must never pass on a number
    it cannot compare (Infinity, NaN, a win rate past 100, a negative count)."""
    if not (isinstance(row.n, int) and not isinstance(row.n, bool) and row.n >= 0):
        return f"n must be a count (a whole number >= 0), got {row.n!r:.40}"
    for name, v, high in (("win_rate", row.win_rate, 100.0),
                          ("standard_error", row.standard_error, 100.0),
                          ("length_controlled_winrate", row.length_controlled_winrate, 100.0)):
        if v is not None and not _number(v, 0.0, high):
            return f"{name} must be a finite number in [0, {high:g}], got {v!r:.40}"
    bad = next((k for k, v in row.outcomes.items() if v is not None and not _number(v, 1, 2)),
               None)
    if bad is not None:
        return (f"outcome of {bad!r} must be a preference in [1, 2], got "
                f"{row.outcomes[bad]!r:.40}")
    return ""


def _valid(values: Sequence[float | None]) -> np.ndarray:
    arr = np.array([np.nan if v is None else v for v in values], dtype=float)
    return arr


def paired_bootstrap(base: Sequence[float | None], now: Sequence[float | None], rule: Rule
                     ) -> tuple[float, tuple[float, float]]:
    """Mean win-rate change (points) over paired instructions and its (1 - alpha) interval."""
    a, b = _valid(base), _valid(now)
    keep = ~(np.isnan(a) | np.isnan(b))
    diff = (b[keep] - a[keep]) * 100
    if diff.size < 2:
        raise DataError("fewer than 2 paired instructions to compare")
    rng = np.random.default_rng(rule.seed)
    means = np.empty(rule.n_boot)
    for start in range(0, rule.n_boot, 1000):
        stop = min(rule.n_boot, start + 1000)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(axis=1)
    low, high = np.quantile(means, [rule.alpha / 2, 1 - rule.alpha / 2])
    return float(diff.mean()), (float(low), float(high))


def _decide(delta: float, low: float, high: float, rule: Rule) -> str:
    if abs(delta) < rule.min_delta:
        return "ok"
    if high < 0:
        return "regression"
    if low > 0:
        return "improvement"
    return "ok"


def compare_row(base: Row, now: Row, rule: Rule, allow_changed: bool = False) -> Comparison:
    """The verdict for one task x variant present in both the baseline and the run."""
    changed = tuple(k for k in sorted(set(base.hashes) | set(now.hashes))
                    if base.hashes.get(k) != now.hashes.get(k))
    head = {"task": now.task, "model": now.model, "baseline": base.win_rate, "now": now.win_rate,
            "changed": changed}
    if changed and not allow_changed:
        return Comparison(**head, verdict="changed",
                          note=f"{', '.join(changed)} changed; --allow-changed compares anyway, "
                               f"--update accepts it")
    common = sorted(set(base.outcomes) & set(now.outcomes))
    if len(common) >= 2 and len(common) >= 0.9 * max(len(base.outcomes), len(now.outcomes)):
        delta, (low, high) = paired_bootstrap([base.outcomes[i] for i in common],
                                              [now.outcomes[i] for i in common], rule)
        name = (f"paired bootstrap over {len(common)} instructions, "
                f"{100 * (1 - rule.alpha):g}% interval")
    else:
        if None in (base.win_rate, now.win_rate, base.standard_error, now.standard_error):
            return Comparison(**head, verdict="ok", rule="none",
                              note="no standard error to compare with")
        delta = now.win_rate - base.win_rate
        half = rule.z * math.sqrt(base.standard_error ** 2 + now.standard_error ** 2)
        low, high = delta - half, delta + half
        name = f"unpaired |delta| > {rule.z:g} * sqrt(SE_base^2 + SE_now^2)"
    verdict = _decide(delta, low, high, rule)
    note = f"compared despite: {', '.join(changed)} changed" if changed else ""
    return Comparison(**head, verdict=verdict, rule=name, delta=delta, interval=(low, high),
                      note=note)


def check(run_dir: Path, baseline_path: Path, rule: Rule = Rule(),
          allow_changed: bool = False) -> list[Comparison]:
    """Compare a run with a baseline: one Comparison per task x variant in either."""
    base = {(r.task, r.model): r for r in read_baseline(baseline_path)}
    now = {(r.task, r.model): r for r in rows_from_run(run_dir)[0]}
    out = []
    for key in list(base) + [k for k in now if k not in base]:
        if key not in now:
            out.append(Comparison(*key, verdict="missing", baseline=base[key].win_rate,
                                  note="in the baseline, not in the run"))
        elif key not in base:
            out.append(Comparison(*key, verdict="new", now=now[key].win_rate,
                                  note="not in the baseline"))
        else:
            out.append(compare_row(base[key], now[key], rule, allow_changed))
    return out


def failed(comparisons: Sequence[Comparison]) -> bool:
    """True when any row fails the gate (a regression, or an unaccepted config change)."""
    return any(c.verdict in FAILING for c in comparisons)


def _num(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def _interval(c: Comparison) -> str:
    return "–" if c.interval is None else f"[{c.interval[0]:+.1f}, {c.interval[1]:+.1f}]"


def format_table(comparisons: Sequence[Comparison]) -> str:
    """The plain-text table `check` prints."""
    header = (f"{'task':<16} {'variant':<34} {'baseline':>8} {'now':>6} {'delta':>6} "
              f"{'interval':>16}  verdict")
    lines = [header, "-" * len(header)]
    for c in comparisons:
        lines.append(f"{c.task:<16} {c.model:<34} {_num(c.baseline):>8} {_num(c.now):>6} "
                     f"{_num(c.delta, '+.1f'):>6} {_interval(c):>16}  {c.verdict}"
                     + (f" ({c.note})" if c.note else ""))
    rules = sorted({c.rule for c in comparisons if c.rule and c.rule != "none"})
    lines += [f"rule: {r}" for r in rules]
    return "\n".join(lines)


def format_markdown(comparisons: Sequence[Comparison], rule: Rule) -> str:
    """A Markdown table a CI job can post."""
    lines = ["| task | variant | baseline | now | Δ | interval | verdict |",
             "|---|---|---:|---:|---:|---|---|"]
    for c in comparisons:
        verdict = f"**{c.verdict}**" if c.verdict in FAILING else c.verdict
        lines.append(f"| {c.task} | {c.model} | {_num(c.baseline)} | {_num(c.now)} | "
                     f"{_num(c.delta, '+.1f')} | {_interval(c)} | {verdict} |")
    rules = sorted({c.rule for c in comparisons if c.rule and c.rule != "none"})
    lines += ["", f"Rules: {'; '.join(rules) or 'none'}; minimum meaningful delta "
                  f"{rule.min_delta:g} points."]
    return "\n".join(lines) + "\n"


def format_junit(comparisons: Sequence[Comparison]) -> str:
    """JUnit XML: one test case per task x variant; regressions and changes are failures."""
    fails = sum(c.verdict in FAILING for c in comparisons)
    cases = []
    for c in comparisons:
        name = quoteattr(f"{c.task} / {c.model}")
        body = (f"baseline {_num(c.baseline)}, now {_num(c.now)}, delta {_num(c.delta, '+.1f')}"
                f", interval {_interval(c)}; {c.rule or c.note}")
        inner = (f'<failure message={quoteattr(c.verdict)}>{escape(body)}</failure>'
                 if c.verdict in FAILING else f"<system-out>{escape(c.verdict + ': ' + body)}"
                                                 f"</system-out>")
        cases.append(f'  <testcase classname="harness.check" name={name}>{inner}</testcase>')
    return ('<?xml version="1.0" encoding="utf-8"?>\n'
            f'<testsuite name="harness win-rate regression" tests="{len(comparisons)}" '
            f'failures="{fails}">\n' + "\n".join(cases) + "\n</testsuite>\n")


@dataclass
class CheckOutputs:
    """Where check writes its optional reports."""

    junit: Path | None = None
    markdown: Path | None = None
    written: list[Path] = field(default_factory=list)


def write_reports(comparisons: Sequence[Comparison], rule: Rule, outputs: CheckOutputs) -> None:
    """Write the JUnit and Markdown files that were asked for."""
    for path, text in ((outputs.junit, format_junit(comparisons) if outputs.junit else ""),
                       (outputs.markdown, format_markdown(comparisons, rule)
                        if outputs.markdown else "")):
        if path is None:
            continue
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        except OSError as e:
            raise DataError(f"cannot write {path}: {e.strerror}") from None
        outputs.written.append(Path(path))
