"""The HTML report: a Jinja2 template (results/report.html.j2) with autoescaping of all outputs."""

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from harness.configs import report_template
from harness.registry import ModelSpec
from harness.store import os_error
from harness.tasks import GENERATING, STORED, Task


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


#: Tables longer than this are shown collapsed.
COLLAPSE_ROWS = 40


def _task_tables(tasks: list[Task], tables: dict[str, dict[str, list[dict]]],
                 reference: str) -> list[dict[str, Any]]:
    out = []
    for task in tasks:
        shown = []
        for name, rows in tables.get(task.name, {}).items():
            columns: list[str] = []
            for r in rows:
                columns += [k for k in r if k not in columns and k != "task"]
            shown.append({"name": name, "rows": rows, "columns": columns,
                          "collapsed": len(rows) > COLLAPSE_ROWS})
        ref = task.reference_label or task.reference or (reference if task.judged else "")
        out.append({"name": task.name, "kind": task.kind, "reference": ref, "tables": shown})
    return out


def write_report(run_dir: Path, config: dict, meta: dict, summary: list[dict],
                 tasks: list[Task], specs: list[ModelSpec], generations: dict,
                 judgments: dict, tables: dict | None = None) -> Path:
    """Write run_dir/report.html: the summary, every task's tables and every conversation."""
    conversations = []
    for task in tasks:
        if task.kind not in GENERATING:
            continue
        for ins in task.instructions:
            rows = []
            if task.reference == STORED:
                rows.append({"model": task.reference_label, "role": "reference",
                             "output": ins.reference, "n_tokens": "", "finish_reason": "stored",
                             "preference": None, "why": ""})
            for spec in specs:
                gen = generations[(task.name, spec.name, ins.id)]
                judgment = judgments.get((task.name, spec.name, ins.id))
                role = "reference" if spec.name == (task.reference or meta.get("reference")) \
                    and task.judged else "variant"
                rows.append({"model": spec.name, "role": role, "output": gen.output,
                             "n_tokens": gen.n_tokens, "finish_reason": gen.finish_reason,
                             "preference": judgment.preference if judgment else None,
                             "why": judgment.raw if judgment else ""})
            conversations.append({"task": task.name, "id": ins.id, "category": ins.category,
                                  "instruction": ins.instruction, "rows": rows})
    html = render_report({"meta": meta, "config": config, "summary": summary,
                          "conversations": conversations,
                          "task_tables": _task_tables(tasks, tables or {},
                                                      meta.get("reference", ""))})
    path = run_dir / "report.html"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise os_error(e, path, "write") from None
    return path
