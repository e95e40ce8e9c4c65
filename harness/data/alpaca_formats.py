"""AlpacaEval's file formats: model_outputs.json and annotations.json, read, checked and written."""

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.errors import DataError

_OUTPUT_FIELDS = ("instruction", "output", "generator", "dataset")
_ANNOTATION_FIELDS = (
    "instruction", "output_1", "generator_1", "output_2", "generator_2", "preference",
    "annotator", "raw_completion", "price_per_example", "dataset",
)


@dataclass(frozen=True)
class ModelOutput:
    """One record of model_outputs.json: a model's answer to one instruction."""

    instruction: str
    output: str
    generator: str = ""
    dataset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, kept for round trips

    def as_dict(self) -> dict[str, Any]:
        """The record as AlpacaEval writes it."""
        return {"instruction": self.instruction, "output": self.output,
                "generator": self.generator, "dataset": self.dataset, **self.extra}


@dataclass(frozen=True)
class Annotation:
    """One record of annotations.json: a judge's verdict on output_1 (reference) vs output_2."""

    instruction: str
    output_1: str
    output_2: str
    preference: float | None  # in [1, 2]: 1 = output_1 better, 2 = output_2 better; None = none
    generator_1: str = ""
    generator_2: str = ""
    annotator: str = ""
    raw_completion: Any = None
    price_per_example: float | None = None
    dataset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, kept for round trips

    def as_dict(self) -> dict[str, Any]:
        """The record as AlpacaEval writes it."""
        return {"instruction": self.instruction, "output_1": self.output_1,
                "generator_1": self.generator_1, "dataset": self.dataset,
                "output_2": self.output_2, "generator_2": self.generator_2,
                "annotator": self.annotator, "preference": self.preference,
                "price_per_example": self.price_per_example,
                "raw_completion": self.raw_completion, **self.extra}


def _load_records(path: Path, what: str) -> list[dict[str, Any]]:
    """Parse a JSON file that must hold a non-empty list of objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): "
                        f"{e.msg}") from None
    except (ValueError, RecursionError) as e:  # a number too long to read, or too deep
        raise DataError(f"{path} is not readable JSON: "
                        f"{'nested too deeply' if isinstance(e, RecursionError) else e}") \
            from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {what} records, "
                        f"got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: holds no {what} records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is {type(rec).__name__}, expected an object")
    return data


def _text(rec: dict[str, Any], key: str, i: int, path: Path, required: bool) -> str:
    """A string field; None or absent reads as '' unless the key is required."""
    if key not in rec:
        if required:
            raise DataError(f"{path}: record {i} lacks the key {key!r}")
        return ""
    value = rec[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}: record {i} has {key}={value!r:.40}, expected a string")
    return value


def _preference(value: Any, i: int, path: Path) -> float | None:
    """A preference: a number (AlpacaEval's [1, 2], or legacy 0 for a draw) or null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{path}: record {i} has preference={value!r:.40}, expected a number "
                        "in [1, 2] or null")
    value = float(value)
    return None if math.isnan(value) else value


def _price(value: Any, i: int, path: Path) -> float | None:
    """Cost of one judgment in dollars, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{path}: record {i} has price_per_example={value!r:.40}, "
                        "expected a number or null")
    return float(value)


def read_model_outputs(path: Path) -> list[ModelOutput]:
    """Read an AlpacaEval model_outputs.json (list of {instruction, output, generator, dataset})."""
    path = Path(path)
    records = _load_records(path, "model_outputs")
    out = []
    for i, rec in enumerate(records):
        out.append(ModelOutput(
            instruction=_text(rec, "instruction", i, path, True),
            output=_text(rec, "output", i, path, True),
            generator=_text(rec, "generator", i, path, False),
            dataset=_text(rec, "dataset", i, path, False),
            extra={k: v for k, v in rec.items() if k not in _OUTPUT_FIELDS},
        ))
    return out


def read_annotations(path: Path) -> list[Annotation]:
    """Read an AlpacaEval annotations.json; a preference of NaN/null reads as None."""
    path = Path(path)
    records = _load_records(path, "annotations")
    out = []
    for i, rec in enumerate(records):
        if "preference" not in rec:
            raise DataError(f"{path}: record {i} lacks the key 'preference'")
        out.append(Annotation(
            instruction=_text(rec, "instruction", i, path, True),
            output_1=_text(rec, "output_1", i, path, True),
            output_2=_text(rec, "output_2", i, path, True),
            preference=_preference(rec["preference"], i, path),
            generator_1=_text(rec, "generator_1", i, path, False),
            generator_2=_text(rec, "generator_2", i, path, False),
            annotator=_text(rec, "annotator", i, path, False),
            raw_completion=rec.get("raw_completion"),
            price_per_example=_price(rec.get("price_per_example"), i, path),
            dataset=_text(rec, "dataset", i, path, False),
            extra={k: v for k, v in rec.items() if k not in _ANNOTATION_FIELDS},
        ))
    return out


def _dump(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records as AlpacaEval does (indented JSON list), atomically, NaN as null."""
    path = Path(path)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
             for r in records]
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None


def write_model_outputs(path: Path, outputs: Iterable[ModelOutput]) -> None:
    """Write an AlpacaEval model_outputs.json."""
    _dump(path, [o.as_dict() for o in outputs])


def write_annotations(path: Path, annotations: Iterable[Annotation]) -> None:
    """Write an AlpacaEval annotations.json."""
    _dump(path, [a.as_dict() for a in annotations])


def annotations_frame(annotations: Sequence[Annotation]) -> pd.DataFrame:
    """Annotations as a DataFrame (one row each, in file order; preference None becomes NaN)."""
    if not annotations:
        raise DataError("no annotations to tabulate")
    rows = [{"instruction": a.instruction, "output_1": a.output_1, "generator_1": a.generator_1,
             "output_2": a.output_2, "generator_2": a.generator_2,
             "preference": math.nan if a.preference is None else a.preference,
             "annotator": a.annotator, "price_per_example": a.price_per_example,
             "dataset": a.dataset} for a in annotations]
    frame = pd.DataFrame(rows)
    frame["preference"] = frame["preference"].astype(float)
    return frame


def read_annotations_frame(path: Path) -> pd.DataFrame:
    """Read an annotations.json straight into a DataFrame (see annotations_frame)."""
    return annotations_frame(read_annotations(path))
