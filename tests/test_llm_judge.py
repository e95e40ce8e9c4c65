"""Tests of the OpenAI-compatible LLM judge: faults, the AlpacaEval protocol, and real HTTP servers.

The end-to-end tests run tests/tiny_server.py, a small OpenAI-compatible server of a tiny random
model: `transformers serve` ignores `logprobs`/`top_logprobs`, so it cannot exercise the
log-probability path.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx2
import pytest
import tiny_server as tiny_server_mod
from tiny import sigint_default

from harness import PROJECT_ROOT
from harness.core import cache as harness_cache
from harness.core.errors import ConfigError, HarnessError, JudgeError, TransientJudgeError
from harness.core.hashing import canonical_json
from harness.core.http import Endpoint, make_client
from harness.judging import Candidate, JudgeSpec, PairwiseItem
from harness.judging import llm as llm_judge
from harness.judging.registry import load_judge_spec

KEY_ENV = "HARNESS_TEST_JUDGE_KEY"
SECRET = "sk-test-TOPSECRET-0123456789abcdef"
DATA = PROJECT_ROOT.parent / "shared" / "data"
MINI_TEMPLATE = ("<|im_start|>system\nPick the better output.\n<|im_end|>\n<|im_start|>user\n"
                 "Instruction: {instruction}\nm: {output_1}\nM: {output_2}\nAnswer m or M.\n"
                 "<|im_end|>")


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def make_judge(handler=None, **params):
    """A judge whose HTTP traffic goes to `handler` (an httpx2.MockTransport handler)."""
    p = {"model": "judge-x", "base_url": "http://judge.test/v1", "api_key_env": KEY_ENV,
         "template": "templates/pairwise.txt", "identifiers": ["A", "B"], "backoff_s": 0.001,
         "max_backoff_s": 0.01, "max_retries": 3, "max_concurrency": 4,
         "price_usd_per_1m": {"prompt": 10.0, "completion": 30.0}, **params}
    client = httpx2.Client(transport=httpx2.MockTransport(handler)) if handler else None
    return llm_judge.build(JudgeSpec(name="t", kind="openai", params=p), http_client=client)


def reply(top: dict[str, float] | None, text: str = "A", usage=(100, 1)) -> httpx2.Response:
    """A chat.completion body; top maps tokens to probabilities (None: no logprobs)."""
    choice = {"index": 0, "finish_reason": "length",
              "message": {"role": "assistant", "content": text}, "logprobs": None}
    if top is not None:
        tl = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
              for t, p in top.items()]
        choice["logprobs"] = {"content": [{"token": text, "logprob": tl[0]["logprob"],
                                           "top_logprobs": tl}]}
    return httpx2.Response(200, json={
        "id": "x", "object": "chat.completion", "model": "judge-x", "choices": [choice],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                  "total_tokens": sum(usage)}})


def shown(request: httpx2.Request) -> tuple[str, str]:
    """The two outputs in the order the judge saw them (own template: ANSWER A, ANSWER B)."""
    user = json.loads(request.content)["messages"][-1]["content"]
    a = user.split("[ANSWER A]\n", 1)[1].split("\n[END OF ANSWER A]", 1)[0]
    b = user.split("[ANSWER B]\n", 1)[1].split("\n[END OF ANSWER B]", 1)[0]
    return a, b


def items(n: int, good_second: bool = True) -> list[PairwiseItem]:
    """n items; the GOOD output is output_2 when good_second, else output_1."""
    out = []
    for i in range(n):
        good, bad = Candidate(f"GOOD answer {i}"), Candidate(f"bad answer {i}")
        o1, o2 = (bad, good) if good_second else (good, bad)
        out.append(PairwiseItem(instruction=f"Question number {i}?", output_1=o1, output_2=o2))
    return out


def content_judge(p_good: float):
    """A judge that gives the GOOD output's label probability p_good, wherever it is shown."""
    def handler(request):
        a, _ = shown(request)
        pa = p_good if a.startswith("GOOD") else 1 - p_good
        return reply({"A": pa, "B": 1 - pa, "The": 1e-4}, text="A" if pa > 0.5 else "B")
    return handler


def collect(judge, its):
    return dict(judge.judge(its))


# ---------------------------------------------------------------- protocol and mapping


def test_top_logprob_weighting_follows_alpaca_eval():
    lp = [{"token": "M", "logprob": math.log(0.75)}, {"token": "m", "logprob": math.log(0.2)},
          {"token": "Both", "logprob": math.log(0.05)}]
    assert llm_judge.preference_from_top_logprobs(lp, ["m", "M"]) == pytest.approx(2 - 0.2 / 0.95)
    only_m = [{"token": "m", "logprob": -3.0}, {"token": "The", "logprob": -0.1}]
    assert llm_judge.preference_from_top_logprobs(only_m, ["m", "M"]) == 1.0
    assert math.isnan(llm_judge.preference_from_top_logprobs(
        [{"token": "The", "logprob": -0.1}], ["m", "M"]))
    spaced = [{"token": " A", "logprob": math.log(0.3)}, {"token": "A", "logprob": math.log(0.3)},
              {"token": " B", "logprob": math.log(0.4)}]
    assert llm_judge.preference_from_top_logprobs(spaced, ["A", "B"]) == 1.0  # exact match
    assert llm_judge.preference_from_top_logprobs(spaced, ["A", "B"], strip=True) == \
        pytest.approx(2 - 0.6)


