"""LLM pairwise judge over any OpenAI-compatible endpoint, after AlpacaEval 2.0's weighted judge.

Protocol of `weighted_alpaca_eval_gpt4_turbo` (alpaca_eval 0.6.6): the judge sees the instruction
and two outputs labelled "m" and "M", answers with one token (max_tokens=1, temperature=1), and the
preference is 2 - P(m) / (P(m) + P(M)) read from the top-5 log-probabilities of that token (a
token missing from the top 5 has probability 0; if neither is there the preference is NaN, which
AlpacaEval drops). The order of the two outputs is swapped per instruction by
`random.Random("is_switched_outputs" + instruction + str(seed)).choices([False, True])[0]` with
seed 0, and a swapped preference p maps back to 3 - p. Identical outputs get 1.5 without a call.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.core.cache import fetch_wheel, installed_file, installed_version
from harness.core.errors import ConfigError, JudgeError, TransientJudgeError, WeightsError
from harness.core.hashing import canonical_json
from harness.core.http import (
    Endpoint,
    RetryNotices,
    make_client,
    mask,
    mask_data,
    one_line,
    post_with_retries,
    run_concurrently,
    safe_url,
)
from harness.judging import JudgeSpec, Judgment, PairwiseItem
from harness.judging.registry import JUDGES_DIR

log = logging.getLogger(__name__)

#: The most characters of a judge's raw reply (and of its text) a record keeps: a server that
#: answers with megabytes would otherwise be stored in the log, the cache and the report.
MAX_STORED_REPLY = 16_000

#: The alpaca-eval release whose wheel is fetched when the package is not installed.
ALPACA_EVAL_PACKAGE = "alpaca-eval"
ALPACA_EVAL_VERSION = "0.6.6"
ALPACA_EVAL_PREFIX = "alpaca_eval:"
MODES = ("alpaca_eval", "both_orders")
PARSERS = ("logprobs", "text")
PLACEHOLDERS = ("instruction", "output_1", "output_2")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

#: Every parameter a judges/<name>.toml [params] table may set, with its default.
DEFAULTS: dict[str, Any] = {
    "model": "",
    "base_url": "https://api.openai.com/v1",
    "api_key_env": "OPENAI_API_KEY",  # NAME of the env var holding the key; "" = no key (local)
    "template": "alpaca_eval:weighted_alpaca_eval_gpt4_turbo",
    "identifiers": ["m", "M"],  # labels of the first and second output shown to the judge
    "parser": "logprobs",
    "top_logprobs": 5,
    "match_stripped_tokens": False,  # also count " M" as "M" (sentencepiece/BPE local judges)
    "temperature": 1.0,
    "max_tokens": 1,
    "mode": "alpaca_eval",
    "seed": 0,
    "max_concurrency": 8,
    "max_retries": 5,
    "timeout_s": 60.0,
    "backoff_s": 1.0,
    "max_backoff_s": 60.0,
    "price_usd_per_1m": {"prompt": 0.0, "completion": 0.0},
}

#: Parameters that do not change verdicts: left out of the recorded spec, so changing them keeps
#: cached judgments valid.
OPERATIONAL_PARAMS = frozenset({"api_key_env", "max_concurrency", "max_retries", "timeout_s",
                                "backoff_s", "max_backoff_s", "price_usd_per_1m"})

#: The message of the preflight request (max_tokens=1: a few tokens in all).
_PREFLIGHT_MESSAGE = "Reply with one letter."


@dataclass(frozen=True)
class LLMJudgeConfig:
    """Resolved parameters of an LLM judge (see DEFAULTS for their meaning)."""

    model: str
    base_url: str
    api_key_env: str
    template: str
    identifiers: tuple[str, str]
    parser: str
    top_logprobs: int
    match_stripped_tokens: bool
    temperature: float
    max_tokens: int
    mode: str
    seed: int
    max_concurrency: int
    max_retries: int
    timeout_s: float
    backoff_s: float
    max_backoff_s: float
    price_usd_per_1m: dict[str, float] = field(default_factory=dict)

    def as_params(self) -> dict[str, Any]:
        """All parameters as plain TOML-like data."""
        d = asdict(self)
        d["identifiers"] = list(self.identifiers)
        return d


def parse_config(params: dict[str, Any], where: str = "judge") -> LLMJudgeConfig:
    """Check a [params] table against DEFAULTS and fill in what it leaves out; one clear error."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(DEFAULTS))}")
    p = {**DEFAULTS, **params}

    def num(key: str, kind: type, low: float) -> Any:
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and v != int(v)):
            raise ConfigError(f"{where}: {key} must be a {kind.__name__}, got {v!r}")
        if v < low:
            raise ConfigError(f"{where}: {key} must be >= {low}, got {v!r}")
        return kind(v)

    for key in ("model", "base_url", "api_key_env", "template"):
        if not isinstance(p[key], str):
            raise ConfigError(f"{where}: {key} must be a string, got {p[key]!r}")
    if not p["model"]:
        raise ConfigError(f"{where}: model is required (the model name the endpoint serves)")
    if not p["base_url"].startswith(("http://", "https://")):
        raise ConfigError(f"{where}: base_url must start with http:// or https://, "
                          f"got {safe_url(p['base_url'])!r}")
    if p["parser"] not in PARSERS:
        raise ConfigError(f"{where}: parser must be one of {', '.join(PARSERS)}, "
                          f"got {p['parser']!r}")
    if p["mode"] not in MODES:
        raise ConfigError(f"{where}: mode must be one of {', '.join(MODES)}, got {p['mode']!r}")
    ids = p["identifiers"]
    if (not isinstance(ids, list | tuple) or len(ids) != 2 or not all(isinstance(i, str) and i
                                                                      for i in ids)
            or ids[0] == ids[1]):
        raise ConfigError(f"{where}: identifiers must be two different non-empty strings, "
                          f"got {ids!r}")
    price = p["price_usd_per_1m"]
    if (not isinstance(price, dict) or set(price) - {"prompt", "completion"}
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
                       for v in price.values())):
        raise ConfigError(f"{where}: price_usd_per_1m must be a table with numbers 'prompt' and "
                          f"'completion' (USD per 1M tokens), got {price!r}")
    if not isinstance(p["match_stripped_tokens"], bool):
        raise ConfigError(f"{where}: match_stripped_tokens must be true or false")
    return LLMJudgeConfig(
        model=p["model"], base_url=p["base_url"].rstrip("/"), api_key_env=p["api_key_env"],
        template=p["template"], identifiers=(ids[0], ids[1]), parser=p["parser"],
        top_logprobs=num("top_logprobs", int, 1), match_stripped_tokens=p["match_stripped_tokens"],
        temperature=num("temperature", float, 0), max_tokens=num("max_tokens", int, 1),
        mode=p["mode"], seed=num("seed", int, -(2**63)),
        max_concurrency=num("max_concurrency", int, 1), max_retries=num("max_retries", int, 0),
        timeout_s=num("timeout_s", float, 0.001), backoff_s=num("backoff_s", float, 0),
        max_backoff_s=num("max_backoff_s", float, 0),
        price_usd_per_1m={"prompt": float(price.get("prompt", 0.0)),
                          "completion": float(price.get("completion", 0.0))},
    )


