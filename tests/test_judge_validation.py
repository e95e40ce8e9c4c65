"""The judge validation suite: content features, contrastive pairs, blind labels, held-out
fitting, cached validity figures, and the cap-against-EOS figures of a run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.core.cache import shared_data_dir
from harness.core.errors import DataError
from harness.judging import blind, contrastive
from harness.judging import heuristic as hj
from harness.judging import validation as jv
from harness.judging.protocol import Candidate, JudgeSpec, PairwiseItem
from harness.report.text import cap_warning, validity_line
from harness.tasks.head_to_head import cap_against_eos, order_agreement

HAS_SHARED = (shared_data_dir() / "alpaca_eval" / "annotations").is_dir()
needs_shared = pytest.mark.skipif(not HAS_SHARED, reason="needs ../shared/data")


def feats(instruction: str, text: str) -> dict[str, float]:
    return hj.text_features(instruction, Candidate(text))


# ------------------------------------------------------------------------------- features


@pytest.mark.parametrize("leak", ["<|user|>", "<|assistant|>", "<start_of_turn>user",
                                  "### Instruction:", "User: hi", "<|im_start|>", "<|manager|>",
                                  "<|interviewer>", "</s>", "[INST]"])
def test_markup_finds_leaked_roles(leak):
    assert feats("Say hello.", f"Hello there.\n{leak}\nmore text")["markup"] > 0


def test_markup_ignores_html_and_prose():
    text = "Use <div> and <br> tags.\nThe user said: fine. An assistant helps."
    assert feats("Explain HTML tags.", text)["markup"] == 0


def test_questions_share_unless_questions_were_asked():
    qs = "What is a job interview?\nHow do you prepare for one?\nWhy does it matter?"
    assert feats("Give advice for a job interview.", qs)["questions"] == pytest.approx(1.0)
    assert feats("Write three questions for a job interview.", qs)["questions"] == 0.0
    assert feats("Give advice.", "Prepare well. Arrive early.")["questions"] == 0.0


def test_echo_and_duplicate_lines():
    ins = "Write a short story about a dragon who loves tea."
    assert feats(ins, ins)["echo"] == pytest.approx(1.0)
    assert feats(ins, "Once, a dragon brewed green tea every dawn.")["echo"] == 0.0
    assert feats(ins, "a\nb\na\na")["dup_lines"] == pytest.approx(0.5)
    assert feats(ins, "one\ntwo\nthree")["dup_lines"] == 0.0


def test_weighted_fit_follows_the_weights():
    """Rows with zero weight do not move the fit; a heavily weighted block dominates it."""
    x = np.array([[1.0], [1.0], [-1.0], [-1.0]])
    y = np.array([1.0, 1.0, 0.0, 0.0])
    y_flip = np.array([0.0, 0.0, 1.0, 1.0])
    xs, ys = np.vstack([x, x]), np.concatenate([y, y_flip])
    w_first = hj.fit_logistic(xs, ys, l2=0.1, sample_weight=np.r_[np.ones(4), np.zeros(4)])
    w_second = hj.fit_logistic(xs, ys, l2=0.1, sample_weight=np.r_[np.zeros(4), np.ones(4)])
    assert w_first[0] > 1 and w_second[0] < -1


# --------------------------------------------------------------------------- contrastive


@needs_shared
def test_contrastive_pairs_are_seeded_balanced_and_known():
    pairs = contrastive.build(seed=0, per_category=30)
    again = contrastive.build(seed=0, per_category=30)
    assert [(p.item, p.good) for p in pairs] == [(p.item, p.good) for p in again]
    assert {p.category for p in pairs} == set(contrastive.CATEGORIES)
    assert len(pairs) == 30 * len(contrastive.CATEGORIES)
    sides = [p.good for p in pairs]
    assert 0.3 < sides.count(1) / len(sides) < 0.7  # the good answer is on either side
    for p in pairs:
        good = p.item.output_1 if p.good == 1 else p.item.output_2
        bad = p.item.output_2 if p.good == 1 else p.item.output_1
        assert 0 <= p.fold < 5 and good.output.strip()
        if p.category == "vs_loop":
            assert bad.finish_reason == "length" and hj.repetition_share(bad.output) > 0.5
        if p.category == "cut_vs_offtopic":
            assert good.finish_reason in ("length", "eos") and bad.finish_reason == "eos"
        if p.category == "vs_markup":
            assert hj.text_features(p.item.instruction, bad)["markup"] > 0
    # a good answer is sometimes complete and sometimes cut: EOS alone cannot tell the sides
    finishes = {(p.item.output_1 if p.good == 1 else p.item.output_2).finish_reason
                for p in pairs if p.category == "vs_echo"}
    assert finishes == {"eos", "length"}


def test_cut_keeps_the_opening_words():
    text = " ".join(f"w{i}" for i in range(300))
    assert contrastive.cut(text, 10) == " ".join(f"w{i}" for i in range(10))


# ---------------------------------------------------------------------------- blind labels


def _gens(tasks=("mtbench",), n=6):
    rows = []
    for task in tasks:
        for i in range(n):
            for model in ("ref", "v1", "v2"):
                rows.append({"task": task, "model": model, "instruction_id": str(i),
                             "instruction": f"question {i}", "output": f"{model} answer {i}",
                             "finish_reason": "eos" if model != "v2" else "length"})
    return rows


def test_blind_pairs_hide_names_draw_sides_and_hash_outputs():
    pairs = blind.build_pairs(_gens(("mtbench", "instructions")), "ref", per_variant=4, seed=1)
    assert len(pairs) == 8 and {p.task for p in pairs} == {"mtbench"}  # never the built-in 72
    assert [p.pair_id for p in pairs] == [f"p{n:04d}" for n in range(8)]
    assert {p.variant_side for p in pairs} == {"A", "B"}
    for p in pairs:
        shown_var = p.output_a if p.variant_side == "A" else p.output_b
        assert shown_var.startswith(p.variant) and p.sha256_a == blind.sha256_text(p.output_a)
        item = p.as_item()
        assert item.output_2.output == shown_var  # the judge sees the variant as output_2
        view = blind.reader_view(p)
        assert set(view) == {"pair_id", "instruction", "A", "B"}
    assert pairs == blind.build_pairs(_gens(("mtbench", "instructions")), "ref", 4, seed=1)


def test_stale_labels_are_detected(tmp_path):
    pairs = blind.build_pairs(_gens(), "ref", per_variant=3)
    labels = [blind.BlindLabel(p.pair_id, 0.9, "B better", "r1", p.sha256_a, p.sha256_b)
              for p in pairs]
    changed = [pairs[0].__class__(**{**pairs[0].__dict__, "output_a": "new text",
                                     "sha256_a": blind.sha256_text("new text")}), *pairs[1:]]
    fresh, stale, missing = blind.join(changed, labels[:-1])
    assert stale == [pairs[0].pair_id] and missing == [pairs[-1].pair_id]
    assert len(fresh) == len(pairs) - 2
    lp = fresh[0]
    assert lp.preference == (2.0 if lp.pair.variant_side == "B" else 1.0)
    gens = _gens()
    gens[0] = {**gens[0], "output": "the reference changed"}  # ref, instruction 0
    stale_ids = blind.stale_against_run(pairs, gens)
    assert stale_ids == [p.pair_id for p in pairs if p.instruction_id == "0"]


def test_labels_file_is_checked(tmp_path):
    bad = tmp_path / "labels.jsonl"
    bad.write_text(json.dumps({"pair_id": "p0", "p_b": 1.5, "reason": "", "reader": "r",
                               "sha256_a": "", "sha256_b": ""}) + "\n")
    with pytest.raises(DataError, match="p_b must be"):
        blind.read_labels(bad)
    bad.write_text('{"pair_id": "p0"}\n')
    with pytest.raises(DataError, match="missing or unknown"):
        blind.read_labels(bad)


def test_committed_labels_cover_the_committed_pairs():
    """Every committed pair has exactly one fresh label, by the rubric's rules."""
    pairs, labels = blind.read_pairs(), blind.read_labels()
    ids = [lab.pair_id for lab in labels]
    assert len(ids) == len(set(ids))
    fresh, stale, missing = blind.join(pairs, labels)
    assert len(pairs) >= 300 and not stale and not missing
    assert {p.task for p in pairs} <= set(blind.LABELLED_TASKS)
    assert blind.RUBRIC_FILE.is_file()


