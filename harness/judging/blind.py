"""Blind pairwise labels of this harness's own outputs: build the pairs, read the labels back.

Pairs follow ../shared/protocols/blind-pairwise-labels.md: a variant's output against the
reference's for one instruction, the variant shown as A or B by a seeded draw, shuffled across
variants, every output stored with its sha256 so a label whose output changed shows as stale.
Readers see only the instruction and the two texts (no names, token counts or finish reasons).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.core.configs import builtin_dir, read_user_text
from harness.core.errors import DataError
from harness.judging.protocol import Candidate, PairwiseItem

#: The committed pairs, labels and rubric (judges/validation/ in the checkout and the wheel).
VALIDATION_DIR = builtin_dir() / "judges" / "validation"
PAIRS_FILE = VALIDATION_DIR / "blind_pairs.jsonl"
LABELS_FILE = VALIDATION_DIR / "blind_labels.jsonl"
RUBRIC_FILE = VALIDATION_DIR / "RUBRIC.md"
#: Tasks whose instructions may be labelled: never the built-in 72 nor AlpacaEval's 805.
LABELLED_TASKS = ("implicit_ins_val", "mtbench")


def sha256_text(text: str) -> str:
    """sha256 of a text's UTF-8 bytes (what a label records of each output it saw)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class BlindPair:
    """One labelled head-to-head: the variant's output on side `variant_side` ("A" or "B")."""

    pair_id: str
    task: str
    instruction_id: str
    instruction: str
    variant: str
    reference: str
    variant_side: str
    output_a: str
    output_b: str
    finish_a: str
    finish_b: str
    sha256_a: str
    sha256_b: str

    def as_item(self) -> PairwiseItem:
        """The pair as a judge sees it: the reference as output_1, the variant as output_2."""
        a = Candidate(self.output_a, "A", self.finish_a)
        b = Candidate(self.output_b, "B", self.finish_b)
        ref, var = (a, b) if self.variant_side == "B" else (b, a)
        return PairwiseItem(self.instruction, ref, var, f"{self.task}/{self.instruction_id}")


@dataclass(frozen=True)
class BlindLabel:
    """A reader's verdict on one pair: p_b = P(B better) in [0, 1], with a short reason."""

    pair_id: str
    p_b: float
    reason: str
    reader: str
    sha256_a: str
    sha256_b: str


def build_pairs(generations: Iterable[dict[str, Any]], reference: str, per_variant: int,
                seed: int = 0, tasks: Sequence[str] = LABELLED_TASKS) -> list[BlindPair]:
    """Pairs of each variant against the reference, per_variant of each variant (a seeded
    sample of instructions), sides drawn and the whole list shuffled with the seed."""
    rows = [g for g in generations if g["task"] in tasks]
    bad = sorted({g["task"] for g in generations} - set(tasks))
    if not rows:
        raise DataError(f"no generations of the labelled tasks {list(tasks)} (found {bad})")
    by = {(g["task"], g["model"], g["instruction_id"]): g for g in rows}
    refs = {(t, i): g for (t, m, i), g in by.items() if m == reference}
    if not refs:
        raise DataError(f"no generations of the reference {reference!r}")
    variants = sorted({m for (_, m, _) in by} - {reference})
    rng = random.Random(seed)
    pairs = []
    for variant in variants:
        keys = sorted(k for k in refs if (k[0], variant, k[1]) in by)
        for task, iid in rng.sample(keys, min(per_variant, len(keys))):
            var, ref = by[(task, variant, iid)], refs[(task, iid)]
            side = rng.choice("AB")
            a, b = (var, ref) if side == "A" else (ref, var)
            pairs.append(BlindPair(
                pair_id="", task=task, instruction_id=iid, instruction=var["instruction"],
                variant=variant, reference=reference, variant_side=side,
                output_a=a["output"], output_b=b["output"], finish_a=a["finish_reason"],
                finish_b=b["finish_reason"], sha256_a=sha256_text(a["output"]),
                sha256_b=sha256_text(b["output"])))
    rng.shuffle(pairs)
    return [BlindPair(**{**asdict(p), "pair_id": f"p{n:04d}"}) for n, p in enumerate(pairs)]


