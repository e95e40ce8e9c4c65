"""Generation backends: registry fields, cache keys, the openai backend (faked wire and a real
local server), lm-eval's hf model, and the rules as vLLM's per-request logits processor."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import pytest
import tiny_server
from tiny import make_tiny_model

from harness.cli import main
from harness.core.errors import BackendError, ConfigError, HarnessError
from harness.generate import backends
from harness.generate import transformers as generation
from harness.generate.backends import output_identity
from harness.models.registry import load_registry
from harness.models.spec import DecodingSpec, ModelSpec
from harness.store.records import generation_key

KEY_ENV = "HARNESS_TEST_BACKEND_KEY"
SECRET = "sk-test-BACKEND-SECRET-0123456789"
CAP = 16


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _registry(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text('[models.ref]\nrole = "reference"\nsource = "local"\npath = "/nowhere"\n'
                    + body)
    return path


def _spec(tmp_path: Path, body: str, name: str = "x") -> ModelSpec:
    return load_registry(_registry(tmp_path, body))[name]


OPENAI = f'''
[models.x]
backend = "openai"
base_url = "http://server.test/v1/"
model = "served-name"
api_key_env = "{KEY_ENV}"
max_retries = 3
backoff_s = 0.001
max_backoff_s = 0.01
[models.x.decoding]
max_new_tokens = {CAP}
'''


# ------------------------------------------------------------------------------ registry


def test_each_backend_parses_and_transformers_specs_are_unchanged(tmp_path):
    reg = load_registry(_registry(tmp_path, OPENAI + f'''
[models.y]
base = "x"
endpoint = "completions"
prompt_format = "plain"

[models.l]
backend = "lm-eval"
lm_eval_model = "hf"
model_args = "pretrained={tmp_path},dtype=float32"

[models.v]
backend = "vllm"
source = "local"
path = "{tmp_path}"
tensor_parallel_size = 2
rules = {{}}
'''))
    x, y, lm, v = reg["x"], reg["y"], reg["l"], reg["v"]
    assert x.backend == "openai" and x.source == "" and x.backend_options.base_url == \
        "http://server.test/v1" and x.backend_options.endpoint == "chat"
    assert y.backend_options.endpoint == "completions" and y.backend_options.model == "served-name"
    assert lm.backend_options.model_args.startswith("pretrained=")
    assert v.backend_options.tensor_parallel_size == 2 and v.rules is not None
    assert "backend" not in reg["ref"].as_dict() and "backend_options" not in reg["ref"].as_dict()
    assert x.as_dict()["backend_options"]["kind"] == "openai"
    assert "backend" not in output_identity(reg["ref"])
    assert SECRET not in json.dumps(x.as_dict())


BAD = [
    ('[models.x]\nbackend = "tgi"\n', "backend must be one of transformers, openai, lm-eval, vllm"),
    ('[models.x]\nbackend = "openai"\nmodel = "m"\n', "needs base_url"),
    ('[models.x]\nbackend = "openai"\nbase_url = "http://h/v1"\n', "needs model"),
    ('[models.x]\nbackend = "openai"\nbase_url = "ftp://h"\nmodel = "m"\n', "http://"),
    ('[models.x]\nbackend = "openai"\nbase_url = "http://h/v1"\nmodel = "m"\nendpoint = "x"\n',
     "endpoint must be one of chat, completions"),
    ('[models.x]\nbackend = "openai"\nbase_url = "http://h/v1"\nmodel = "m"\nrules = {}\n',
     "rules need the model's logits"),
    ('[models.x]\nbackend = "openai"\nbase_url = "http://h/v1"\nmodel = "m"\n'
     'max_concurrency = 0\n', "max_concurrency must be >= 1"),
    ('[models.x]\nbackend = "lm-eval"\nlm_eval_model = "hf"\n', "needs model_args"),
    ('[models.x]\nbackend = "lm-eval"\nmodel_args = "pretrained=p"\n', "needs lm_eval_model"),
    ('[models.x]\nbackend = "lm-eval"\nlm_eval_model = "hf"\nmodel_args = "pretrained"\n',
     "expected key=value"),
    ('[models.x]\nbackend = "lm-eval"\nlm_eval_model = "local-completions"\n'
     'model_args = "model=m,api_key=sk-123"\n', "may not hold api_key"),
    ('[models.x]\nsource = "local"\npath = "/p"\nbase_url = "http://h/v1"\n',
     "base_url only apply to another backend"),
    ('[models.x]\nbackend = "vllm"\nsource = "local"\npath = "/p"\ntensor_parallel_size = 0\n',
     "tensor_parallel_size must be >= 1"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_backend_fields_are_one_line_and_exit_2(tmp_path, capsys, body, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_registry(_registry(tmp_path, body))
    assert main(["list", "--registry", str(_registry(tmp_path, body))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "sk-123" not in err


def test_cache_key_has_what_changes_outputs_not_the_key_url_or_concurrency(tmp_path, monkeypatch):
    base = _spec(tmp_path, OPENAI)
    prompt = backends.format_prompt(base, None, "Hi")

    def key(body: str, instruction: str = "Hi") -> str:
        spec = _spec(tmp_path, body)
        return generation_key(output_identity(spec), backends.format_prompt(spec, None,
                                                                             instruction))

    same = key(OPENAI)
    operational = [('base_url = "http://server.test/v1/"', 'base_url = "http://elsewhere:9/v1"'),
                   ("max_retries = 3", "max_retries = 9\nmax_concurrency = 2\ntimeout_s = 5.0"),
                   (f'api_key_env = "{KEY_ENV}"', 'api_key_env = "OTHER_KEY"')]
    for old, new in operational:
        assert key(OPENAI.replace(old, new)) == same, new
    for change in ('model = "other"', 'endpoint = "completions"\nprompt_format = "plain"',
                   'revision = "v2"', 'system_prompt = "Be brief."',
                   'extra_body = { top_k = 5 }'):
        body = OPENAI.replace('model = "served-name"', change if change.startswith("model")
                              else f'model = "served-name"\n{change}')
        assert key(body) != same, change
    assert key(OPENAI.replace(f"max_new_tokens = {CAP}", "max_new_tokens = 9")) != same
    assert key(OPENAI, "Hello") != same
    assert json.loads(prompt) == [{"role": "user", "content": "Hi"}]
    identity = json.dumps(output_identity(base))
    assert "server.test" not in identity and KEY_ENV not in identity and SECRET not in identity


# ------------------------------------------------------------------- openai: faked wire


def _chat_reply(text: str = "hello there", finish: str = "stop",
                usage: tuple[int, int] | None = (7, 3)) -> httpx2.Response:
    body: dict = {"id": "x", "object": "chat.completion", "created": 0, "model": "served-name",
                  "choices": [{"index": 0, "finish_reason": finish,
                               "message": {"role": "assistant", "content": text}}]}
    if usage:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": sum(usage)}
    return httpx2.Response(200, json=body)


def _faked(spec: ModelSpec, handler) -> list:
    client = httpx2.Client(transport=httpx2.MockTransport(handler))
    loaded = backends.load_model(spec, None, http_client=client)
    prompts = [backends.format_prompt(spec, None, f"Say {i}.") for i in range(3)]
    return sorted(backends.generate(loaded, prompts), key=lambda p: p[0])


def test_429_then_success_is_retried_and_usage_and_finish_reason_are_recorded(tmp_path):
    spec = _spec(tmp_path, OPENAI)
    calls: list[dict] = []

    def handler(request):
        calls.append(json.loads(request.content))
        if len(calls) == 1:
            return httpx2.Response(429, json={"error": {"message": "slow down"}},
                                   headers={"retry-after": "0"})
        said = calls[-1]["messages"][0]["content"]
        return _chat_reply(f" reply to {said} ", "length" if "1" in said else "stop")

    got = _faked(spec, handler)
    assert len(calls) == 4 and [i for i, _ in got] == [0, 1, 2]
    assert calls[0]["model"] == "served-name" and calls[0]["max_tokens"] == CAP
    assert calls[0]["temperature"] == 0.0 and "seed" not in calls[0]
    for i, g in got:
        assert g.output == f"reply to Say {i}." and g.n_tokens == 3 and g.n_prompt_tokens == 7
        assert g.finish_reason == ("length" if i == 1 else "eos")
        assert g.info["finish_reason"] == ("length" if i == 1 else "stop")
        assert g.info["usage"]["completion_tokens"] == 3
    assert sum(g.info["attempts"] for _, g in got) == 4


@pytest.mark.parametrize("status", [401, 403])
def test_auth_refusal_stops_at_once_with_one_line_without_the_key(tmp_path, status):
    spec = _spec(tmp_path, OPENAI)
    calls = []

    def handler(request):
        calls.append(1)
        return httpx2.Response(status, json={"error": {
            "message": f"Incorrect API key provided: {SECRET}"}})

    with pytest.raises(BackendError, match=f"HTTP {status}") as e:
        _faked(spec, handler)
    msg = str(e.value)
    assert "\n" not in msg and SECRET not in msg and KEY_ENV in msg and "model x" in msg
    assert len(calls) <= spec.backend_options.max_concurrency  # no retries


@pytest.mark.parametrize("status", [400, 404])
def test_bad_requests_stop_without_retries(tmp_path, status):
    spec = _spec(tmp_path, OPENAI)

    def handler(request):
        return httpx2.Response(status, json={"error": {"message": f"nope {SECRET}"}})

    with pytest.raises(BackendError, match=f"HTTP {status}") as e:
        _faked(spec, handler)
    assert SECRET not in str(e.value) and "\n" not in str(e.value)


def test_500s_give_up_with_one_transient_line_and_timeouts_are_retried(tmp_path):
    from harness.core.errors import TransientBackendError

    spec = _spec(tmp_path, OPENAI)
    with pytest.raises(TransientBackendError, match="giving up after 4 attempt"):
        _faked(spec, lambda request: httpx2.Response(503, json={"error": {"message": "busy"}}))
    calls = []

    def flaky(request):
        calls.append(1)
        if len(calls) <= 2:
            raise httpx2.ReadTimeout("timed out", request=request)
        return _chat_reply(usage=None)

    got = _faked(spec, flaky)
    assert len(got) == 3 and all(g.info["n_tokens_from"] == "words" for _, g in got)
    assert got[0][1].n_tokens == 2  # no usage: words of "hello there"


def test_completions_endpoint_sends_the_formatted_prompt_and_sampling(tmp_path):
    spec = _spec(tmp_path, OPENAI.replace('model = "served-name"', 'model = "served-name"\n'
                                          'endpoint = "completions"\nprompt_format = "plain"\n'
                                          'extra_body = { add_special_tokens = false }')
                 .replace(f"max_new_tokens = {CAP}", f"max_new_tokens = {CAP}\ndo_sample = true"
                          "\ntemperature = 0.7\nseed = 3"))
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        assert request.url.path == "/v1/completions"
        return httpx2.Response(200, json={"choices": [{"index": 0, "text": "ok",
                                                       "finish_reason": "stop"}]})

    got = _faked(spec, handler)
    assert bodies[0]["prompt"] == "<|user|>\nSay 0.\n<|assistant|>\n" or \
        bodies[0]["prompt"].startswith("<|user|>\nSay ")
    assert bodies[0]["temperature"] == 0.7 and bodies[0]["seed"] == 3
    assert bodies[0]["add_special_tokens"] is False
    assert all(g.output == "ok" and g.finish_reason == "eos" for _, g in got)


def test_missing_key_variable_and_plain_prompts_on_chat_are_one_line(tmp_path, monkeypatch):
    spec = _spec(tmp_path, OPENAI)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=f"environment variable {KEY_ENV}"):
        _faked(spec, lambda r: _chat_reply())
    plain = _spec(tmp_path, OPENAI.replace('model = "served-name"',
                                           'model = "served-name"\nprompt_format = "plain"'))
    with pytest.raises(ConfigError, match="needs endpoint = \"completions\""):
        backends.format_prompt(plain, None, "x")
    ranking = _spec(tmp_path, OPENAI)
    with pytest.raises(ConfigError, match="ranking task needs log-likelihoods"):
        backends.check_scoring([ranking])


# ------------------------------------------------------------- a real local server


def make_eos_model(out_dir: Path) -> Path:
    """The tests' tiny model, with EOS made the greedy choice wherever one common token would
    be: some responses end on EOS after a few tokens, others run to the cap."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_model(out_dir, seed=0)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    target = tok.convert_tokens_to_ids("Ġplu")
    with torch.no_grad():
        head = model.lm_head.weight
        head[tok.eos_token_id] = head[target] * 1.02 + 0.01
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory) -> Path:
    return make_eos_model(tmp_path_factory.mktemp("eos") / "model")


