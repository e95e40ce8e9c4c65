"""The HTTP client for OpenAI-compatible endpoints, shared by the LLM judge and the openai
generation backend: the client, retries, concurrency, and masking of keys in what is shown."""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from harness.core.errors import ConfigError

log = logging.getLogger(__name__)

#: HTTP statuses below 500 that are retried (timeout, conflict, too early, rate limit).
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
#: Attempts, and the pause between them, before "cannot connect" (refused, unknown host) is fatal.
CONNECT_ATTEMPTS = 2
CONNECT_PAUSE_S = 0.25


def mask(text: str, key: str) -> str:
    """Text with the key (when at least 4 characters), sk-... and Bearer tokens masked."""
    if len(key) >= 4:
        text = text.replace(key, "***")
    text = re.sub(r"\bsk-[A-Za-z0-9*_\-.]{3,}", "sk-***", text)
    return re.sub(r"\bBearer\s+\S+", "Bearer ***", text)


def mask_data(obj: Any, key: str) -> Any:
    """mask applied through dicts, lists and tuples; a list of byte values (a logprob token's
    `bytes`) that decodes to text with a secret in it is replaced by the masked text's bytes."""
    if isinstance(obj, str):
        return mask(obj, key)
    if isinstance(obj, dict):
        return {mask_data(k, key): mask_data(v, key) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        if obj and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256
                       for b in obj):
            text = bytes(obj).decode("utf-8", errors="replace")
            masked = mask(text, key)
            if masked != text:
                return list(masked.encode("utf-8"))
        return [mask_data(v, key) for v in obj]
    return obj


def _cannot_connect(exc: BaseException) -> bool:
    """True for a failure to open a connection at all (refused, unknown host, no route), as
    opposed to one dropped mid-request; httpx, httpx2 and httpcore name it ConnectError."""
    return any(c.__name__ == "ConnectError" for c in type(exc).__mro__)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def safe_url(url: str) -> str:
    """A URL without user:password@."""
    return re.sub(r"//[^/@]*@", "//", url)


