"""Tests of win rates, bootstrap intervals and the length-controlled win rate vs AlpacaEval 2.0."""

import math

import numpy as np
import pandas as pd
import pytest

from harness.cli import build_parser
from harness.core.cache import shared_data_dir
from harness.core.errors import ConfigError, DataError
from harness.stats import leaderboard
from harness.stats import winrates as stats

SHARED = shared_data_dir() / "alpaca_eval"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared AlpacaEval data absent")
MODELS = sorted(p.stem for p in (SHARED / "annotations").glob("*.json")) if SHARED.is_dir() else []


@pytest.fixture(scope="module")
def official():
    return pd.read_csv(SHARED / "leaderboard_dev.csv", index_col=0)


@pytest.fixture(scope="module")
def frames():
    return leaderboard.load_annotations_dir(SHARED / "annotations")


@pytest.fixture(scope="module")
def ours():
    """Our whole leaderboard, computed once (joint difficulty fit + 12 GLMs, about 10 s)."""
    return leaderboard.reproduce_leaderboard(SHARED / "annotations")


# ---------------------------------------------------------------- win rate definitions


def test_ties_count_half_and_counts_split_at_one_and_a_half():
    out = stats.win_rate_summary([2, 2, 1, 1.5])
    assert out["win_rate"] == pytest.approx(62.5)
    assert out["standard_error"] == pytest.approx(np.std([1, 1, 0, 0.5], ddof=1) / 2 * 100)
    assert (out["n_wins"], out["n_wins_base"], out["n_draws"], out["n_total"]) == (2, 1, 1, 4)
    assert out["discrete_win_rate"] == pytest.approx(62.5)


def test_all_ties_is_fifty_percent_with_zero_error():
    out = stats.win_rate_summary([1.5] * 7)
    assert out["win_rate"] == 50 and out["standard_error"] == 0
    assert (out["n_wins"], out["n_wins_base"], out["n_draws"], out["n_total"]) == (0, 0, 7, 7)


def test_legacy_zero_is_a_draw_and_missing_or_invalid_preferences_are_dropped():
    out = stats.win_rate_summary([0, 2, None, float("nan"), 3.0, 1])
    assert out["n_total"] == 3  # 0 -> 1.5, 2, 1; None, NaN and 3.0 dropped
    assert out["n_draws"] == 1
    assert out["win_rate"] == pytest.approx(50.0)


def test_soft_preferences_average_and_discrete_rate_rounds():
    out = stats.win_rate_summary([1.6, 1.6, 1.4])
    assert out["win_rate"] == pytest.approx(100 * (0.6 + 0.6 + 0.4) / 3)
    assert out["discrete_win_rate"] == pytest.approx(200 / 3)
    assert (out["n_wins"], out["n_wins_base"], out["n_draws"]) == (2, 1, 0)
    assert math.isnan(stats.win_rate_summary([1.7])["standard_error"])  # SEM needs 2 values


def test_no_valid_preference_is_a_data_error():
    with pytest.raises(DataError, match="no valid preference"):
        stats.win_rate_summary([None, 7.0])
    with pytest.raises(DataError):
        stats.win_rate_summary(["not a number"])


@needs_shared
@pytest.mark.parametrize("model", MODELS)
def test_win_rate_reproduces_the_official_leaderboard_exactly(model, official, frames):
    out = stats.win_rate_summary(frames[model]["preference"])
    row = official.loc[model]
    assert out["win_rate"] == pytest.approx(row["win_rate"], abs=1e-6)
    assert out["standard_error"] == pytest.approx(row["standard_error"], abs=1e-6)
    assert out["discrete_win_rate"] == pytest.approx(row["discrete_win_rate"], abs=1e-6)
    for col in ("n_wins", "n_wins_base", "n_draws", "n_total"):
        assert out[col] == row[col], col


# ---------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    prefs = 1 + rng.random(300)
    a = stats.bootstrap_ci(prefs, n_boot=500, seed=3)
    assert a == stats.bootstrap_ci(prefs, n_boot=500, seed=3)
    assert a != stats.bootstrap_ci(prefs, n_boot=500, seed=4)
    point = stats.win_rate_summary(prefs)["win_rate"]
    assert a[0] < point < a[1]
    narrow = stats.bootstrap_ci(prefs, n_boot=500, seed=3, level=0.5)
    assert a[0] < narrow[0] < narrow[1] < a[1]
    se = stats.win_rate_summary(prefs)["standard_error"]
    assert (a[1] - a[0]) == pytest.approx(2 * 1.96 * se, rel=0.2)  # percentile ~ normal here


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        stats.bootstrap_ci([1, 2], level=1.5)
    with pytest.raises(DataError):
        stats.bootstrap_ci([None])


# ----------------------------------------------------------------- length-controlled GLM


def _synthetic(n=400, quality=0.0, length_slope=-2.0, seed=0):
    """Annotations whose judge prefers longer answers, plus a fixed quality gap (logit)."""
    rng = np.random.default_rng(seed)
    len_1 = rng.integers(200, 2000, n)
    len_2 = rng.integers(50, 3000, n)
    delta = (len_1 - len_2) / np.std(len_1 - len_2, ddof=1)
    p = 1 / (1 + np.exp(-(quality + length_slope * np.tanh(delta))))
    return pd.DataFrame({
        "instruction": [f"q{i}" for i in range(n)],
        "output_1": ["a" * k for k in len_1], "output_2": ["b" * k for k in len_2],
        "generator_1": "ref", "generator_2": "model", "preference": 1 + p,
    })


