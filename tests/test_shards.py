"""Sharded runs on the tiny models: three shards merged equal the unsharded run record for record
and number for number; the shard assignment is stable and a partition; bad input is one line."""

import json
import shutil
from pathlib import Path

import pytest
from tiny import write_registry, write_task

from harness.cli import main
from harness.run.runner import RunConfig, run
from harness.run.shards import Shard, parse_shard, select_samples, shard_of
from harness.tasks.kinds import load_task

#: A rules variant whose EOS bonus ends some responses early: verdicts and lengths vary.
RULES = '\n[models.tiny-rules]\nbase = "tiny-base"\nrules = { eos_max = 4.0, ramp = 8 }\n'

#: Fields that record when or how fast a record was made, not what it holds.
TIMING = {"created", "batch_seconds", "batch_size"}


def _records_raw(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / f"{name}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _records(run_dir: Path, name: str) -> list[str]:
    """A run's records of one kind, as sorted JSON without their timing fields."""
    return sorted(json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True)
                  for r in _records_raw(run_dir, name))


def _tables(run_dir: Path) -> dict[str, object]:
    return {p.name: json.loads(p.read_text()) for p in (run_dir / "tables").glob("*.json")}


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def runs(tiny_dirs, tmp_path_factory):
    """One config (head-to-head, length, ranking) run whole, and as three shards."""
    root = tmp_path_factory.mktemp("shards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_CACHE", str(root / "cache"))
        registry = write_registry(root / "models.toml", *tiny_dirs, extra=RULES)
        h2h = write_task(root, n=6)
        ins = root / "ins.jsonl"
        length = root / "len.toml"
        length.write_text(f'name = "len"\nkind = "length"\nbins = 2\ninstructions = "{ins}"\n')
        pairs = root / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(
            {"instruction": f"Give {i + 2} tips for staying healthy.",
             "response": f"Tip {i}: eat well, sleep enough and move every day."}) + "\n"
            for i in range(8)))
        rank = root / "rank.toml"
        rank.write_text(f'name = "rank"\nkind = "ranking"\nn = 5\nk = 2\npairs = {{ kind = '
                        f'"jsonl", path = "{pairs}", instruction_field = "instruction", '
                        f'response_field = "response" }}\n')

        def config(results: Path, **kw) -> RunConfig:
            return RunConfig(models="all", tasks=(str(h2h), str(length), str(rank)),
                             judge="heuristic", results_dir=results, registry_path=registry,
                             **kw)

        whole = run(config(root / "whole"))
        shards = [run(config(root / "sharded", shard=Shard(i, 3), run_id=f"shard-{i}"))
                  for i in range(3)]
        other = run(RunConfig(models="all", tasks=(str(h2h),), judge="heuristic",
                              results_dir=root / "sharded", registry_path=registry,
                              max_new_tokens=5, shard=Shard(0, 3), run_id="other-0"))
        yield {"root": root, "whole": whole, "shards": shards, "other": other,
               "h2h": h2h, "config": config}


def test_three_shards_merged_equal_the_unsharded_run(runs, capsys):
    whole, shards = runs["whole"], runs["shards"]
    n_ins = {r["task"]: r["n"] for r in whole.summary if r["model"] == "tiny-rules"}
    assert n_ins == {"tiny": 6, "len": 6, "rank": 5}
    prefs = {r["preference"] for r in _records_raw(whole.run_dir, "judgments")}
    assert len(prefs) > 1  # the verdicts vary, so their order and pairing matter
    assert sum(s.n_generated for s in shards) == whole.n_generated == 3 * 6
    assert sum(s.n_judged for s in shards) == whole.n_judged == 2 * 6
    assert sum(s.n_scored for s in shards) == whole.n_scored == 3 * 5 * 3
    for i, s in enumerate(shards):  # a shard holds only its own samples, every variant's
        gens = [json.loads(x) for x in (s.run_dir / "generations.jsonl").open()]
        assert gens and all(shard_of(g["instruction"], 3) == i for g in gens)
        by_model = {m: {g["instruction_id"] for g in gens if g["model"] == m}
                    for m in ("tiny-ref", "tiny-base", "tiny-rules")}
        assert by_model["tiny-ref"] == by_model["tiny-base"] == by_model["tiny-rules"]
        config = json.loads((s.run_dir / "config.json").read_text())
        assert config["shard"]["index"] == i and config["shard"]["count"] == 3
        meta = json.loads((s.run_dir / "summary.json").read_text())["meta"]
        assert meta["shard"] == f"{i}/3"
        assert meta["base_config_hash"] == config["shard"]["base_config_hash"]
        assert "<b>" + f"{i}/3" + "</b> (0-based)" in s.report_path.read_text()

    dirs = [str(s.run_dir) for s in reversed(shards)]  # any order
    assert main(["merge", *dirs]) == 0
    out = capsys.readouterr().out
    merged = runs["root"] / "sharded" / whole.run_dir.name  # the unsharded run's own id
    assert f"into {merged}" in out and "tiny-base" in out
    assert (merged / "config.json").read_bytes() == (whole.run_dir / "config.json").read_bytes()
    for name in ("generations", "judgments", "scores"):
        assert _records(merged, name) == _records(whole.run_dir, name), name
    summary = json.loads((merged / "summary.json").read_text())
    assert summary["rows"] == json.loads((whole.run_dir / "summary.json").read_text())["rows"]
    assert summary["rows"] == whole.summary
    assert _tables(merged) == _tables(whole.run_dir)
    assert sorted(p.name for p in (merged / "tables").iterdir()) == \
        sorted(p.name for p in (whole.run_dir / "tables").iterdir())
    assert summary["meta"]["generated"] == 18 and len(summary["meta"]["merged_from"]) == 3
    assert (merged / "report.html").exists()
    assert main(["report", str(merged), "--format", "md"]) == 0  # a run like any other
    assert "tiny-base" in capsys.readouterr().out

    assert main(["merge", *dirs, "--run-id", "again"]) == 0  # and it is repeatable
    again = runs["root"] / "sharded" / "again"
    assert _records(again, "generations") == _records(merged, "generations")
    assert json.loads((again / "summary.json").read_text())["rows"] == summary["rows"]


