"""Task kinds and instruction sets on the tiny models: stored references, several sources,
per-category tables, a task's own reference variant, length, MT-bench, and bad task files."""

import csv
import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.errors import HarnessError
from harness.data.instruction_sets import load_source, parse_sources
from harness.run.runner import RunConfig, run
from harness.tasks.kinds import load_task


def _config(setup, tasks, **kw) -> RunConfig:
    return RunConfig(models="all", tasks=tuple(str(t) for t in tasks), judge="heuristic",
                     results_dir=setup["results"], registry_path=setup["registry"], **kw)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def qa_set(tmp_path):
    """Four questions with stored answers, in two categories, with non-default field names."""
    rows = [{"qid": f"q{i}", "prompt": f"Name {i + 1} colours.", "topic": ["a", "b"][i % 2],
             "answer": "Red, green and blue." if i % 2 else "Red."} for i in range(4)]
    return _jsonl(tmp_path / "qa.jsonl", rows)


def test_head_to_head_against_stored_outputs_with_a_category_breakdown(tiny_setup, qa_set,
                                                                       tmp_path):
    task = _write(tmp_path / "stored.toml", f'''
name = "stored"
reference = "outputs"
instructions = {{ path = "{qa_set}", id_field = "qid", instruction_field = "prompt", \
category_field = "topic", reference_field = "answer", reference_name = "gold" }}
''')
    result = run(_config(tiny_setup, [task]))
    # both variants (the registry's reference too) are judged against the stored answers
    assert result.n_judged == 8
    judgments = [json.loads(x) for x in (result.run_dir / "judgments.jsonl").open()]
    assert {j["generator_1"] for j in judgments} == {"gold"}
    assert {j["model"] for j in judgments} == {"tiny-ref", "tiny-base"}
    rows = {r["model"]: r for r in result.summary}
    assert all(r["role"] == "variant" and r["reference"] == "gold" for r in rows.values())
    tables = result.run_dir / "tables"
    by_cat = json.loads((tables / "stored.by_category.json").read_text())
    assert sorted((r["model"], r["category"], r["n"]) for r in by_cat) == [
        ("tiny-base", "a", 2), ("tiny-base", "b", 2), ("tiny-ref", "a", 2), ("tiny-ref", "b", 2)]
    for model, row in rows.items():  # the categories' win rates average to the overall one
        cats = [r["win_rate"] for r in by_cat if r["model"] == model]
        assert sum(cats) / 2 == pytest.approx(row["win_rate"])
    with (tables / "stored.summary.csv").open() as f:
        assert {r["model"] for r in csv.DictReader(f)} == {"tiny-ref", "tiny-base"}
    html = (result.run_dir / "report.html").read_text()
    assert "Red, green and blue." in html and 'data-task="stored"' in html
    from harness.data.alpaca_formats import read_annotations
    from harness.report.export import export_run

    exported = [p for p in export_run(result.run_dir) if p.name == "annotations.json"]
    anns = read_annotations(exported[0])
    assert len(anns) == 4 and {a.output_1 for a in anns} == {"Red.", "Red, green and blue."}


def test_several_sources_keep_source_and_category_and_ids_stay_unique(tmp_path, qa_set):
    other = _jsonl(tmp_path / "more.jsonl", [{"id": "q0", "instruction": "Say hi."},
                                             {"id": "q1", "instruction": "Say bye."}])
    task = _write(tmp_path / "multi.toml", f'''
instructions = [{{ path = "{qa_set}", id_field = "qid", instruction_field = "prompt", \
category_field = "topic", n = 3, seed = 1 }}, "{other}"]
''')
    t = load_task(str(task))
    assert [i.source for i in t.instructions] == ["qa"] * 3 + ["more"] * 2
    assert len({i.id for i in t.instructions}) == 5 and t.instructions[-1].id == "more/q1"
    assert {i.category for i in t.instructions[:3]} <= {"a", "b"}
    assert len(load_task(str(task), limit=1).instructions) == 2  # --limit is per source


def test_a_task_may_name_its_own_reference_variant(tiny_setup, tmp_path):
    ins = tiny_setup["task"].parent / "ins.jsonl"
    task = _write(tmp_path / "own.toml", f'name = "own"\nreference = "tiny-base"\n'
                                         f'instructions = "{ins}"\n')
    result = run(_config(tiny_setup, [task]))
    rows = {r["model"]: r for r in result.summary}
    assert rows["tiny-base"]["role"] == "reference" and rows["tiny-ref"]["role"] == "variant"
    assert rows["tiny-ref"]["win_rate"] is not None and rows["tiny-ref"]["n_total"] == 6


