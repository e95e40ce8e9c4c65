"""Heuristic pairwise judges: deterministic, no API; configured by judges/<name>.toml.

`params.method` picks the judge:
- "cascade" (the default `heuristic` judge): empty loses, then a response that ended on its own
  beats one cut at the token cap, then less repetition wins, then closer to a target length
  wins; otherwise a tie (1.5). Judgment.info["decided_by"] names the deciding criterion.
- single signals: "length" (longer wins), "termination", "repetition", "relevance" (cosine
  similarity of instruction and response MiniLM embeddings), "target_length".
- "combined": a logistic model over feature differences (output_2 minus output_1) whose
  weights are fitted to GPT-4-turbo judgments (see fit_logistic and judge_agreement).

Every judge is symmetric: swapping output_1 and output_2 maps a preference p to 3 - p.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from harness.core.configs import expect
from harness.core.errors import ConfigError
from harness.judging.protocol import Candidate, JudgeSpec, Judgment, PairwiseItem
from harness.stats.winrates import sigmoid

#: Bumped whenever a feature function or verdict rule changes what a judge outputs, so cached
#: judgments made by the old code are not reused (it is part of every heuristic judge's key).
FEATURE_VERSION = 1

#: Below this MiniLM cosine with its instruction a response counts as (partly) off the topic.
OFFTOPIC_COSINE = 0.3

CASCADE_CRITERIA = ("empty", "termination", "repetition", "target_length")
SINGLE_SIGNAL_METHODS = ("length", "termination", "repetition", "relevance", "target_length")
METHODS = ("cascade", "combined", *SINGLE_SIGNAL_METHODS)

#: Features of one response used by the combined judge (its input is output_2's minus output_1's).
FEATURES = (
    "log_chars",      # log(1 + characters)
    "log_words",      # log(1 + words)
    "ended",          # 1 if the response ended on its own (finish_reason not "length")
    "empty",          # 1 if the response is empty or whitespace
    "repetition",     # share of repeated word n-grams
    "relevance",      # cosine(instruction, response) with MiniLM
    "offtopic",       # max(0, OFFTOPIC_COSINE - relevance) / OFFTOPIC_COSINE: off the topic
    "overlap",        # share of the instruction's content words that the response uses
    "list_items",     # log(1 + lines that are bullet or numbered items)
    "headers",        # log(1 + markdown headers and bold-only lines)
    "bold",           # log(1 + **bold** spans)
    "code_blocks",    # log(1 + fenced code blocks)
    "paragraphs",     # log(1 + blank-line-separated blocks)
    "clean_end",      # 1 if the text ends with sentence-final punctuation or a closing fence
    "wordlike",       # share of whitespace tokens that contain a letter or digit run
    "refusal",        # 1 if the response opens with an apology or refusal
    "markup",         # log(1 + leaked chat-role markup: <|user|>, <start_of_turn>, ### Human:, ...)
    "questions",      # share of sentences that are questions (0 when the instruction asks for any)
    "echo",           # share of the instruction's word 4-grams that the response repeats
    "dup_lines",      # share of non-blank lines that repeat an earlier line
)

DEFAULTS: dict[str, Any] = {
    "method": "cascade",
    "criteria": list(CASCADE_CRITERIA),
    "ngram": 3,
    "repetition_margin": 0.05,
    "target_words": 150,
    "length_tolerance_words": 10,
    "empty_max_words": 0,
    "unit": "chars",
    "relevance_margin": 0.0,
    "relevance_max_length": 128,
    "weights": {},
    "soft": True,
    "l2": 1.0,  # fitting only (judge-agreement --refit): no effect on verdicts
    "fixed": [],  # fitting only: weights set by hand, kept by --refit
    "fit_sources": [],  # fitting only: validation sets fitted on (harness.judging.validation)
    "source_weights": {},  # fitting only: each fitted source's share of the total weight
    "exclude_models": [],  # fitting only: annotated models never fitted on
}

#: Parameters each method reads: only these (defaults filled in) go into the judge's key.
USED_PARAMS: dict[str, tuple[str, ...]] = {
    "cascade": ("criteria", "ngram", "repetition_margin", "target_words",
                "length_tolerance_words", "empty_max_words"),
    "length": ("unit",),
    "termination": (),
    "repetition": ("ngram", "repetition_margin"),
    "relevance": ("relevance_margin", "relevance_max_length"),
    "target_length": ("target_words", "length_tolerance_words"),
    "combined": ("weights", "ngram", "relevance_max_length", "soft"),
}
_PARAM_TYPES: dict[str, Any] = {
    "method": str, "criteria": list, "ngram": int, "repetition_margin": (int, float),
    "target_words": (int, float), "length_tolerance_words": (int, float),
    "empty_max_words": int, "unit": str, "relevance_margin": (int, float),
    "relevance_max_length": int, "weights": dict, "soft": bool, "l2": (int, float),
    "fixed": list, "fit_sources": list, "source_weights": dict,
    "exclude_models": list,
}

_WORD = re.compile(r"\w+")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+•]|\d{1,3}[.)])\s+\S", re.MULTILINE)
_HEADER = re.compile(r"^\s*(?:#{1,6}\s+\S.*|\*\*[^*\n]{1,80}\*\*:?)\s*$", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*")
_FENCE = re.compile(r"^\s*```", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_CLEAN_END = re.compile(r"""(?:[.!?…:;)\]}"'»”’*`]|```)\s*$""")
_REFUSAL = re.compile(r"^\W*(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|as an ai|i cannot|"
                      r"i can'?t|i am unable|i'm unable|unfortunately,? i)", re.IGNORECASE)