# ------------------------------------------------------------------------ held-out fitting


def _toy_suite(n_per_fold=40):
    """Blind pairs where a feature's sign flips in fold 0: a fit that saw fold 0 would get it
    right there; a held-out one must get it wrong."""
    labelled = []
    rng = np.random.default_rng(0)
    k = 0
    while len(labelled) < 5 * n_per_fold:
        ins = f"instruction {k}"
        k += 1
        fold = jv.instruction_fold(ins)
        long_wins = fold != 0
        var_long = bool(rng.integers(2))
        out_v = "word " * (60 if var_long else 3)
        out_r = "word " * (3 if var_long else 60)
        side = "B"
        pair = blind.BlindPair(f"p{k}", "mtbench", str(k), ins, "v", "ref", side, out_r, out_v,
                               "eos", "eos", blind.sha256_text(out_r), blind.sha256_text(out_v))
        p_b = 1.0 if (var_long == long_wins) else 0.0
        labelled.append(blind.LabelledPair(pair, blind.BlindLabel(pair.pair_id, p_b, "", "r",
                                                                  pair.sha256_a, pair.sha256_b)))
    return jv.Suite([], [], labelled)


def test_fitted_judge_is_scored_held_out():
    suite = _toy_suite()
    spec = JudgeSpec("toy", "heuristic", {"method": "combined", "weights": {"log_chars": 0.0},
                                          "fit_sources": ["blind"], "l2": 0.01})
    rows = jv.suite_rows(suite)
    prefs, how = jv.preferences(spec, rows)
    assert "held out" in how
    fold0 = rows.fold == 0
    right = (prefs > 1.5) == (rows.y > 0.5)
    assert right[~fold0].mean() > 0.95  # learnt from the other folds
    assert right[fold0].mean() < 0.05  # fold 0 was never seen: its flipped sign is missed


