"""judge-agreement: agreement, kappa and win rates against the shared AlpacaEval annotations."""

import json
import math
import tomllib

import numpy as np
import pytest

from harness import PROJECT_ROOT
from harness.cli import build_parser
from harness.core.cache import shared_data_dir
from harness.core.errors import DataError, HarnessError
from harness.judging import Candidate, PairwiseItem
from harness.judging import agreement as ja

ANNOTATIONS = shared_data_dir() / "alpaca_eval" / "annotations"
needs_data = pytest.mark.skipif(not ANNOTATIONS.is_dir(),
                                reason=f"shared annotations not present at {ANNOTATIONS}")
MODELS = ["alpaca-7b", "claude-2.1", "gpt4_gamed"]
LIMIT = 60


def run_cli(*argv: str) -> int:
    """Parse argv with the harness's own parser and run the judge-agreement handler."""
    args = build_parser().parse_args(["judge-agreement", *argv])
    return args.func(args)


def hand_longer_agreement(models, limit):
    """Always-pick-the-longer agreement computed straight from the raw JSON records."""
    agree = used = 0
    for m in models:
        for r in json.loads((ANNOTATIONS / f"{m}.json").read_text())[:limit]:
            p = float(r["preference"])
            n1, n2 = len(r["output_1"]), len(r["output_2"])
            if p == 1.5 or n1 == n2:
                continue
            used += 1
            agree += (p > 1.5) == (n2 > n1)
    return 100.0 * agree / used, used


@needs_data
def test_subset_runs_and_longer_matches_hand_computation(capsys, tmp_path):
    """On a small subset: kappa in [-1, 1], longer's agreement equals the hand count."""
    out_json = tmp_path / "rows.json"
    rc = run_cli("--judges", "heuristic,repetition", "--models", ",".join(MODELS),
                 "--limit", str(LIMIT), "--json", str(out_json))
    assert rc == 0
    report = capsys.readouterr().out
    assert "longer" in report and "OFFICIAL" in report
    rows = json.loads(out_json.read_text())
    assert {r["judge"] for r in rows} == {"longer", "heuristic", "repetition"}
    for r in rows:
        if not math.isnan(r["kappa"]):
            assert -1.0 <= r["kappa"] <= 1.0
        assert r["n_used"] + r["ref_ties"] + r["judge_ties"] == r["n"]
    pooled = next(r for r in rows if r["judge"] == "longer" and r["model"] == "ALL")
    expected, used = hand_longer_agreement(MODELS, LIMIT)
    assert pooled["n_used"] == used
    assert pooled["agreement"] == pytest.approx(expected)


@needs_data
def test_official_win_rate_is_mean_preference():
    """The official column is mean (preference - 1) * 100 over the annotations."""
    sets = ja.load_annotations(ANNOTATIONS, limit=LIMIT, models=["claude-2.1"])
    rows = ja.evaluate(["longer"], sets)
    raw = [float(r["preference"]) for r in
           json.loads((ANNOTATIONS / "claude-2.1.json").read_text())[:LIMIT]]
    assert rows[0]["official_win_rate"] == pytest.approx(np.mean(np.array(raw) - 1) * 100)


def test_kappa_and_agreement_on_hand_made_labels():
    """Perfect agreement is kappa 1, inverted is -1; ties on either side are excluded."""
    ref = np.array([1.0, 2.0, 1.0, 2.0, 1.5, 1.2, 1.8])
    assert ja.agreement_stats(ref, ref)["kappa"] == pytest.approx(1.0)
    flipped = 3.0 - ref
    stats = ja.agreement_stats(flipped, ref)
    assert stats["kappa"] == pytest.approx(-1.0) and stats["agreement"] == 0.0
    judge = np.array([1.0, 2.0, 1.5, 1.0, 2.0, 1.0, 1.0])
    stats = ja.agreement_stats(judge, ref)
    assert (stats["ref_ties"], stats["judge_ties"], stats["n_used"]) == (1, 1, 5)
    assert stats["agreement"] == pytest.approx(60.0)  # pairs 0, 1 and 5 of 0, 1, 3, 5, 6


