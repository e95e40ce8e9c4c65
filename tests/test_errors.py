"""Bad input gets one clear line on stderr and exit code 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.errors import ConfigError, DataError
from harness.data.instruction_sets import read_instructions
from harness.models.registry import load_registry, select_models

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unknown_model_suggests_the_nearest(capsys):
    err = _one_line_error(capsys, ["run", "--models", "gemma3-207m"])
    assert "unknown model 'gemma3-207m'" in err and "gemma3-270m" in err


def test_unknown_task_and_judge_suggest_the_nearest(capsys):
    assert "did you mean instructions" in _one_line_error(capsys, ["run", "--tasks", "instrucions"])
    assert "did you mean heuristic" in _one_line_error(capsys, ["run", "--judge", "heuristik"])


def test_bad_numbers_and_unknown_commands_are_one_line(capsys):
    assert "--limit" in _one_line_error(capsys, ["run", "--limit", "0"])
    assert "invalid choice" in _one_line_error(capsys, ["frobnicate"])


@pytest.mark.parametrize("text, message", [
    ("[models.a]\nsource = 'pypi'\n", "needs packages"),
    ("[models.a]\nsource = 'ftp'\n", "source must be one of"),
    ("[models.a]\nsource = 'local'\npath = '/x'\nrole = 'reference'\ncolour = 1\n",
     "unknown field(s) colour"),
    ("[models.a]\nsource = 'local'\npath = '/x'\n", "exactly one enabled variant"),
    ("[models.a]\nbase = 'b'\n[models.b]\nbase = 'a'\n", "cycle"),
    ("[models.a\n", "models.toml"),
    ("[models.a]\nsource = 'local'\npath = '/x'\nrole = 'reference'\nrules = { eos_max = 'x' }\n",
     "eos_max must be a number"),
])
def test_malformed_registry_is_reported(tmp_path, text, message):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_registry(path)
    assert message in str(e.value)


def test_missing_registry_and_instruction_files(tmp_path, capsys):
    err = _one_line_error(capsys, ["run", "--registry", str(tmp_path / "none.toml")])
    assert "not found" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"instruction": \n')
    with pytest.raises(DataError, match="malformed JSON"):
        read_instructions(bad)
    with pytest.raises(DataError, match="not found"):
        read_instructions(tmp_path / "missing.jsonl")


def test_select_models_all_excludes_disabled_variants():
    registry = load_registry()
    names = [s.name for s in select_models(registry, "all")]
    assert "smollm2-135m-instruct-hub" not in names
    assert {"smollm2-135m-instruct", "gemma3-270m", "gemma3-270m+rules"} <= set(names)


def test_module_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "--models", "nope"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model 'nope'")
    assert "Traceback" not in proc.stderr
