"""Tuning recipes: a variant's [tune] table as a frozen, type-checked TuneSpec (no torch here).

A tuned variant inherits from its base variant (`base = "gemma3-270m"`) and adds a `tune`
table: its training data (an adapter from harness.data.tune_data and its options), the method
(full fine-tune or LoRA), the optimisation settings, and optional overrides used when training
on a GPU (`gpu = { dtype = "bfloat16", batch_size = 8 }`). The loss covers response tokens
only; the prompt is the one the variant is evaluated with (its prompt_format).

Where a recipe's build lives, and what names it, is harness.models.builds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness.core.configs import expect
from harness.core.errors import ConfigError
from harness.core.hashing import content_hash
from harness.data.tune_data import DataSpec, parse_data

#: Bumped when training changes what a recipe produces (tokenisation, masking, saving).
TUNE_VERSION = 3
#: Written into a finished build; its presence means "built".
TUNED_MARKER = "harness-tuned.json"
METHODS = ("full", "lora")
#: How a pair longer than max_seq_length is shortened: "boundary" ends the response at its last
#: paragraph or sentence end that fits and keeps EOS (the model still learns to stop); "cut"
#: drops the tail and its EOS.
TRUNCATIONS = ("boundary", "cut")
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
TRAIN_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Settings that do not change the trained weights (left out of the recipe hash): checkpoint
#: spacing, and how many held-out pairs measure the validation loss after each epoch.
NOT_IN_KEY = ("save_steps", "validation")


@dataclass(frozen=True)
class TuneSpec:
    """A tuning recipe. `gpu` holds (setting, value) overrides used when training on a GPU."""

    data: DataSpec
    method: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    learning_rate: float = 2e-4
    schedule: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_length: int = 256
    #: Responses longer than this many tokens are shortened as `truncation` says (0: only
    #: max_seq_length applies); it lets a recipe teach responses that end within the
    #: evaluation's token cap.
    max_response_tokens: int = 0
    truncation: str = "boundary"
    seed: int = 0
    dtype: str = "float32"
    save_steps: int = 20
    #: Held-out pairs of the same source (never trained on) whose loss is measured before
    #: training and after each epoch: the build record's validation curve (0: none).
    validation: int = 0
    gpu: tuple[tuple[str, Any], ...] = field(default=())

    def effective(self, on_gpu: bool) -> TuneSpec:
        """The settings used on this kind of device (the GPU overrides applied, or not)."""
        if not on_gpu or not self.gpu:
            return dataclasses.replace(self, gpu=())
        return dataclasses.replace(self, **dict(self.gpu), gpu=())

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["data"] = self.data.as_dict()
        d["target_modules"] = (list(self.target_modules)
                               if isinstance(self.target_modules, tuple) else self.target_modules)
        d["gpu"] = dict(self.gpu)
        if self.method != "lora":
            for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules"):
                d.pop(k)
        return d

    def recipe_hash(self) -> str:
        """Hash of the recipe as written (GPU overrides included; checkpoint spacing not)."""
        return content_hash({k: v for k, v in self.as_dict().items() if k not in NOT_IN_KEY})


# ---------------------------------------------------------------------------------- parsing

_INTS = {"lora_r": 1, "max_steps": 0, "batch_size": 1, "grad_accum": 1, "max_seq_length": 8,
         "max_response_tokens": 0, "seed": None, "save_steps": 1, "validation": 0}
_NUMBERS = ("lora_alpha", "lora_dropout", "learning_rate", "warmup_ratio", "weight_decay",
            "epochs")
_CHOICES = {"method": METHODS, "schedule": SCHEDULES, "dtype": TRAIN_DTYPES,
            "truncation": TRUNCATIONS}
#: Settings a [tune.gpu] table may override (device-dependent: precision, batch shape, ...).
GPU_KEYS = tuple(sorted((set(_INTS) | set(_NUMBERS) | set(_CHOICES) | {"target_modules"})
                        - {"seed", "truncation", "max_response_tokens", "validation"}))
def _check_settings(table: dict[str, Any], where: str) -> dict[str, Any]:
    """Type- and range-check recipe settings; returns them ready for TuneSpec."""
    out = dict(table)
    for k, low in _INTS.items():
        if k in table and expect(table[k], int, where, k) < (low if low is not None
                                                             else table[k]):
            raise ConfigError(f"{where}: {k} must be at least {low}, got {table[k]}")
    for k in _NUMBERS:
        if k in table:
            out[k] = float(expect(table[k], (int, float), where, k))
    for k, choices in _CHOICES.items():
        if k in table and expect(table[k], str, where, k) not in choices:
            raise ConfigError(f"{where}: {k} must be one of {', '.join(choices)}, "
                              f"got {table[k]!r}")
    if "learning_rate" in out and not out["learning_rate"] > 0:
        raise ConfigError(f"{where}: learning_rate must be positive, got {table['learning_rate']}")
    if "epochs" in out and not out["epochs"] > 0:
        raise ConfigError(f"{where}: epochs must be positive, got {table['epochs']}")
    if "lora_alpha" in out and not out["lora_alpha"] > 0:
        raise ConfigError(f"{where}: lora_alpha must be positive, got {table['lora_alpha']}")
    for k in ("lora_dropout", "warmup_ratio"):
        if k in out and not 0 <= out[k] < 1:
            raise ConfigError(f"{where}: {k} must be in [0, 1), got {table[k]}")
    if "weight_decay" in out and out["weight_decay"] < 0:
        raise ConfigError(f"{where}: weight_decay must not be negative, "
                          f"got {table['weight_decay']}")
    if "target_modules" in table:
        t = table["target_modules"]
        if isinstance(t, str):
            if t != "all-linear":
                raise ConfigError(f"{where}: target_modules must be a list of module names or "
                                  f"\"all-linear\", got {t!r}")
        elif not (isinstance(expect(t, (list, str), where, "target_modules"), list) and t
                  and all(isinstance(x, str) and x for x in t)):
            raise ConfigError(f"{where}: target_modules must be a non-empty list of names")
        else:
            out["target_modules"] = tuple(t)
    return out


def parse_tune(table: Any, where: str) -> TuneSpec:
    """A [tune] table as a TuneSpec; any wrong type, range or name is one ConfigError line."""
    expect(table, dict, where, "tune")
    w = f"{where} tune"
    known = {f.name for f in dataclasses.fields(TuneSpec)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{w}: unknown field(s) {', '.join(unknown)}")
    if "data" not in table:
        raise ConfigError(f"{w}: needs a data table, e.g. data = {{ kind = \"lima\", n = 300 }}")
    data = parse_data(table["data"], w)
    settings = _check_settings({k: v for k, v in table.items() if k not in ("data", "gpu")}, w)
    gpu = expect(table.get("gpu", {}), dict, w, "gpu")
    bad = sorted(set(gpu) - set(GPU_KEYS))
    if bad:
        raise ConfigError(f"{w}: gpu cannot set {', '.join(bad)}; it may set "
                          f"{', '.join(GPU_KEYS)}")
    gpu_settings = _check_settings(gpu, f"{w} gpu")
    return TuneSpec(data=data, **settings, gpu=tuple(sorted(gpu_settings.items())))