@pytest.mark.parametrize("good_second", [True, False])
def test_preference_maps_back_to_item_orientation(good_second):
    seen_first = []

    def handler(request):
        seen_first.append(shown(request)[0].startswith("GOOD"))
        return content_judge(0.9)(request)

    got = collect(make_judge(handler), items(24, good_second))
    assert len(got) == 24 and set(seen_first) == {True, False}  # both orders were shown
    for i, j in got.items():
        assert j.preference == pytest.approx(1.9 if good_second else 1.1)
        assert j.info["logprobs_used"] is True and j.info["parse"] == "logprobs"
        assert j.info["order"] == ("swapped" if j.info["swapped"] else "as_given")
        assert j.info["swapped"] == llm_judge.is_swapped(f"Question number {i}?", 0)


def test_position_biased_judge_in_alpaca_eval_mode_follows_the_seeded_order():
    def handler(request):  # always prefers whatever is shown first
        return reply({"A": 0.8, "B": 0.2})

    got = collect(make_judge(handler), items(24))
    for j in got.values():
        assert j.preference == pytest.approx(1.8 if j.info["swapped"] else 1.2)
    seeded = collect(make_judge(handler, seed=7), items(24))
    assert [j.info["swapped"] for j in got.values()] != \
        [seeded[i].info["swapped"] for i in got]


def test_both_orders_ties_when_orders_disagree_and_averages_otherwise():
    calls = []

    def biased(request):  # always picks the first shown, more surely when it is the GOOD one
        calls.append(1)
        pa = 0.9 if shown(request)[0].startswith("GOOD") else 0.6
        return reply({"A": pa, "B": 1 - pa}, usage=(50, 1))

    got = collect(make_judge(biased, mode="both_orders"), items(5))
    assert len(calls) == 10
    for j in got.values():  # 1.4 one way, 1.9 the other: a tie, not their mean 1.65
        assert j.preference == 1.5 and j.info["orders_disagree"] is True
        assert j.info["preference_as_given"] == pytest.approx(1.4)
        assert j.info["preference_swapped"] == pytest.approx(1.9)
        assert j.info["prompt_tokens"] == 100 and j.info["completion_tokens"] == 2
        assert j.info["cost_usd"] == pytest.approx((100 * 10 + 2 * 30) / 1e6)
        assert j.info["order"] == "both"

    def stronger_when_first(request):  # GOOD wins in both orders, by 0.9 first and 0.7 second
        a, _ = shown(request)
        pa = 0.9 if a.startswith("GOOD") else 0.3
        return reply({"A": pa, "B": 1 - pa})

    got = collect(make_judge(stronger_when_first, mode="both_orders"), items(4))
    assert all(j.preference == pytest.approx((1.9 + 1.7) / 2) for j in got.values())
    assert all(j.info["orders_disagree"] is False for j in got.values())


def test_combine_both_orders_rule():
    assert llm_judge.combine_both_orders(1.1, 1.7) == 1.5
    assert llm_judge.combine_both_orders(1.95, 1.45) == 1.5
    assert llm_judge.combine_both_orders(1.2, 1.4) == pytest.approx(1.3)
    assert llm_judge.combine_both_orders(1.5, 1.9) == pytest.approx(1.7)
    assert llm_judge.combine_both_orders(math.nan, 1.9) == 1.9
    assert math.isnan(llm_judge.combine_both_orders(math.nan, math.nan))


def test_identical_outputs_are_a_tie_without_a_call():
    def handler(request):
        raise AssertionError("no request expected")

    same = PairwiseItem("Say hi.", Candidate("hi"), Candidate("hi"))
    j = collect(make_judge(handler), [same])[0]
    assert j.preference == 1.5 and j.info["identical_outputs"] and j.info["cost_usd"] == 0


@pytest.mark.skipif(not (DATA / "alpaca_eval" / "annotations").is_dir(),
                    reason="reference data ../shared/data/alpaca_eval is absent")
