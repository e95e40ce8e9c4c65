"""The records a run stores (one generation, one judgment), their cache keys, and their checks.

A record's `key` is a content hash of what produced it: for a generation, the model's output
identity and the exact prompt; for a judgment, the resolved judge spec (template included) and
everything the judge sees. Names (variant, task, run id) are labels on a record, never part of
its key, so two variants with one output identity share their generations. Records read back
from disk are checked field by field, so a damaged file gives one line naming file and line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from harness.core.hashing import content_hash
from harness.judging.protocol import JudgeSpec, PairwiseItem

#: (task, variant, sample id): where a record belongs in a run.
Where = tuple[str, str, str]

FINISH_REASONS = ("eos", "length")
#: Bumped when the log-likelihood computation (harness.generate.lm_eval) changes its numbers.
SCORING_VERSION = 1


def generation_key(model_identity: dict[str, Any], prompt: str) -> str:
    """Generation cache key: the model's output identity and the exact prompt text."""
    return content_hash({"model": model_identity, "prompt": prompt}, 32)


def judgment_key(judge_spec: JudgeSpec, item: PairwiseItem) -> str:
    """Judgment cache key: the resolved judge spec and what the judge sees (not the names)."""
    def seen(c: Any) -> dict[str, Any]:
        return {"output": c.output, "finish_reason": c.finish_reason}

    judge = {k: v for k, v in judge_spec.as_dict().items() if k != "name"}  # a label
    return content_hash({"judge": judge, "instruction": item.instruction,
                         "output_1": seen(item.output_1), "output_2": seen(item.output_2)}, 32)


def score_key(model_identity: dict[str, Any], backend: str, context: str,
              continuation: str) -> str:
    """Log-likelihood cache key: the model's identity without its decoding (a likelihood does
    not depend on how one would decode), the backend, and the exact texts."""
    model = {k: v for k, v in model_identity.items() if k != "decoding"}
    return content_hash({"model": model, "backend": backend, "version": SCORING_VERSION,
                         "context": context, "continuation": continuation}, 32)


@dataclass(frozen=True)
class GenerationRecord:
    """One variant's response to one instruction of a task, and how it was produced.

    info: backend details where there are any (a server's usage and raw finish_reason, request
    attempts and seconds); absent from the stored record when empty.
    """

    key: str
    task: str
    model: str
    instruction_id: str
    instruction: str
    prompt: str
    output: str
    n_prompt_tokens: int
    n_tokens: int
    finish_reason: str
    model_spec_hash: str = ""
    decoding: dict[str, Any] = field(default_factory=dict)
    batch_seconds: float = 0.0
    batch_size: int = 0
    created: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def labelled(self, task: str, model: str, instruction_id: str,
                 instruction: str) -> GenerationRecord:
        """The same output under another variant's, task's or instruction's labels."""
        return dataclasses.replace(self, task=task, model=model, instruction_id=instruction_id,
                                   instruction=instruction)


@dataclass(frozen=True)
class JudgmentRecord:
    """A judge's verdict on a variant's response against the reference's, for one instruction.

    preference: 1 = the reference (output_1) is better, 2 = the variant (output_2), 1.5 = tie;
    None (NaN in memory) when the judge gave no usable verdict.
    """

    key: str
    task: str
    model: str
    instruction_id: str
    judge: str
    judge_spec_hash: str
    generator_1: str
    generator_2: str
    preference: float | None
    raw: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def labelled(self, task: str, model: str, instruction_id: str, generator_1: str,
                 generator_2: str) -> JudgmentRecord:
        """The same verdict under the labels of the run that reuses it."""
        return dataclasses.replace(self, task=task, model=model, instruction_id=instruction_id,
                                   generator_1=generator_1, generator_2=generator_2)


@dataclass(frozen=True)
class ScoreRecord:
    """The log-likelihood of one continuation given one context, under one variant.

    instruction_id is "<item id>#<candidate index>" for the ranking task.
    """

    key: str
    task: str
    model: str
    instruction_id: str
    logprob: float
    n_tokens: int
    is_greedy: bool
    backend: str = "harness"
    created: str = ""


Record = GenerationRecord | JudgmentRecord | ScoreRecord


class RecordError(ValueError):
    """A stored record does not have the fields and types of its record type."""


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a JSON value fits a (simple) type hint; ints are accepted as floats."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_accepts(h, value) for h in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if hint is type(None):
        return value is None
    if origin is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


def from_dict(cls: type[Record], data: Any) -> Record:
    """A typed record from a JSON object; RecordError names the first wrong or missing field."""
    if not isinstance(data, dict):
        raise RecordError(f"expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"missing field '{f.name}'")
            continue
        value = data[f.name]
        if not _accepts(hints[f.name], value):
            raise RecordError(f"field '{f.name}' has the wrong type ({value!r:.60})")
        values[f.name] = float(value) if hints[f.name] in (float, float | None) and \
            value is not None else value
    if cls is GenerationRecord and values["finish_reason"] not in FINISH_REASONS:
        raise RecordError(f"finish_reason must be one of {FINISH_REASONS}")
    for name, (low, high) in _RANGES.get(cls.__name__, {}).items():
        v = values.get(name)
        finite = isinstance(v, int) or math.isfinite(v) or (v == -math.inf and low == -math.inf) \
            if v is not None else True  # a huge int is finite (math.isfinite overflows on it)
        if v is not None and not (finite and low <= v <= high):
            raise RecordError(f"field '{name}' must be a number in [{low:g}, {high:g}], "
                              f"got {v!r:.40}")
    return cls(**values)


#: The ranges a stored record's numbers must lie in (a count is >= 0, a preference in [1, 2]).
_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "GenerationRecord": {"n_prompt_tokens": (0, math.inf), "n_tokens": (0, math.inf),
                         "batch_seconds": (0, math.inf), "batch_size": (0, math.inf)},
    "JudgmentRecord": {"preference": (1.0, 2.0)},
    "ScoreRecord": {"logprob": (-math.inf, 0.0), "n_tokens": (0, math.inf)},
}


def to_dict(record: Record) -> dict[str, Any]:
    """A record as a JSON-able dict (a NaN preference is stored as null)."""
    d = dataclasses.asdict(record)
    if isinstance(record, GenerationRecord) and not d["info"]:
        del d["info"]  # transformers records are stored as they always were
    if isinstance(record, JudgmentRecord) and isinstance(d["preference"], float) and \
            math.isnan(d["preference"]):
        d["preference"] = None
    return d