def test_length_task_reports_the_cap_share_and_win_rate_by_length(tiny_setup, tmp_path):
    ins = tiny_setup["task"].parent / "ins.jsonl"
    task = _write(tmp_path / "len.toml", f'name = "len"\nkind = "length"\nbins = 2\n'
                                         f'instructions = "{ins}"\n')
    h2h = run(_config(tiny_setup, [tiny_setup["task"]]))
    result = run(_config(tiny_setup, [task]))
    assert result.n_generated == 0 and result.n_judged == 0  # the head-to-head run's records
    gens = [json.loads(x) for x in (h2h.run_dir / "generations.jsonl").open()]
    for r in result.summary:
        mine = [g for g in gens if g["model"] == r["model"]]
        assert r["kind"] == "length" and r["n"] == 6
        assert r["cap_share"] == pytest.approx(
            sum(g["finish_reason"] == "length" for g in mine) / 6)
        assert r["eos_share"] + r["cap_share"] == pytest.approx(1.0)
        assert r["mean_tokens"] == pytest.approx(sum(g["n_tokens"] for g in mine) / 6)
    base = next(r for r in result.summary if r["model"] == "tiny-base")
    old = next(r for r in h2h.summary if r["model"] == "tiny-base")
    assert base["win_rate"] == pytest.approx(old["win_rate"])
    bins = json.loads((result.run_dir / "tables" / "len.by_length_bin.json").read_text())
    assert bins and sum(b["n"] for b in bins) == 6 and {b["model"] for b in bins} == {
        "tiny-base"}
    assert (result.run_dir / "tables" / "len.distribution.csv").exists()


def test_mtbench_gives_its_80_first_turns_in_8_categories():
    task = load_task("mtbench")
    assert len(task.instructions) == 80
    assert len({i.category for i in task.instructions}) == 8
    assert task.instructions[0].instruction.startswith("Compose an engaging travel blog post")


def test_the_study_sets_with_stored_references_load():
    gpt4 = load_task("alpaca_eval_gpt4")
    assert len(gpt4.instructions) == 805 and gpt4.reference_label == "gpt4_1106_preview"
    assert all(i.reference for i in gpt4.instructions)
    assert len({i.category for i in gpt4.instructions}) == 5
    val = load_task("implicit_ins_val_gpt35")
    assert len(val.instructions) == 56 and val.reference_label == "gpt-3.5-turbo"


@pytest.mark.parametrize("body, message", [
    ('instructions = {{ path = "{qa}" }}\n', ":1: no 'instruction' string"),
    ('instructions = {{ path = "{qa}", instruction_field = "prompt", category_field = "x" }}\n',
     ":1: no 'x' string"),
    ('reference = "outputs"\ninstructions = {{ path = "{qa}", instruction_field = "prompt" }}\n',
     "has no stored output"),
    ('kind = "head_to_hed"\ninstructions = "{qa}"\n', "did you mean head_to_head"),
    ('instructions = {{ path = "{qa}", formt = "jsonl" }}\n', "unknown instructions field"),
    ('instructions = []\n', "empty list"),
    ('kind = "length"\nbins = "four"\ninstructions = "{qa}"\n', "bins"),
    ('reference = "tiny-nope"\ninstructions = {{ path = "{qa}", instruction_field = "prompt" }}\n',
     "did you mean tiny-"),
    ('kind = "style_adherence"\ninstructions = {{ path = "{qa}", instruction_field = "prompt" }}\n'
     'domain = {{ kind = "jsonl", path = "{empty}" }}\n', "holds no records"),
    ('kind = "style_adherence"\ninstructions = {{ path = "{qa}", instruction_field = "prompt" }}\n'
     'domain = {{ kind = "jsonl", path = "{blank}" }}\n', "is empty"),
    ('kind = "ranking"\nk = 9\npairs = {{ kind = "jsonl", path = "{qa}", instruction_field = '
     '"prompt", response_field = "answer" }}\n', "k = 9 needs at least 10 distinct pairs"),
    ('kind = "ranking"\npairs = {{ kind = "jsonl", path = "{qa}", instruction_field = '
     '"prompt", response_field = "answr" }}\n', "qa.jsonl:1: needs string fields"),
])
def test_bad_task_files_get_one_line_and_exit_2(tiny_setup, qa_set, tmp_path, capsys, body,
                                                 message):
    empty = _write(tmp_path / "empty.jsonl", "\n")
    blank = _jsonl(tmp_path / "blank.jsonl", [{"instruction": " ", "response": "x"}])
    task = _write(tmp_path / "bad.toml", body.format(qa=qa_set, empty=empty, blank=blank))
    err = _one_line(capsys, ["run", "--registry", str(tiny_setup["registry"]), "--tasks",
                             str(task), "--results-dir", str(tiny_setup["results"])])
    assert message in err


def test_tasks_all_cannot_be_mixed_with_names(tiny_setup, capsys):
    err = _one_line(capsys, ["run", "--registry", str(tiny_setup["registry"]), "--tasks",
                             "all,instructions"])
    assert "--tasks all" in err