@pytest.mark.parametrize("model", ["claude-2.1", "gpt4_gamed"])
def test_replaying_alpaca_eval_replies_reproduces_its_preferences(model, tmp_path):
    """Feed AlpacaEval's recorded GPT-4 Turbo replies back: same order swap, same preferences."""
    records = json.loads((DATA / "alpaca_eval" / "annotations" / f"{model}.json").read_text())
    by_instruction = {r["instruction"]: r for r in records}
    template = tmp_path / "mini.txt"
    template.write_text(MINI_TEMPLATE)

    def handler(request):
        user = json.loads(request.content)["messages"][-1]["content"]
        instruction = user.split("Instruction: ", 1)[1].split("\nm: ", 1)[0]
        rc = by_instruction[instruction]["raw_completion"]
        return httpx2.Response(200, json={"choices": [rc], "usage": {
            "prompt_tokens": int(rc["total_tokens"]) - 1, "completion_tokens": 1}})

    judge = make_judge(handler, template=str(template), identifiers=["m", "M"],
                       max_concurrency=8)
    its = [PairwiseItem(r["instruction"], Candidate(r["output_1"]), Candidate(r["output_2"]))
           for r in records]
    got = collect(judge, its)
    assert len(got) == len(records) == 805
    for i, r in enumerate(records):
        assert got[i].preference == pytest.approx(r["preference"], abs=1e-6), r["instruction"]
        if r["raw_completion"] is not None:
            assert got[i].info["reply"] == r["raw_completion"]["message"]["content"]


# ---------------------------------------------------------------- faults


def test_429_is_retried_then_succeeds_and_attempts_are_counted():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            return httpx2.Response(429, json={"error": {"message": "Rate limit reached"}},
                                   headers={"retry-after": "0"})
        return reply({"A": 0.25, "B": 0.75}, text="B")

    j = collect(make_judge(handler), items(1))[0]
    assert len(calls) == 2 and j.info["attempts"] == 2
    assert j.preference == pytest.approx(1.25 if j.info["swapped"] else 1.75)


def test_500_is_retried_and_gives_up_with_one_transient_line():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx2.Response(500, json={"error": {"message": "upstream exploded"}})

    with pytest.raises(TransientJudgeError) as e:
        collect(make_judge(handler, max_retries=2), items(1))
    assert len(calls) == 3
    msg = str(e.value)
    assert "\n" not in msg and "3 attempt" in msg and "HTTP 500" in msg


def test_500_then_success():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx2.Response(503) if len(calls) < 3 else reply({"A": 0.5, "B": 0.5})

    j = collect(make_judge(handler), items(1))[0]
    assert j.preference == 1.5 and j.info["attempts"] == 3


def test_timeout_is_retried_then_reported():
    calls = []

    def flaky(request):
        calls.append(1)
        if len(calls) == 1:
            raise httpx2.ReadTimeout("timed out", request=request)
        return reply({"A": 0.9, "B": 0.1})

    assert collect(make_judge(flaky), items(1))[0].info["attempts"] == 2

    def dead(request):
        raise httpx2.ReadTimeout("timed out", request=request)

    with pytest.raises(TransientJudgeError, match="no reply from http://judge.test/v1 within"):
        collect(make_judge(dead, max_retries=1, timeout_s=5), items(1))


def test_malformed_json_is_retried_then_reported():
    calls = []

    def flaky(request):
        calls.append(1)
        if len(calls) == 1:
            return httpx2.Response(200, text='{"choices": [', headers={"content-type":
                                                                       "application/json"})
        return reply({"A": 0.9, "B": 0.1})

    assert collect(make_judge(flaky), items(1))[0].info["attempts"] == 2

    def garbage(request):
        return httpx2.Response(200, text="<html>proxy error</html>")

    with pytest.raises(TransientJudgeError, match="malformed reply"):
        collect(make_judge(garbage, max_retries=1), items(1))


def test_reply_without_choices_is_a_judge_error():
    def handler(request):
        return httpx2.Response(200, json={"error": {"message": f"bad key {SECRET}"}})

    with pytest.raises(JudgeError, match="has no choices") as e:
        collect(make_judge(handler), items(1))
    assert SECRET not in str(e.value)


def test_missing_logprobs_falls_back_to_the_text_and_says_so():
    def handler(request):
        a, _ = shown(request)
        return reply(None, text="A" if a.startswith("GOOD") else "B")

    got = collect(make_judge(handler), items(6))
    for j in got.values():
        assert j.preference == 2.0
        assert j.info["logprobs_used"] is False and j.info["parse"] == "text"
        assert "no log-probabilities" in j.info["parse_note"]

    def babble(request):
        return reply(None, text="Both are fine")

    j = collect(make_judge(babble), items(1))[0]
    assert math.isnan(j.preference) and j.info["parse"] == "unparsed"