@pytest.fixture(scope="module")
def server(eos_model):
    proc, base_url = tiny_server.start(["serve-tiny-model", str(eos_model)],
                                       {"TINY_SERVER_KEY": SECRET})
    try:
        yield base_url
    finally:
        tiny_server.stop(proc)


INSTRUCTIONS = [f"Give {i + 2} tips for staying healthy." for i in range(5)] + [
    "Write a short poem about the sea.", "What is two plus two?",
    "Explain how a bicycle works."]


def _local(model_dir: Path, prompt_format: str) -> ModelSpec:
    return ModelSpec(name="local", source="local", path=str(model_dir),
                     prompt_format=prompt_format, decoding=DecodingSpec(max_new_tokens=CAP))


def _run_backend(spec: ModelSpec, tokenizer=None, batch_size: int = 4) -> dict[int, object]:
    loaded = backends.load_model(spec, tokenizer)
    prompts = [backends.format_prompt(spec, tokenizer, ins) for ins in INSTRUCTIONS]
    return dict(backends.generate(loaded, prompts, batch_size))


@pytest.mark.parametrize(("endpoint", "prompt_format"),
                         [("chat", "chat_template"), ("completions", "plain"),
                          ("completions", "chat_template")])
def test_openai_greedy_outputs_match_the_transformers_backend(eos_model, server, tmp_path,
                                                              endpoint, prompt_format):
    ref_spec = _local(eos_model, prompt_format)
    tok = generation.load_tokenizer(ref_spec)
    ref = _run_backend(ref_spec, tok)
    local = f'source = "local"\npath = "{eos_model}"\n' if endpoint == "completions" else ""
    spec = _spec(tmp_path, OPENAI.replace("http://server.test/v1/", server).replace(
        'model = "served-name"', f'model = "tiny"\nendpoint = "{endpoint}"\n'
        f'prompt_format = "{prompt_format}"\n{local}max_concurrency = 3'))
    got = _run_backend(spec, backends.load_tokenizer(spec))
    assert {g.finish_reason for g in ref.values()} == {"eos", "length"}  # both paths exercised
    for i, r in ref.items():
        g = got[i]
        assert (g.output, g.finish_reason) == (r.output, r.finish_reason), INSTRUCTIONS[i]
        # the server counts the EOS token in completion_tokens, as vLLM does
        assert g.n_tokens == r.n_tokens + (r.finish_reason == "eos")
        assert g.n_prompt_tokens == r.n_prompt_tokens
        assert g.info["usage"]["completion_tokens"] == g.n_tokens


