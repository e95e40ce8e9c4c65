"""A wheel installed outside the checkout works: built-in configs ship inside it, and a user's
project folder (its own models.toml, tasks/ and judges/) adds to them."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh virtual environment holding the harness wheel (dependencies from this Python)."""
    root = tmp_path_factory.mktemp("install")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(root / "dist"), str(ROOT)],
                           capture_output=True, text=True, cwd=root)
    if built.returncode != 0:
        pytest.fail(f"wheel build failed: {built.stderr[-2000:]}")
    wheel = next((root / "dist").glob("harness-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")],
                   check=True)
    # --system-site-packages sees the base interpreter's packages only; when these tests run
    # inside a virtual environment (as the README's commands do), its packages must be seen too
    site_dir = next((root / "venv" / "lib").glob("python*/site-packages"))
    (site_dir / "outer-environment.pth").write_text(
        "\n".join(p for p in site.getsitepackages() if Path(p).is_dir()) + "\n")
    python = root / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True)
    return python, root


def _harness(python: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HARNESS_PROJECT")}
    return subprocess.run([str(python), "-m", "harness", *args], cwd=cwd, capture_output=True,
                          text=True, env={**clean, **env})


def test_installed_wheel_lists_built_in_configs_from_another_directory(venv, tmp_path):
    python, _ = venv
    where = subprocess.run([str(python), "-c", "import harness; print(harness.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where and "venv" in where  # the wheel, not the checkout
    out = _harness(python, tmp_path, "list")
    assert out.returncode == 0, out.stderr
    for name in ("smollm2-135m-instruct [reference]", "gemma3-270m+rules", "instructions",
                 "alpaca_eval", "heuristic_combined", "content", "local_openai"):
        assert name in out.stdout
    # the validation suite's labels and the judges' figures ship inside the wheel
    shipped = subprocess.run(
        [str(python), "-c", "from harness.judging import blind, validation as v; "
         "print(len(blind.read_pairs()), len(blind.read_labels()), "
         "v.shipped_figures('content').is_file())"],
        cwd=tmp_path, capture_output=True, text=True)
    assert shipped.stdout.split() == ["400", "400", "True"], shipped.stderr


def test_a_project_folder_adds_models_tasks_and_judges_and_runs(venv, tiny_dirs, tmp_path):
    """From another directory: the project's reference, task and judge join the built-ins."""
    python, _ = venv
    ref, var = tiny_dirs
    project = tmp_path / "my-eval"
    (project / "tasks").mkdir(parents=True)
    (project / "judges").mkdir()
    (project / "models.toml").write_text(f'''
[models.tiny-ref]
role = "reference"
source = "local"
path = "{ref}"

[models.tiny-base]
source = "local"
path = "{var}"
prompt_format = "plain"
decoding = {{ max_new_tokens = 6 }}
''')
    (project / "tasks" / "mine.jsonl").write_text(
        "\n".join(json.dumps({"id": str(i), "instruction": f"Name {i} colours."})
                  for i in range(3)) + "\n")
    (project / "tasks" / "mine.toml").write_text('instructions = "mine.jsonl"\n')
    (project / "judges" / "longest.toml").write_text(
        'kind = "heuristic"\n[params]\nmethod = "length"\nunit = "words"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"HARNESS_CACHE": str(tmp_path / "cache")}

    listed = _harness(python, elsewhere, "--project", str(project), "list", **env)
    assert listed.returncode == 0, listed.stderr
    assert "tiny-ref [reference]" in listed.stdout
    assert "smollm2-135m-instruct:" in listed.stdout  # built-ins stay, no longer the reference
    assert "mine" in listed.stdout and "longest" in listed.stdout and "alpaca_eval" in listed.stdout

    ran = _harness(python, elsewhere, "--project", str(project), "run", "--models", "tiny-base",
                   "--tasks", "mine", "--judge", "longest", "--run-id", "r", **env)
    assert ran.returncode == 0, ran.stderr
    assert "tiny-base" in ran.stdout and "generated 6," in ran.stdout
    assert (project / "results" / "r" / "report.html").is_file()  # results in the project

    in_cwd = _harness(python, project, "run", "--models", "tiny-base", "--tasks", "mine",
                      "--judge", "longest", "--run-id", "r", **env)
    assert in_cwd.returncode == 0, in_cwd.stderr
    assert "generated 0, judged 0" in in_cwd.stdout  # the working directory is the project
