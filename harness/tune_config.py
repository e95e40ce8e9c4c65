"""Tuning recipes: a variant's [tune] table as a frozen, type-checked TuneSpec (no torch here).

A tuned variant inherits from its base variant (`base = "gemma3-270m"`) and adds a `tune`
table: its training data (an adapter from harness.tune_data and its options), the method
(full fine-tune or LoRA), the optimisation settings, and optional overrides used when training
on a GPU (`gpu = { dtype = "bfloat16", batch_size = 8 }`). The loss covers response tokens
only; the prompt is the one the variant is evaluated with (its prompt_format).

A built variant lives in `<cache>/tuned/<recipe hash>-<data hash>/`: the recipe hash covers
the effective settings (after GPU overrides, if they were used), the starting weights and the
prompt format; the data hash covers the training pairs themselves. A changed recipe or data
means another directory, never a stale one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.configs import expect
from harness.errors import ConfigError, HarnessError, WeightsError, unknown_name
from harness.hashing import content_hash

if TYPE_CHECKING:
    from harness.registry import ModelSpec

#: Bumped when training changes what a recipe produces (tokenisation, masking, saving).
TUNE_VERSION = 2
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
#: Settings that do not change the trained weights (left out of the recipe hash).
NOT_IN_KEY = ("save_steps",)


@dataclass(frozen=True)
class DataSpec:
    """Which training pairs: an adapter kind, its options, and a seeded subsample size."""

    kind: str
    n: int | None = None
    seed: int = 0
    path: str = ""
    instruction_field: str = "instruction"
    response_field: str = "response"

    def as_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "n": self.n, "seed": self.seed}
        if self.kind == "jsonl":
            d.update(path=self.path, instruction_field=self.instruction_field,
                     response_field=self.response_field)
        return d


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
    truncation: str = "boundary"
    seed: int = 0
    dtype: str = "float32"
    save_steps: int = 20
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
         "seed": None, "save_steps": 1}
_NUMBERS = ("lora_alpha", "lora_dropout", "learning_rate", "warmup_ratio", "weight_decay",
            "epochs")
_CHOICES = {"method": METHODS, "schedule": SCHEDULES, "dtype": TRAIN_DTYPES,
            "truncation": TRUNCATIONS}
#: Settings a [tune.gpu] table may override (device-dependent: precision, batch shape, ...).
GPU_KEYS = tuple(sorted((set(_INTS) | set(_NUMBERS) | set(_CHOICES) | {"target_modules"})
                        - {"seed", "truncation"}))
_DATA_KEYS = {"lima": ("kind", "n", "seed"), "lima_responses": ("kind", "n", "seed"),
              "poetry": ("kind", "n", "seed"),
              "jsonl": ("kind", "n", "seed", "path", "instruction_field", "response_field")}


def _parse_data(table: Any, where: str) -> DataSpec:
    expect(table, dict, where, "data")
    w = f"{where} data"
    kind = expect(table.get("kind"), str, w, "kind")
    if kind not in _DATA_KEYS:
        raise unknown_name("data kind", kind, list(_DATA_KEYS), f" (in {where})")
    unknown = sorted(set(table) - set(_DATA_KEYS[kind]))
    if unknown:
        raise ConfigError(f"{w}: unknown field(s) for kind '{kind}': {', '.join(unknown)}")
    n = table.get("n")
    if n is not None and expect(n, int, w, "n") < 1:
        raise ConfigError(f"{w}: n must be positive, got {n}")
    expect(table.get("seed", 0), int, w, "seed")
    for k in ("path", "instruction_field", "response_field"):
        if k in table and not expect(table[k], str, w, k):
            raise ConfigError(f"{w}: {k} must not be empty")
    if kind == "jsonl" and "path" not in table:
        raise ConfigError(f"{w}: kind 'jsonl' needs path")
    return DataSpec(**table)


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
    data = _parse_data(table["data"], w)
    settings = _check_settings({k: v for k, v in table.items() if k not in ("data", "gpu")}, w)
    gpu = expect(table.get("gpu", {}), dict, w, "gpu")
    bad = sorted(set(gpu) - set(GPU_KEYS))
    if bad:
        raise ConfigError(f"{w}: gpu cannot set {', '.join(bad)}; it may set "
                          f"{', '.join(GPU_KEYS)}")
    gpu_settings = _check_settings(gpu, f"{w} gpu")
    return TuneSpec(data=data, **settings, gpu=tuple(sorted(gpu_settings.items())))


# ---------------------------------------------------------------------------- keys and builds

_DATA_HASHES: dict[tuple, str] = {}


def data_hash(data: DataSpec) -> str:
    """Content hash of the training pairs a DataSpec yields (recomputed when its file changes)."""
    from harness import tune_data

    key = (data, tune_data.source_signature(data))
    if key not in _DATA_HASHES:
        _DATA_HASHES[key] = tune_data.pairs_hash(tune_data.load_pairs(data))
    return _DATA_HASHES[key]


def starting_spec(spec: ModelSpec) -> ModelSpec:
    """The variant whose weights tuning starts from: the same source, untuned, in float32."""
    return dataclasses.replace(spec, tune=None, rules=None, dtype="float32")


def _from_identity(spec: ModelSpec) -> dict[str, Any]:
    from harness.weights import CONVERSION_VERSION, local_fingerprint

    start = starting_spec(spec)
    ident = {"weights": start.weights_identity(), "conversion": CONVERSION_VERSION}
    if start.source == "local":
        ident["local_weights"] = local_fingerprint(start)
    return ident


def build_recipe_hash(spec: ModelSpec, on_gpu: bool) -> str:
    """Hash of what training does for this variant on this kind of device: the effective
    settings, the starting weights and the prompt template (not the name or description)."""
    assert spec.tune is not None
    eff = spec.tune.effective(on_gpu)
    return content_hash({"recipe": eff.recipe_hash(), "from": _from_identity(spec),
                         "prompt_format": spec.prompt_format,
                         "system_prompt": spec.system_prompt, "version": TUNE_VERSION})


def tuned_root() -> Path:
    """Where built variants live: <cache>/tuned/."""
    from harness.cache import cache_root

    return cache_root() / "tuned"


def build_dir(spec: ModelSpec, on_gpu: bool, data_digest: str | None = None) -> Path:
    """The directory this variant is built into on this kind of device."""
    assert spec.tune is not None
    digest = data_digest or data_hash(spec.tune.data)
    return tuned_root() / f"{build_recipe_hash(spec, on_gpu)}-{digest}"


def _device_kinds(spec: ModelSpec) -> list[bool]:
    """Builds looked for, in order: the plain recipe, then its GPU settings (if it has any)."""
    return [False, True] if spec.tune is not None and spec.tune.gpu else [False]


def find_build(spec: ModelSpec) -> Path | None:
    """The finished build of a tuned variant, or None. The data is only read (and hashed) when
    a build of this recipe exists at all, so an unbuilt variant costs a directory listing."""
    root = tuned_root()
    for on_gpu in _device_kinds(spec):
        recipe = build_recipe_hash(spec, on_gpu)
        if not any(root.glob(f"{recipe}-*/{TUNED_MARKER}")):
            continue
        path = build_dir(spec, on_gpu)
        if (path / TUNED_MARKER).is_file():
            return path
    return None


def tune_command(spec: ModelSpec) -> str:
    return f"python -m harness tune {spec.name}"


def require_build(spec: ModelSpec) -> Path:
    """The built directory, or one WeightsError line naming the command that builds it."""
    path = find_build(spec)
    if path is None:
        raise WeightsError(f"{spec.name} is a tuned variant that is not built yet; build it "
                           f"with: {tune_command(spec)}")
    return path


def is_built(spec: ModelSpec) -> bool:
    """Whether a tuned variant is built (False when its data cannot even be read)."""
    try:
        return find_build(spec) is not None
    except HarnessError:
        return False


def tuned_identity(spec: ModelSpec) -> dict[str, Any]:
    """A tuned variant's weights identity: its starting weights, the recipe's hash, the training
    data's content hash and the build used (which says whether GPU settings applied)."""
    assert spec.tune is not None
    build = require_build(spec)
    return {"source": "tuned", "from": starting_spec(spec).weights_identity(),
            "recipe": spec.tune.recipe_hash(), "data": data_hash(spec.tune.data),
            "build": build.name}


def build_status(spec: ModelSpec) -> str:
    """One phrase for `harness list`: built (where), or the command that builds it."""
    try:
        path = find_build(spec)
    except HarnessError as e:
        return f"not built ({e}); build: {tune_command(spec)}"
    if path is None:
        return f"not built; build: {tune_command(spec)}"
    return f"built ({path})"