def test_a_run_with_an_openai_variant_records_usage_and_reuses_its_cache(
        eos_model, server, tmp_path, monkeypatch, capsys):
    from tiny import write_task

    from harness.run.runner import RunConfig, run

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    registry = tmp_path / "models.toml"
    registry.write_text(f'''
[defaults.decoding]
max_new_tokens = {CAP}

[models.tiny-ref]
role = "reference"
source = "local"
path = "{eos_model}"

[models.tiny-served]
backend = "openai"
base_url = "{server}"
model = "tiny"
api_key_env = "{KEY_ENV}"
''')
    task = write_task(tmp_path, n=4)
    config = RunConfig(models="all", tasks=(str(task),), judge="heuristic",
                       results_dir=tmp_path / "results", registry_path=registry)
    first = run(config)
    assert first.n_generated == 8
    lines = [json.loads(x) for x in (first.run_dir / "generations.jsonl").read_text()
             .splitlines()]
    served = [x for x in lines if x["model"] == "tiny-served"]
    local = {x["instruction_id"]: x for x in lines if x["model"] == "tiny-ref"}
    assert len(served) == 4 and all("info" not in x for x in local.values())
    for x in served:
        assert x["info"]["usage"]["completion_tokens"] == x["n_tokens"]
        assert x["output"] == local[x["instruction_id"]]["output"]
        assert json.loads(x["prompt"])[-1]["role"] == "user"
    text = "".join(p.read_text() for p in first.run_dir.rglob("*") if p.is_file())
    assert SECRET not in text
    again = run(config)
    assert again.n_generated == 0 and again.summary == first.summary
    # a wrong key: one line, exit 2, the key never shown
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-98765")
    code = main(["run", "--registry", str(registry), "--tasks", str(task), "--judge",
                 "heuristic", "--results-dir", str(tmp_path / "results2"),
                 "--max-new-tokens", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: model tiny-served: ")
    assert "HTTP 401" in err[-1] and "98765" not in "\n".join(err)


# ------------------------------------------------------------------- lm-eval backend


@pytest.mark.parametrize("prompt_format", ["chat_template", "plain"])
def test_lm_eval_hf_greedy_outputs_match_the_transformers_backend(eos_model, tmp_path,
                                                                  prompt_format):
    ref_spec = _local(eos_model, prompt_format)
    ref = _run_backend(ref_spec, generation.load_tokenizer(ref_spec))
    spec = _spec(tmp_path, f'''
[models.x]
backend = "lm-eval"
lm_eval_model = "hf"
model_args = "pretrained={eos_model},dtype=float32"
prompt_format = "{prompt_format}"
[models.x.decoding]
max_new_tokens = {CAP}
''')
    tok = backends.load_tokenizer(spec)
    got = _run_backend(spec, tok, batch_size=3)
    assert {g.finish_reason for g in ref.values()} == {"eos", "length"}
    for i, r in ref.items():
        g = got[i]
        assert (g.output, g.finish_reason, g.n_tokens) == (r.output, r.finish_reason,
                                                           r.n_tokens), INSTRUCTIONS[i]
        assert "finish_reason_inferred" not in g.info and g.info["lm_eval_model"] == "hf"


def test_lm_eval_variant_is_scored_by_the_ranking_task_through_its_loglikelihood(
        eos_model, tmp_path, monkeypatch):
    from harness.run.runner import RunConfig, run

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"instruction": ins, "response": f"Answer {i}: eat "
                                           f"well and sleep."})
                               for i, ins in enumerate(INSTRUCTIONS)) + "\n")
    task = tmp_path / "rank.toml"
    task.write_text(f'name = "rank"\nkind = "ranking"\nn = 4\nk = 2\npairs = {{ kind = "jsonl", '
                    f'path = "{pairs}", instruction_field = "instruction", response_field = '
                    f'"response" }}\n')
    registry = tmp_path / "models.toml"
    registry.write_text(f'''
[models.tiny-ref]
role = "reference"
source = "local"
path = "{eos_model}"

[models.tiny-lm-eval]
backend = "lm-eval"
lm_eval_model = "hf"
model_args = "pretrained={eos_model},dtype=float32"
''')
    result = run(RunConfig(models="all", tasks=(str(task),), judge="heuristic",
                           results_dir=tmp_path / "results", registry_path=registry))
    assert result.n_scored == 2 * 4 * 3
    scores = [json.loads(x) for x in (result.run_dir / "scores.jsonl").read_text().splitlines()]
    mine = {x["instruction_id"]: x for x in scores if x["model"] == "tiny-lm-eval"}
    theirs = {x["instruction_id"]: x for x in scores if x["model"] == "tiny-ref"}
    assert {x["backend"] for x in mine.values()} == {"lm-eval:hf"}
    for k, x in mine.items():  # the same weights: lm-eval's likelihoods equal the harness's
        assert x["logprob"] == pytest.approx(theirs[k]["logprob"], abs=1e-3)
    rows = {r["model"]: r for r in result.summary}
    assert rows["tiny-lm-eval"]["accuracy"] == rows["tiny-ref"]["accuracy"]


def test_unknown_lm_eval_model_is_one_line(tmp_path):
    spec = _spec(tmp_path, '[models.x]\nbackend = "lm-eval"\nlm_eval_model = "no-such-model"\n'
                 'model_args = "pretrained=/nowhere"\n')
    with pytest.raises(ConfigError, match="lm-eval has no model 'no-such-model'") as e:
        backends.load_model(spec, None)
    assert "\n" not in str(e.value) and isinstance(e.value, HarnessError)


def test_a_server_s_impossible_token_counts_are_not_stored_as_counts(tmp_path):
    """usage.completion_tokens -7 (or prompt_tokens -1) is flagged and counted locally."""
    spec = _spec(tmp_path, OPENAI)
    got = _faked(spec, lambda request: _chat_reply("one two three", usage=(-1, -7)))
    for _, g in got:
        assert g.n_tokens == 3 and g.n_prompt_tokens == 0  # three words, counted here
        assert g.info["usage_rejected"] == "completion_tokens -7 is not a count"
        assert g.info["usage_rejected_prompt"] == "prompt_tokens -1 is not a count"