# ---------------------------------------------------------------- templates


def read_alpaca_eval_file(relpath: str) -> tuple[str, str]:
    """Text of alpaca_eval/evaluators_configs/<relpath> and its source, without importing
    alpaca_eval: from the installed distribution (any version), else from the pinned release's
    wheel, fetched once into the harness cache ($HARNESS_CACHE/wheels)."""
    member = f"alpaca_eval/evaluators_configs/{relpath}"
    path = installed_file(ALPACA_EVAL_PACKAGE, member)
    if path is not None:
        version = installed_version(ALPACA_EVAL_PACKAGE)
        return path.read_text(encoding="utf-8"), f"alpaca-eval {version} (installed)"
    try:
        wheel = fetch_wheel(f"{ALPACA_EVAL_PACKAGE}=={ALPACA_EVAL_VERSION}")
    except WeightsError as e:
        raise ConfigError(
            f"cannot read AlpacaEval's prompt template: package alpaca-eval is not installed and "
            f"its wheel could not be fetched ({one_line(str(e), 200)}); install it with `pip "
            f"install --no-deps alpaca-eval=={ALPACA_EVAL_VERSION}` or point `template` at a "
            f"file under judges/") from None
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member).decode("utf-8"), f"{wheel.name} (wheel)"
    except KeyError:
        raise ConfigError(f"alpaca-eval {ALPACA_EVAL_VERSION} has no evaluator file {relpath!r}; "
                          f"check the template name") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"cannot read {wheel}: {e}; delete it to fetch it again") from None


