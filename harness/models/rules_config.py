"""The rule-based model's constants (no torch), so the registry and `harness list` stay light.

`RulesConfig` holds every constant and on/off flag of the study's three rules; its `as_dict()`,
defaults filled in, is part of every rules variant's output identity. The batched logits
processor that applies them lives in `harness.generate.rules`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harness.core.errors import ConfigError

#: Bumped when the rules' implementation changes what they output (part of the cache key).
RULES_VERSION = 1

#: The study's uniform token changes, as (string, weight) pairs.
DEFAULT_TOKEN_TABLE: tuple[tuple[str, float], ...] = (
    ("<", -4.0),
    (" <", -4.0),
    ("|", -4.0),
    ("I", -5.0),
    (" I", -5.0),
    (" We", -3.0),
    (" What", -5.0),
    (" should", -6.0),
    (" *", 1.0),
    (" -", 1.0),
    ("  ", 1.0),
    (" #", 1.0),
    (" ##", 1.0),
    ("\n", 1.0),
    ("!", 1.0),
)

DIVERSITY_SCOPES = ("response", "prompt+response")


@dataclass(frozen=True)
class RulesConfig:
    """Constants and on/off flags of the rule-based model (ablations are flags turned off)."""

    eos: bool = True
    eos_max: float = 15.0
    ramp: int = 250
    eos_hold: bool = True
    uniform: bool = True
    token_table: tuple[tuple[str, float], ...] = DEFAULT_TOKEN_TABLE
    diversity: bool = True
    diversity_penalty: float = 1.5
    diversity_scope: str = "response"

    def __post_init__(self) -> None:
        for name in ("eos", "eos_hold", "uniform", "diversity"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"rules: {name} must be true or false")
        if not isinstance(self.ramp, int) or isinstance(self.ramp, bool) or self.ramp < 1:
            raise ConfigError(f"rules: ramp must be a positive integer, got {self.ramp!r}")
        for name in ("eos_max", "diversity_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"rules: {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"rules: {name} must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.diversity_scope not in DIVERSITY_SCOPES:
            raise ConfigError(
                f"rules: diversity_scope must be one of {', '.join(DIVERSITY_SCOPES)}, "
                f"got {self.diversity_scope!r}"
            )
        table = []
        for entry in self.token_table:
            if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) != 2:
                raise ConfigError(f"rules: token_table entries are [string, weight], got {entry!r}")
            text, weight = entry
            if not isinstance(text, str) or not text:
                raise ConfigError(f"rules: token_table string must be non-empty, got {text!r}")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ConfigError(f"rules: token_table weight for {text!r} must be a number")
            if not math.isfinite(weight):
                raise ConfigError(f"rules: token_table weight for {text!r} must be finite")
            table.append((text, float(weight)))
        object.__setattr__(self, "token_table", tuple(table))

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, for hashing and run configs."""
        d = asdict(self)
        d["token_table"] = [[text, weight] for text, weight in self.token_table]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RulesConfig:
        """Build from a mapping (e.g. a TOML table); unknown keys are a ConfigError."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"rules: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(d))


def eos_bonus(config: RulesConfig, n: int) -> float:
    """EOS score after n response tokens: eos_max·n/ramp inside the ramp, then held or dropped."""
    if not config.eos or n <= 0:
        return 0.0
    if n < config.ramp:
        return config.eos_max * n / config.ramp
    return config.eos_max if config.eos_hold else 0.0


