"""Judges as data: `judges/<name>.toml` files become JudgeSpecs, and a kind maps to its builder."""

import importlib

from harness.core.configs import available, builtin_dir, expect, load_named_toml
from harness.core.errors import ConfigError
from harness.judging.protocol import Judge, JudgeSpec

#: The built-in judge configs (a project's own judges/ folder is searched first).
JUDGES_DIR = builtin_dir() / "judges"

#: kind -> module whose `build(spec) -> Judge` makes the judge (imported lazily).
BUILDERS = {
    "heuristic": "harness.judging.heuristic",
    "openai": "harness.judging.llm",
}


def available_judges() -> list[str]:
    """Names of the judges defined under judges/ (the project's and the built-in ones)."""
    return available("judges")


def load_judge_spec(name_or_path: str) -> JudgeSpec:
    """Read a judge config by name (judges/<name>.toml) or by path; one clear error if bad."""
    path, data = load_named_toml("judges", name_or_path)
    where = f"judge config {path}"
    unknown = sorted(set(data) - {"name", "kind", "params"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kind = data.get("kind")
    if kind not in BUILDERS:
        raise ConfigError(f"{where}: kind must be one of {sorted(BUILDERS)}, got {kind!r}")
    params = expect(data.get("params", {}), dict, where, "[params]")
    name = expect(data.get("name", path.stem), str, where, "name")
    return JudgeSpec(name=name, kind=kind, params=params)


def build_judge(spec: JudgeSpec) -> Judge:
    """Make the judge for a spec; the returned judge's .spec is what gets hashed and recorded."""
    module = importlib.import_module(BUILDERS[spec.kind])
    return module.build(spec)


def get_judge(name_or_path: str) -> Judge:
    """Load a judge config and build it."""
    return build_judge(load_judge_spec(name_or_path))
