"""The report re-rendered from stored results: byte-identical, Markdown/CSV leaderboards, and two
runs compared with a delta column."""

import csv
import io

import pytest

from harness.cli import main
from harness.run.runner import RunConfig, run


@pytest.fixture
def finished(tiny_setup):
    """A finished tiny run with a head-to-head and a length task."""
    ins = tiny_setup["task"].parent / "ins.jsonl"
    length = tiny_setup["task"].parent / "len.toml"
    length.write_text(f'name = "len"\nkind = "length"\nbins = 2\ninstructions = "{ins}"\n')
    result = run(RunConfig(models="all", tasks=(str(tiny_setup["task"]), str(length)),
                           judge="heuristic", results_dir=tiny_setup["results"],
                           registry_path=tiny_setup["registry"]))
    return result


def test_re_rendering_from_stored_results_gives_the_same_bytes(finished, capsys, tmp_path):
    original = finished.report_path.read_bytes()
    assert main(["report", str(finished.run_dir), "--out", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_bytes() == original
    html = original.decode()
    for figure in ("tiny-win-rates", "len-lengths", "len-win-by-length"):
        assert f'id="figure-{figure}"' in html and "<svg" in html
    assert 'id="leaderboard-tiny"' in html and 'data-model="tiny-base"' in html
    assert html.count('class="conversation"') == 12  # 6 instructions x 2 tasks
    assert "<figcaption>Win rate of each variant against tiny-ref on tiny (6 instructions" in html
    assert 'id="run-header"' in html and "config hash" in html


def test_markdown_and_csv_leaderboards(finished, capsys):
    assert main(["report", str(finished.run_dir), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| task | kind | variant | n | result |")
    base = next(r for r in finished.summary if r["model"] == "tiny-base" and r["task"] == "tiny")
    assert f"| tiny | head_to_head | tiny-base | 6 | {base['win_rate']:.1f} ±" in md
    assert "| len | length | tiny-base | 6 | hit the cap" in md
    assert main(["report", str(finished.run_dir), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(finished.summary) == 4
    got = next(r for r in rows if r["model"] == "tiny-base" and r["task"] == "tiny")
    assert float(got["win_rate"]) == pytest.approx(base["win_rate"])


def test_two_runs_compare_with_a_delta(finished, tiny_setup, capsys):
    other = run(RunConfig(models="all", tasks=(str(tiny_setup["task"]),), judge="longer",
                          results_dir=tiny_setup["results"],
                          registry_path=tiny_setup["registry"]))
    assert main(["report", str(finished.run_dir), str(other.run_dir), "--format", "md"]) == 0
    md = capsys.readouterr().out
    a = next(r["win_rate"] for r in finished.summary
             if r["model"] == "tiny-base" and r["task"] == "tiny")
    b = next(r["win_rate"] for r in other.summary if r["model"] == "tiny-base")
    line = next(x for x in md.splitlines() if "| tiny-base |" in x)
    assert line.endswith(f"| win_rate | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    assert main(["report", str(finished.run_dir), str(other.run_dir)]) == 0
    html = (other.run_dir / f"compare-{finished.run_dir.name}.html").read_text()
    assert 'id="comparison"' in html and f"{b - a:+.3f}" in html


def test_report_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run directory not found" in err[0]


def test_judge_validity_and_cap_figures_in_summary_and_report(finished, tiny_setup, capsys):
    """A judge with measured figures (longer's ship with the package) has them in summary.json
    and the report's header; one without says how to measure them; the leaderboard shows the
    share of pairs where one side hit the cap."""
    import json

    other = run(RunConfig(models="all", tasks=(str(tiny_setup["task"]),), judge="longer",
                          results_dir=tiny_setup["results"],
                          registry_path=tiny_setup["registry"]))
    meta = json.loads((other.run_dir / "summary.json").read_text())["meta"]
    v = meta["judge_validity"]
    assert v["measured"] and v["contrastive_worst_category"] == "cut_vs_offtopic"
    assert v["blind_n"] >= 300 and v["annotations_agreement"] is not None
    html = other.report_path.read_text()
    header = html.split('id="judge-validity"')[1].split("</dd>")[0]
    assert f"{v['contrastive_all']:.1f}%" in header and "leave-one-model-out" in header
    assert "one side cut %" in html and "win rate % elsewhere" in html
    row = next(r for r in other.summary if r["model"] == "tiny-base")
    assert 0.0 <= row["cap_vs_eos_share"] <= 1.0
    unmeasured = json.loads((finished.run_dir / "summary.json").read_text())["meta"]
    assert unmeasured["judge_validity"] == {"measured": False}
    assert "not measured for this judge" in finished.report_path.read_text()
