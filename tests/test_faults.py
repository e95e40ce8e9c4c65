"""What the harness survives: every fault a hostile user tried, each kept fixed by a test.

Kill -9 and SIGINT mid-run; torn, garbage, unterminated and empty record files; wrong types in
every file a user writes and in stored records; read-only and full directories; two runs at
once; duplicate task names; variants that share an output identity; and unreachable, stalled
and key-echoing judges. Every failure is one line on stderr with exit code 2, and every resumed
run ends with the same numbers as an uninterrupted one. Runs use the tiny random models.
"""

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny import sigint_default, write_registry

from harness.cli import main
from harness.core.errors import DataError
from harness.store.logs import RecordLog, by_row
from harness.store.records import GenerationRecord, to_dict

ROOT = Path(__file__).resolve().parents[1]
N = 30  # instructions in the kill tests: long enough to be killed mid-run at batch size 1


# ------------------------------------------------------------------------------- helpers


def _task(folder: Path, n: int, name: str = "faults") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"k{i}", "category": "misc",
                         "instruction": f"Explain topic {i} in many words."}) for i in range(n)]
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / f"{name}.toml").write_text(f'name = "{name}"\ninstructions = "{name}.jsonl"\n')
    return folder / f"{name}.toml"


def _cmd(registry: Path, task: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness", "run", "--registry", str(registry), "--tasks",
            str(task), "--results-dir", str(results), "--judge", "longer", "--batch-size", "1",
            "--max-new-tokens", "40", *extra]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HARNESS_CACHE": str(cache),
            "PYTHONUNBUFFERED": "1"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _numbers(run_dir: Path) -> tuple[list, dict]:
    """What must not change across kills and resumes: summary rows and every output."""
    rows = json.loads((run_dir / "summary.json").read_text())["rows"]
    outputs = {(g["model"], g["instruction_id"]): g["output"]
               for g in _lines(run_dir / "generations.jsonl")}
    return rows, outputs


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_bytes().splitlines()) >= n:
            return
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before the fault could be injected"
    pytest.fail(f"{path} never reached {n} lines")


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 with exactly one line on stderr; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    """A registry, a 30-instruction task and one uninterrupted run to compare against."""
    root = tmp_path_factory.mktemp("faults")
    registry = write_registry(root / "models.toml", *tiny_dirs)
    task = _task(root / "tasks", N)
    baseline = root / "baseline"
    done = subprocess.run(_cmd(registry, task, baseline, "--run-id", "r"), cwd=ROOT,
                          env=_env(root / "cache-baseline"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {"root": root, "registry": registry, "task": task, "baseline": baseline / "r"}


# --------------------------------------------------------------------- kills and signals


@pytest.mark.parametrize("after_lines", [3, N + 5])
def test_kill_9_mid_run_then_resume_gives_identical_results(setup, tmp_path, after_lines):
    """SIGKILL in the reference's generation or in the variant's; the rerun finishes the rest."""
    results = tmp_path / "results"
    cmd = _cmd(setup["registry"], setup["task"], results, "--run-id", "r")
    env = _env(tmp_path / "cache")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    gens = results / "r" / "generations.jsonl"
    _wait_lines(gens, after_lines, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(RecordLog(gens, GenerationRecord, by_row))
    assert after_lines <= kept < 2 * N
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"generated {2 * N - kept}," in resumed.stdout
    assert _numbers(results / "r") == _numbers(setup["baseline"])


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_sigint_or_sigterm_saves_work_in_one_line_and_resumes_identically(setup, tmp_path, sig,
                                                                          code, word):
    """Ctrl-C, and SIGTERM (what `timeout` and Slurm send), alike: one line, then resume."""
    results = tmp_path / "results"
    cmd = _cmd(setup["registry"], setup["task"], results, "--run-id", "r")
    env = _env(tmp_path / "cache")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    _wait_lines(results / "r" / "generations.jsonl", 5, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1].startswith(f"{word}: everything computed so far")
    assert "Traceback" not in err
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _numbers(results / "r") == _numbers(setup["baseline"])


def test_a_second_run_on_the_same_run_directory_is_refused_in_one_line(setup, tmp_path):
    """Two runs at once on one run directory: the second stops at once; no record doubles."""
    results = tmp_path / "results"
    cmd = _cmd(setup["registry"], setup["task"], results, "--run-id", "r")
    env = _env(tmp_path / "cache")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    _wait_lines(results / "r" / "generations.jsonl", 2, first)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 2
    assert "in progress in another process" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.wait(timeout=300) == 0
    rows = _lines(results / "r" / "generations.jsonl")
    assert len(rows) == len({(r["key"], r["model"], r["instruction_id"]) for r in rows}) == 2 * N


def test_concurrent_runs_sharing_a_cache_never_corrupt_it(setup, tmp_path):
    """Two run ids in one results dir write the shared cache at once; every line stays whole."""
    results = tmp_path / "results"
    env = _env(tmp_path / "cache")
    procs = [subprocess.Popen(_cmd(setup["registry"], setup["task"], results, "--run-id", rid),
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for rid in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    cache = RecordLog(results / "cache" / "generations.jsonl", GenerationRecord)
    assert len(cache) == 2 * N  # every line parses; duplicates are harmless and collapse
    assert _numbers(results / "a") == _numbers(results / "b") == _numbers(setup["baseline"])


# ------------------------------------------------------------------ damaged record files


def _record(key: str, **kw) -> GenerationRecord:
    fields = {"task": "t", "model": "m", "instruction_id": key, "instruction": "i",
              "prompt": "p", "output": "o", "n_prompt_tokens": 1, "n_tokens": 1,
              "finish_reason": "eos"}
    return GenerationRecord(key=key, **{**fields, **kw})


def test_a_torn_last_line_is_dropped_and_appending_continues(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RecordLog(path, GenerationRecord)
    log.append(_record("a"))
    log.append(_record("b"))
    with open(path, "a") as f:
        f.write('{"key": "c", "task"')  # a kill in the middle of a write
    log = RecordLog(path, GenerationRecord)
    assert [r.key for r in log] == ["a", "b"]
    log.append(_record("c"))
    assert [r.key for r in RecordLog(path, GenerationRecord)] == ["a", "b", "c"]


def test_a_last_record_without_its_newline_is_not_glued_to_the_next(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(to_dict(_record("a"))))  # valid, but no final newline
    log = RecordLog(path, GenerationRecord)
    assert [r.key for r in log] == ["a"]
    log.append(_record("b"))
    assert path.read_text().count("\n") == 2 and "}{" not in path.read_text()
    assert [r.key for r in RecordLog(path, GenerationRecord)] == ["a", "b"]


def test_a_garbage_line_in_the_middle_names_its_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(to_dict(_record("a"))) + "\nnot json at all\n"
                    + json.dumps(to_dict(_record("b"))) + "\n")
    with pytest.raises(DataError, match=r"log\.jsonl:2: malformed record"):
        RecordLog(path, GenerationRecord)


def test_an_empty_file_is_an_empty_log(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("")
    log = RecordLog(path, GenerationRecord)
    assert len(log) == 0
    log.append(_record("a"))
    assert len(RecordLog(path, GenerationRecord)) == 1


@pytest.mark.parametrize("field, value", [("output", None), ("n_tokens", "12"),
                                          ("finish_reason", "stop"), ("key", 5)])
def test_a_stored_record_of_the_wrong_type_is_one_line_naming_file_and_line(tmp_path, field,
                                                                             value):
    path = tmp_path / "log.jsonl"
    bad = {**to_dict(_record("b")), field: value}
    path.write_text(json.dumps(to_dict(_record("a"))) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        RecordLog(path, GenerationRecord)
    assert "log.jsonl:2:" in str(e.value) and "\n" not in str(e.value)


def test_a_run_over_a_damaged_run_log_exits_2_in_one_line(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    shutil.copytree(setup["baseline"], results / "r")
    gens = results / "r" / "generations.jsonl"
    rows = gens.read_text().splitlines()
    rows[3] = rows[3].replace('"output": "', '"output": null, "x": "')
    gens.write_text("\n".join(rows) + "\n")
    argv = _cmd(setup["registry"], setup["task"], results, "--run-id", "r")[3:]
    err = _one_line_error(capsys, argv)
    assert "generations.jsonl:4:" in err and "output" in err


# ---------------------------------------------------------------- wrong types in configs


@pytest.mark.parametrize("extra, message", [
    ('decoding = "greedy"', "decoding must be a table"),
    ("decoding = { max_new_tokens = \"many\" }", "max_new_tokens must be an integer"),
    ("enabled = \"no\"", "enabled must be true or false"),
    ("rules = { eos = \"no\" }", "eos must be true or false"),
    ("rules = 3", "rules must be a table"),
    ("dtype = \"int3\"", "dtype must be one of"),
])
def test_wrong_types_in_the_registry_are_one_line(tiny_dirs, tmp_path, capsys, extra, message):
    registry = write_registry(tmp_path / "models.toml", *tiny_dirs, extra=extra)
    assert message in _one_line_error(capsys, ["list", "--registry", str(registry)])


def test_a_non_table_model_entry_is_one_line(tiny_dirs, tmp_path, capsys):
    registry = write_registry(tmp_path / "models.toml", *tiny_dirs)
    registry.write_text("models.extra = 3\n" + registry.read_text())
    assert "models.extra must be a table" in _one_line_error(
        capsys, ["list", "--registry", str(registry)])


@pytest.mark.parametrize("text, message", [
    ('name = 3\ninstructions = "ins.jsonl"\n', "name must be a string"),
    ('instructions = 3\n', "instructions must be a table"),
    ('instructions = [3]\n', "instructions must be a table"),
    ('kind = "quiz"\ninstructions = "ins.jsonl"\n', "unknown task kind 'quiz'"),
    ('kind = 3\ninstructions = "ins.jsonl"\n', "kind must be a string"),
    ('instructions = "ins.jsonl"\nlimit = 3\n', "unknown field(s) limit"),
])
def test_wrong_types_in_a_task_are_one_line(setup, tmp_path, capsys, text, message):
    (tmp_path / "ins.jsonl").write_text('{"instruction": "hi"}\n')
    (tmp_path / "bad.toml").write_text(text)
    argv = ["run", "--registry", str(setup["registry"]), "--tasks", str(tmp_path / "bad.toml"),
            "--results-dir", str(tmp_path / "results")]
    assert message in _one_line_error(capsys, argv)


@pytest.mark.parametrize("params, message", [
    ('method = "cascade"\nngram = "three"', "ngram must be an integer"),
    ('method = "length"\ncolour = 1', "unknown parameter(s) colour"),
    ('method = "combined"\nweights = { log_chars = "big" }', "weights.log_chars must be"),
    ('model = "m"\nbase_url = "http://127.0.0.1:1/v1"\nmax_retries = "x"',
     "max_retries must be"),
])
def test_wrong_types_in_a_judge_are_one_line(setup, tmp_path, capsys, params, message):
    kind = "openai" if "base_url" in params else "heuristic"
    (tmp_path / "j.toml").write_text(f'kind = "{kind}"\n[params]\n{params}\n')
    argv = ["run", "--registry", str(setup["registry"]), "--tasks", str(setup["task"]),
            "--judge", str(tmp_path / "j.toml"), "--results-dir", str(tmp_path / "results")]
    assert message in _one_line_error(capsys, argv)


def test_a_malformed_jsonl_line_is_reported_with_its_own_line_number(setup, tmp_path, capsys):
    (tmp_path / "ins.jsonl").write_text('{"instruction": "one"}\n{"instruction": \n')
    (tmp_path / "t.toml").write_text('instructions = "ins.jsonl"\n')
    argv = ["run", "--registry", str(setup["registry"]), "--tasks", str(tmp_path / "t.toml"),
            "--results-dir", str(tmp_path / "results")]
    assert "ins.jsonl:2: malformed JSON" in _one_line_error(capsys, argv)


def test_two_tasks_with_one_name_are_refused(setup, tmp_path, capsys):
    """Two tasks named alike would pair one task's instructions with the other's outputs."""
    other = _task(tmp_path / "other", 3, name="faults")
    argv = ["run", "--registry", str(setup["registry"]), "--tasks",
            f"{setup['task']},{other}", "--results-dir", str(tmp_path / "results")]
    assert "two tasks are named 'faults'" in _one_line_error(capsys, argv)


# ------------------------------------------------------------ read-only and full disks


@contextlib.contextmanager
def _read_only(path: Path):
    """Make a directory unwritable, even for root (chattr +i); skip where that is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory read-only for root here (chattr +i failed)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_results_directory_is_one_line_naming_the_path(setup, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    with _read_only(results):
        argv = _cmd(setup["registry"], setup["task"], results, "--limit", "2")[3:]
        err = _one_line_error(capsys, argv)
    assert str(results) in err and "cannot" in err


def test_export_to_a_read_only_directory_is_one_line(setup, tmp_path, capsys):
    out = tmp_path / "out"
    with _read_only(out):
        err = _one_line_error(capsys, ["export", str(setup["baseline"]), "--out", str(out)])
    assert str(out) in err


def test_a_full_disk_is_one_line(setup, tmp_path, capsys, monkeypatch):
    """Results on a 256 KiB tmpfs filled to the brim: ENOSPC is reported, not a traceback."""
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as f:
            f.write(b"\0" * (512 << 10))
        monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
        argv = _cmd(setup["registry"], setup["task"], full / "results", "--limit", "2")[3:]
        err = _one_line_error(capsys, argv)
        assert "No space left on device" in err and str(full) in err
    finally:
        subprocess.run(["umount", str(full)], check=False)


# --------------------------------------------------------------- shared output identity


def test_two_names_for_one_output_identity_both_export(tiny_dirs, tmp_path, capsys,
                                                       monkeypatch):
    """Variants with the same weights and decoding share generations, yet both export."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    registry = write_registry(tmp_path / "models.toml", *tiny_dirs,
                              extra='[models.tiny-twin]\nbase = "tiny-base"\n')
    task = _task(tmp_path / "tasks", 3)
    run_dir = tmp_path / "results" / "r"
    assert main(["run", "--registry", str(registry), "--tasks", str(task), "--results-dir",
                 str(tmp_path / "results"), "--run-id", "r", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "generated 6," in out  # the twin reuses tiny-base's 3 generations
    assert main(["export", str(run_dir)]) == 0
    for model in ("tiny-ref", "tiny-base", "tiny-twin"):
        outputs = json.loads((run_dir / "alpaca_eval" / model / "model_outputs.json").read_text())
        assert len(outputs) == 3 and {o["generator"] for o in outputs} == {model}
    twin = json.loads((run_dir / "alpaca_eval" / "tiny-twin" / "annotations.json").read_text())
    base = json.loads((run_dir / "alpaca_eval" / "tiny-base" / "annotations.json").read_text())
    assert [a["output_2"] for a in twin] == [a["output_2"] for a in base]


@pytest.mark.parametrize("limit", [1, 2])
def test_tiny_runs_print_undefined_values_as_dashes(setup, tmp_path, capsys, monkeypatch,
                                                    limit):
    """n = 1 has no standard error and n < 5 no LC fit: both print "–", nothing crashes."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    argv = _cmd(setup["registry"], setup["task"], tmp_path / "results", "--limit",
                str(limit))[3:]
    assert main(argv) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "tiny-base" in line)
    assert "–" in row
    run_dir = next(tmp_path.glob("results/run-*"))
    report = (run_dir / "report.html").read_text()
    board = report.split('id="leaderboard-faults"')[1].split("</table>")[0]
    cells = board.split('data-model="tiny-base"')[1].split("</tr>")[0]
    assert "–" in cells and "nan" not in cells.lower()  # the LC column (and n = 1's SE)
    assert main(["report", str(run_dir), "--format", "md"]) == 0
    md = next(line for line in capsys.readouterr().out.splitlines() if "tiny-base" in line)
    assert "–" in md and "nan" not in md.lower()
    assert main(["report", str(run_dir), "--format", "csv"]) == 0
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    base = next(r for r in rows if r["model"] == "tiny-base")
    assert base["length_controlled_winrate"] == ""  # undefined, not 0 or nan
    if limit == 1:
        assert base["standard_error"] == ""


# -------------------------------------------------------------------------------- judges


def _judge_toml(tmp_path: Path, base_url: str, **params) -> Path:
    lines = ['kind = "openai"', "[params]", 'model = "m"', f'base_url = "{base_url}"',
             'api_key_env = "FAULTS_KEY"', 'template = "templates/pairwise.txt"',
             'identifiers = ["A", "B"]', 'parser = "text"', 'mode = "both_orders"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in params.items()]
    (tmp_path / "judge.toml").write_text("\n".join(lines) + "\n")
    return tmp_path / "judge.toml"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_judge_fails_fast_before_any_generation(setup, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("FAULTS_KEY", "sk-faults-secret-123")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    judge = _judge_toml(tmp_path, f"http://127.0.0.1:{_closed_port()}/v1")
    argv = _cmd(setup["registry"], setup["task"], tmp_path / "results", "--judge",
                str(judge))[3:]
    start = time.perf_counter()
    err = _one_line_error(capsys, argv)
    assert time.perf_counter() - start < 30  # model loading included; no minute of retries
    assert "cannot reach" in err and "sk-faults" not in err
    gens = list(tmp_path.glob("results/*/generations.jsonl"))
    assert not gens or not gens[0].read_text().strip()


def test_a_stalled_judge_is_one_line_after_its_timeout(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAULTS_KEY", "sk-faults-secret-123")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        judge = _judge_toml(tmp_path, f"http://127.0.0.1:{server.getsockname()[1]}/v1",
                            timeout_s=1.0, max_retries=1, backoff_s=0.1)
        argv = _cmd(setup["registry"], setup["task"], tmp_path / "results", "--judge",
                    str(judge))[3:]
        start = time.perf_counter()
        err = _one_line_error(capsys, argv)
    assert time.perf_counter() - start < 30
    assert "within 1s" in err


def _send_chat(handler: http.server.BaseHTTPRequestHandler, content: str, **extra) -> None:
    """Answer a chat completion request with `content` (and extra top-level fields)."""
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, **extra}
    data = json.dumps(body).encode()
    handler.send_response(200)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class _SlowlorisHandler(http.server.BaseHTTPRequestHandler):
    """Sends its headers at once, then one byte of the body every 0.2 s, for at most 20 s."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "100000")
        self.end_headers()
        for _ in range(100):
            try:
                self.wfile.write(b" ")
                self.wfile.flush()
            except OSError:  # the client gave up
                return
            time.sleep(0.2)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_a_slowloris_judge_is_one_line_within_its_deadline(setup, tmp_path, capsys,
                                                            monkeypatch):
    """The client's timeout bounds each read; a server trickling a byte every 0.2 s must still
    be given up on once the whole request has taken timeout_s."""
    monkeypatch.setenv("FAULTS_KEY", "sk-faults-secret-123")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    with _serve(_SlowlorisHandler) as url:
        judge = _judge_toml(tmp_path, url, timeout_s=1.0, max_retries=1, backoff_s=0.1)
        argv = _cmd(setup["registry"], setup["task"], tmp_path / "results", "--judge",
                    str(judge))[3:]
        start = time.perf_counter()
        err = _one_line_error(capsys, argv)
    assert time.perf_counter() - start < 10, err
    assert "giving up after 2 attempt(s)" in err


def test_a_slowloris_generation_server_is_given_up_on(setup, tmp_path, monkeypatch):
    from harness.core.errors import TransientBackendError
    from harness.generate import backends
    from harness.models.registry import load_registry

    monkeypatch.setenv("FAULTS_KEY", "sk-faults-secret-123")
    with _serve(_SlowlorisHandler) as url:
        registry = tmp_path / "models.toml"
        registry.write_text(setup["registry"].read_text() + f"""
[models.served]
backend = "openai"
base_url = "{url}"
model = "m"
api_key_env = "FAULTS_KEY"
timeout_s = 1.0
max_retries = 1
backoff_s = 0.1
""")
        spec = load_registry(registry)["served"]
        loaded = backends.load_model(spec, None)
        prompts = [backends.format_prompt(spec, None, "Say hi.")]
        start = time.perf_counter()
        with pytest.raises(TransientBackendError, match="giving up after 2 attempt"):
            list(backends.generate(loaded, prompts))
    assert time.perf_counter() - start < 10


class _HugeReplyHandler(http.server.BaseHTTPRequestHandler):
    """A chat endpoint whose reply is "B" and then 5 MB more."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        _send_chat(self, "B " + "x" * 5_000_000)

    def log_message(self, *args):
        pass


def test_a_huge_judge_reply_is_cut_before_it_is_stored(setup, tmp_path, capsys, monkeypatch):
    from harness.judging.llm import MAX_STORED_REPLY

    monkeypatch.setenv("FAULTS_KEY", "sk-faults-secret-123")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    with _serve(_HugeReplyHandler) as url:
        judge = _judge_toml(tmp_path, url, timeout_s=30.0)
        argv = _cmd(setup["registry"], setup["task"], tmp_path / "results", "--judge",
                    str(judge), "--limit", "2", "--run-id", "huge")[3:]
        assert main(argv) == 0, capsys.readouterr().err
    run = tmp_path / "results" / "huge"
    judged = _lines(run / "judgments.jsonl")
    assert judged and all(j["info"]["raw_cut_from"] > 5_000_000 for j in judged)
    assert all(len(j["raw"]) == MAX_STORED_REPLY for j in judged)
    assert all(n > 5_000_000 for j in judged for n in j["info"]["reply_cut_from"])
    for path in (run / "judgments.jsonl", run / "report.html"):
        assert path.stat().st_size < 2_000_000, path  # not 4 x 5 MB per judgment


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """A chat endpoint that answers "B" and echoes the caller's Authorization header."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        echoed = self.headers.get("authorization", "")
        _send_chat(self, f"B ({echoed})", echo=echoed)

    def log_message(self, *args):
        pass


def test_a_key_echoed_by_the_judge_never_reaches_disk(setup, tmp_path, capsys, monkeypatch):
    key = "faults-secret-key-9876"
    monkeypatch.setenv("FAULTS_KEY", key)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        judge = _judge_toml(tmp_path, f"http://127.0.0.1:{server.server_address[1]}/v1")
        argv = _cmd(setup["registry"], setup["task"], tmp_path / "results", "--judge",
                    str(judge), "--limit", "3")[3:]
        assert main(argv) == 0, capsys.readouterr().err
    finally:
        server.shutdown()
    captured = capsys.readouterr()
    assert key not in captured.out + captured.err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "judgments.jsonl" for p in written)
    for path in written:
        assert key.encode() not in path.read_bytes(), path


# ------------------------------------------- names that become paths (second hostile probe)


@pytest.mark.parametrize("run_id", ["../../x", "/abs/path", "..", "a/b", "cache", ".hidden",
                                    ""])
def test_a_run_id_that_is_not_one_safe_folder_is_refused_before_any_work(setup, tmp_path,
                                                                          capsys, run_id):
    results = tmp_path / "deep" / "results"
    argv = ["run", "--registry", str(setup["registry"]), "--tasks", str(setup["task"]),
            "--results-dir", str(results), "--run-id", run_id, "--judge", "longer"]
    err = _one_line_error(capsys, argv)
    assert "--run-id" in err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "x").exists()  # nothing made


def test_merge_refuses_an_unsafe_run_id(setup, tmp_path, capsys):
    err = _one_line_error(capsys, ["merge", str(setup["baseline"]), "--run-id", "../out"])
    assert "--run-id '../out'" in err and not (setup["baseline"].parent.parent / "out").exists()


def test_a_task_whose_name_is_a_path_is_refused_before_any_work(setup, tmp_path, capsys):
    task = _task(tmp_path / "t", 3)
    task.write_text('name = "../../../x"\ninstructions = "faults.jsonl"\n')
    argv = ["run", "--registry", str(setup["registry"]), "--tasks", str(task),
            "--results-dir", str(tmp_path / "results"), "--judge", "longer"]
    assert "task name '../../../x'" in _one_line_error(capsys, argv)
    assert not (tmp_path / "results").exists()


def test_a_variant_whose_name_is_a_path_is_refused(setup, tmp_path, capsys):
    text = setup["registry"].read_text().replace("[models.tiny-base]",
                                                 '[models."../../../../x"]')
    registry = tmp_path / "models.toml"
    registry.write_text(text)
    argv = ["run", "--registry", str(registry), "--tasks", str(setup["task"]),
            "--results-dir", str(tmp_path / "results"), "--judge", "longer"]
    assert "variant name '../../../../x'" in _one_line_error(capsys, argv)


def test_export_refuses_a_stored_variant_name_that_is_a_path(setup, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(setup["baseline"], run)
    gens = _lines(run / "generations.jsonl")
    gens[0]["model"] = "../../../../x"
    (run / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    err = _one_line_error(capsys, ["export", str(run), "--out", str(tmp_path / "a" / "b")])
    assert "variant name '../../../../x'" in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("**/model_outputs.json"))


# ------------------------------------------------ files that hang, or parse into tracebacks


def test_an_instruction_file_that_is_a_fifo_is_refused_not_read(setup, tmp_path):
    """Reading a FIFO blocks until a writer comes: it must be refused, not waited on."""
    fifo = tmp_path / "ins.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "t.toml").write_text('instructions = "ins.jsonl"\n')
    cmd = [sys.executable, "-m", "harness", "run", "--registry", str(setup["registry"]),
           "--tasks", str(tmp_path / "t.toml"), "--results-dir", str(tmp_path / "results")]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "cache"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "is not a regular file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _task_with(tmp_path: Path, line: str) -> list[str]:
    (tmp_path / "ins.jsonl").write_text('{"instruction": "fine"}\n' + line + "\n")
    (tmp_path / "t.toml").write_text('instructions = "ins.jsonl"\n')
    return ["--tasks", str(tmp_path / "t.toml"), "--results-dir", str(tmp_path / "results")]


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "bad \\ud800 text"}', "ins.jsonl:2: 'instruction' holds invalid Unicode"),
    ('{"instruction": "x", "n": ' + "9" * 5000 + "}", "ins.jsonl:2: malformed JSON (a number"),
    ('{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "ins.jsonl:2: malformed JSON (nested too deeply)"),
])
def test_hostile_task_lines_are_one_line(setup, tmp_path, capsys, line, message):
    argv = ["run", "--registry", str(setup["registry"]), *_task_with(tmp_path, line)]
    assert message in _one_line_error(capsys, argv)


def test_a_deeply_nested_registry_is_one_line(setup, tmp_path, capsys):
    registry = tmp_path / "models.toml"
    registry.write_text(setup["registry"].read_text() + "\nx = " + "[" * 5000 + "]" * 5000
                        + "\n")
    argv = ["run", "--registry", str(registry), "--tasks", str(setup["task"]),
            "--results-dir", str(tmp_path / "results")]
    assert "nested too deeply" in _one_line_error(capsys, argv)


def test_a_huge_integer_in_a_stored_record_or_a_baseline_is_one_line(setup, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(setup["baseline"], run)
    gens = (run / "generations.jsonl").read_text().splitlines()
    gens[1] = gens[1].replace('"n_tokens": ', '"n_tokens": ' + "9" * 5000 + ", \"x\": ", 1)
    (run / "generations.jsonl").write_text("\n".join(gens) + "\n")
    err = _one_line_error(capsys, ["export", str(run)])
    assert "generations.jsonl:2: malformed record" in err
    baseline = tmp_path / "baseline.json"
    assert main(["baseline", str(setup["baseline"]), "-o", str(baseline)]) == 0
    capsys.readouterr()
    baseline.write_text(baseline.read_text().replace('"n": ', '"n": ' + "9" * 5000 + ", \"y\": ",
                                                     1))
    err = _one_line_error(capsys, ["check", str(setup["baseline"]), "--baseline", str(baseline)])
    assert "cannot read" in err and "baseline" in err


def test_a_byte_order_mark_is_accepted_in_toml_and_jsonl(setup, tmp_path, capsys):
    (tmp_path / "ins.jsonl").write_text('\ufeff{"instruction": "Name a colour."}\n',
                                        encoding="utf-8")
    (tmp_path / "t.toml").write_text('\ufeffname = "bom"\ninstructions = "ins.jsonl"\n',
                                     encoding="utf-8")
    registry = tmp_path / "models.toml"
    registry.write_text("\ufeff" + setup["registry"].read_text(), encoding="utf-8")
    argv = ["run", "--registry", str(registry), "--tasks", str(tmp_path / "t.toml"),
            "--results-dir", str(tmp_path / "results"), "--judge", "longer",
            "--max-new-tokens", "4", "--run-id", "bom"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "results" / "bom" / "summary.json").is_file()


# ------------------------------------------------------------ impossible numbers refused


@pytest.mark.parametrize("field, value", [("n_tokens", -1000), ("n_prompt_tokens", -1),
                                          ("batch_seconds", float("inf"))])
def test_an_impossible_number_in_a_stored_generation_names_file_and_line(tmp_path, field,
                                                                        value):
    rec = GenerationRecord(key="k", task="t", model="m", instruction_id="1", instruction="i",
                           prompt="p", output="o", n_prompt_tokens=1, n_tokens=2,
                           finish_reason="eos")
    path = tmp_path / "generations.jsonl"
    path.write_text(json.dumps({**to_dict(rec), field: value}) + "\n")
    with pytest.raises(DataError, match=rf"generations.jsonl:1: .*'{field}' must be a number"):
        RecordLog(path, GenerationRecord, by_row)


def test_a_preference_outside_one_to_two_in_a_stored_judgment_is_refused(tmp_path):
    from harness.store.records import JudgmentRecord

    rec = JudgmentRecord(key="k", task="t", model="m", instruction_id="1", judge="j",
                         judge_spec_hash="h", generator_1="a", generator_2="b", preference=7.0)
    path = tmp_path / "judgments.jsonl"
    path.write_text(json.dumps(to_dict(rec)) + "\n")
    with pytest.raises(DataError, match=r"judgments.jsonl:1: .*'preference' must be"):
        RecordLog(path, JudgmentRecord, by_row)


@pytest.mark.parametrize("field, value, expected", [
    ("win_rate", "Infinity", "win_rate must be a finite number in [0, 100]"),
    ("win_rate", "NaN", "win_rate must be a finite number"),
    ("standard_error", "-1", "standard_error must be a finite number"),
    ("n", "-3", "n must be a count"),
    ("win_rate", "1" + "0" * 400, "win_rate must be a finite number in [0, 100]"),
])
def test_a_baseline_with_an_impossible_number_never_passes(setup, tmp_path, capsys, field,
                                                            value, expected):
    baseline = tmp_path / "baseline.json"
    assert main(["baseline", str(setup["baseline"]), "-o", str(baseline)]) == 0
    capsys.readouterr()
    data = json.loads(baseline.read_text())
    data["rows"][0][field] = "@@"
    baseline.write_text(json.dumps(data).replace('"@@"', value))
    err = _one_line_error(capsys, ["check", str(setup["baseline"]), "--baseline",
                                   str(baseline)])
    assert expected in err and "row 1" in err
