"""The generation contract: the Backend protocol, what a backend yields (Generation), and the
name -> module map that loads one backend on first use (no torch, vllm or lm_eval here).

A backend is one module of this package with a module-level `BACKEND` implementing Backend:
its tokenizer, prompt text, loaded engine, outputs, fingerprints, output identity (what its
generations are keyed by) and whether it can score log-likelihoods. Adding one is a module
plus a line in BACKENDS (and its config fields in harness.models.backend_config).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.core.errors import ConfigError, WeightsError
from harness.models.builds import weights_identity
from harness.models.rules_config import RULES_VERSION
from harness.models.spec import PLAIN_TEMPLATE, ModelSpec

#: backend name (models.toml `backend`) -> the module holding its BACKEND.
BACKENDS = {
    "transformers": "harness.generate.transformers",
    "openai": "harness.generate.openai",
    "lm-eval": "harness.generate.lm_eval",
    "vllm": "harness.generate.vllm",
}

#: Rows running at once (the transformers backend's default batch).
DEFAULT_BATCH_SIZE = 72

#: Bumped when the local engines change how they turn a prompt into output text.
#: 2: the slot decoder (rows leave the batch as they end, new prompts join; sampling applies
#: only the spec's temperature and top_p, not transformers' implicit top_k=50).
GENERATION_VERSION = 2


@dataclass(frozen=True)
class Generation:
    """One response and how it was produced: finish_reason "eos" (ended on its own) or
    "length" (hit max_new_tokens); backend details (server usage, raw finish reason) in info."""

    output: str
    n_prompt_tokens: int
    n_tokens: int
    finish_reason: str
    batch_seconds: float
    batch_size: int
    info: dict[str, Any] = field(default_factory=dict)


class Loaded(Protocol):
    """A backend's loaded state for one variant (relabelled per variant with replace)."""

    spec: ModelSpec


class Backend(Protocol):
    """One generation engine. Every method takes the variant's spec (or its loaded state)."""

    def load_tokenizer(self, spec: ModelSpec) -> Any | None:
        """The local tokenizer, or None where there is none (a server without a source)."""

    def format_prompt(self, spec: ModelSpec, tokenizer: Any, instruction: str) -> str:
        """The exact prompt the engine receives for an instruction."""

    def load_model(self, spec: ModelSpec, tokenizer: Any, http_client: Any = None) -> Loaded:
        """The engine, ready to generate."""

    def generate(self, loaded: Any, prompts: Sequence[str], batch_size: int,
                 on_progress: Callable[[float], None] | None) -> Iterator[tuple[int, Generation]]:
        """(index, Generation) for each prompt as the engine finishes it."""

    def fingerprints(self, spec: ModelSpec, tokenizer: Any) -> dict[str, str]:
        """Hashes of local content (tokenizer, weights' files) that join the output identity."""

    def output_identity(self, spec: ModelSpec, prints: dict[str, str]) -> dict[str, Any]:
        """Everything that changes the output for a given prompt text (the generation key)."""

    def check_scoring(self, spec: ModelSpec) -> None:
        """Refuse (one ConfigError line) a variant whose log-likelihoods this backend cannot
        give (the ranking task needs them)."""

    def scoring_label(self, spec: ModelSpec) -> str:
        """What computes the variant's log-likelihoods (part of the score key)."""


def get(name: str) -> Backend:
    """The backend registered as `name` (its module imported on first use)."""
    return importlib.import_module(BACKENDS[name]).BACKEND


# --------------------------------------------------------- shared by the backends' modules

def model_eos_ids(model: Any = None, tokenizer: Any = None) -> list[int]:
    """EOS ids: the model's generation_config.eos_token_id (int or list), else the tokenizer's."""
    eos = None
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        eos = gen.eos_token_id
    if eos is None and model is not None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise WeightsError("the model and tokenizer define no EOS token id")
    if hasattr(eos, "tolist"):  # a tensor
        eos = eos.tolist()
    ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    return list(dict.fromkeys(ids))