def test_text_parser_does_not_ask_for_logprobs():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return reply(None, text=" B\n")

    j = collect(make_judge(handler, parser="text", max_tokens=3), items(1))[0]
    assert "logprobs" not in bodies[0] and bodies[0]["max_tokens"] == 3
    assert j.preference == (1.0 if j.info["swapped"] else 2.0)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_stop_at_once_without_the_key(status):
    calls = []

    def handler(request):
        calls.append(request.headers["authorization"])
        return httpx2.Response(status, json={"error": {
            "message": f"Incorrect API key provided: {SECRET[:8]}***{SECRET[-4:]} ({SECRET})"}})

    with pytest.raises(JudgeError) as e:
        collect(make_judge(handler, max_retries=5), items(3)[:1])
    assert len(calls) == 1 and calls[0] == f"Bearer {SECRET}"  # the key was sent, once
    msg = str(e.value)
    assert not isinstance(e.value, TransientJudgeError)
    assert "\n" not in msg and f"HTTP {status}" in msg and KEY_ENV in msg
    assert SECRET not in msg and SECRET[-4:] not in msg and SECRET[:8] not in msg


@pytest.mark.parametrize("status", [400, 404, 422])
def test_bad_requests_are_not_retried(status):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx2.Response(status, json={"error": {"message": f"model not found; {SECRET}"}})

    with pytest.raises(JudgeError, match=f"HTTP {status}") as e:
        collect(make_judge(handler), items(1))
    assert len(calls) == 1 and SECRET not in str(e.value)
    assert not isinstance(e.value, TransientJudgeError)


def test_results_yielded_before_a_fatal_error_stay_yielded():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) > 2:
            return httpx2.Response(401, json={"error": {"message": "revoked"}})
        return reply({"A": 0.6, "B": 0.4})

    yielded = []
    with pytest.raises(JudgeError):
        for pair in make_judge(handler, max_concurrency=1).judge(items(6)):
            yielded.append(pair)
    assert [i for i, _ in yielded] == [0, 1]
    assert all(1 <= j.preference <= 2 for _, j in yielded)
    assert len(calls) == 3  # the rest were cancelled


def test_the_api_key_reaches_no_judgment_spec_or_error():
    def handler(request):
        assert request.headers["authorization"] == f"Bearer {SECRET}"
        return reply({"A": 0.6, "B": 0.4})

    judge = make_judge(handler, mode="both_orders")
    got = collect(judge, items(3))
    blob = canonical_json([[j.preference, j.raw, j.info] for j in got.values()])
    assert SECRET not in blob and SECRET not in canonical_json(judge.spec.as_dict())
    assert KEY_ENV not in canonical_json(judge.spec.as_dict())  # operational, not verdict


def test_concurrency_is_bounded_by_max_concurrency():
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def handler(request):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return reply({"A": 0.6, "B": 0.4})

    t0 = time.perf_counter()
    got = collect(make_judge(handler, max_concurrency=4), items(16))
    assert len(got) == 16 and state["peak"] == 4
    assert time.perf_counter() - t0 < 16 * 0.05  # ran in parallel


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def _judge_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == llm_judge.__name__ and r.levelno >= logging.WARNING]


def test_unreachable_endpoint_is_fatal_at_once_with_one_clear_line(caplog, capsys):
    port = _closed_port()
    judge = make_judge(None, base_url=f"http://127.0.0.1:{port}/v1", max_retries=5,
                       backoff_s=1.0, max_backoff_s=60.0)  # the backoff of a real config
    t0 = time.monotonic()
    with pytest.raises(JudgeError) as e:
        collect(judge, items(8))
    assert time.monotonic() - t0 < 2.0  # was about 50 s of retries
    assert not isinstance(e.value, TransientJudgeError)
    msg = str(e.value)
    assert "\n" not in msg and f"cannot reach http://127.0.0.1:{port}/v1" in msg
    assert "is the server running" in msg
    assert _judge_warnings(caplog) == [] and capsys.readouterr().err == ""  # was 12 lines


def test_unknown_host_is_fatal_after_one_quick_retry_without_credentials():
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

    judge = make_judge(handler, base_url="http://user:pa55word@judge.test/v1", max_retries=5,
                       backoff_s=1.0, max_backoff_s=60.0, max_concurrency=1)
    t0 = time.monotonic()
    with pytest.raises(JudgeError) as e:
        collect(judge, items(3))
    assert time.monotonic() - t0 < 2.0 and len(calls) == 2
    msg = str(e.value)
    assert not isinstance(e.value, TransientJudgeError)
    assert "\n" not in msg and "cannot reach http://judge.test/v1" in msg
    assert "Name or service not known" in msg and "pa55word" not in msg and "user" not in msg


def test_a_dropped_connection_is_still_retried():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            raise httpx2.RemoteProtocolError("Server disconnected without sending a response.",
                                             request=request)
        return reply({"A": 0.9, "B": 0.1})

    assert collect(make_judge(handler), items(1))[0].info["attempts"] == 2


