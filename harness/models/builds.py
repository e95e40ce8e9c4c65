"""What names a variant's weights, and where a tuned variant's build lives.

A built variant lives in `<cache>/tuned/<recipe hash>-<data hash>/`: the recipe hash covers
the effective settings (after GPU overrides, if they were used), the starting weights and the
prompt format; the data hash covers the training pairs themselves. A changed recipe or data
means another directory, never a stale one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from harness.core.cache import cache_root
from harness.core.errors import HarnessError, WeightsError
from harness.core.hashing import content_hash
from harness.data import tune_data
from harness.data.tune_data import DataSpec
from harness.models import weights
from harness.models.recipes import TUNE_VERSION, TUNED_MARKER
from harness.models.spec import ModelSpec


def weights_identity(spec: ModelSpec) -> dict[str, Any]:
    """What names the weights (not the variant): source plus checksum, id or path; for a
    tuned variant, its starting weights, recipe hash, data hash and build; for a server or
    lm-eval, its backend identity and revision."""
    if spec.backend_options is not None and spec.backend in ("openai", "lm-eval"):
        return {**spec.backend_options.identity(), "revision": spec.revision}
    local = tuned_identity(spec) if spec.tune is not None else weights.source_identity(spec)
    if spec.backend == "vllm":  # the same weights, another engine: never one loaded model
        return {**local, "engine": "vllm"}
    return local


def model_dir(spec: ModelSpec) -> str:
    """A directory or hub id that `from_pretrained` loads: a tuned variant's build (unbuilt:
    one WeightsError line naming `python -m harness tune NAME`), else the converted weights."""
    if spec.tune is not None:
        return str(require_build(spec))
    return weights.resolve_model_dir(spec)


_DATA_HASHES: dict[tuple, str] = {}


def data_hash(data: DataSpec) -> str:
    """Content hash of the training pairs a DataSpec yields (recomputed when its file changes)."""
    key = (data, tune_data.source_signature(data))
    if key not in _DATA_HASHES:
        _DATA_HASHES[key] = tune_data.pairs_hash(tune_data.load_pairs(data))
    return _DATA_HASHES[key]


def starting_spec(spec: ModelSpec) -> ModelSpec:
    """The variant whose weights tuning starts from: the same source, untuned, in float32."""
    return dataclasses.replace(spec, tune=None, rules=None, dtype="float32")


def _from_identity(spec: ModelSpec) -> dict[str, Any]:
    start = starting_spec(spec)
    ident = {"weights": weights_identity(start), "conversion": weights.CONVERSION_VERSION}
    if start.source == "local":
        ident["local_weights"] = weights.local_fingerprint(start)
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
    return {"source": "tuned", "from": weights_identity(starting_spec(spec)),
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
