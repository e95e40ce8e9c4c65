"""Generation backends of a registry variant (no torch): which engine produces its outputs.

A variant's `backend` field picks it (default "transformers", the in-process path of
harness.generate.transformers):

- "openai": any OpenAI-compatible server (vLLM serve, SGLang, TGI, llama.cpp, OpenAI) through
  `base_url`, the served `model` name and `endpoint = "chat" | "completions"`; the API key is read
  from the environment variable named by `api_key_env` and is never stored.
- "lm-eval": any model lm-evaluation-harness builds (`lm_eval_model = "hf" | "vllm" |
  "local-completions" | ...` with `model_args = "pretrained=...,..."`), generating through its
  `generate_until` and scored by the ranking task through its `loglikelihood`.
- "vllm": in-process vLLM (`pip install 'harness[vllm]'`, a GPU) on the variant's own weights
  (`source`), with `tensor_parallel_size`; the rules variant runs as a vLLM logits processor.

`BackendOptions.identity()` is what of these settings enters the generation cache key: what
changes outputs (served model name, endpoint, revision, extra request fields, lm-eval model and
arguments), never the API key, and not the base_url, concurrency, timeouts or retries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from harness.core.configs import expect
from harness.core.errors import ConfigError

BACKENDS = ("transformers", "openai", "lm-eval", "vllm")
ENDPOINTS = ("chat", "completions")
#: Bumped when a backend changes how it turns a prompt into a request or a reply into a record.
BACKEND_VERSIONS = {"openai": 1, "lm-eval": 1, "vllm": 1}

#: Registry fields each non-default backend accepts, with their defaults.
OPENAI_FIELDS: dict[str, Any] = {
    "base_url": "", "model": "", "endpoint": "chat", "api_key_env": "",
    "max_concurrency": 8, "timeout_s": 120.0, "max_retries": 5, "backoff_s": 1.0,
    "max_backoff_s": 60.0, "extra_body": {},
}
LM_EVAL_FIELDS: dict[str, Any] = {"lm_eval_model": "", "model_args": ""}
VLLM_FIELDS: dict[str, Any] = {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
                               "max_model_len": 0}
FIELDS_BY_BACKEND = {"openai": OPENAI_FIELDS, "lm-eval": LM_EVAL_FIELDS, "vllm": VLLM_FIELDS}
ALL_FIELDS = frozenset(k for fields in FIELDS_BY_BACKEND.values() for k in fields)
#: model_args keys that do not change outputs (left out of the cache key).
LM_EVAL_OPERATIONAL_ARGS = frozenset({"batch_size", "max_batch_size", "device", "parallelize",
                                      "num_concurrent", "max_retries", "timeout"})
#: model_args keys refused: a secret belongs in the environment, never in models.toml.
LM_EVAL_SECRET_ARGS = ("key", "token", "password", "secret")


@dataclass(frozen=True)
class BackendOptions:
    """A non-default backend's settings (see the module docstring); unused fields keep defaults."""

    kind: str
    base_url: str = ""
    model: str = ""
    endpoint: str = "chat"
    api_key_env: str = ""
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    lm_eval_model: str = ""
    model_args: str = ""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The backend's own fields only (for the run's resolved config)."""
        d = asdict(self)
        return {"kind": self.kind, **{k: d[k] for k in FIELDS_BY_BACKEND[self.kind]}}

    def identity(self) -> dict[str, Any]:
        """What of these settings changes outputs (part of the generation cache key)."""
        version = BACKEND_VERSIONS[self.kind]
        if self.kind == "openai":
            return {"backend": "openai", "model": self.model, "endpoint": self.endpoint,
                    "extra_body": self.extra_body, "version": version}
        if self.kind == "lm-eval":
            args = {k: v for k, v in parse_model_args(self.model_args).items()
                    if k not in LM_EVAL_OPERATIONAL_ARGS}
            return {"backend": "lm-eval", "lm_eval_model": self.lm_eval_model,
                    "model_args": args, "version": version}
        return {"backend": "vllm", "version": version}


def parse_model_args(text: str) -> dict[str, str]:
    """lm-eval's "k1=v1,k2=v2" argument string as a dict (values kept as written)."""
    out: dict[str, str] = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"model_args: expected key=value, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def parse_backend(entry: dict[str, Any], where: str) -> BackendOptions | None:
    """The backend fields of a registry entry, checked; None for the default transformers."""
    kind = entry.get("backend", "transformers")
    expect(kind, str, where, "backend")
    if kind not in BACKENDS:
        raise ConfigError(f"{where}: backend must be one of {', '.join(BACKENDS)}, got {kind!r}")
    own = FIELDS_BY_BACKEND.get(kind, {})
    stray = sorted(k for k in entry if k in ALL_FIELDS and k not in own)
    if stray:
        raise ConfigError(f"{where}: {', '.join(stray)} only apply to another backend (this "
                          f"variant's backend is {kind!r})")
    if kind == "transformers":
        return None
    values = {k: entry.get(k, default) for k, default in own.items()}
    for k, default in own.items():
        types: Any = (int, float) if isinstance(default, float) else type(default)
        expect(values[k], types, where, k)
    if kind == "openai":
        _check_openai(values, where)
    elif kind == "lm-eval":
        _check_lm_eval(values, where)
    else:
        if values["tensor_parallel_size"] < 1 or values["max_model_len"] < 0:
            raise ConfigError(f"{where}: tensor_parallel_size must be >= 1 and max_model_len "
                              f">= 0 (0: the model's own)")
        if not 0 < values["gpu_memory_utilization"] <= 1:
            raise ConfigError(f"{where}: gpu_memory_utilization must be in (0, 1]")
    floats = {k: float(v) for k, v in values.items() if isinstance(own[k], float)}
    return BackendOptions(kind=kind, **{**values, **floats})