def chat_messages(spec: ModelSpec, instruction: str) -> list[dict[str, str]]:
    """The chat messages for an instruction: the system prompt, if any, then the user's."""
    messages = [{"role": "user", "content": instruction}]
    if spec.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return messages


def template_prompt(spec: ModelSpec, tokenizer: Any, instruction: str) -> str:
    """The prompt text a local tokenizer makes: the study's plain template, or its chat
    template applied to the messages."""
    if spec.prompt_format == "plain":
        return PLAIN_TEMPLATE.format(instruction=instruction)
    if not getattr(tokenizer, "chat_template", None):
        raise WeightsError(f"{spec.name}: prompt_format = \"chat_template\" but the tokenizer has "
                           f"none; use prompt_format = \"plain\"")
    return tokenizer.apply_chat_template(chat_messages(spec, instruction), tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(spec: ModelSpec, tokenizer: Any, prompt: str) -> list[int]:
    """A prompt's token ids as generation feeds them (plain prompts get the tokenizer's BOS; a
    chat template writes its own special tokens). Tuning encodes its prompts the same way."""
    add_special = spec.prompt_format == "plain"
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def local_output_identity(spec: ModelSpec, prints: dict[str, str],
                          extra: dict[str, Any]) -> dict[str, Any]:
    """The output identity of an engine that runs the weights here (transformers, vllm)."""
    return {**extra, "weights": weights_identity(spec), "dtype": spec.dtype,
            "decoding": spec.decoding.identity(), "generation_version": GENERATION_VERSION,
            "rules": None if spec.rules is None else {**spec.rules.as_dict(),
                                                      "version": RULES_VERSION},
            **prints}


def served_output_identity(spec: ModelSpec, prints: dict[str, str]) -> dict[str, Any]:
    """A server's or lm-eval's output identity: its backend identity (served model name,
    endpoint, revision, extra request fields; or lm-eval's model and arguments) with the
    decoding; the prompt text itself (system prompt included) is keyed beside it."""
    return {"weights": weights_identity(spec), "decoding": spec.decoding.identity(), **prints}


def cannot_score(spec: ModelSpec, why: str) -> ConfigError:
    return ConfigError(f"{spec.name}: the ranking task {why}")


# ------------------------------------------------- what the runner calls, for any variant

def load_tokenizer(spec: ModelSpec) -> Any | None:
    return get(spec.backend).load_tokenizer(spec)


def format_prompt(spec: ModelSpec, tokenizer: Any, instruction: str) -> str:
    return get(spec.backend).format_prompt(spec, tokenizer, instruction)


def load_model(spec: ModelSpec, tokenizer: Any, http_client: Any = None) -> Loaded:
    return get(spec.backend).load_model(spec, tokenizer, http_client)


def generate(loaded: Loaded, prompts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
             on_progress: Callable[[float], None] | None = None,
             ) -> Iterator[tuple[int, Generation]]:
    """Yield (index, Generation) for each prompt as the backend finishes it; the transformers
    backend also reports the running batch's progress each step to on_progress."""
    return get(loaded.spec.backend).generate(loaded, prompts, batch_size, on_progress)


def fingerprints(spec: ModelSpec, tokenizer: Any) -> dict[str, str]:
    return get(spec.backend).fingerprints(spec, tokenizer)


def output_identity(spec: ModelSpec, prints: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything about the variant that changes its output for a given prompt text."""
    return get(spec.backend).output_identity(spec, prints or {})


def scoring_backend(spec: ModelSpec) -> str:
    """The label of what computes a variant's log-likelihoods (part of the score key)."""
    return get(spec.backend).scoring_label(spec)


def check_scoring(specs: Sequence[ModelSpec]) -> None:
    """Refuse, before any work, a variant whose backend cannot score log-likelihoods."""
    for spec in specs:
        get(spec.backend).check_scoring(spec)