def test_length_control_removes_a_pure_length_bias():
    frame = _synthetic(n=400, quality=0.0, length_slope=-2.0)
    raw = stats.win_rate_summary(frame["preference"])["win_rate"]
    lc = stats.length_controlled_win_rate(frame, None)
    assert abs(raw - 50) > 5  # the judge's length bias moves the raw win rate
    assert lc["length_controlled_winrate"] == pytest.approx(50, abs=2)
    better = stats.length_controlled_win_rate(_synthetic(quality=1.0), None)
    assert better["length_controlled_winrate"] == pytest.approx(100 / (1 + math.exp(-1)), abs=3)


def test_baseline_against_itself_is_fifty_and_errors_are_clear():
    frame = _synthetic(n=50)
    frame["generator_2"] = "ref"
    out = stats.length_controlled_win_rate(frame, None)
    assert out == {"length_controlled_winrate": 50.0, "lc_standard_error": 0.0}
    with pytest.raises(DataError, match="output_2"):
        stats.length_controlled_win_rate(frame.drop(columns=["output_2"]), None)
    with pytest.raises(ConfigError, match="not both"):
        stats.fit_length_glm(_synthetic(n=50), None, gamed_baseline=frame,
                             length_prior=stats.LengthPrior(-2.0))
    short = pd.Series([0.1, 0.2], name="instruction_difficulty")
    with pytest.raises(DataError, match="covers 2 instructions"):
        stats.length_controlled_win_rate(_synthetic(n=50), short)


def test_gamed_baseline_rows_and_their_offline_stand_in_pin_the_length_slope():
    # Every output_2 is far longer, so tanh(std_delta_len) is -1 throughout: the model's own
    # rows cannot tell the length effect from quality. True quality gap 0, length slope -2.
    n = 300
    rng = np.random.default_rng(0)
    frame = _synthetic(n=n)
    frame["output_2"] = ["b" * (10_000 + int(k)) for k in rng.integers(0, 50, n)]
    frame["preference"] = 1 + 1 / (1 + np.exp(-2.0))
    t = np.linspace(-2, 2, n)
    gamed = pd.DataFrame({"index": np.arange(n), "std_delta_len": t,
                          "preference": 1 / (1 + np.exp(2.0 * np.tanh(t))),
                          "not_gamed_baseline": False})
    with_gamed = stats.fit_length_glm(frame, None, gamed_baseline=gamed)
    assert with_gamed.weights["np.tanh(std_delta_len)"] == pytest.approx(-2, abs=0.3)
    assert with_gamed.length_controlled_winrate == pytest.approx(50, abs=5)
    with_prior = stats.fit_length_glm(frame, None, length_prior=stats.LengthPrior(-2.0))
    assert with_prior.length_controlled_winrate == pytest.approx(50, abs=5)


def test_hub_files_fail_with_one_clear_line_offline():
    for loader in (leaderboard.load_official_instruction_difficulty,
                   leaderboard.load_official_gamed_baseline):
        with pytest.raises(DataError) as info:
            loader(local_files_only=True)
        assert "Hugging Face hub" in str(info.value) and "\n" not in str(info.value)


@needs_shared
def test_joint_difficulty_tracks_how_hard_instructions_are(frames):
    joint = leaderboard.fit_joint_difficulty(frames)
    diff = joint.instruction_difficulty
    assert len(diff) == len(joint.instructions) == 805 and diff.iloc[0] == 0
    where = {t: i for i, t in enumerate(joint.instructions)}
    mean_pref = pd.concat(frames.values()).assign(
        pos=lambda f: f["instruction"].map(where)).groupby("pos")["preference"].mean()
    assert diff.corr(mean_pref, method="spearman") > 0.5  # easier for models => higher value
    assert (joint.length_slopes < 0).all()  # every model's judge favours the longer answer


@needs_shared
def test_leaderboard_matches_official_counts_lengths_and_win_rates(ours, official):
    assert sorted(ours.index) == MODELS
    assert list(ours.columns) == list(leaderboard.LEADERBOARD_COLUMNS)
    for col in ("n_wins", "n_wins_base", "n_draws", "n_total", "avg_length"):
        assert (ours[col] == official.loc[ours.index, col]).all(), col
    assert np.allclose(ours["win_rate"], official.loc[ours.index, "win_rate"], atol=1e-6)


@needs_shared
def test_offline_lc_win_rate_reproduces_the_official_one(ours, official):
    lc = ours["length_controlled_winrate"]
    ref = official.loc[ours.index, "length_controlled_winrate"]
    err = (lc - ref).abs()
    assert err.median() <= 1.5, err.sort_values().to_dict()
    assert lc.corr(ref, method="spearman") >= 0.97
    assert ours["lc_standard_error"].between(0, 2).all()


@needs_shared
def test_cli_prints_both_tables_with_differences(monkeypatch, capsys, ours):
    parser = build_parser()
    monkeypatch.setattr(leaderboard, "reproduce_leaderboard", lambda path, use_hub=False: ours)
    args = parser.parse_args(["leaderboard", "--compare", str(SHARED / "leaderboard_dev.csv")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "LC diff" in out and "Spearman" in out and "claude-2.1" in out
    assert "counts match for 12/12" in out


def test_cli_rejects_a_missing_annotations_folder(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["leaderboard", "--annotations", str(tmp_path / "nope")])
    with pytest.raises(DataError, match="annotations folder not found"):
        args.func(args)
