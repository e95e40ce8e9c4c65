"""Task kinds behind one protocol, and task files (`tasks/<name>.toml`) loaded as Tasks.

Kinds (see tasks/README.md for every field):
- head_to_head: each variant's response against the reference's, judged; the reference is the
  registry's reference variant, another variant (`reference = "<name>"`), or the instruction
  set's stored outputs (`reference = "outputs"`, AlpacaEval's own mode).
- length: the response-length distribution, EOS versus the cap, and (judged head-to-head as
  above) win rate by length.
- style_adherence: out-of-domain style adherence against a domain (the study's Figure 5).
- ranking: the true response against k others by mean per-token log-likelihood (Table 2).

Adding a kind is one module with a `KIND` (harness.tasks.protocol.TaskKind) and a line in KINDS.
"""

from __future__ import annotations

import importlib

from harness.core.configs import available, expect, load_named_toml, path_component
from harness.core.errors import ConfigError, unknown_name
from harness.data.instruction_sets import (
    load_sources,
    parse_sources,
    reference_label,
    source_name,
)
from harness.tasks.protocol import TaskKind
from harness.tasks.spec import STORED, Task

#: kind name (a task file's `kind`) -> the module holding its KIND.
KINDS = {
    "head_to_head": "harness.tasks.head_to_head",
    "length": "harness.tasks.length",
    "style_adherence": "harness.tasks.style_adherence",
    "ranking": "harness.tasks.ranking",
}

_COMMON = ("name", "kind", "description", "instructions")


def get(kind: str) -> TaskKind:
    """The kind registered as `kind` (its module imported on first use)."""
    return importlib.import_module(KINDS[kind]).KIND


def available_tasks() -> list[str]:
    """Names of the tasks defined under tasks/ (the project's and the built-in ones)."""
    return available("tasks")


def load_task(name: str, limit: int | None = None) -> Task:
    """Load a task by name (tasks/<name>.toml) or path to a .toml, at most `limit` samples per
    instruction source; one clear error if anything is wrong."""
    path, data = load_named_toml("tasks", name)
    where = f"task config {path}"
    kind = data.get("kind", "head_to_head")
    expect(kind, str, where, "kind")
    if kind not in KINDS:
        raise unknown_name("task kind", kind, list(KINDS), f" (in {where})")
    kind_of = get(kind)
    for k in ("name", "description"):
        if k in data:
            expect(data[k], str, where, k)
    reference = data.get("reference")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ConfigError(f"{where}: reference must be a variant name or \"{STORED}\"")
    options = kind_of.parse_options({k: v for k, v in data.items() if k not in _COMMON},
                                    where, path.parent)
    task_name = path_component(data.get("name", path.stem), f"{where}: task name")
    if not kind_of.generating:  # the kind reads its own items (ranking's pairs)
        if "instructions" in data:
            raise ConfigError(f"{where}: kind '{kind}' reads 'pairs', not 'instructions'")
        options = kind_of.limited(options, limit)
        return Task(name=task_name, kind=kind, instructions=(),
                    description=data.get("description", ""), source=options.source,
                    options=options, judged=kind_of.judged(options), n_items=options.n)
    if "instructions" not in data:
        raise ConfigError(f"{where}: needs 'instructions' (a file path, or a table)")
    sources = parse_sources(data["instructions"], where)
    samples = load_sources(sources, path.parent, limit)
    label = ""
    if reference == STORED:
        missing = next((s for s in samples if s.reference is None), None)
        if missing is not None:
            raise ConfigError(f"{where}: reference = \"{STORED}\" but instruction '{missing.id}' "
                              f"of '{missing.source}' has no stored output (set "
                              f"reference_field on its source)")
        labels = {reference_label(s, path.parent) for s in sources}
        label = labels.pop() if len(labels) == 1 else "stored-reference"
    source = ", ".join(s.path if s.path else source_name(s) for s in sources)
    return Task(name=task_name, kind=kind, instructions=samples,
                description=data.get("description", ""), source=source, reference=reference,
                reference_label=label, options=options, judged=kind_of.judged(options))
