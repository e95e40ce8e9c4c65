"""The HTML report, rendered from a run's stored files alone (no model, no judge).

`write_report(run_dir)` reads config.json, summary.json, tables/*.json, generations.jsonl and
judgments.jsonl and renders results/report.html.j2 (Jinja2, every output autoescaped) into one
self-contained file: a run header, per task its leaderboard, figures (inline SVG) and tables,
and every conversation with the judge's verdict. The same stored results give the same bytes.
`python -m harness report RUN [RUN_B]` re-renders, as HTML, Markdown or CSV, and compares two
runs with a delta column.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from harness.core.configs import read_json, report_template
from harness.core.errors import DataError
from harness.core.hashing import content_hash
from harness.store.logs import RecordLog, by_row, os_error
from harness.store.records import GenerationRecord, JudgmentRecord
from harness.tasks import kinds

#: Tables longer than this are shown collapsed.
COLLAPSE_ROWS = 40
#: Leaderboard columns (key, heading) of a head-to-head task, in order.
LEADERBOARD = (("model", "variant"), ("n", "n"), ("win_rate", "win rate %"),
               ("standard_error", "± SE"), ("ci", "95% CI"),
               ("length_controlled_winrate", "LC win rate %"),
               ("record", "wins / ties / losses"), ("mean_tokens", "mean tokens"),
               ("eos_share", "ended on EOS %"),
               ("cap_vs_eos_share", "one side cut %"),
               ("win_rate_cap_vs_eos", "win rate % there"),
               ("win_rate_without_cap_vs_eos", "win rate % elsewhere"),
               ("order_agreement", "judge's two orders agree %"))


#: Leaderboard columns shown only when some row has a value (an LLM judge asked in both orders).
OPTIONAL_COLUMNS = ("order_agreement",)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_report(context: dict[str, Any]) -> str:
    """Render the report template with every model output escaped."""
    template = report_template()
    env = Environment(loader=FileSystemLoader(str(template.parent)),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["fmt"] = _fmt
    return env.get_template(template.name).render(**context)


# --------------------------------------------------------------------------- stored run


@dataclass
class StoredRun:
    """Everything a finished run wrote, read back from its directory."""

    run_dir: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    tables: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    generations: list[Any] = field(default_factory=list)
    judgments: list[Any] = field(default_factory=list)



def load_run(run_dir: Path, records: bool = True) -> StoredRun:
    """A finished run's files; one DataError line if it is not a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    config = read_json(run_dir / "config.json", "run config")
    summary = read_json(run_dir / "summary.json", "run summary (is the run finished?)")
    if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list):
        raise DataError(f"{run_dir}/summary.json holds no rows (re-run it)")
    run = StoredRun(run_dir, config, summary.get("meta", {}), summary["rows"])
    for task in config.get("tasks", []):
        name = task["name"]
        found = {}
        for path in sorted((run_dir / "tables").glob(f"{name}.*.json")):
            table = path.name[len(name) + 1:-len(".json")]
            if "." not in table:
                found[table] = read_json(path, "table")
        run.tables[name] = found
    if records:
        gens = run_dir / "generations.jsonl"
        run.generations = list(RecordLog(gens, GenerationRecord, by_row)) if gens.exists() \
            else []
        judg = run_dir / "judgments.jsonl"
        run.judgments = list(RecordLog(judg, JudgmentRecord, by_row)) if judg.exists() else []
    return run


# ----------------------------------------------------------------------------- context