_MARKUP = re.compile(
    r"<\|[^|<>\n]{1,24}\|?>|<[A-Za-z_]{1,24}\|>|</?s>|<(?:start|end)_of_turn>|<bos>|<eos>"
    r"|\[/?INST\]|^\s*#{1,4}\s*(?:Instruction|Response|Input|Human|Assistant|User)\b"
    r"|^\s*(?:User|Human|Assistant|AI|System)\s*:", re.MULTILINE | re.IGNORECASE)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]+|[^.!?\n]+$", re.MULTILINE)
_ASKS_QUESTIONS = re.compile(r"question|quiz|\bask|riddle|faq|trivia", re.IGNORECASE)
_STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being it "
    "its this that these those i you he she we they me my your our their what which who whom how "
    "why when where can could would should will shall may might must do does did not no so than "
    "then there here about into over under up down out just also please give write tell make "
    "some any each all more most very".split())


@lru_cache(maxsize=8192)
def _tokens(text: str) -> tuple[str, ...]:
    """Lower-cased word tokens of a text (cached: a baseline output recurs across pairs)."""
    return tuple(_WORD.findall(text.lower()))


def word_count(text: str) -> int:
    """Number of word tokens in a text."""
    return len(_tokens(text))


@lru_cache(maxsize=8192)
def repetition_share(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none, near 1 = a loop)."""
    toks = _tokens(text)
    if len(toks) < n + 1:
        return 0.0
    total = len(toks) - n + 1
    return 1.0 - len(set(zip(*(toks[i:] for i in range(n)), strict=False))) / total


def ended_on_its_own(candidate: Candidate) -> bool:
    """True unless the response was cut at the token cap (finish_reason "length")."""
    return candidate.finish_reason != "length"


def is_empty(candidate: Candidate, max_words: int = 0) -> bool:
    """True for an output with no more than max_words words (blank counts as empty)."""
    return not candidate.output.strip() or word_count(candidate.output) <= max_words


def instruction_overlap(instruction: str, output: str) -> float:
    """Share of the instruction's distinct content words that appear in the output."""
    wanted = {w for w in _tokens(instruction) if w not in _STOPWORDS and len(w) > 2}
    if not wanted:
        return 0.0
    return len(wanted.intersection(_tokens(output))) / len(wanted)


#: Features computed from MiniLM embeddings rather than from the text alone.
EMBEDDING_FEATURES = ("relevance", "offtopic")


def text_features(instruction: str, candidate: Candidate, ngram: int = 3) -> dict[str, float]:
    """Every feature of FEATURES except relevance (which needs embeddings) for one response."""
    return dict(_text_features(instruction, candidate.output, ended_on_its_own(candidate), ngram))