def _503_then_ok(n_failures: int):
    calls, lock = [], threading.Lock()

    def handler(request):
        with lock:
            calls.append(1)
            fail = len(calls) <= n_failures
        if fail:
            return httpx2.Response(503, json={"error": {"message": f"overloaded #{len(calls)}"}})
        return reply({"A": 0.6, "B": 0.4})
    return handler, calls


def test_many_retries_log_one_warning_line(caplog, capsys):
    handler, calls = _503_then_ok(8)
    got = collect(make_judge(handler, max_retries=8, max_concurrency=2), items(2))
    assert len(got) == 2 and len(calls) == 10
    warnings = _judge_warnings(caplog)
    assert len(warnings) == 1 and "HTTP 503" in warnings[0]  # was one line per retry
    assert SECRET not in warnings[0]
    assert len(capsys.readouterr().err.splitlines()) <= 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_retries_on_a_terminal_rewrite_one_line_then_leave_one_summary(monkeypatch, caplog):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler, calls = _503_then_ok(4)
    assert collect(make_judge(handler, max_retries=8), items(1))[0].info["attempts"] == 5
    out = term.getvalue()
    assert "\n" not in out and out.count("\r\x1b[K") == 5  # 4 rewrites of one line, 1 clear
    assert "retry 4/8" in out and "HTTP 503" in out
    warnings = _judge_warnings(caplog)
    assert len(warnings) == 1 and "4 retries" in warnings[0] and "HTTP 503 x4" in warnings[0]


# ---------------------------------------------------------------- preflight


@pytest.mark.parametrize("status", [401, 403])
def test_preflight_refused_key_is_one_line_without_the_key(status):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx2.Response(status, json={"error": {"message": f"bad key {SECRET}"}})

    with pytest.raises(JudgeError) as e:
        make_judge(handler).preflight()
    msg = str(e.value)
    assert len(calls) == 1 and not isinstance(e.value, TransientJudgeError)
    assert "\n" not in msg and f"HTTP {status}" in msg and KEY_ENV in msg
    assert SECRET not in msg and SECRET[-6:] not in msg


def test_preflight_against_a_closed_port_fails_fast():
    port = _closed_port()
    judge = make_judge(None, base_url=f"http://127.0.0.1:{port}/v1", backoff_s=1.0,
                       max_backoff_s=60.0, max_retries=5)
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match=f"cannot reach http://127.0.0.1:{port}/v1"):
        judge.preflight()
    assert time.monotonic() - t0 < 3.0


def test_preflight_unknown_model_names_the_model():
    def handler(request):
        return httpx2.Response(404, json={"error": {
            "message": "The model `judge-x` does not exist or you do not have access to it."}})

    with pytest.raises(JudgeError) as e:
        make_judge(handler).preflight()
    msg = str(e.value)
    assert "HTTP 404" in msg and "'judge-x'" in msg and "\n" not in msg
    assert not isinstance(e.value, TransientJudgeError)


def test_preflight_against_a_healthy_endpoint_is_one_tiny_request(caplog):
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return reply({"A": 0.5, "B": 0.5}, usage=(9, 1))

    assert make_judge(handler).preflight() is None
    assert len(bodies) == 1 and bodies[0]["max_tokens"] == 1 and bodies[0]["model"] == "judge-x"
    assert bodies[0]["logprobs"] is True and len(json.dumps(bodies[0]["messages"])) < 100
    assert _judge_warnings(caplog) == []

    def no_logprobs(request):
        return reply(None)

    make_judge(no_logprobs).preflight()  # works, but says the text will be parsed
    assert any("no log-probabilities" in w for w in _judge_warnings(caplog))


# ---------------------------------------------------------------- stopping early


def _stalled(n_quick: int):
    """A handler that answers n_quick requests and then blocks until `release` is set."""
    release, calls, lock = threading.Event(), [], threading.Lock()

    def handler(request):
        with lock:
            calls.append(1)
            quick = len(calls) <= n_quick
        if not quick:
            release.wait(60)
        return reply({"A": 0.6, "B": 0.4})
    return handler, release


def _judge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("llm-judge")]


@pytest.mark.parametrize("how", ["close", "KeyboardInterrupt"])
def test_stopping_early_returns_at_once_against_a_stalled_endpoint(how):
    handler, release = _stalled(1)
    judge = make_judge(handler, timeout_s=60, max_concurrency=4)
    gen = judge.judge(items(8))
    try:
        first = next(gen)
        assert first[0] in range(8)
        t0 = time.monotonic()
        if how == "close":
            gen.close()
        else:
            with pytest.raises(KeyboardInterrupt):
                gen.throw(KeyboardInterrupt)
        assert time.monotonic() - t0 < 3.0  # was: wait for every request in flight (60 s)
        assert all(t.daemon for t in _judge_threads())  # exit does not wait for them either
    finally:
        release.set()
        for t in _judge_threads():
            t.join(5)
    assert not _judge_threads()