def load_template(ref: str, judges_dir: Path = JUDGES_DIR) -> tuple[str, str]:
    """Template text and its source for `alpaca_eval:<evaluator>` or a path relative to judges/."""
    if ref.startswith(ALPACA_EVAL_PREFIX):
        evaluator = ref[len(ALPACA_EVAL_PREFIX):]
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", evaluator):
            raise ConfigError(f"bad AlpacaEval evaluator name {evaluator!r}")
        configs, source = read_alpaca_eval_file(f"{evaluator}/configs.yaml")
        m = re.search(r"^\s*prompt_template:\s*[\"']?([^\"'\n#]+?)[\"']?\s*(?:#.*)?$", configs,
                      flags=re.M)
        if not m:
            raise ConfigError(f"AlpacaEval evaluator {evaluator!r} has no prompt_template")
        text, source = read_alpaca_eval_file(m.group(1).strip())
        return text, f"{source}: {m.group(1).strip()}"
    path = Path(ref) if Path(ref).is_absolute() else judges_dir / ref
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except OSError as e:
        raise ConfigError(f"cannot read judge template {path}: {e.strerror or e}") from None


def chatml_to_messages(text: str) -> list[dict[str, str]]:
    """Split an AlpacaEval chat-ml template (<|im_start|>role\\n...<|im_end|>) into chat messages.

    As alpaca_eval's prompt_to_chatml: role = first line, content stripped. A template without
    chat-ml markers is one user message.
    """
    text = text.strip()
    if not text.startswith(IM_START):
        return [{"role": "user", "content": text}]
    if not text.endswith(IM_END):
        raise ConfigError(f"chat-ml template must end with {IM_END}")
    messages = []
    for part in text.split(IM_START)[1:]:
        head, _, body = part.partition("\n")
        role = head.strip()
        msg = {"role": role, "content": body.split(IM_END, 1)[0].strip()}
        if role.startswith("system") and role != "system":  # "system name=example_user"
            msg.update(dict(kv.split("=", 1) for kv in role[len("system"):].split() if "=" in kv))
            msg["role"] = "system"
        messages.append(msg)
    return messages


def fill_messages(messages: Sequence[dict[str, str]],
                  values: dict[str, str]) -> list[dict[str, str]]:
    """Put instruction/output_1/output_2 into the messages in one pass (text inserted is not
    scanned again, so an output containing "{output_2}" stays as written)."""
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in PLACEHOLDERS))
    return [{**m, "content": pattern.sub(lambda g: values[g.group(0)[1:-1]], m["content"])}
            for m in messages]


# ---------------------------------------------------------------- the protocol


def is_swapped(instruction: str, seed: int = 0) -> bool:
    """AlpacaEval's per-instruction random order: True shows output_2 first."""
    return random.Random("is_switched_outputs" + instruction + str(seed)).choices(
        [False, True], k=1)[0]


def preference_from_top_logprobs(top_logprobs: Sequence[dict[str, Any]],
                                 identifiers: Sequence[str], strip: bool = False) -> float:
    """2 - P(first) / (P(first) + P(second)) from one token's top log-probabilities, in the order
    shown to the judge; an identifier missing from the list has probability 0; NaN if both are."""
    found: dict[str, list[float]] = {identifiers[0]: [], identifiers[1]: []}
    for entry in top_logprobs:
        token = entry.get("token")
        if isinstance(token, str) and strip:
            token = token.strip()
        lp = entry.get("logprob")
        if token in found and isinstance(lp, int | float) and not isinstance(lp, bool):
            found[token].append(float(lp))
    first, second = (_logsumexp(found[i]) for i in identifiers)
    if first == second == -math.inf:
        return math.nan
    top = max(first, second)
    p_first = math.exp(first - top) / (math.exp(first - top) + math.exp(second - top))
    return 2.0 - p_first