def _fake_sets(seed: int = 0):
    """Three synthetic models whose reference prefers the longer output, plus label noise."""
    rng = np.random.default_rng(seed)
    sets = []
    for m in range(3):
        items, prefs = [], []
        for i in range(80):
            n1, n2 = rng.integers(5, 200, size=2)
            items.append(PairwiseItem(f"instruction {i} about topic {i % 7}",
                                      Candidate(" ".join(f"a{k}" for k in range(n1))),
                                      Candidate(" ".join(f"b{k}" for k in range(n2)))))
            p = 1.0 / (1.0 + np.exp(-(np.log1p(n2) - np.log1p(n1)) * 2 + rng.normal()))
            prefs.append(1.0 + p)
        sets.append(ja.AnnotationSet(f"m{m}", tuple(items), np.array(prefs)))
    return sets


def _text_only_spec(tmp_path):
    """A copy of the combined judge's config without the embedding feature (fast tests)."""
    text = (PROJECT_ROOT / "judges" / "heuristic_combined.toml").read_text()
    data = tomllib.loads(text)
    path = tmp_path / "combined_text.toml"
    weights = {k: v for k, v in data["params"]["weights"].items() if k != "relevance"}
    lines = ['name = "combined_text"', 'kind = "heuristic"', "[params]", 'method = "combined"',
             'fixed = ["ended"]', "[params.weights]"] + [f"{k} = {v}" for k, v in weights.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_held_out_predictions_ignore_the_held_out_models_labels(tmp_path):
    """Leakage check: scrambling one model's reference leaves its held-out judgments unchanged."""
    spec = ja.resolve_spec(str(_text_only_spec(tmp_path)))
    sets = _fake_sets()
    before, how = ja.held_out_preferences(spec, sets)
    scrambled = list(sets)
    scrambled[1] = ja.AnnotationSet("m1", sets[1].items, 3.0 - sets[1].reference)
    after, _ = ja.held_out_preferences(spec, scrambled)
    assert np.allclose(before[1], after[1])
    assert not np.allclose(before[0], after[0])  # others did learn from m1's labels
    assert "leave-one-model-out" in how
    stats = ja.agreement_stats(before[0], sets[0].reference)
    assert stats["agreement"] > 70  # the length signal was learnt


def test_refit_writes_a_loadable_config(tmp_path):
    """--refit's writer produces a TOML that loads, keeps fixed weights and judges symmetrically."""
    path = _text_only_spec(tmp_path)
    fixed_before = tomllib.loads(path.read_text())["params"]["weights"]["ended"]
    weights = ja.refit_combined(_fake_sets(), path=path, baseline_agreement=80.0,
                                held_out_agreement=81.0)
    data = tomllib.loads(path.read_text())
    assert data["params"]["weights"] == weights
    assert weights["ended"] == fixed_before
    assert weights["log_chars"] > 0
    assert "Held-out" in path.read_text() and "81.0%" in path.read_text()
    spec = ja.resolve_spec(str(path))
    item = PairwiseItem("q", Candidate("short answer"), Candidate("a much longer answer " * 9))
    judge = ja.build_judge(spec)
    (_, j), = judge.judge([item])
    (_, k), = judge.judge([PairwiseItem("q", item.output_2, item.output_1)])
    assert j.preference + k.preference == pytest.approx(3.0)


def test_bad_annotations_dir_is_one_line_error(tmp_path):
    """A missing folder, or one without annotation files, is one HarnessError line."""
    for bad in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(DataError) as e:
            run_cli("--annotations", str(bad), "--judges", "longer")
        assert "\n" not in str(e.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError) as e:
        run_cli("--annotations", str(tmp_path), "--judges", "longer")
    assert "broken.json" in str(e.value) and "\n" not in str(e.value)


def test_unknown_judge_is_config_error():
    """An unknown judge name fails before any work, as one line."""
    with pytest.raises(HarnessError) as e:
        run_cli("--judges", "no_such_judge", "--annotations", str(ANNOTATIONS))
    assert "\n" not in str(e.value)
