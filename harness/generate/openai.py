"""The openai generation backend: any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp).

One request per prompt, max_concurrency in flight (threads), with the client, retry and error
rules it shares with the LLM judge (harness.core.http): rate limits (429), 5xx, timeouts and
dropped connections are retried with backoff; 401/403, 400, 404 and a refused connection stop the
run at once with one line that never shows the key. Greedy decoding is temperature 0; sampling
sends temperature, top_p and the seed. The chat endpoint receives the messages (the server
applies its chat template); the completions endpoint receives the prompt text the harness
formatted.

finish_reason "length" means the cap was hit; anything else ("stop": EOS or a server-side stop
token, "content_filter", ...) means the response ended on its own and is recorded as "eos", with
the server's own reason, its usage and the attempts in the record's `info`. n_tokens is the
server's completion_tokens (vLLM counts the EOS token: one more than the transformers backend
for a response that ended on EOS); without usage, the local tokenizer's count, else words.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from harness.core.errors import BackendError, ConfigError, TransientBackendError
from harness.core.http import (
    Endpoint,
    RetryNotices,
    endpoint_key,
    make_client,
    mask,
    mask_data,
    one_line,
    post_with_retries,
    run_concurrently,
    safe_url,
)
from harness.generate.backends import (
    Generation,
    cannot_score,
    chat_messages,
    served_output_identity,
    template_prompt,
)
from harness.models.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenAIModel:
    """A variant served by an OpenAI-compatible server; http_client lets tests fake the wire."""

    spec: ModelSpec
    tokenizer: Any = None
    http_client: Any = None


def endpoint_of(spec: ModelSpec) -> Endpoint:
    """The variant's endpoint settings as the shared retry rules read them."""
    o = spec.backend_options
    return Endpoint(label=f"model {spec.name}", base_url=o.base_url, model=o.model,
                    api_key_env=o.api_key_env, max_retries=o.max_retries, timeout_s=o.timeout_s,
                    backoff_s=o.backoff_s, max_backoff_s=o.max_backoff_s, fatal=BackendError,
                    transient=TransientBackendError)


def request_kwargs(spec: ModelSpec, prompt: str) -> dict[str, Any]:
    """The create() arguments for one prompt (messages JSON for chat, text for completions)."""
    o, dec = spec.backend_options, spec.decoding
    kwargs: dict[str, Any] = {"model": o.model, "max_tokens": dec.max_new_tokens}
    if dec.do_sample:
        kwargs.update(temperature=dec.temperature, top_p=dec.top_p, seed=dec.seed)
    else:
        kwargs["temperature"] = 0.0
    if o.endpoint == "chat":
        kwargs["messages"] = json.loads(prompt)
    else:
        kwargs["prompt"] = prompt
    if o.extra_body:
        kwargs["extra_body"] = dict(o.extra_body)
    return kwargs


def generate(model: OpenAIModel, prompts: Sequence[str]) -> Iterator[tuple[int, Generation]]:
    """Yield (index, Generation) as each request completes, max_concurrency in flight."""
    spec = model.spec
    if not prompts:
        return
    endpoint = endpoint_of(spec)
    key = endpoint_key(endpoint)
    client = make_client(endpoint, model.http_client)
    api = client.chat.completions if spec.backend_options.endpoint == "chat" \
        else client.completions
    notices = RetryNotices(endpoint.label, log)

    def scrub(text: str) -> str:
        return one_line(mask(text, key), 300)

    def check(body: Any) -> dict[str, Any]:
        if isinstance(body, dict) and isinstance(body.get("choices"), list) and body["choices"] \
                and isinstance(body["choices"][0], dict):
            return body
        err = body.get("error") if isinstance(body, dict) else None
        msg = err.get("message", err) if isinstance(err, dict) else err
        detail = f": {scrub(str(msg))}" if msg else ""
        raise BackendError(f"{endpoint.label}: reply from {safe_url(endpoint.base_url)} has no "
                           f"choices{detail}")

    def work(i: int, stop: threading.Event) -> Generation:
        kwargs = request_kwargs(spec, prompts[i])
        t0 = time.perf_counter()
        body, attempts = post_with_retries(
            endpoint, lambda: api.with_raw_response.create(**kwargs), check, notices, stop,
            scrub)
        return _generation(model, body, attempts, time.perf_counter() - t0, key)

    def close() -> None:
        if model.http_client is None:  # a client passed in is the caller's to close
            client.close()

    notices.reset()
    finished = False
    try:
        yield from run_concurrently(len(prompts), work, spec.backend_options.max_concurrency,
                                    "openai-generate", close)
        finished = True
    finally:
        notices.finish()
        if finished:
            close()


