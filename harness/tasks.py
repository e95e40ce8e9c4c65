"""Task definitions: `tasks/<name>.toml` names an instruction set and how it is evaluated.

Kinds (see tasks/README.md for every field):
- head_to_head: each variant's response against the reference's, judged; the reference is the
  registry's reference variant, another variant (`reference = "<name>"`), or the instruction
  set's stored outputs (`reference = "outputs"`, AlpacaEval's own mode).
- length: the response-length distribution, EOS versus the cap, and (judged head-to-head as
  above) win rate by length.
- style_adherence: out-of-domain style adherence against a domain (the study's Figure 5).
- ranking: the true response against k others by mean per-token log-likelihood (Table 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.configs import available, expect, load_named_toml, path_component
from harness.errors import ConfigError, unknown_name
from harness.hashing import content_hash
from harness.instruction_sets import (
    Instruction,
    load_sources,
    parse_sources,
    reference_label,
    resolve_path,
    source_name,
)

KINDS = ("head_to_head", "length", "style_adherence", "ranking")
#: Kinds whose variants answer the instructions (generations); ranking scores fixed texts.
GENERATING = ("head_to_head", "length", "style_adherence")
#: `reference = "outputs"`: judge against the instruction set's stored reference outputs.
STORED = "outputs"
_COMMON = ("name", "kind", "description", "instructions")

__all__ = ["GENERATING", "KINDS", "STORED", "Instruction", "Task", "available_tasks",
           "load_task", "resolve_path"]


@dataclass(frozen=True)
class Task:
    """A named instruction set and the kind of evaluation run on it.

    reference: None (the registry's reference variant), a variant name, or STORED.
    options: the kind's parsed settings (a frozen dataclass of the kind's module), or None.
    """

    name: str
    kind: str
    instructions: tuple[Instruction, ...]
    description: str = ""
    source: str = ""
    reference: str | None = None
    reference_label: str = ""
    options: Any = None

    @property
    def judged(self) -> bool:
        """Whether the task needs head-to-head judgments."""
        return self.kind == "head_to_head" or (self.kind == "length" and self.options.judge)

    def describe(self) -> dict[str, Any]:
        """What the run's resolved config records of this task."""
        n = self.options.options.n if self.kind == "ranking" else len(self.instructions)
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "source": self.source,
                             "n": n}
        if self.reference is not None:
            d["reference"] = self.reference
        if self.options is not None:
            d["options"] = self.options.as_dict()
        return d


def available_tasks() -> list[str]:
    """Names of the tasks defined under tasks/ (the project's and the built-in ones)."""
    return available("tasks")


def _kind_options(kind: str, table: dict[str, Any], where: str, base: Path) -> Any:
    """Parse the kind's own fields (everything but the common ones) with the kind's module."""
    if kind == "head_to_head":
        unknown = sorted(set(table) - {"reference"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        return None
    rest = {k: v for k, v in table.items() if k != "reference"}
    if kind == "length":
        from harness.length_analysis import parse_options

        return parse_options(rest, where)
    if kind == "style_adherence":
        from harness import style_adherence

        if "domain" not in rest:
            raise ConfigError(f"{where}: kind 'style_adherence' needs a 'domain' table")
        domain = style_adherence.load_domain(rest.pop("domain"), where, base)
        return StyleSettings(style_adherence.parse_options(rest, where), domain)
    if "reference" in table:
        raise ConfigError(f"{where}: kind 'ranking' has no reference")
    from harness import ranking

    return RankingSettings(ranking.parse_options(rest, where))


def _plain(options: Any) -> dict[str, Any]:
    return options.as_dict() if hasattr(options, "as_dict") else dataclasses.asdict(options)


@dataclass(frozen=True)
class StyleSettings:
    """A style-adherence task's settings and its domain (example instructions and responses)."""

    options: Any
    domain: Any

    def as_dict(self) -> dict[str, Any]:
        d = self.domain
        return {**_plain(self.options),
                "domain": {"name": d.name, "n": len(d.instructions),
                           "hash": content_hash([list(d.instructions), list(d.responses)])}}


@dataclass(frozen=True)
class RankingSettings:
    """A ranking task's settings (its pairs' source, k, n, seed...)."""

    options: Any

    def as_dict(self) -> dict[str, Any]:
        return _plain(self.options)

    @property
    def source(self) -> str:
        pairs = self.options.pairs
        return str(pairs.get("path") or pairs.get("kind")) if isinstance(pairs, dict) else ""


def load_task(name: str, limit: int | None = None) -> Task:
    """Load a task by name (tasks/<name>.toml) or path to a .toml, at most `limit` samples per
    instruction source; one clear error if anything is wrong."""
    path, data = load_named_toml("tasks", name)
    where = f"task config {path}"
    kind = data.get("kind", "head_to_head")
    expect(kind, str, where, "kind")
    if kind not in KINDS:
        raise unknown_name("task kind", kind, list(KINDS), f" (in {where})")
    for k in ("name", "description"):
        if k in data:
            expect(data[k], str, where, k)
    reference = data.get("reference")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ConfigError(f"{where}: reference must be a variant name or \"{STORED}\"")
    options = _kind_options(kind, {k: v for k, v in data.items() if k not in _COMMON},
                            where, path.parent)
    task_name = path_component(data.get("name", path.stem), f"{where}: task name")
    if kind == "ranking":
        if "instructions" in data:
            raise ConfigError(f"{where}: kind 'ranking' reads 'pairs', not 'instructions'")
        if limit is not None and limit < options.options.n:  # --limit: N items
            options = RankingSettings(dataclasses.replace(options.options, n=limit))
        return Task(name=task_name, kind=kind, instructions=(),
                    description=data.get("description", ""), source=options.source,
                    options=options)
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
                reference_label=label, options=options)