_INTERRUPT_CHILD = """
import socket, sys, threading, time
from harness.judging import llm
from harness.judging import Candidate, JudgeSpec, PairwiseItem
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(64)
held = []
def accept():  # a server that takes connections and never answers
    while True:
        held.append(srv.accept()[0])
        if len(held) == 4:
            print("STALLED", flush=True)
threading.Thread(target=accept, daemon=True).start()
judge = llm.build(JudgeSpec(name="t", kind="openai", params={
    "model": "m", "base_url": f"http://127.0.0.1:{srv.getsockname()[1]}/v1", "api_key_env": "",
    "template": "templates/pairwise.txt", "timeout_s": 60, "max_concurrency": 4}))
its = [PairwiseItem(f"q{i}", Candidate("a"), Candidate(f"b{i}")) for i in range(8)]
try:
    for pair in judge.judge(its):
        pass
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
"""


def test_ctrl_c_against_a_stalled_server_ends_the_process_at_once():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPT_CHILD], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=sigint_default)
    try:
        assert proc.stdout.readline().strip() == "STALLED"  # 4 requests in flight, unanswered
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 3.0, err  # was: 60 s for the requests to time out
        assert proc.returncode == 0 and "INTERRUPTED" in out, err
    finally:
        tiny_server_mod.stop(proc)


# ---------------------------------------------------------------- secrets echoed back


@pytest.mark.parametrize("secret", [SECRET, "local-Token-Without-Prefix-42"])
@pytest.mark.parametrize("mode", ["alpaca_eval", "both_orders"])
def test_a_key_echoed_by_the_endpoint_never_reaches_raw_or_info(secret, mode, monkeypatch):
    monkeypatch.setenv(KEY_ENV, secret)

    def echo(request):
        key = request.headers["authorization"].removeprefix("Bearer ")
        resp = reply({"A": 0.6, "B": 0.3, f" {key}": 0.1}, text=f"A (your key: {key})")
        body = json.loads(resp.content)
        body["choices"][0]["message"]["refusal"] = {"echo": [f"Bearer {key}", {key: key}]}
        return httpx2.Response(200, json=body)

    got = collect(make_judge(echo, mode=mode), items(3))
    for j in got.values():
        blob = json.dumps([j.raw, j.info])
        assert secret not in blob and secret not in j.raw
        assert json.dumps(list(f" {secret}".encode()))[1:-1] not in blob  # the token's bytes
        replies = j.info["reply"] if mode == "both_orders" else [j.info["reply"]]
        assert all(r.startswith("A (your key: ") and "***" in r for r in replies)
        if mode == "alpaca_eval":  # the preference is read before masking
            shown_pref = 2 - 0.6 / 0.9
            assert j.preference == pytest.approx(3 - shown_pref if j.info["swapped"]
                                                 else shown_pref)
        else:  # always the first shown: the orders disagree
            assert j.preference == 1.5 and j.info["orders_disagree"]


# ---------------------------------------------------------------- configuration


def test_configs_in_judges_are_valid_and_the_spec_records_the_template():
    for name in ("alpaca_eval_gpt4_turbo", "local_openai"):
        spec = load_judge_spec(name)
        cfg = llm_judge.parse_config(spec.params)
        assert spec.kind == "openai" and cfg.api_key_env in ("", "OPENAI_API_KEY")
    ae = llm_judge.parse_config(load_judge_spec("alpaca_eval_gpt4_turbo").params)
    assert (ae.max_tokens, ae.temperature, ae.top_logprobs, ae.identifiers, ae.seed, ae.mode) == \
        (1, 1.0, 5, ("m", "M"), 0, "alpaca_eval")
    local = llm_judge.build(load_judge_spec("local_openai"))
    text = (PROJECT_ROOT / "judges" / "templates" / "pairwise.txt").read_text()
    assert local.spec.template == text and local.spec.params["mode"] == "both_orders"
    assert set(local.spec.params).isdisjoint(llm_judge.OPERATIONAL_PARAMS)


def test_operational_params_do_not_change_the_spec_but_verdict_params_do():
    a = make_judge(None).spec
    assert make_judge(None, max_concurrency=32, max_retries=9, timeout_s=5).spec == a
    assert make_judge(None, seed=1).spec != a and make_judge(None, model="other").spec != a


def test_bad_configs_give_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown parameter.*max_concurency"):
        make_judge(None, max_concurency=3)
    with pytest.raises(ConfigError, match="mode must be one of"):
        make_judge(None, mode="both")
    with pytest.raises(ConfigError, match="cannot read judge template"):
        make_judge(None, template="templates/nope.txt")
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=f"environment variable {KEY_ENV}, which is not set"):
        collect(make_judge(lambda r: reply({"A": 1.0})), items(1))


