"""The HTML report in a real browser (headless Chromium): it renders, and outputs stay text."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.run.runner import RunConfig, run

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = '<img src=x onerror="document.title=\'pwned\'"><b>bold?</b>'


@pytest.mark.skipif(BROWSER is None and os.environ.get("CI") != "true",
                    reason="no chromium on this machine (.ci/run installs it)")
def test_report_renders_in_chromium_and_escapes_outputs(tiny_setup, monkeypatch, tmp_path):
    if BROWSER is None:  # under CI=true a missing browser fails: the report must be checked
        pytest.fail("CI=true but chromium is not installed: the report's browser test cannot run")
    import harness.generate.transformers as generation

    real = generation.generate

    def evil(loaded, prompts, batch_size=16, **kw):
        for i, g in real(loaded, prompts, batch_size, **kw):
            out = EVIL if i == 0 and loaded.spec.name == "tiny-base" else g.output
            yield i, type(g)(**{**g.__dict__, "output": out})

    monkeypatch.setattr(generation, "generate", evil)
    result = run(RunConfig(models="all", tasks=(str(tiny_setup["task"]),), judge="heuristic",
                           results_dir=tiny_setup["results"],
                           registry_path=tiny_setup["registry"]))
    flags = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = result.report_path.as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    assert "<title>harness report" in dom and "pwned" not in dom.split("</title>")[0]
    assert 'data-model="tiny-base"' in dom and 'data-model="tiny-ref"' in dom
    assert dom.count('class="conversation"') == 6
    assert "<img" not in dom and "&lt;img src=x" in dom  # the output stayed text
    assert 'id="figure-tiny-win-rates"' in dom and "<svg" in dom  # the figure, inline
    assert 'id="leaderboard-tiny"' in dom
    assert 'id="judge-validity"' in dom and "one side cut %" in dom  # the judge's validity
    # sorting runs in the browser: the address asks for the win-rate column, descending
    sorted_dom = subprocess.run(
        flags + ["--virtual-time-budget=3000", "--dump-dom",
                 url + "#sort=leaderboard-tiny:2:desc"],
        capture_output=True, text=True, timeout=120).stdout
    board = sorted_dom.split('id="leaderboard-tiny"')[1].split("</table>")[0]
    order = [chunk.split('"')[0] for chunk in board.split('data-model="')[1:]]
    assert order == ["tiny-base", "tiny-ref"]  # the variant first, the reference ("–") last
    assert 'data-dir="desc"' in board
    shot = Path(os.environ.get("HARNESS_ARTIFACTS", tmp_path)) / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,900", url],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