def test_source_parsing_rejects_a_table_without_a_path():
    with pytest.raises(HarnessError, match="need a 'path'"):
        parse_sources({"n": 3}, "t")
    with pytest.raises(HarnessError, match="not found"):
        load_source(parse_sources("nowhere.jsonl", "t")[0], Path("/nonexistent"))


def test_style_adherence_task_runs_end_to_end_on_the_tiny_models(tiny_setup, tmp_path):
    ins = tiny_setup["task"].parent / "ins.jsonl"
    poems = _jsonl(tmp_path / "poems.jsonl", [{"instruction": "Write a poem about the sea.",
                                               "response": "The sea is wide\nThe sea is deep"}] * 3)
    task = _write(tmp_path / "style.toml", f'''
name = "style"
kind = "style_adherence"
instructions = "{ins}"
domain = {{ kind = "jsonl", path = "{poems}", instruction_field = "instruction", \
response_field = "response" }}
bins = 2
''')
    result = run(_config(tiny_setup, [task]))
    assert result.n_judged == 0  # style adherence needs no judge
    rows = {r["model"]: r for r in result.summary}
    assert set(rows) == {"tiny-ref", "tiny-base"}
    for r in rows.values():
        assert r["kind"] == "style_adherence" and r["n"] == 6
        assert 0 <= r["poem_share"] <= 1 and r["adherence_slope"] is not None
    items = json.loads((result.run_dir / "tables" / "style.items.json").read_text())
    assert len(items) == 12 and {"instruction_similarity", "poem_score"} <= set(items[0])
    assert (result.run_dir / "tables" / "style.bins.csv").exists()
    from harness.cli import format_table

    assert "adherence slope" in format_table(result.summary)


def test_ranking_task_runs_through_the_run_and_resumes_from_its_scores(tiny_setup, tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"instruction": f"Give {i + 2} tips for staying healthy.",
         "response": f"Tip {i}: eat well, sleep enough and move every day."} for i in range(8)])
    task = _write(tmp_path / "rank.toml", f'''
name = "rank"
kind = "ranking"
pairs = {{ kind = "jsonl", path = "{pairs}", instruction_field = "instruction", \
response_field = "response" }}
n = 5
k = 2
''')
    first = run(_config(tiny_setup, [task]))
    assert first.n_scored == 2 * 5 * 3 and first.n_generated == 0
    rows = {r["model"]: r for r in first.summary}
    for r in rows.values():
        assert r["kind"] == "ranking" and r["n"] == 5 and r["k"] == 2
        assert r["chance"] == pytest.approx(1 / 3) and 0 <= r["accuracy"] <= 1
    items = json.loads((first.run_dir / "tables" / "rank.items.json").read_text())
    assert len(items) == 10
    for i in items:
        assert bool(i["correct"]) == (i["predicted_index"] == i["true_index"])
    for model, r in rows.items():
        mine = [i for i in items if i["model"] == model]
        assert r["accuracy"] == pytest.approx(sum(bool(i["correct"]) for i in mine) / 5)
    again = run(_config(tiny_setup, [task]))
    assert again.n_scored == 0 and again.summary == first.summary
    limited = run(_config(tiny_setup, [task], limit=2, run_id="limited"))
    assert {r["n"] for r in limited.summary} == {2}


def test_tasks_all_skips_a_task_whose_reference_is_not_in_the_registry(tiny_setup, capsys):
    from harness.run.runner import resolve

    specs, _, tasks, _ = resolve(_config(tiny_setup, ["all"]))
    names = {t.name for t in tasks}
    assert {"instructions", "length", "style_adherence", "ranking", "mtbench"} <= names
    assert "instructions_vs_instruction_tuned" not in names
    assert "instructions_vs_instruction_tuned: skipped" in capsys.readouterr().err
    assert {s.name for s in specs} == {"tiny-ref", "tiny-base"}


def test_a_prompt_in_two_tasks_is_generated_and_judged_once(tiny_setup, tmp_path):
    ins = tiny_setup["task"].parent / "ins.jsonl"
    length = _write(tmp_path / "len.toml", f'name = "len"\nkind = "length"\n'
                                           f'instructions = "{ins}"\n')
    result = run(_config(tiny_setup, [tiny_setup["task"], length]))
    assert result.n_generated == 12 and result.n_judged == 6  # not 24 and 12
    gens = [json.loads(x) for x in (result.run_dir / "generations.jsonl").open()]
    assert len(gens) == 24 and {g["task"] for g in gens} == {"tiny", "len"}  # both labelled
    rows = {(r["task"], r["model"]): r for r in result.summary}
    assert rows[("len", "tiny-base")]["win_rate"] == pytest.approx(
        rows[("tiny", "tiny-base")]["win_rate"])
