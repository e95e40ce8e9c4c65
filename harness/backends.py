"""Generation backends behind one interface: a variant's tokenizer, prompt text, model and outputs.

The runner asks this module, never a backend directly: `load_tokenizer`, `format_prompt`,
`load_model`, `generate` and `fingerprints` dispatch on the variant's `backend` (see
harness.backend_config). Each backend's loaded state is a dataclass with a `spec` field, so
variants of one weights identity share it (relabelled with `dataclasses.replace`), and
`generate` yields `(index, harness.generation.Generation)` like the transformers backend:
finish_reason "eos" (ended on its own) or "length" (hit max_new_tokens), token counts, and
backend details (server usage, raw finish reason) in `info`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from harness.errors import ConfigError
from harness.generation import DEFAULT_BATCH_SIZE, Generation
from harness.registry import PLAIN_TEMPLATE, ModelSpec


class Loaded(Protocol):
    """A backend's loaded state for one variant (relabelled per variant with replace)."""

    spec: ModelSpec


def load_tokenizer(spec: ModelSpec) -> Any | None:
    """The variant's local tokenizer, or None where the backend has none (a server without a
    `source` to read its tokenizer from)."""
    from harness import generation

    if spec.backend == "openai" and not spec.source:
        return None
    if spec.backend == "lm-eval":
        from harness.lm_eval_model import lm_eval_tokenizer

        return lm_eval_tokenizer(spec)
    return generation.load_tokenizer(spec)


def chat_messages(spec: ModelSpec, instruction: str) -> list[dict[str, str]]:
    """The chat messages a chat endpoint receives: the system prompt, if any, then the user's."""
    messages = [{"role": "user", "content": instruction}]
    if spec.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return messages


def format_prompt(spec: ModelSpec, tokenizer: Any, instruction: str) -> str:
    """The exact prompt the variant's engine receives: prompt text, or for a chat endpoint the
    messages as canonical JSON (the server applies its own chat template)."""
    from harness import generation

    if spec.backend == "openai" and spec.backend_options.endpoint == "chat":
        if spec.prompt_format != "chat_template":
            raise ConfigError(f"{spec.name}: endpoint 'chat' sends messages and the server "
                              f"applies its chat template; prompt_format \"plain\" needs "
                              f"endpoint = \"completions\"")
        return json.dumps(chat_messages(spec, instruction), ensure_ascii=False,
                          separators=(",", ":"))
    if spec.prompt_format == "plain":
        return PLAIN_TEMPLATE.format(instruction=instruction)
    if tokenizer is None:
        hint = ("set source/path (or model_id) to the served model's tokenizer, or use endpoint "
                "= \"chat\"" if spec.backend == "openai" else
                "add tokenizer=... to model_args")
        raise ConfigError(f"{spec.name}: prompt_format \"chat_template\" needs a local "
                          f"tokenizer here; {hint}")
    return generation.format_prompt(spec, tokenizer, instruction)


def load_model(spec: ModelSpec, tokenizer: Any, http_client: Any = None) -> Loaded:
    """The variant's engine, ready to generate (a server needs no loading: its settings)."""
    from harness import generation

    if spec.backend == "openai":
        from harness.openai_generation import OpenAIModel

        return OpenAIModel(spec=spec, tokenizer=tokenizer, http_client=http_client)
    if spec.backend == "lm-eval":
        from harness.lm_eval_model import load_lm_eval_model

        return load_lm_eval_model(spec, tokenizer)
    if spec.backend == "vllm":
        from harness.vllm_generation import load_vllm

        return load_vllm(spec, tokenizer)
    return generation.load_model(spec, tokenizer)


def generate(loaded: Loaded, prompts: Sequence[str],
             batch_size: int = DEFAULT_BATCH_SIZE,
             on_progress: Callable[[float], None] | None = None,
             ) -> Iterator[tuple[int, Generation]]:
    """Yield (index, Generation) for each prompt as the backend finishes it; the transformers
    backend also reports the running batch's progress each step to on_progress."""
    from harness import generation

    backend = loaded.spec.backend
    if backend == "openai":
        from harness.openai_generation import generate as openai_generate

        return openai_generate(loaded, prompts)
    if backend == "lm-eval":
        from harness.lm_eval_model import lm_eval_generate

        return lm_eval_generate(loaded, prompts, batch_size)
    if backend == "vllm":
        from harness.vllm_generation import vllm_generate

        return vllm_generate(loaded, prompts)
    return generation.generate(loaded, prompts, batch_size, on_progress=on_progress)


def fingerprints(spec: ModelSpec, tokenizer: Any) -> dict[str, str]:
    """Hashes that join a variant's output identity: its tokenizer and local weights' content
    (and the GGUF conversion version); for lm-eval, the tokenizer and a local `pretrained`
    folder's content; none for a server (its identity is the served name and revision)."""
    from harness.generation import tokenizer_fingerprint
    from harness.weights import CONVERSION_VERSION, local_fingerprint

    if spec.backend == "openai":
        return {}
    prints = {} if tokenizer is None else {"tokenizer": tokenizer_fingerprint(tokenizer)}
    if spec.backend == "lm-eval":
        from harness.lm_eval_model import pretrained_fingerprint

        local = pretrained_fingerprint(spec)
        return {**prints, "local_weights": local} if local else prints
    if spec.source == "local":
        prints["local_weights"] = local_fingerprint(spec)
    if spec.source == "pypi" or spec.gguf_file:
        prints["conversion"] = str(CONVERSION_VERSION)
    return prints


def scoring_backend(spec: ModelSpec) -> str:
    """The label of what computes a variant's log-likelihoods (part of the score key)."""
    return f"lm-eval:{spec.backend_options.lm_eval_model}" if spec.backend == "lm-eval" \
        else "harness"


def check_tasks(specs: Sequence[ModelSpec], task_kinds: Sequence[str]) -> None:
    """Refuse, before any work, a task a variant's backend cannot run (one line)."""
    if "ranking" not in task_kinds:
        return
    for spec in specs:
        if spec.backend == "openai":
            raise ConfigError(
                f"{spec.name}: the ranking task needs log-likelihoods, which backend 'openai' "
                f"does not give; run it through backend \"lm-eval\" (lm_eval_model = "
                f"\"local-completions\" against the same server) or leave the task out")
        if spec.backend == "lm-eval":
            from harness.backend_config import parse_model_args

            args = parse_model_args(spec.backend_options.model_args)
            if not (args.get("tokenizer") or args.get("pretrained")):
                raise ConfigError(f"{spec.name}: the ranking task counts tokens with the "
                                  f"model's tokenizer; add tokenizer=... to model_args")