def test_held_out_fits_never_see_a_pair_that_shows_the_held_out_fold_or_model():
    """A contrastive pair whose off-topic answer comes from fold 3 and from model m1 is left
    out of every fit that scores fold 3, its own fold, or model m1."""
    item = PairwiseItem("i", Candidate("a"), Candidate("b"))
    ann = [jv.AnnotationSet("m0", (item,), np.array([1.2])),
           jv.AnnotationSet("m1", (item,), np.array([1.7]))]
    own = jv.instruction_fold("i")
    other = (own + 3) % 5
    touching = contrastive.ContrastivePair("cut_vs_offtopic", item, 1, fold=own,
                                           models=frozenset({"m1"}),
                                           folds=frozenset({own, other}))
    rows = jv.suite_rows(jv.Suite(ann, [touching], []))
    pair = rows.source == 1
    free = next(k for k in range(5) if k not in (own, other))
    assert jv.training_rows(rows, free)[pair].all()
    assert jv.training_rows(rows, free, 0)[pair].all()  # m0's outputs are not in it
    for k, m in ((own, None), (other, None), (other, 0), (free, 1)):
        assert not jv.training_rows(rows, k, m)[pair].any(), (k, m)


def test_validity_figures_are_cached_per_resolved_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    a = JudgeSpec("x", "heuristic", {"method": "length"})
    b = JudgeSpec("x", "heuristic", {"method": "length", "unit": "words"})
    figures = {"judge": "x", "how": "not fitted", "contrastive": [
        {"category": "vs_echo", "n": 2, "accuracy": 50.0},
        {"category": "ALL", "n": 2, "accuracy": 50.0}],
        "blind": [{"variant": "v", "n": 3, "agreement": 80.0, "delta": -4.0,
                   "judge_win_rate": 1.0, "label_win_rate": 5.0, "n_both_call": 2},
                  {"variant": "ALL", "n": 3, "agreement": 80.0, "delta": -4.0,
                   "judge_win_rate": 1.0, "label_win_rate": 5.0, "n_both_call": 2}],
        "annotations": {"agreement": 88.0, "kappa": 0.5, "spearman": 0.6}}
    jv.store_figures(a, a, figures)
    assert jv.cached_figures(a, a)["judge"] == "x" and jv.cached_figures(b, b) is None
    # a fitting parameter changes the held-out figures, not the judgments: a new key too
    refit = JudgeSpec("x", "heuristic", {**a.params, "l2": 5.0})
    assert jv.cached_figures(a, refit) is None
    head = jv.headline(jv.cached_figures(a, a))
    assert head["contrastive_worst_category"] == "vs_echo" and head["blind_max_abs_delta"] == 4.0
    line = validity_line(head, "x")
    assert "80.0% agreement" in line and "88.0%" in line
    assert "not measured" in validity_line(jv.headline(None), "x")


