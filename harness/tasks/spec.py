"""A loaded task as plain data: a named instruction set and the kind of evaluation run on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.data.instruction_sets import Instruction

#: `reference = "outputs"`: judge against the instruction set's stored reference outputs.
STORED = "outputs"


@dataclass(frozen=True)
class Task:
    """A named instruction set and the kind of evaluation run on it.

    reference: None (the registry's reference variant), a variant name, or STORED.
    options: the kind's parsed settings (a frozen dataclass of the kind's module), or None.
    judged: whether the task needs head-to-head judgments (its kind says, from its options).
    n_items: the number of items when they are not the instructions (ranking's pairs).
    """

    name: str
    kind: str
    instructions: tuple[Instruction, ...]
    description: str = ""
    source: str = ""
    reference: str | None = None
    reference_label: str = ""
    options: Any = None
    judged: bool = False
    n_items: int | None = None

    def describe(self) -> dict[str, Any]:
        """What the run's resolved config records of this task."""
        n = self.n_items if self.n_items is not None else len(self.instructions)
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "source": self.source,
                             "n": n}
        if self.reference is not None:
            d["reference"] = self.reference
        if self.options is not None:
            d["options"] = self.options.as_dict()
        return d