def preference_from_text(text: str, identifiers: Sequence[str]) -> float:
    """1 if the reply names the first identifier, 2 the second, NaN if neither or both."""
    core = text.strip().strip("\"'`*[]().:,;!").strip()
    if core in identifiers:
        return 1.0 if core == identifiers[0] else 2.0
    hits = {i for i in identifiers if re.search(rf"(?<!\w){re.escape(i)}(?!\w)", text)}
    if len(hits) == 1:
        return 1.0 if identifiers[0] in hits else 2.0
    return math.nan


def combine_both_orders(as_given: float, swapped: float) -> float:
    """One preference from both orders (each already in the item's orientation): 1.5 when they
    pick opposite winners, else their mean; a NaN order yields the other."""
    if math.isnan(as_given) or math.isnan(swapped):
        return swapped if math.isnan(as_given) else as_given
    if (as_given - 1.5) * (swapped - 1.5) < 0:
        return 1.5
    return (as_given + swapped) / 2


def _logsumexp(xs: Sequence[float]) -> float:
    if not xs:
        return -math.inf
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


# ---------------------------------------------------------------- calls


@dataclass(frozen=True)
class _Reply:
    """What one chat completion gave: preference in the shown order, and its accounting."""

    preference: float
    text: str
    choice: dict[str, Any]
    prompt_tokens: int | None
    completion_tokens: int | None
    logprobs_used: bool
    parse: str
    note: str
    attempts: int