# ------------------------------------------------------------------- cap against EOS


def test_cap_against_eos_figures_and_warning():
    prefs = [2.0, 2.0, 1.0, 1.5, 2.0]
    ref = ["length", "length", "eos", "eos", "eos"]
    var = ["eos", "eos", "eos", "eos", "eos"]
    out = cap_against_eos(prefs, ref, var)
    assert out["cap_vs_eos_share"] == pytest.approx(2 / 5)
    assert out["cap_vs_eos_win_share"] == pytest.approx(2 / 3.5)
    assert out["win_rate_without_cap_vs_eos"] == pytest.approx(100 * 1.5 / 3)
    assert out["win_rate_cap_vs_eos"] == pytest.approx(100.0)
    row = {"task": "t", "model": "m", "role": "variant", **out}
    assert "warning: t/m: 57%" in cap_warning(row) and "wins 100.0%" in cap_warning(row)
    assert cap_warning({**row, "cap_vs_eos_win_share": 0.4}) == ""
    # most wins come from such pairs, but the other pairs win as often: no warning
    assert cap_warning({**row, "win_rate_cap_vs_eos": 40.0}) == ""
    assert cap_warning({**row, "win_rate_cap_vs_eos": 53.0}) == ""  # within 5 points
    none = cap_against_eos([1.0, 1.0], ["eos", "eos"], ["eos", "eos"])
    assert none["cap_vs_eos_win_share"] is None and none["cap_vs_eos_share"] == 0


def test_order_agreement_of_a_judge_asked_in_both_orders():
    infos = [{"orders_disagree": False}, {"orders_disagree": True}, {"orders_disagree": False},
             {"order": "none"}]
    assert order_agreement(infos) == pytest.approx(2 / 3)
    assert order_agreement([{"method": "combined"}]) is None


# ------------------------------------------------------------------- the whole suite


@needs_shared
def test_suite_scores_baselines_on_known_answers():
    """On the contrastive pairs, `termination` is worse than chance where the good answer was
    cut, and `longer` is near chance against a loop run to the cap: the suite catches both."""
    suite = jv.Suite([], contrastive.build(seed=0, per_category=40), [])
    rows = jv.suite_rows(suite)
    for name, category, most in (("termination", "cut_vs_offtopic", 25.0),
                                 ("longer", "vs_loop", 60.0)):
        figures = jv.validate(jv.resolve_spec(name), suite, rows)
        acc = {r["category"]: r["accuracy"] for r in figures["contrastive"]}
        assert acc[category] <= most, (name, acc)


def test_pair_item_orientation():
    item = PairwiseItem("i", Candidate("a"), Candidate("b"))
    assert contrastive.swapped(item).output_1.output == "b"


def test_validate_judges_command_rejects_unknown_judge(capsys):
    from harness.cli import main

    assert main(["validate-judges", "--judges", "no-such-judge"]) == 2
    assert "no-such-judge" in capsys.readouterr().err


