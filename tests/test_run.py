"""The whole path on tiny random models: generate, judge, summarise, report, resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.run.runner import RunConfig, run
from harness.store.logs import RecordLog, by_row
from harness.store.records import GenerationRecord

ROOT = Path(__file__).resolve().parents[1]


def _config(setup, **kw) -> RunConfig:
    return RunConfig(models="all", tasks=(str(setup["task"]),), judge="heuristic",
                     results_dir=setup["results"], registry_path=setup["registry"], **kw)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_whole_path_writes_every_artifact_and_a_rerun_does_no_work(tiny_setup):
    first = run(_config(tiny_setup))
    assert first.n_generated == 12 and first.n_judged == 6
    names = {p.name for p in first.run_dir.iterdir()}
    assert {"config.json", "generations.jsonl", "judgments.jsonl", "summary.json",
            "report.html"} <= names
    gens = _lines(first.run_dir / "generations.jsonl")
    assert len({g["key"] for g in gens}) == 12
    for g in gens:
        assert g["finish_reason"] in ("eos", "length")
        assert (g["finish_reason"] == "length") == (g["n_tokens"] == 12)
        assert g["model_spec_hash"] and g["prompt"]
    plain = [g for g in gens if g["model"] == "tiny-base"]
    assert all(g["prompt"].startswith("<|user|>\n") for g in plain)
    judgments = _lines(first.run_dir / "judgments.jsonl")
    assert all(1 <= j["preference"] <= 2 and j["judge"] == "heuristic" for j in judgments)
    row = next(r for r in first.summary if r["model"] == "tiny-base")
    prefs = [j["preference"] for j in judgments]
    assert row["win_rate"] == pytest.approx(100 * (sum(prefs) / len(prefs) - 1))
    assert row["n_wins"] + row["n_wins_base"] + row["n_draws"] == row["n_total"] == 6

    second = run(_config(tiny_setup))
    assert (second.n_generated, second.n_judged) == (0, 0)
    assert second.run_dir == first.run_dir
    assert second.summary == first.summary
    assert len(_lines(first.run_dir / "generations.jsonl")) == 12  # nothing duplicated


def test_changing_only_the_judge_reuses_every_generation(tiny_setup):
    run(_config(tiny_setup))
    other = run(dataclasses.replace(_config(tiny_setup), judge="longer"))
    assert other.n_generated == 0 and other.n_judged == 6


def test_max_new_tokens_changes_the_cache_key(tiny_setup):
    run(_config(tiny_setup))
    again = run(_config(tiny_setup, max_new_tokens=5))
    assert again.n_generated == 12
    gens = _lines(again.run_dir / "generations.jsonl")
    assert max(g["n_tokens"] for g in gens) <= 5


def test_interrupted_run_resumes_without_redoing_work(tiny_setup, monkeypatch):
    import harness.generate.transformers as generation

    real = generation.generate
    made = []

    def dying(*args, **kwargs):
        for out in real(*args, **kwargs):
            if len(made) == 3:
                raise KeyboardInterrupt
            made.append(out)
            yield out

    monkeypatch.setattr(generation, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        run(_config(tiny_setup, batch_size=1))
    monkeypatch.setattr(generation, "generate", real)
    resumed = run(_config(tiny_setup, batch_size=1))
    assert resumed.n_generated == 12 - 3
    keys = [g["key"] for g in _lines(resumed.run_dir / "generations.jsonl")]
    assert len(keys) == len(set(keys)) == 12


def test_killed_process_resumes_where_it_stopped(tiny_setup):
    """SIGKILL a real run mid-generation; the rerun makes only what is missing."""
    task_dir = tiny_setup["task"].parent
    lines = [json.dumps({"id": f"k{i}", "instruction": f"Explain topic {i} in many words."})
             for i in range(40)]
    (task_dir / "ins.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "harness", "run", "--registry", str(tiny_setup["registry"]),
           "--tasks", str(tiny_setup["task"]), "--results-dir", str(tiny_setup["results"]),
           "--batch-size", "1", "--max-new-tokens", "48", "--run-id", "killed"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    gen_file = tiny_setup["results"] / "killed" / "generations.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if gen_file.exists() and len(gen_file.read_text().splitlines()) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(RecordLog(gen_file, GenerationRecord, by_row))
    assert 5 <= done_before < 80
    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"generated {80 - done_before}," in resumed.stdout
    keys = [g["key"] for g in _lines(gen_file)]
    assert len(keys) == len(set(keys)) == 80


def test_report_escapes_model_outputs(tiny_setup, monkeypatch):
    import harness.generate.transformers as generation

    real = generation.generate

    def evil(loaded, prompts, batch_size=16, **kw):
        for i, g in real(loaded, prompts, batch_size, **kw):
            yield i, type(g)(**{**g.__dict__, "output": "<script>alert(1)</script> & co"})

    monkeypatch.setattr(generation, "generate", evil)
    result = run(_config(tiny_setup))
    html = result.report_path.read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html


def test_cli_prints_report_path_and_table(tiny_setup, capsys):
    code = main(["run", "--registry", str(tiny_setup["registry"]), "--tasks",
                 str(tiny_setup["task"]), "--results-dir", str(tiny_setup["results"]),
                 "--limit", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "report: " in out and "tiny-base" in out and "reference" in out


RULES_VARIANTS = '''
[models.tiny-rules]
base = "tiny-base"
rules = { eos_max = 40.0, ramp = 8 }

[models.tiny-rules-off]
base = "tiny-base"
rules = { eos = false, uniform = false, diversity = false }
'''


def test_rules_variants_run_batched_and_all_rules_off_equals_the_base_model(tiny_dirs, tmp_path,
                                                                             monkeypatch):
    from tiny import write_registry, write_task

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    registry = write_registry(tmp_path / "models.toml", *tiny_dirs, extra=RULES_VARIANTS)
    task = write_task(tmp_path, n=6)
    result = run(RunConfig(models="all", tasks=(str(task),), results_dir=tmp_path / "res",
                           registry_path=registry, batch_size=4))
    gens = _lines(result.run_dir / "generations.jsonl")
    by = {}
    for g in gens:
        by.setdefault(g["model"], {})[g["instruction_id"]] = g
    assert {k: v["output"] for k, v in by["tiny-rules-off"].items()} == \
        {k: v["output"] for k, v in by["tiny-base"].items()}
    # an EOS bonus of 40 * n / 8 ends every response within a few tokens
    assert all(g["finish_reason"] == "eos" and g["n_tokens"] < 8
               for g in by["tiny-rules"].values())
    assert any(g["finish_reason"] == "length" for g in by["tiny-base"].values())
    config = json.loads((result.run_dir / "config.json").read_text())
    report = config["rules_token_resolution"]["tiny-rules"]
    assert {e["string"] for e in report} >= {"<", " I", "\n"}
    assert {e["status"] for e in report} <= {"mapped", "skipped", "duplicate"}
    spec = next(m for m in config["models"] if m["name"] == "tiny-rules")
    assert spec["rules"]["diversity_penalty"] == 1.5 and spec["rules"]["ramp"] == 8


def test_export_writes_alpaca_eval_files_that_read_back(tiny_setup):
    from harness.data.alpaca_formats import read_annotations, read_model_outputs

    result = run(_config(tiny_setup))
    assert main(["export", str(result.run_dir)]) == 0
    outs = read_model_outputs(result.run_dir / "alpaca_eval" / "tiny-base" / "model_outputs.json")
    anns = read_annotations(result.run_dir / "alpaca_eval" / "tiny-base" / "annotations.json")
    assert len(outs) == len(anns) == 6
    assert {a.generator_1 for a in anns} == {"tiny-ref"}
    judged = {j["instruction_id"]: j["preference"]
              for j in _lines(result.run_dir / "judgments.jsonl")}
    assert sorted(a.preference for a in anns) == sorted(judged.values())
    assert main(["export", str(tiny_setup["results"] / "nope")]) == 2


def test_tuned_builds_with_the_same_tokenizer_files_load_one_tokenizer(tmp_path, monkeypatch):
    """Tuned builds each hold a copy of their base's tokenizer: equal copies (other weights and
    build records aside) load once; a build whose tokenizer or config differs loads its own."""
    from harness.data.tune_data import DataSpec
    from harness.models.recipes import TuneSpec
    from harness.models.spec import ModelSpec
    from harness.run import runner

    builds = {}
    for name, tokenizer, config in (("a", "tok", "cfg"), ("b", "tok", "cfg"),
                                    ("c", "other tok", "cfg"), ("d", "tok", "other cfg")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tokenizer.json").write_text(tokenizer)
        (folder / "config.json").write_text(config)
        (folder / "model.safetensors").write_text(f"weights of {name}")
        (folder / "harness-tuned.json").write_text(json.dumps({"build": name}))
        builds[name] = folder
    monkeypatch.setattr(runner, "require_build", lambda spec: builds[spec.name])
    tune = TuneSpec(data=DataSpec(kind="lima"))
    key = {n: runner.tokenizer_source(ModelSpec(name=n, source="pypi", sha256="s", tune=tune))
           for n in builds}
    assert key["a"] == key["b"] and len({key["a"], key["c"], key["d"]}) == 3
    base = ModelSpec(name="base", source="pypi", sha256="s")
    assert runner.tokenizer_source(base) == runner.tokenizer_source(
        dataclasses.replace(base, name="base+rules"))
    assert runner.tokenizer_source(base) not in key.values()


def _rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_memory_freed_between_models_goes_back_to_the_system():
    """What a finished model's decoding freed on the heap is returned before the next model
    loads (glibc keeps it otherwise: 2 GB a gemma variant)."""
    import ctypes

    from harness.run.runner import release_memory

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim"):
        pytest.skip("not glibc")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(4096)]  # 256 MB of heap blocks
    for b in blocks:
        ctypes.memset(b, 1, 64 << 10)
    pin = libc.malloc(64 << 10)  # a live block above them: the heap's top cannot shrink
    for b in blocks:
        libc.free(b)
    held = _rss_mb()
    release_memory()
    assert _rss_mb() < held - 200, (held, _rss_mb())
    libc.free(pin)