def _leaderboard(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        ref = r.get("role") == "reference"
        eos = r.get("eos_share")
        out.append({
            "model": r["model"], "role": r.get("role", "variant"), "n": r.get("n"),
            "win_rate": None if ref else r.get("win_rate"),
            "standard_error": None if ref else r.get("standard_error"),
            "ci": "reference" if ref else f"{_fmt(r.get('ci_low'))} – {_fmt(r.get('ci_high'))}",
            "length_controlled_winrate": None if ref else r.get("length_controlled_winrate"),
            "record": "" if ref else
            f"{r.get('n_wins')} / {r.get('n_draws')} / {r.get('n_wins_base')}",
            "mean_tokens": r.get("mean_tokens"),
            "eos_share": None if eos is None else 100 * eos,
            "cap_vs_eos_share": None if ref or r.get("cap_vs_eos_share") is None
            else 100 * r["cap_vs_eos_share"],
            "win_rate_cap_vs_eos": None if ref else r.get("win_rate_cap_vs_eos"),
            "win_rate_without_cap_vs_eos": None if ref else r.get("win_rate_without_cap_vs_eos"),
            "order_agreement": None if r.get("order_agreement") is None
            else 100 * r["order_agreement"]})
    return out


def _figures(task: dict[str, Any], tables: dict[str, list[dict[str, Any]]],
             caps: dict[str, Any]) -> list[Any]:
    figs = kinds.get(task["kind"]).figures(task["name"], tables, caps)
    return [f for f in figs if f is not None]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k != "task"]
    return cols


def _conversations(run: StoredRun, task: dict[str, Any]) -> list[dict[str, Any]]:
    """Every instruction of a generating task with each variant's output and verdict."""
    name = task["name"]
    samples = run.tables.get(name, {}).get("instructions", [])
    gens = {(g.model, g.instruction_id): g for g in run.generations if g.task == name}
    judged = {(j.model, j.instruction_id): j for j in run.judgments if j.task == name}
    models = [m["name"] for m in run.config.get("models", [])]
    reference = task.get("reference") or run.config.get("reference")
    out = []
    for s in samples:
        rows = []
        stored = next((j.info.get("reference_output") for (m, i), j in judged.items()
                       if i == s["id"] and isinstance((j.info or {}).get("reference_output"),
                                                      str)), None)
        if stored is not None:
            label = next(j.generator_1 for (_, i), j in judged.items() if i == s["id"])
            rows.append({"model": label, "role": "reference", "output": stored, "n_tokens": "",
                         "finish_reason": "stored", "preference": None, "why": "", "info": ""})
        for model in models:
            g = gens.get((model, s["id"]))
            if g is None:
                continue
            j = judged.get((model, s["id"]))
            role = "reference" if model == reference and j is None and stored is None \
                else "variant"
            rows.append({"model": model, "role": role, "output": g.output,
                         "n_tokens": g.n_tokens, "finish_reason": g.finish_reason,
                         "preference": None if j is None else j.preference,
                         "why": "" if j is None else j.raw,
                         "info": "" if j is None or not j.info else json.dumps(
                             {k: v for k, v in j.info.items() if k != "reference_output"},
                             sort_keys=True)})
        verdicts = sorted({_verdict(r["preference"]) for r in rows
                           if r["preference"] is not None})
        out.append({"task": name, "id": s["id"], "category": s.get("category", ""),
                    "source": s.get("source", ""), "instruction": s["instruction"],
                    "rows": rows, "verdicts": " ".join(verdicts)})
    return out


def _verdict(preference: float | None) -> str:
    if preference is None:
        return ""
    return "win" if preference > 1.5 else ("loss" if preference < 1.5 else "tie")


def _header(run: StoredRun) -> dict[str, Any]:
    config, meta = run.config, run.meta
    judge = config.get("judge", {})
    seeds = sorted({m.get("decoding", {}).get("seed", 0) for m in config.get("models", [])})
    return {
        "run_id": meta.get("run_id", run.run_dir.name), "created": meta.get("created", ""),
        "config_hash": content_hash(config), "harness_version": config.get("harness_version"),
        "git_commit": meta.get("git_commit", ""), "packages": meta.get("packages", {}),
        "judge": judge.get("name"), "judge_kind": judge.get("kind"),
        "judge_params": json.dumps(judge.get("params", {}), sort_keys=True),
        "template_hash": content_hash(judge.get("template", "")) if judge.get("template")
        else "", "decoding_seeds": seeds, "tasks": config.get("tasks", []),
        "reference": config.get("reference"),
    }