def test_chatml_template_parsing():
    msgs = llm_judge.chatml_to_messages(
        "<|im_start|>system\nBe fair.\n<|im_end|>\n<|im_start|>system name=example_user\n"
        "Hi {instruction}\n<|im_end|>\n<|im_start|>user\n{output_1} vs {output_2}\n<|im_end|>")
    assert msgs == [{"role": "system", "content": "Be fair."},
                    {"role": "system", "name": "example_user", "content": "Hi {instruction}"},
                    {"role": "user", "content": "{output_1} vs {output_2}"}]
    filled = llm_judge.fill_messages(msgs, {"instruction": "x {output_2}", "output_1": "1",
                                            "output_2": "2"})
    assert filled[1]["content"] == "Hi x {output_2}" and filled[2]["content"] == "1 vs 2"


def _fake_alpaca_eval_tree(root: Path, marker: str) -> None:
    base = root / "alpaca_eval" / "evaluators_configs"
    (base / "weighted_x").mkdir(parents=True)
    (base / "clf_x").mkdir(parents=True)
    (base / "weighted_x" / "configs.yaml").write_text(
        'weighted_x:\n  prompt_template: "clf_x/clf.txt"\n  fn_completions: "openai"\n')
    (base / "clf_x" / "clf.txt").write_text(MINI_TEMPLATE.replace("Pick", marker))


def test_alpaca_eval_template_from_the_installed_distribution(tmp_path, monkeypatch):
    _fake_alpaca_eval_tree(tmp_path, "INSTALLED")

    class Dist:
        version = "9.9"

        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(harness_cache.metadata, "distribution", lambda name: Dist())
    text, source = llm_judge.load_template("alpaca_eval:weighted_x")
    assert "INSTALLED the better output" in text and "alpaca-eval 9.9" in source


def test_alpaca_eval_template_from_the_cached_wheel(tmp_path, monkeypatch):
    """The wheel lives in the one harness cache ($HARNESS_CACHE), whatever $XDG_CACHE_HOME is."""
    _fake_alpaca_eval_tree(tmp_path / "tree", "WHEEL")
    cache = tmp_path / "cache" / "wheels"
    cache.mkdir(parents=True)
    wheel = cache / f"alpaca_eval-{llm_judge.ALPACA_EVAL_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in (tmp_path / "tree").rglob("*.*"):
            zf.write(f, f.relative_to(tmp_path / "tree").as_posix())
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(harness_cache.metadata, "distribution", _not_installed)
    monkeypatch.setattr(harness_cache.subprocess, "run", _no_pip)
    text, source = llm_judge.load_template("alpaca_eval:weighted_x")
    assert "WHEEL the better output" in text and "(wheel)" in source


def test_alpaca_eval_template_unavailable_is_one_harness_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(harness_cache.metadata, "distribution", _not_installed)

    def pip_fails(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching "
                                                       "distribution found for alpaca-eval\n")

    monkeypatch.setattr(harness_cache.subprocess, "run", pip_fails)
    with pytest.raises(HarnessError) as e:
        make_judge(None, template="alpaca_eval:weighted_alpaca_eval_gpt4_turbo")
    msg = str(e.value)
    assert "\n" not in msg and "No matching distribution" in msg and "pip install" in msg


def _not_installed(name):
    raise harness_cache.metadata.PackageNotFoundError(name)


def _no_pip(*a, **kw):
    raise AssertionError("pip must not run when the wheel is cached")


@pytest.mark.slow
def test_real_alpaca_eval_template_is_fetched_and_parsed():
    """Reads AlpacaEval's own prompt (installed package, cached wheel, or a pip download)."""
    judge = llm_judge.build(load_judge_spec("alpaca_eval_gpt4_turbo"))
    assert [m["role"] for m in judge.messages] == ["system", "user"]
    user = judge.messages[1]["content"]
    assert '"model_identifier": "m"' in user and '"model_identifier": "M"' in user
    assert user.index("{output_1}") < user.index("{output_2}")
    assert judge.spec.template.startswith("<|im_start|>system")


# ---------------------------------------------------------------- real servers on 127.0.0.1


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """tests/tiny_server.py serving the judge's tiny random model; yields (base_url, model_dir)."""
    model_dir = tmp_path_factory.mktemp("tiny") / "model"
    try:
        proc, base_url = tiny_server_mod.start(["serve-tiny-model", str(model_dir)],
                                               {"TINY_SERVER_KEY": SECRET})
    except RuntimeError as e:
        pytest.fail(f"tiny model server: {e}")
    try:
        yield base_url, model_dir
    finally:
        tiny_server_mod.stop(proc)