@needs_shared
@pytest.mark.slow
def test_default_judge_meets_its_targets_held_out():
    """The default judge's committed figures are what the suite measures now (held out), and
    they meet the targets on (a) and (b); NullModel's attack does not fool it."""
    from harness.run.runner import DEFAULT_JUDGE

    spec = jv.resolve_spec(DEFAULT_JUDGE)
    figures = jv.validate(spec, jv.load_suite())
    shipped = json.loads(jv.shipped_figures(DEFAULT_JUDGE).read_text(encoding="utf-8"))
    assert shipped["spec_hash"] == jv.spec_hash(jv.build_judge(spec).spec, spec)
    for key in ("contrastive", "blind", "annotations"):
        assert figures[key] == shipped[key], key
    assert all(r["accuracy"] >= 95 for r in figures["contrastive"]), figures["contrastive"]
    blind_all = next(r for r in figures["blind"] if r["variant"] == "ALL")
    assert blind_all["agreement"] >= 90 and blind_all["n"] >= 300
    assert all(abs(r["delta"]) <= 5 for r in figures["blind"])
    assert figures["annotations"]["adversarial_win_rates"]["NullModel"]["judge"] < 10


@needs_shared
def test_validate_judges_command_prints_the_three_sets(tmp_path, capsys, monkeypatch):
    from harness.cli import main

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "figures.json"
    assert main(["validate-judges", "--judges", "longer,termination", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for part in ("(a) contrastive", "cut_vs_offtopic (n=400)", "(b) blind-labelled",
                 "g+rules", "(c) AlpacaEval", "without NullModel", "NullModel win rate (76.9)"):
        assert part in text, part
    figures = json.loads(out.read_text())
    assert [f["judge"] for f in figures] == ["longer", "termination"]
    assert figures[0]["annotations"]["agreement"] == pytest.approx(88.1, abs=0.05)
    assert figures[1]["annotations"]["agreement"] is None  # it never decides: no agreement
    # cached per resolved spec: a run with that judge finds them
    spec = jv.resolve_spec("longer")
    assert jv.cached_figures(jv.build_judge(spec).spec, spec) is not None


def test_blind_pairs_command_writes_pairs_and_reader_views(tmp_path, capsys):
    from harness.cli import main
    from harness.store.records import GenerationRecord, to_dict

    run = tmp_path / "run"
    run.mkdir()
    rows = [GenerationRecord(key=f"k{n}", prompt="p", n_prompt_tokens=1, n_tokens=3,
                             task=g["task"], model=g["model"], instruction_id=g["instruction_id"],
                             instruction=g["instruction"], output=g["output"],
                             finish_reason=g["finish_reason"])
            for n, g in enumerate(_gens(("implicit_ins_val",)))]
    (run / "generations.jsonl").write_text("".join(json.dumps(to_dict(r)) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"meta": {"reference": "ref"}, "rows": []}))
    pairs, views = tmp_path / "pairs.jsonl", tmp_path / "views.jsonl"
    assert main(["blind-pairs", str(run), "--out", str(pairs), "--views", str(views),
                 "--per-variant", "3"]) == 0
    assert len(blind.read_pairs(pairs)) == 6
    shown = [json.loads(line) for line in views.read_text().splitlines()]
    assert all(set(v) == {"pair_id", "instruction", "A", "B"} for v in shown)
    assert main(["blind-pairs", str(tmp_path), "--out", str(pairs)]) == 2  # not a run


def test_blind_pairs_without_a_reference_in_the_summary_is_one_line(tmp_path, capsys):
    from harness.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "generations.jsonl").write_text("")
    (run / "summary.json").write_text("{not json")
    assert main(["blind-pairs", str(run), "--out", str(tmp_path / "p.jsonl")]) == 2
    (run / "summary.json").write_text("{}")
    assert main(["blind-pairs", str(run), "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "names no reference" in err[1] and "Traceback" not in "".join(err)