def _is_count(v: Any) -> bool:
    """A whole number >= 0 (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _count(model: OpenAIModel, text: str) -> tuple[int, str]:
    if model.tokenizer is not None:
        return len(model.tokenizer(text, add_special_tokens=False)["input_ids"]), "tokenizer"
    return len(text.split()), "words"


def _generation(model: OpenAIModel, body: dict[str, Any], attempts: int, seconds: float,
                key: str) -> Generation:
    """A reply body as a Generation (the key, if a server echoed it, is masked)."""
    choice = body["choices"][0]
    if model.spec.backend_options.endpoint == "chat":
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
    else:
        text = choice.get("text")
    text = text if isinstance(text, str) else ""
    if len(key) >= 4:
        text = text.replace(key, "***")
    raw_finish = choice.get("finish_reason")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
    n_tokens = usage.get("completion_tokens") if usage else None
    info: dict[str, Any] = {"backend": "openai", "finish_reason": raw_finish, "usage": usage,
                            "attempts": attempts, "seconds": round(seconds, 4)}
    if not _is_count(n_tokens):
        if n_tokens is not None:  # a server's impossible count is not stored as a count
            info["usage_rejected"] = f"completion_tokens {n_tokens!r:.40} is not a count"
        n_tokens, info["n_tokens_from"] = _count(model, text)
    n_prompt = usage.get("prompt_tokens") if usage else None
    if not _is_count(n_prompt):
        if n_prompt is not None:
            info["usage_rejected_prompt"] = f"prompt_tokens {n_prompt!r:.40} is not a count"
        n_prompt = 0
    return Generation(output=text.strip(), n_prompt_tokens=n_prompt, n_tokens=n_tokens,
                      finish_reason="length" if raw_finish == "length" else "eos",
                      batch_seconds=round(seconds, 3), batch_size=1,
                      info=mask_data(info, key))


class OpenAIBackend:
    """An OpenAI-compatible server (`base_url`, `served_model`, `endpoint` in models.toml)."""

    def load_tokenizer(self, spec: ModelSpec) -> Any | None:
        if not spec.source:
            return None
        from harness.generate.transformers import load_tokenizer  # torch: a local tokenizer

        return load_tokenizer(spec)

    def format_prompt(self, spec: ModelSpec, tokenizer: Any, instruction: str) -> str:
        """Chat endpoint: the messages as canonical JSON (the server applies its own chat
        template); completions: the prompt text a local tokenizer makes."""
        if spec.backend_options.endpoint == "chat":
            if spec.prompt_format != "chat_template":
                raise ConfigError(f"{spec.name}: endpoint 'chat' sends messages and the server "
                                  f"applies its chat template; prompt_format \"plain\" needs "
                                  f"endpoint = \"completions\"")
            return json.dumps(chat_messages(spec, instruction), ensure_ascii=False,
                              separators=(",", ":"))
        if spec.prompt_format != "plain" and tokenizer is None:
            raise ConfigError(f"{spec.name}: prompt_format \"chat_template\" needs a local "
                              f"tokenizer here; set source/path (or model_id) to the served "
                              f"model's tokenizer, or use endpoint = \"chat\"")
        return template_prompt(spec, tokenizer, instruction)

    def load_model(self, spec: ModelSpec, tokenizer: Any, http_client: Any = None
                   ) -> OpenAIModel:
        return OpenAIModel(spec=spec, tokenizer=tokenizer, http_client=http_client)

    def generate(self, loaded: OpenAIModel, prompts: Sequence[str], batch_size: int,
                 on_progress: Any = None) -> Iterator[tuple[int, Generation]]:
        return generate(loaded, prompts)

    def fingerprints(self, spec: ModelSpec, tokenizer: Any) -> dict[str, str]:
        return {}  # its identity is the served name and revision

    def output_identity(self, spec: ModelSpec, prints: dict[str, str]) -> dict[str, Any]:
        return served_output_identity(spec, prints)

    def check_scoring(self, spec: ModelSpec) -> None:
        raise cannot_score(spec, "needs log-likelihoods, which backend 'openai' does not give; "
                                 "run it through backend \"lm-eval\" (lm_eval_model = "
                                 "\"local-completions\" against the same server) or leave the "
                                 "task out")

    def scoring_label(self, spec: ModelSpec) -> str:
        return "harness"


BACKEND = OpenAIBackend()