def test_end_to_end_against_a_real_server_with_logprobs(tiny_server):
    base_url, model_dir = tiny_server
    its = [PairwiseItem(f"Write about item {i}.", Candidate(f"the quick fox {i} " * (i + 1)),
                        Candidate(f"the lazy dog {i}")) for i in range(8)]
    judge = llm_judge.build(JudgeSpec(name="tiny", kind="openai", params={
        "model": "tiny", "base_url": base_url, "api_key_env": KEY_ENV,
        "template": "templates/pairwise.txt", "identifiers": ["A", "B"],
        "max_concurrency": 4, "timeout_s": 30}))
    judge.preflight()
    got = collect(judge, its)
    assert sorted(got) == list(range(8))
    assert {j.info["swapped"] for j in got.values()} == {True, False}
    for j in got.values():
        assert j.info["logprobs_used"] is True and j.info["judge_model"] == "tiny"
        assert j.info["prompt_tokens"] > 100 and j.info["completion_tokens"] == 1
        top = json.loads(j.raw)["logprobs"]["content"][0]["top_logprobs"]
        assert len(top) == 5
        p = llm_judge.preference_from_top_logprobs(top, ["A", "B"])
        assert 1 < p < 2 and j.preference == pytest.approx(3 - p if j.info["swapped"] else p)

    both = llm_judge.build(JudgeSpec(name="tiny2", kind="openai", params={
        "model": "tiny", "base_url": base_url, "api_key_env": KEY_ENV,
        "template": "templates/pairwise.txt", "identifiers": ["A", "B"],
        "mode": "both_orders"}))
    for j in collect(both, its[:3]).values():
        assert j.preference == llm_judge.combine_both_orders(j.info["preference_as_given"],
                                                             j.info["preference_swapped"])


def test_end_to_end_wrong_key_is_refused_once(tiny_server, monkeypatch):
    base_url, _ = tiny_server
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-98765")
    judge = llm_judge.build(JudgeSpec(name="tiny", kind="openai", params={
        "model": "tiny", "base_url": base_url, "api_key_env": KEY_ENV,
        "template": "templates/pairwise.txt", "identifiers": ["A", "B"]}))
    with pytest.raises(JudgeError, match="HTTP 401") as e:
        judge.preflight()
    assert "98765" not in str(e.value)
    with pytest.raises(JudgeError, match="HTTP 401") as e:
        collect(judge, items(2))
    assert "98765" not in str(e.value)


def test_end_to_end_preflight_wrong_model_path_is_one_line(tiny_server):
    base_url, _ = tiny_server
    judge = llm_judge.build(JudgeSpec(name="tiny", kind="openai", params={
        "model": "tiny", "base_url": base_url.removesuffix("/v1"), "api_key_env": KEY_ENV,
        "template": "templates/pairwise.txt", "identifiers": ["A", "B"]}))
    with pytest.raises(JudgeError, match="HTTP 404 for model 'tiny'") as e:
        judge.preflight()
    assert "\n" not in str(e.value) and SECRET not in str(e.value)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("transformers") is None,
                    reason="transformers CLI not on PATH (pip install 'transformers[serving]')")
def test_end_to_end_against_transformers_serve_falls_back_to_text(tiny_server):
    """`transformers serve` ignores logprobs: the judge parses the text and says so."""
    pytest.importorskip("fastapi", reason="needs pip install 'transformers[serving]'")
    _, model_dir = tiny_server
    port = tiny_server_mod.free_port()
    proc = subprocess.Popen(
        ["transformers", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        tiny_server_mod.wait_healthy(f"http://127.0.0.1:{port}/health", proc, 120)
        judge = llm_judge.build(JudgeSpec(name="ts", kind="openai", params={
            "model": str(model_dir), "base_url": f"http://127.0.0.1:{port}/v1",
            "api_key_env": "", "template": "templates/pairwise.txt",
            "identifiers": ["A", "B"], "max_concurrency": 2, "timeout_s": 60}))
        judge.preflight()
        got = collect(judge, items(4))
        for j in got.values():
            assert j.info["logprobs_used"] is False
            assert "no log-probabilities" in j.info["parse_note"]
            shown_pref = {"A": 1.0, "B": 2.0}.get(j.info["reply"].strip(), math.nan)
            want = 3 - shown_pref if j.info["swapped"] else shown_pref
            assert (math.isnan(j.preference) and math.isnan(want)) or j.preference == want
        assert any(not math.isnan(j.preference) for j in got.values())
    finally:
        tiny_server_mod.stop(proc)


def test_the_deadline_client_keeps_proxies_from_the_environment(monkeypatch):
    """Wrapping the transports for the whole-request deadline must not drop env proxies."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    endpoint = Endpoint(label="judge t", base_url="https://example.test/v1", model="m",
                        api_key_env="", max_retries=0, timeout_s=5.0, backoff_s=0.0,
                        max_backoff_s=0.0, fatal=JudgeError, transient=TransientJudgeError)
    http = make_client(endpoint)._client
    assert len(http._mounts) == 1  # the proxy's mount, wrapped
    assert all(type(t).__name__ == "DeadlineTransport" for t in http._mounts.values())
    assert type(http._transport).__name__ == "DeadlineTransport"