def context(run: StoredRun) -> dict[str, Any]:
    """Everything the template shows, computed from the stored run."""
    caps = {m["name"]: m.get("decoding", {}).get("max_new_tokens")
            for m in run.config.get("models", [])}
    tasks = []
    conversations = []
    for task in run.config.get("tasks", []):
        kind = kinds.get(task["kind"])
        tables = run.tables.get(task["name"], {})
        summary = [r for r in run.rows if r.get("task") == task["name"]]
        shown = [{"name": n, "rows": rows, "columns": _columns(rows),
                  "collapsed": len(rows) > COLLAPSE_ROWS}
                 for n, rows in tables.items() if n not in ("summary", "instructions")]
        tasks.append({
            "name": task["name"], "kind": task["kind"], "n": task.get("n"),
            "source": task.get("source", ""),
            "reference": (summary[0].get("reference") if summary and kind.compares else ""),
            "leaderboard": _leaderboard(summary) if kind.leaderboard else [],
            "summary": summary, "summary_columns": _columns(summary),
            "figures": _figures(task, {**tables, "summary": summary}, caps),
            "tables": shown})
        if kind.generating:
            conversations += _conversations(run, task)
    models = [m["name"] for m in run.config.get("models", [])]
    categories = sorted({c["category"] for c in conversations if c["category"]})
    return {"meta": run.meta, "config": run.config, "header": _header(run),
            "summary": run.rows, "tasks": tasks,
            "leaderboard_columns": [c for c in LEADERBOARD if c[0] not in OPTIONAL_COLUMNS
                                    or any(r.get(c[0]) is not None for r in run.rows)],
            "conversations": conversations, "models": models, "categories": categories}


def write_report(run_dir: Path, compare_with: Path | None = None, out: Path | None = None
                 ) -> Path:
    """Render run_dir/report.html (or `out`) from the run's stored files; with compare_with,
    run_dir/compare-<that run>.html, which also tables that run's headline numbers and the
    delta. Returns the path."""
    run = load_run(run_dir)
    ctx = context(run)
    if compare_with is not None:
        ctx["comparison"] = compare_rows(load_run(compare_with, records=False).rows, run.rows)
        ctx["compare_with"] = str(compare_with)
    html = render_report(ctx)
    default = "report.html" if compare_with is None else \
        f"compare-{Path(compare_with).name}.html"
    path = Path(out) if out is not None else Path(run_dir) / default
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise os_error(e, path, "write") from None
    return path


# ------------------------------------------------------------------- markdown, csv, compare

#: The leaderboard's columns in Markdown and CSV: (key, heading).
FLAT = (("task", "task"), ("kind", "kind"), ("model", "variant"), ("n", "n"),
        ("headline", "result"))


def _headline(row: dict[str, Any]) -> str:
    return kinds.get(row.get("kind", "head_to_head")).headline(row)


def compare_rows(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of run B with run A's headline number beside them and the delta (B - A)."""
    old = {(r["task"], r["model"]): r for r in a}
    out = []
    for r in b:
        k = kinds.get(r.get("kind", "head_to_head")).metric
        before = old.get((r["task"], r["model"]), {}).get(k)
        now = r.get(k)
        delta = now - before if isinstance(now, int | float) and isinstance(
            before, int | float) else None
        out.append({**r, "metric": k, "before": before, "after": now, "delta": delta})
    return out


def to_markdown(rows: list[dict[str, Any]], compare: bool = False) -> str:
    """The leaderboards as one Markdown table (with before/after/delta when comparing)."""
    head = [h for _, h in FLAT] + (["metric", "run A", "run B", "delta"] if compare else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(k, "")) if k != "headline" else _headline(r) for k, _ in FLAT]
        if compare:
            cells += [r["metric"], _fmt(r["before"], 3), _fmt(r["after"], 3),
                      "–" if r["delta"] is None else f"{r['delta']:+.3f}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The summary rows as CSV (every field; nested values as JSON)."""
    cols = _columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["task", *cols], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})
    return buf.getvalue()