class LLMJudge:
    """Pairwise judge that asks an OpenAI-compatible chat endpoint; see the module docstring."""

    def __init__(self, spec: JudgeSpec, config: LLMJudgeConfig, template_text: str,
                 template_source: str = "", http_client: Any = None) -> None:
        self.config = config
        self.template_source = template_source
        self.messages = chatml_to_messages(template_text)
        joined = "\n".join(m["content"] for m in self.messages)
        missing = [k for k in PLACEHOLDERS if "{" + k + "}" not in joined]
        if missing:
            raise ConfigError(f"judge {spec.name}: template {template_source or config.template} "
                              f"lacks {', '.join('{' + k + '}' for k in missing)}")
        params = {k: v for k, v in config.as_params().items() if k not in OPERATIONAL_PARAMS}
        self.spec = JudgeSpec(name=spec.name, kind=spec.kind, params=params, template=template_text)
        self._http_client = http_client
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._notices = RetryNotices(f"judge {spec.name}", log)
        self.endpoint = Endpoint(
            label=f"judge {spec.name}", base_url=config.base_url, model=config.model,
            api_key_env=config.api_key_env, max_retries=config.max_retries,
            timeout_s=config.timeout_s, backoff_s=config.backoff_s,
            max_backoff_s=config.max_backoff_s, fatal=JudgeError, transient=TransientJudgeError)

    # -- public

    def judge(self, items: Sequence[PairwiseItem]) -> Iterator[tuple[int, Judgment]]:
        """Yield (index, judgment) as each request completes, with max_concurrency in flight.

        Stopping early (closing the generator, Ctrl-C, a fatal error) returns at once: requests
        in flight are abandoned to daemon threads, so neither the caller nor exit waits on them.
        """
        if not items:
            return
        client = self._get_client()
        self._notices.reset()
        try:
            yield from run_concurrently(
                len(items), lambda i, stop: self._judge_one(client, items[i], stop),
                self.config.max_concurrency, "llm-judge", lambda: self._abandon(client))
        finally:
            self._notices.finish()

    def judge_one(self, item: PairwiseItem) -> Judgment:
        """Judge a single item (synchronously)."""
        return self._judge_one(self._get_client(), item, threading.Event())

    def preflight(self) -> None:
        """One tiny request (max_tokens=1) that fails fast, as a JudgeError, when the endpoint is
        unreachable, refuses the key or does not serve the model; call it before other work."""
        cfg = self.config
        kwargs: dict[str, Any] = {"model": cfg.model, "max_tokens": 1,
                                  "temperature": cfg.temperature,
                                  "messages": [{"role": "user", "content": _PREFLIGHT_MESSAGE}]}
        if cfg.parser == "logprobs":  # an endpoint that rejects logprobs fails here, not later
            kwargs.update(logprobs=True, top_logprobs=cfg.top_logprobs)
        self._notices.reset()
        try:
            body, _ = self._post(self._get_client(), kwargs, threading.Event())
        finally:
            self._notices.finish()
        if cfg.parser == "logprobs" and _first_top_logprobs(body["choices"][0]) is None:
            log.warning("judge %s: %s returned no log-probabilities; judgments will be parsed "
                        "from the reply text", self.spec.name, safe_url(cfg.base_url))

    # -- internals

    def _get_client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = make_client(self.endpoint, self._http_client)
            return self._client

    def _abandon(self, client: Any) -> None:
        """Close a client we made whose requests were given up, so a later call makes a new one
        (a client passed in by the caller is theirs to close)."""
        if self._http_client is not None:
            return
        with self._client_lock:
            if self._client is client:
                self._client = None
        try:
            client.close()
        except Exception as e:  # best effort: the requests are abandoned anyway
            log.debug("closing the judge client failed: %s", e)

    def _judge_one(self, client: Any, item: PairwiseItem, stop: threading.Event) -> Judgment:
        cfg = self.config
        base = {"judge_model": cfg.model, "mode": cfg.mode}
        if item.output_1.output == item.output_2.output:  # AlpacaEval: a tie, no call
            return Judgment(preference=1.5, raw="", info={
                **base, "order": "none", "identical_outputs": True, "logprobs_used": False,
                "parse": "identical", "prompt_tokens": 0, "completion_tokens": 0,
                "cost_usd": 0.0, "attempts": 0})
        a, b = item.output_1.output, item.output_2.output
        if cfg.mode == "alpaca_eval":
            swapped = is_swapped(item.instruction, cfg.seed)
            r = self._ask(client, item.instruction, *((b, a) if swapped else (a, b)), stop=stop)
            pref = 3.0 - r.preference if swapped else r.preference
            info = {**base, "order": "swapped" if swapped else "as_given", "swapped": swapped,
                    **self._accounting([r])}
            return self._stored(pref, r.choice, info)
        r1 = self._ask(client, item.instruction, a, b, stop=stop)
        r2 = self._ask(client, item.instruction, b, a, stop=stop)
        p1, p2 = r1.preference, 3.0 - r2.preference
        info = {**base, "order": "both", "preference_as_given": p1, "preference_swapped": p2,
                "orders_disagree": (p1 - 1.5) * (p2 - 1.5) < 0, **self._accounting([r1, r2])}
        return self._stored(combine_both_orders(p1, p2),
                            {"as_given": r1.choice, "swapped": r2.choice}, info)

    def _stored(self, preference: float, raw: Any, info: dict[str, Any]) -> Judgment:
        """The judgment as it may reach disk: the API key (and anything key-like) that an
        endpoint echoed back is masked in raw and info, after the preference was read; a reply
        longer than MAX_STORED_REPLY characters is cut, and the record says from how long."""
        text = canonical_json(self._scrub_data(raw))
        info = self._scrub_data(info)
        if len(text) > MAX_STORED_REPLY:
            info["raw_cut_from"] = len(text)
            text = text[:MAX_STORED_REPLY]
        replies = info.get("reply")
        if isinstance(replies, str | list):
            many = replies if isinstance(replies, list) else [replies]
            if any(isinstance(r, str) and len(r) > MAX_STORED_REPLY for r in many):
                info["reply_cut_from"] = [len(r) if isinstance(r, str) else 0 for r in many]
                cut = [r[:MAX_STORED_REPLY] if isinstance(r, str) else r for r in many]
                info["reply"] = cut if isinstance(replies, list) else cut[0]
        return Judgment(preference=preference, raw=text, info=info)

    def _accounting(self, replies: Sequence[_Reply]) -> dict[str, Any]:
        price = self.config.price_usd_per_1m
        tokens = {k: None if any(getattr(r, k) is None for r in replies)
                  else sum(getattr(r, k) for r in replies)
                  for k in ("prompt_tokens", "completion_tokens")}
        cost = (None if None in tokens.values() else
                (tokens["prompt_tokens"] * price["prompt"]
                 + tokens["completion_tokens"] * price["completion"]) / 1e6)
        notes = [r.note for r in replies if r.note]
        info: dict[str, Any] = {
            "reply": replies[0].text if len(replies) == 1 else [r.text for r in replies],
            "logprobs_used": all(r.logprobs_used for r in replies),
            "parse": replies[0].parse if len(replies) == 1 else [r.parse for r in replies],
            **tokens, "cost_usd": cost, "attempts": sum(r.attempts for r in replies)}
        if notes:
            info["parse_note"] = "; ".join(dict.fromkeys(notes))
        return info

    def _ask(self, client: Any, instruction: str, first: str, second: str,
             stop: threading.Event) -> _Reply:
        cfg = self.config
        messages = fill_messages(self.messages, {"instruction": instruction, "output_1": first,
                                                 "output_2": second})
        kwargs: dict[str, Any] = {"model": cfg.model, "messages": messages,
                                  "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
        if cfg.parser == "logprobs":
            kwargs.update(logprobs=True, top_logprobs=cfg.top_logprobs)
        body, attempts = self._post(client, kwargs, stop)
        return self._parse(body, attempts)

    def _post(self, client: Any, kwargs: dict[str, Any],
              stop: threading.Event) -> tuple[dict[str, Any], int]:
        """One chat completion with bounded retries; returns the JSON body and the attempts used."""
        return post_with_retries(
            self.endpoint, lambda: client.chat.completions.with_raw_response.create(**kwargs),
            self._check_body, self._notices, stop, self._scrub)

    def _check_body(self, body: Any) -> dict[str, Any]:
        if isinstance(body, dict) and isinstance(body.get("choices"), list) and body["choices"]:
            if isinstance(body["choices"][0], dict):
                return body
        err = body.get("error") if isinstance(body, dict) else None
        msg = err.get("message", err) if isinstance(err, dict) else err
        detail = f": {self._scrub(str(msg))}" if msg else ""
        raise JudgeError(f"judge {self.spec.name}: reply from {safe_url(self.config.base_url)} "
                         f"has no choices{detail}")

    def _parse(self, body: dict[str, Any], attempts: int) -> _Reply:
        cfg = self.config
        choice = body["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") if isinstance(message, dict) else None
        text = text if isinstance(text, str) else ""
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        tokens = [usage.get(k) if isinstance(usage.get(k), int) else None
                  for k in ("prompt_tokens", "completion_tokens")]
        note, logprobs_used, parse = "", False, "text"
        pref = math.nan
        if cfg.parser == "logprobs":
            top = _first_top_logprobs(choice)
            if top is None:
                note = "endpoint returned no log-probabilities; parsed the reply text"
            else:
                logprobs_used, parse = True, "logprobs"
                pref = preference_from_top_logprobs(top, cfg.identifiers,
                                                    cfg.match_stripped_tokens)
                if math.isnan(pref):
                    note = "neither identifier among the top log-probabilities (AlpacaEval: NaN)"
                    parse = "unparsed"
        if not logprobs_used:
            pref = preference_from_text(text, cfg.identifiers)
            if math.isnan(pref):
                parse = "unparsed"
                note = "; ".join(filter(None, [note, f"reply names neither "
                                                     f"{' nor '.join(cfg.identifiers)}"]))
        return _Reply(preference=pref, text=text, choice=choice, prompt_tokens=tokens[0],
                      completion_tokens=tokens[1], logprobs_used=logprobs_used, parse=parse,
                      note=note, attempts=attempts)

    def _scrub(self, text: str) -> str:
        """One line with the API key (and anything key-like) masked."""
        return one_line(mask(text, self._api_key()), 300)

    def _scrub_data(self, obj: Any) -> Any:
        """A copy of JSON-like data with the API key (and anything key-like) masked in every
        string, dict key and token `bytes` list; text is otherwise kept as it was."""
        return mask_data(obj, self._api_key())

    def _api_key(self) -> str:
        env = self.config.api_key_env
        return os.environ.get(env, "") if env else ""


def _first_top_logprobs(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """top_logprobs of the first generated token, or None when the endpoint sent none."""
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return None
    top = content[0].get("top_logprobs")
    return top if isinstance(top, list) and top else None


def build(spec: JudgeSpec, http_client: Any = None) -> LLMJudge:
    """Make the judge for an `openai` spec; its .spec records the template text used."""
    config = parse_config(dict(spec.params), where=f"judge {spec.name}")
    text, source = load_template(config.template)
    return LLMJudge(spec, config, text, source, http_client=http_client)