def one_line(text: str, limit: int = 200) -> str:
    """The text on one line (runs of whitespace made one space), cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Stopped(Exception):
    """Another request failed for good, or the consumer stopped; this one gives up quietly."""


class RetryNotices:
    """Retry warnings kept to one line: rewritten in place when stderr is a terminal (then one
    summary line at the end), else logged once per kind of fault, to `logger` (by default this
    module's)."""

    def __init__(self, label: str, logger: logging.Logger | None = None) -> None:
        self.label = label  # "judge NAME" or "model NAME": the start of every line
        self._log = logger or log
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._line_open = False

    def reset(self) -> None:
        """Forget earlier retries (a new batch starts)."""
        with self._lock:
            self._counts.clear()

    def note(self, kind: str, message: str) -> None:
        """Report one retry; kind groups faults of the same sort ("HTTP 503", "timeout")."""
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            total = sum(self._counts.values())
            if _is_tty(sys.stderr):
                line = f"{self.label}: {message} [{total} retries so far]"
                width = max(20, shutil.get_terminal_size().columns - 1)
                self._write("\r\x1b[K" + one_line(line, width))
                self._line_open = True
            elif self._counts[kind] == 1:
                self._log.warning("%s: %s (further retries after %s are not reported)",
                                  self.label, message, kind)

    def finish(self) -> None:
        """Replace the in-place line, if any, with one summary line."""
        with self._lock:
            if not self._line_open:
                return
            self._line_open = False
            self._write("\r\x1b[K")
            kinds = ", ".join(f"{k} x{n}" for k, n in self._counts.items())
            self._log.warning("%s: %d retries (%s)", self.label, sum(self._counts.values()),
                              kinds)

    @staticmethod
    def _write(text: str) -> None:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # stderr closed or absent
            pass


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint as its client and retry rules see it (a judge's, or a
    generation backend's): label starts every message ("judge NAME", "model NAME")."""

    label: str
    base_url: str
    model: str
    api_key_env: str
    max_retries: int
    timeout_s: float
    backoff_s: float
    max_backoff_s: float
    fatal: type[Exception]  # raised for what retrying will not fix (auth, bad request, ...)
    transient: type[Exception]  # raised once the retries are used up


def make_client(endpoint: Endpoint, http_client: Any = None) -> Any:
    """An openai client for the endpoint (its own retries off: post_with_retries does them); the
    key is read from the environment variable the endpoint names, never from a file. Unless a
    client is passed in (tests fake the wire), a reply must arrive within timeout_s of its
    request: the client's own timeout bounds each read, so a server that trickles its reply a
    byte at a time would otherwise hold a request forever."""
    import openai  # deferred: runs without an OpenAI-compatible endpoint never import it

    env = endpoint.api_key_env
    key = os.environ.get(env, "") if env else "no-key"
    if not key:
        raise ConfigError(f"{endpoint.label} reads its API key from the environment variable "
                          f"{env}, which is not set")
    if http_client is None:
        http_client = with_deadline(openai.DefaultHttpxClient(timeout=endpoint.timeout_s),
                                    endpoint.timeout_s)
    return openai.OpenAI(api_key=key, base_url=endpoint.base_url, timeout=endpoint.timeout_s,
                         max_retries=0, http_client=http_client)


def with_deadline(client: Any, seconds: float) -> Any:
    """The client with each of its transports (the default one and any proxy mounts it took
    from the environment) wrapped so that a reply's body must arrive within `seconds` of the
    request's start; past it, reading fails as a read timeout does (and is retried as one).
    Headers are bounded per read by the client's timeout."""
    import httpx2  # the openai client's HTTP library

    class DeadlineStream(httpx2.SyncByteStream):
        def __init__(self, inner: Any, deadline: float) -> None:
            self.inner, self.deadline = inner, deadline

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self.inner:
                if time.monotonic() > self.deadline:
                    raise httpx2.ReadTimeout(f"the reply took longer than {seconds:g}s")
                yield chunk

        def close(self) -> None:
            self.inner.close()

    class DeadlineTransport(httpx2.BaseTransport):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def handle_request(self, request: Any) -> Any:
            deadline = time.monotonic() + seconds
            response = self.inner.handle_request(request)
            response.stream = DeadlineStream(response.stream, deadline)
            return response

        def close(self) -> None:
            self.inner.close()

    client._transport = DeadlineTransport(client._transport)
    client._mounts = {pattern: None if t is None else DeadlineTransport(t)
                      for pattern, t in client._mounts.items()}
    return client


def endpoint_key(endpoint: Endpoint) -> str:
    """The API key the endpoint's environment variable holds ("" when none), for masking."""
    return os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""


def post_with_retries(endpoint: Endpoint, send: Any, check: Any, notices: RetryNotices,
                      stop: threading.Event, scrub: Any) -> tuple[dict[str, Any], int]:
    """One request with bounded retries; returns the JSON body and the attempts used.

    send() makes the request (a `with_raw_response` call); check(body) validates a parsed body.
    Rate limits (408/409/425/429), 5xx, timeouts and dropped connections are retried with
    exponential backoff (or Retry-After); 401/403, 404, other 4xx and a refused connection stop at
    once with one line (endpoint.fatal) that never shows the key; retries used up raise
    endpoint.transient. scrub(text) masks the key in anything shown.
    """
    import openai

    where = safe_url(endpoint.base_url)
    label = endpoint.label
    connect_failures = 0
    for attempt in range(1, endpoint.max_retries + 2):
        if stop.is_set():
            raise Stopped()
        retry_after = None
        try:
            raw = send()
            try:
                body = json.loads(raw.text)
            except ValueError:
                reason, kind = f"malformed reply (not JSON) from {where}", "malformed reply"
            else:
                return check(body), attempt
        except openai.APIStatusError as e:
            if stop.is_set():
                raise Stopped() from None
            status = e.status_code
            if status in (401, 403):
                who = (f"the key in ${endpoint.api_key_env}" if endpoint.api_key_env
                       else "the request")
                raise endpoint.fatal(f"{label}: {where} refused {who} (HTTP {status}); check "
                                     f"the API key and its permissions") from None
            if status == 404:
                raise endpoint.fatal(f"{label}: {where} answered HTTP 404 for model "
                                     f"{endpoint.model!r} (unknown model, or base_url lacks the "
                                     f"API path): {_server_message(e, scrub)}") from None
            if status not in RETRYABLE_STATUS and status < 500:
                raise endpoint.fatal(f"{label}: {where} rejected the request (HTTP {status}, "
                                     f"model {endpoint.model!r}): {_server_message(e, scrub)}"
                                     ) from None
            reason = f"HTTP {status} from {where}: {_server_message(e, scrub)}"
            kind = f"HTTP {status}"
            retry_after = _retry_after(e.response.headers.get("retry-after"))
        except openai.APITimeoutError:
            if stop.is_set():
                raise Stopped() from None
            reason, kind = f"no reply from {where} within {endpoint.timeout_s:g}s", "timeout"
        except openai.APIConnectionError as e:
            if stop.is_set():
                raise Stopped() from None
            cause = e.__cause__ or e
            detail = safe_url(one_line(str(cause) or type(cause).__name__))
            if _cannot_connect(cause):  # refused, unknown host: fatal after a quick retry
                connect_failures += 1
                if connect_failures >= CONNECT_ATTEMPTS or attempt > endpoint.max_retries:
                    raise endpoint.fatal(f"{label}: cannot reach {where} ({scrub(detail)}); is "
                                         f"the server running?") from None
                if stop.wait(min(endpoint.backoff_s, CONNECT_PAUSE_S)):
                    raise Stopped() from None
                continue
            reason, kind = f"connection to {where} lost ({detail})", "connection lost"
        if attempt > endpoint.max_retries:
            raise endpoint.transient(f"{label}: giving up after {attempt} attempt(s): "
                                     f"{scrub(reason)}") from None
        delay = min(endpoint.max_backoff_s, endpoint.backoff_s * 2 ** (attempt - 1))
        delay = retry_after if retry_after is not None else random.uniform(delay / 2, delay)
        delay = min(delay, endpoint.max_backoff_s)
        notices.note(kind, f"{scrub(reason)}; retry {attempt}/{endpoint.max_retries} "
                           f"in {delay:.2f}s")
        if stop.wait(delay):
            raise Stopped()
    raise AssertionError("unreachable")


def _server_message(e: Any, scrub: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message") or body.get("detail") or body
    return scrub(str(body) if body else type(e).__name__)


def run_concurrently(n: int, work: Any, max_concurrency: int, name: str,
                     on_abandon: Any = None) -> Iterator[tuple[int, Any]]:
    """Yield (i, work(i, stop)) for i in range(n) as each completes, with at most max_concurrency
    daemon threads in flight. A work item that fails for good stops new ones and its error is
    raised here; stopping early (closing the generator, Ctrl-C, that error) returns at once,
    abandoning requests in flight (on_abandon() is then called, e.g. to close the client)."""
    if n <= 0:
        return
    stop = threading.Event()
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n):
        todo.put(i)
    done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()

    def worker() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, work(i, stop)))
            except Stopped:
                return
            except BaseException as e:  # handed to the consumer, which raises it
                stop.set()  # no new requests once one has failed for good
                done.put((i, _Failed(e)))
                return

    for k in range(min(max_concurrency, n)):
        threading.Thread(target=worker, name=f"{name}-{k}", daemon=True).start()
    finished = False
    try:
        for _ in range(n):  # a worker that fails for good sends its error first
            i, got = done.get()
            if isinstance(got, _Failed):
                raise got.error
            yield i, got
        finished = True
    finally:
        stop.set()
        if not finished and on_abandon is not None:
            on_abandon()


@dataclass(frozen=True)
class _Failed:
    """A work item's error, carried to the consumer (a result may itself be an exception)."""

    error: BaseException