def _check_openai(v: dict[str, Any], where: str) -> None:
    if not v["base_url"]:
        raise ConfigError(f"{where}: backend 'openai' needs base_url (e.g. "
                          f"\"http://127.0.0.1:8000/v1\")")
    if not v["base_url"].startswith(("http://", "https://")):
        raise ConfigError(f"{where}: base_url must start with http:// or https://")
    if not v["model"]:
        raise ConfigError(f"{where}: backend 'openai' needs model (the name the server serves)")
    if v["endpoint"] not in ENDPOINTS:
        raise ConfigError(f"{where}: endpoint must be one of {', '.join(ENDPOINTS)}, "
                          f"got {v['endpoint']!r}")
    for k, low in (("max_concurrency", 1), ("max_retries", 0), ("timeout_s", 0.001),
                   ("backoff_s", 0), ("max_backoff_s", 0)):
        if v[k] < low:
            raise ConfigError(f"{where}: {k} must be >= {low}, got {v[k]!r}")
    reserved = sorted(set(v["extra_body"]) & {"model", "messages", "prompt", "max_tokens",
                                              "temperature", "top_p", "seed", "stream", "n"})
    if reserved:
        raise ConfigError(f"{where}: extra_body may not set {', '.join(reserved)} (the harness "
                          f"sets them from the variant's decoding)")
    v["base_url"] = v["base_url"].rstrip("/")


def _check_lm_eval(v: dict[str, Any], where: str) -> None:
    if not v["lm_eval_model"]:
        raise ConfigError(f"{where}: backend 'lm-eval' needs lm_eval_model (e.g. \"hf\", "
                          f"\"vllm\", \"local-completions\")")
    if not v["model_args"]:
        raise ConfigError(f"{where}: backend 'lm-eval' needs model_args (e.g. "
                          f"\"pretrained=/path/to/model\")")
    try:
        args = parse_model_args(v["model_args"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    secret = sorted(k for k in args if k.lower() in LM_EVAL_SECRET_ARGS
                    or k.lower().endswith(tuple("_" + s for s in LM_EVAL_SECRET_ARGS)))
    if secret:
        raise ConfigError(f"{where}: model_args may not hold {', '.join(secret)}; put secrets in "
                          f"the environment (lm-eval's API models read OPENAI_API_KEY)")
