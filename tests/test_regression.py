"""The win-rate regression gate: its decision rule, and `baseline` / `check` end to end."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from harness.cli import main
from harness.report import regression as rg

HASHES = {"output_identity": "a", "reference_identity": "r", "prompts": "p", "judge": "j"}


def row(win_rate, se, outcomes=None, hashes=None, model="v"):
    return rg.Row(task="t", model=model, n=len(outcomes or {}) or 100, win_rate=win_rate,
                  standard_error=se, length_controlled_winrate=None, outcomes=outcomes or {},
                  hashes=hashes or HASHES)


def test_a_big_drop_fails_and_a_drop_within_noise_passes():
    rule = rg.Rule()
    assert rg.compare_row(row(50, 2), row(30, 2), rule).verdict == "regression"
    assert rg.compare_row(row(50, 5), row(47, 5), rule).verdict == "ok"
    assert rg.compare_row(row(30, 2), row(50, 2), rule).verdict == "improvement"
    assert "unpaired" in rg.compare_row(row(50, 2), row(30, 2), rule).rule


def test_a_significant_change_below_the_minimum_delta_passes():
    assert rg.compare_row(row(50, 0.1), row(49.5, 0.1), rg.Rule(min_delta=1.0)).verdict == "ok"
    assert rg.compare_row(row(50, 0.1), row(49.5, 0.1),
                          rg.Rule(min_delta=0.2)).verdict == "regression"


def test_the_paired_test_catches_a_consistent_drop_the_unpaired_rule_misses():
    rng = np.random.default_rng(0)
    base = {f"i{k}": float(p) for k, p in enumerate(rng.uniform(1.05, 1.95, 100))}
    now = {k: v - 0.04 for k, v in base.items()}  # every instruction loses 4 points

    def summary(o):
        unit = np.array(list(o.values())) - 1
        return 100 * unit.mean(), 100 * unit.std(ddof=1) / np.sqrt(unit.size)

    (wb, sb), (wn, sn) = summary(base), summary(now)
    paired = rg.compare_row(row(wb, sb, base), row(wn, sn, now), rg.Rule())
    unpaired = rg.compare_row(row(wb, sb), row(wn, sn), rg.Rule())
    assert unpaired.verdict == "ok" and "unpaired" in unpaired.rule
    assert paired.verdict == "regression" and "paired bootstrap" in paired.rule
    assert paired.delta == pytest.approx(-4.0) and paired.interval[1] < 0


def test_a_changed_config_is_flagged_not_compared_unless_allowed():
    changed = {**HASHES, "judge": "other"}
    c = rg.compare_row(row(50, 2), row(50, 2, hashes=changed), rg.Rule())
    assert c.verdict == "changed" and c.changed == ("judge",) and rg.failed([c])
    allowed = rg.compare_row(row(50, 2), row(50, 2, hashes=changed), rg.Rule(),
                             allow_changed=True)
    assert allowed.verdict == "ok" and "judge" in allowed.note


def test_reports_name_the_rule_and_parse(tmp_path):
    comps = [rg.compare_row(row(50, 2), row(30, 2), rg.Rule()),
             rg.compare_row(row(50, 2, model="w"), row(51, 2, model="w"), rg.Rule()),
             rg.Comparison("t", "gone", "missing", baseline=10.0)]
    suite = ET.fromstring(rg.format_junit(comps))
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    assert [c.get("name") for c in suite.iter("testcase")] == ["t / v", "t / w", "t / gone"]
    md = rg.format_markdown(comps, rg.Rule())
    assert md.startswith("| task | variant |") and "**regression**" in md and "unpaired" in md
    assert "rule: unpaired" in rg.format_table(comps)


# ---------------------------------------------------------------- end to end, tiny models


def _run(setup, capsys, run_id, models="all", extra=()):
    argv = ["run", "--registry", str(setup["registry"]), "--tasks", str(setup["task"]),
            "--results-dir", str(setup["results"]), "--judge", "longer", "--run-id", run_id,
            "--models", models, *extra]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    return setup["results"] / run_id


def test_baseline_then_check_passes_reports_and_updates(tiny_setup, capsys, tmp_path):
    run_dir = _run(tiny_setup, capsys, "a")
    base = tmp_path / "baseline.json"
    assert main(["baseline", str(run_dir), "-o", str(base)]) == 0
    data = json.loads(base.read_text())
    (r,) = data["rows"]
    assert r["model"] == "tiny-base" and len(r["outcomes"]) == 6 == r["n"]
    assert set(r["hashes"]) == set(HASHES)
    capsys.readouterr()
    junit, md = tmp_path / "j.xml", tmp_path / "c.md"
    assert main(["check", str(run_dir), "--baseline", str(base), "--junit", str(junit),
                 "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "paired bootstrap over 6 instructions" in out and "passed" in out
    assert ET.parse(junit).getroot().get("failures") == "0" and "tiny-base" in md.read_text()

    shorter = _run(tiny_setup, capsys, "b", extra=("--max-new-tokens", "3"))
    assert main(["check", str(shorter), "--baseline", str(base)]) == 1
    assert "changed" in capsys.readouterr().out
    assert main(["check", str(shorter), "--baseline", str(base), "--update"]) == 0
    capsys.readouterr()
    assert main(["check", str(shorter), "--baseline", str(base)]) == 0


def test_missing_and_new_variants_are_reported(tiny_dirs, tmp_path, capsys, monkeypatch):
    from tiny import write_registry, write_task

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    setup = {"registry": write_registry(tmp_path / "m.toml", *tiny_dirs,
                                        extra='[models.tiny-twin]\nbase = "tiny-base"\n'
                                              'decoding = { max_new_tokens = 5 }\n'),
             "task": write_task(tmp_path, n=4), "results": tmp_path / "results"}
    base = tmp_path / "b.json"
    assert main(["baseline", str(_run(setup, capsys, "one", models="tiny-base")), "-o",
                 str(base)]) == 0
    capsys.readouterr()
    assert main(["check", str(_run(setup, capsys, "two", models="tiny-twin")), "--baseline",
                 str(base)]) == 0
    out = capsys.readouterr().out
    assert "tiny-base" in out and "missing" in out and "tiny-twin" in out and "new" in out


@pytest.mark.parametrize("text", ["not json", '{"version": 1}', '{"version": 1, "rows": [{}]}',
                                  '{"version": 9, "rows": []}'])
def test_a_malformed_baseline_is_exit_2(tiny_setup, capsys, tmp_path, text):
    run_dir = _run(tiny_setup, capsys, "a")
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["check", str(run_dir), "--baseline", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert main(["check", str(run_dir), "--baseline", str(tmp_path / "none.json")]) == 2