def _read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file; one DataError naming file and line for a bad one."""
    lines = read_user_text(path, what, DataError).splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        rows.append(row)
    return rows


def _typed(cls: type, row: dict[str, Any], where: str) -> Any:
    """A dataclass from a row whose fields are exactly the class's (one DataError otherwise)."""
    names = set(cls.__dataclass_fields__)
    if set(row) != names:
        raise DataError(f"{where}: fields {sorted(set(row) ^ names)} missing or unknown")
    return cls(**row)


def read_pairs(path: Path = PAIRS_FILE) -> list[BlindPair]:
    """The stored blind pairs."""
    return [_typed(BlindPair, r, f"{path}:{n}")
            for n, r in enumerate(_read_jsonl(path, "blind pairs"), 1)]


def read_labels(path: Path = LABELS_FILE) -> list[BlindLabel]:
    """The stored labels; p_b must lie in [0, 1]."""
    out = []
    for n, r in enumerate(_read_jsonl(path, "blind labels"), 1):
        label = _typed(BlindLabel, r, f"{path}:{n}")
        if not isinstance(label.p_b, int | float) or not 0.0 <= label.p_b <= 1.0:
            raise DataError(f"{path}:{n}: p_b must be a number in [0, 1], got {label.p_b!r}")
        out.append(label)
    return out


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """Dataclasses or dicts as JSONL (one object a line, keys in field order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r if isinstance(r, dict) else asdict(r), ensure_ascii=False) + "\n")


def reader_view(pair: BlindPair) -> dict[str, str]:
    """What a reader is shown: the id, the instruction and the two texts, nothing else."""
    return {"pair_id": pair.pair_id, "instruction": pair.instruction, "A": pair.output_a,
            "B": pair.output_b}


@dataclass(frozen=True)
class LabelledPair:
    """A pair with its (fresh) label: variant_won is the hard verdict for the variant."""

    pair: BlindPair
    label: BlindLabel

    @property
    def p_variant(self) -> float:
        """P(the variant's output is better) by the reader."""
        return self.label.p_b if self.pair.variant_side == "B" else 1.0 - self.label.p_b

    @property
    def preference(self) -> float:
        """The reader's hard verdict in the judge's convention: 2 variant, 1 reference, 1.5 tie."""
        p = self.p_variant
        return 2.0 if p > 0.5 else 1.0 if p < 0.5 else 1.5


def join(pairs: Sequence[BlindPair], labels: Sequence[BlindLabel]
         ) -> tuple[list[LabelledPair], list[str], list[str]]:
    """(fresh labelled pairs, stale pair ids, unlabelled pair ids): a label is stale when the
    outputs it saw (their sha256) are not the pair's outputs now."""
    by_id = {lab.pair_id: lab for lab in labels}
    fresh, stale, missing = [], [], []
    for p in pairs:
        lab = by_id.get(p.pair_id)
        if lab is None:
            missing.append(p.pair_id)
        elif (lab.sha256_a, lab.sha256_b) != (p.sha256_a, p.sha256_b) or \
                (p.sha256_a, p.sha256_b) != (sha256_text(p.output_a), sha256_text(p.output_b)):
            stale.append(p.pair_id)
        else:
            fresh.append(LabelledPair(p, lab))
    return fresh, stale, missing


def stale_against_run(pairs: Sequence[BlindPair], generations: Iterable[dict[str, Any]]
                      ) -> list[str]:
    """Pair ids whose stored outputs differ from a run's outputs for the same task, variant and
    instruction (that run's models no longer produce what was labelled)."""
    now = {(g["task"], g["model"], g["instruction_id"]): sha256_text(g["output"])
           for g in generations}
    stale = []
    for p in pairs:
        var_sha, ref_sha = ((p.sha256_a, p.sha256_b) if p.variant_side == "A"
                            else (p.sha256_b, p.sha256_a))
        for model, sha in ((p.variant, var_sha), (p.reference, ref_sha)):
            current = now.get((p.task, model, p.instruction_id))
            if current is not None and current != sha:
                stale.append(p.pair_id)
                break
    return stale