def test_shard_assignment_is_stable_and_covers_every_sample_once(runs):
    instructions = [f"Instruction number {i}: say something." for i in range(300)]
    for count in (1, 2, 3, 7):
        owners = [[i for i in range(count) if Shard(i, count).holds(x)] for x in instructions]
        assert all(len(o) == 1 for o in owners)  # exactly one shard each
        assert [o[0] for o in owners] == [shard_of(x, count) for x in instructions]  # stable
        if count > 1:
            assert len({o[0] for o in owners}) == count  # every shard gets some
    # pinned: the rule is sha256 of the instruction text, the same in every process and version
    assert [shard_of(f"Give {i + 2} tips for staying healthy.", 3) for i in range(6)] == \
        [0, 1, 1, 2, 0, 2]
    task = load_task(str(runs["h2h"]))
    parts = [select_samples(task, Shard(i, 3).holds).instructions for i in range(3)]
    assert sorted(i.id for p in parts for i in p) == sorted(i.id for i in task.instructions)
    assert [len(p) for p in parts] == [2, 2, 2]


@pytest.mark.parametrize("value, message", [
    ("3/3", "numbered 0 to 2"), ("0/0", "at least 1"), ("a/b", "expected i/N"),
    ("1", "expected i/N"), ("1/2/3", "expected i/N"), ("-1/3", "--shard"),
])
def test_bad_shard_values_are_one_line(value, message, capsys):
    assert parse_shard(" 1/4 ") == Shard(1, 4)
    assert message in _one_line(capsys, ["run", "--shard", value])


def test_merge_refusals_are_one_line_and_a_partial_merge_is_marked(runs, tmp_path, capsys):
    shards = [str(s.run_dir) for s in runs["shards"]]
    assert "not a directory" in _one_line(capsys, ["merge", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "not a run directory" in _one_line(capsys, ["merge", str(tmp_path / "empty")])
    assert "not a shard" in _one_line(capsys, ["merge", str(runs["whole"].run_dir)])
    err = _one_line(capsys, ["merge", shards[0], shards[2]])
    assert "missing shard(s) 1/3" in err and "--allow-partial" in err
    err = _one_line(capsys, ["merge", str(runs["other"].run_dir), *shards[1:]])
    assert "different configs" in err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(shards[1], unfinished)
    (unfinished / "summary.json").unlink()
    assert "not finished" in _one_line(capsys, ["merge", shards[0], str(unfinished),
                                                shards[2]])
    assert "--out" in _one_line(capsys, ["merge", *shards, "--out", str(tmp_path / "o"),
                                         "--run-id", "x"])
    gap = tmp_path / "gap"
    shutil.copytree(shards[1], gap)
    lines = (gap / "generations.jsonl").read_text().splitlines()
    (gap / "generations.jsonl").write_text("\n".join(lines[1:]) + "\n")
    err = _one_line(capsys, ["merge", shards[0], str(gap), shards[2]])
    assert "no generation for task" in err and "shard 1/3" in err

    out = tmp_path / "partial"
    assert main(["merge", shards[0], shards[2], "--allow-partial", "--out", str(out)]) == 0
    assert "missing shard(s) 1/3" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["partial"] == "shards 0, 2 of 3"
    assert json.loads((out / "config.json").read_text())["shard"]["indices"] == [0, 2]
    rows = {(r["task"], r["model"]): r for r in summary["rows"]}
    assert rows[("tiny", "tiny-base")]["n"] == 4