@lru_cache(maxsize=16384)
def _text_features(instruction: str, text: str, ended: bool,
                   ngram: int) -> tuple[tuple[str, float], ...]:
    """text_features, cached (the baseline's outputs recur across every model's pairs)."""
    toks = text.split()
    return tuple({
        "log_chars": math.log1p(len(text)),
        "log_words": math.log1p(word_count(text)),
        "ended": float(ended),
        "empty": float(not text.strip()),
        "repetition": repetition_share(text, ngram),
        "overlap": instruction_overlap(instruction, text),
        "list_items": math.log1p(len(_LIST_ITEM.findall(text))),
        "headers": math.log1p(len(_HEADER.findall(text))),
        "bold": math.log1p(len(_BOLD.findall(text))),
        "code_blocks": math.log1p(len(_FENCE.findall(text)) // 2),
        "paragraphs": math.log1p(len([p for p in _PARAGRAPH_BREAK.split(text) if p.strip()])),
        "clean_end": float(bool(_CLEAN_END.search(text))),
        "wordlike": (sum(1 for t in toks if re.search(r"[^\W_]{2,}", t)) / len(toks))
        if toks else 0.0,
        "refusal": float(bool(_REFUSAL.match(text))),
        "markup": math.log1p(len(_MARKUP.findall(text))),
        "questions": 0.0 if _ASKS_QUESTIONS.search(instruction) else question_share(text),
        "echo": echo_share(instruction, text),
        "dup_lines": duplicate_line_share(text),
    }.items())


def question_share(text: str) -> float:
    """Share of the text's sentences (split at . ! ? and line ends) that end with a '?'."""
    sentences = [s.strip() for s in _SENTENCE.findall(text) if _WORD.search(s)]
    return sum(s.endswith("?") for s in sentences) / len(sentences) if sentences else 0.0


def echo_share(instruction: str, text: str, n: int = 4) -> float:
    """Share of the instruction's distinct word n-grams found in the response (an echo is 1)."""
    ins, out = _tokens(instruction), _tokens(text)
    grams = set(zip(*(ins[i:] for i in range(n)), strict=False))
    if not grams:
        return 0.0
    return len(grams & set(zip(*(out[i:] for i in range(n)), strict=False))) / len(grams)


def duplicate_line_share(text: str) -> float:
    """Share of non-blank lines equal (case and spacing aside) to an earlier line."""
    lines = [" ".join(x.lower().split()) for x in text.splitlines() if x.strip()]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def relevance_scores(items: Sequence[PairwiseItem], max_length: int = 128) -> np.ndarray:
    """(n, 2) cosine similarities of each instruction with output_1 and output_2 (MiniLM)."""
    from harness.judging.embeddings import get_embedder

    embedder = get_embedder(max_length)
    ins = [it.instruction for it in items]
    sims = embedder.similarity(ins + ins, [it.output_1.output for it in items]
                               + [it.output_2.output for it in items])
    return np.stack([sims[:len(items)], sims[len(items):]], axis=1)


def feature_differences(items: Sequence[PairwiseItem], feature_names: Sequence[str],
                        ngram: int = 3, relevance_max_length: int = 128) -> np.ndarray:
    """(n, k) matrix: feature of output_2 minus feature of output_1 for each item."""
    out = np.zeros((len(items), len(feature_names)))
    text_names = [f for f in feature_names if f not in EMBEDDING_FEATURES]
    for i, it in enumerate(items):
        f1 = text_features(it.instruction, it.output_1, ngram)
        f2 = text_features(it.instruction, it.output_2, ngram)
        for j, name in enumerate(feature_names):
            if name in text_names:
                out[i, j] = f2[name] - f1[name]
    if set(EMBEDDING_FEATURES) & set(feature_names) and items:
        rel = relevance_scores(items, relevance_max_length)
        off = np.maximum(0.0, OFFTOPIC_COSINE - rel) / OFFTOPIC_COSINE
        for name, values in (("relevance", rel), ("offtopic", off)):
            if name in feature_names:
                out[:, list(feature_names).index(name)] = values[:, 1] - values[:, 0]
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, offset: np.ndarray | None = None,
                 iterations: int = 50, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Weights w (no intercept) maximising sum y*log p + (1-y)*log(1-p), p = sigmoid(x@w + offset).

    y may be soft (in [0, 1]); sample_weight scales each row's log-likelihood (default 1).
    Columns are standardised for the L2 penalty (l2 * |w_std|^2 / 2)
    and the weights returned on the raw scale; constant columns get weight 0. Newton's method.
    """
    n, k = x.shape
    scale = np.sqrt((x ** 2).mean(axis=0))
    live = scale > 1e-12
    xs = np.zeros_like(x)
    xs[:, live] = x[:, live] / scale[live]
    off = np.zeros(n) if offset is None else offset
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    w = np.zeros(k)
    for _ in range(iterations):
        p = sigmoid(xs @ w + off)
        grad = xs.T @ (sw * (p - y)) + l2 * w
        hess = (xs * (sw * p * (1 - p))[:, None]).T @ xs + l2 * np.eye(k)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    raw = np.zeros(k)
    raw[live] = w[live] / scale[live]
    return raw


def combined_probabilities(diffs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """P(output_2 better) for feature-difference rows under a weight vector."""
    return sigmoid(diffs @ weights)


def _params(spec: JudgeSpec) -> dict[str, Any]:
    """Spec params over the defaults, validated (unknown names and wrong types are errors)."""
    where = f"judge {spec.name}"
    unknown = sorted(set(spec.params) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(DEFAULTS))}")
    params = {**DEFAULTS, **spec.params}
    for k, types in _PARAM_TYPES.items():
        expect(params[k], types, where, k)
    if params["ngram"] < 1 or params["relevance_max_length"] < 1:
        raise ConfigError(f"{where}: ngram and relevance_max_length must be positive")
    for name, w in params["weights"].items():
        expect(w, (int, float), where, f"weights.{name}")
    if params["method"] not in METHODS:
        raise ConfigError(f"judge {spec.name}: method must be one of {list(METHODS)}, "
                          f"got {params['method']!r}")
    bad = [c for c in params["criteria"] if c not in CASCADE_CRITERIA]
    if bad:
        raise ConfigError(f"judge {spec.name}: unknown criteria {bad}; "
                          f"known: {list(CASCADE_CRITERIA)}")
    if params["unit"] not in ("chars", "words"):
        raise ConfigError(f"judge {spec.name}: unit must be 'chars' or 'words'")
    if params["method"] == "combined":
        unknown = [f for f in params["weights"] if f not in FEATURES]
        if not params["weights"] or unknown:
            raise ConfigError(f"judge {spec.name}: [params.weights] must name features from "
                              f"{list(FEATURES)}; unknown: {unknown}")
    return params


def _verdict(score_1: float, score_2: float, margin: float = 0.0) -> float:
    """2 if score_2 beats score_1 by more than margin, 1 for the reverse, else 1.5."""
    if score_2 - score_1 > margin:
        return 2.0
    if score_1 - score_2 > margin:
        return 1.0
    return 1.5


def _which(pref: float) -> str:
    """'output_1', 'output_2' or 'neither' for a discrete preference."""
    return {1.0: "output_1", 2.0: "output_2"}.get(pref, "neither")


def _criterion(name: str, item: PairwiseItem, p: dict[str, Any]) -> tuple[float, str]:
    """Preference by one cascade criterion, with a short reason."""
    c1, c2 = item.output_1, item.output_2
    if name == "empty":
        e1, e2 = is_empty(c1, p["empty_max_words"]), is_empty(c2, p["empty_max_words"])
        pref = _verdict(float(e2), float(e1))
        return pref, f"empty: {_which(3 - pref)} is empty" if pref != 1.5 else ""
    if name == "termination":
        pref = _verdict(float(ended_on_its_own(c1)), float(ended_on_its_own(c2)))
        return pref, (f"termination: {_which(pref)} ended on its own, {_which(3 - pref)} "
                      f"hit the token cap") if pref != 1.5 else ""
    if name == "repetition":
        r1, r2 = repetition_share(c1.output, p["ngram"]), repetition_share(c2.output, p["ngram"])
        pref = _verdict(-r1, -r2, p["repetition_margin"])
        return pref, (f"repetition: repeated {p['ngram']}-gram share {r1:.3f} vs {r2:.3f}"
                      if pref != 1.5 else "")
    if name == "target_length":
        target = p["target_words"]
        w1, w2 = word_count(c1.output), word_count(c2.output)
        pref = _verdict(-abs(w1 - target), -abs(w2 - target), p["length_tolerance_words"])
        return pref, (f"target_length: {w1} vs {w2} words, target {target}"
                      if pref != 1.5 else "")
    raise ConfigError(f"unknown criterion {name!r}")


def uses_relevance(params: dict[str, Any]) -> bool:
    """True when a judge's verdicts depend on MiniLM embeddings."""
    return params["method"] == "relevance" or (
        params["method"] == "combined" and bool(set(EMBEDDING_FEATURES) & set(params["weights"])))


def resolved_spec(spec: JudgeSpec, params: dict[str, Any]) -> JudgeSpec:
    """The spec that is hashed and recorded: what the method reads, defaults filled in, plus the
    feature code's version and (when relevance is used) the embedding model's identity."""
    used = {k: params[k] for k in USED_PARAMS[params["method"]]}
    used.update(method=params["method"], feature_version=FEATURE_VERSION)
    if uses_relevance(params):
        from harness.judging.embeddings import model_identity

        used["embedding_model"] = model_identity()
    return JudgeSpec(name=spec.name, kind=spec.kind, params=used)


@dataclass(frozen=True)
class HeuristicJudge:
    """A heuristic judge built from its spec; judge() yields (index, Judgment) in order."""

    spec: JudgeSpec
    params: dict[str, Any] = field(default_factory=dict)  # effective: spec params over DEFAULTS

    def judge(self, items: Sequence[PairwiseItem]) -> Iterator[tuple[int, Judgment]]:
        """Judge every item; relevance and combined embed all texts in one batched pass first."""
        p = self.params
        method = p["method"]
        if method == "cascade":
            for i, item in enumerate(items):
                yield i, self._cascade(item, p)
        elif method in ("relevance", "combined"):
            yield from enumerate(self._batched(items, p))
        else:
            for i, item in enumerate(items):
                yield i, self._single(item, p)

    def _cascade(self, item: PairwiseItem, p: dict[str, Any]) -> Judgment:
        """First criterion (in params.criteria order) that separates the pair decides."""
        for name in p["criteria"]:
            pref, reason = _criterion(name, item, p)
            if pref != 1.5:
                return Judgment(preference=pref, raw=reason,
                                info={"method": "cascade", "decided_by": name})
        return Judgment(preference=1.5, raw="tie: no criterion separates the outputs",
                        info={"method": "cascade", "decided_by": "tie"})

    def _single(self, item: PairwiseItem, p: dict[str, Any]) -> Judgment:
        """length, termination, repetition or target_length alone."""
        method = p["method"]
        if method == "length":
            if p["unit"] == "words":
                n1, n2 = word_count(item.output_1.output), word_count(item.output_2.output)
            else:
                n1, n2 = len(item.output_1.output), len(item.output_2.output)
            pref = _verdict(n1, n2)
            raw = f"length: {n1} vs {n2} {p['unit']}"
        else:
            pref, raw = _criterion(method, item, p)
            raw = raw or f"{method}: tie"
        return Judgment(preference=pref, raw=raw,
                        info={"method": method, "decided_by": method if pref != 1.5 else "tie"})

    def _batched(self, items: Sequence[PairwiseItem], p: dict[str, Any]) -> list[Judgment]:
        """relevance and combined: features for all items at once (one embedding pass)."""
        if not items:
            return []
        if p["method"] == "relevance":
            rel = relevance_scores(items, p["relevance_max_length"])
            return [Judgment(preference=_verdict(a, b, p["relevance_margin"]),
                             raw=f"relevance: cosine {a:.4f} vs {b:.4f}",
                             info={"method": "relevance", "cosine": [round(float(a), 6),
                                                                     round(float(b), 6)]})
                    for a, b in rel]
        names = list(p["weights"])
        weights = np.array([float(p["weights"][n]) for n in names])
        diffs = feature_differences(items, names, p["ngram"], p["relevance_max_length"])
        z = diffs @ weights
        out = []
        for row, zi in zip(diffs, z, strict=True):
            prob = float(sigmoid(np.array(zi)))
            pref = round(1.0 + prob, 6) if p["soft"] else _verdict(0.0, float(zi))
            top = sorted(zip(names, row * weights, strict=True), key=lambda t: -abs(t[1]))[:3]
            out.append(Judgment(
                preference=pref,
                raw=f"combined: P(output_2 better)={prob:.3f}; main terms: "
                    + ", ".join(f"{n} {v:+.2f}" for n, v in top),
                info={"method": "combined", "logit": round(float(zi), 6)}))
        return out


def method_spec(method: str) -> JudgeSpec:
    """A spec for one single-signal (or cascade) method with default params."""
    if method not in METHODS or method == "combined":
        raise ConfigError(f"no built-in heuristic method {method!r}; known: "
                          f"{[m for m in METHODS if m != 'combined']}")
    return JudgeSpec(name=method, kind="heuristic", params={"method": method})


def build(spec: JudgeSpec) -> HeuristicJudge:
    """Build the heuristic judge a spec describes (validating its params); its .spec is resolved."""
    params = _params(spec)
    return HeuristicJudge(resolved_spec(spec, params), params)
