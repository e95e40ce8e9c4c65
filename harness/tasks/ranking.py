"""The study's response-ranking task (Hewitt et al. 2024, Table 2), scored through lm-eval.

For N instruction-response pairs, the true response competes with k responses to OTHER
instructions; each candidate is scored by its mean per-token log-likelihood given the
instruction (the variant's formatted prompt), computed by an lm-eval LM
(`harness.generate.lm_eval`). Accuracy is the share of items whose true response scores strictly
highest (a tie with a distractor counts as incorrect); chance is 1/(k+1).

A task file looks like::

    kind = "ranking"
    pairs = { kind = "lima", n = 300, seed = 0 }   # or { kind = "jsonl", path = ..., ... }
    k = 3
    n = 100
    seed = 0
    bootstrap = 1000
    exclude_tuning = true   # never rank a tuned variant on its own training pairs
    max_chars = 2000        # optional: keep pairs whose instruction + response is this short
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.configs import expect
from harness.core.errors import ConfigError, DataError
from harness.core.hashing import content_hash
from harness.data.tune_data import DataSpec, load_pairs
from harness.data.tune_data import parse_data as _parse_data
from harness.generate.backends import template_prompt as format_prompt
from harness.tasks import figures
from harness.tasks.protocol import Evidence, Rows, pct, variant_rows

Pair = tuple[str, str]

_INT_FIELDS = {"k": 1, "n": 1, "seed": None, "bootstrap": 0, "max_chars": 1}


@dataclass(frozen=True)
class RankItem:
    """One instruction and its k+1 candidate responses; the true one sits at true_index."""

    id: str
    instruction: str
    candidates: tuple[str, ...]
    true_index: int


@dataclass(frozen=True)
class RankingOptions:
    """A ranking task's settings; `pairs` is the validated data table (tuning data adapters)."""

    pairs: dict[str, Any]
    k: int = 3
    n: int = 100
    seed: int = 0
    bootstrap: int = 1000
    exclude_tuning: bool = True
    max_chars: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for run configs and hashing)."""
        return {**dataclasses.asdict(self), "pairs": dict(self.pairs)}


# ------------------------------------------------------------------------------- options


def parse_options(table: dict[str, Any], where: str) -> RankingOptions:
    """A ranking task's fields as RankingOptions; any bad type or value is one ConfigError."""
    expect(table, dict, where, "ranking options")
    known = {f.name for f in dataclasses.fields(RankingOptions)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    if "pairs" not in table:
        raise ConfigError(f"{where}: kind 'ranking' needs pairs, e.g. "
                          f"pairs = {{ kind = \"lima\" }}")
    expect(table["pairs"], dict, where, "pairs")
    data = _parse_data(table["pairs"], f"{where} pairs")
    for name, low in _INT_FIELDS.items():
        if name in table:
            value = expect(table[name], int, where, name)
            if low is not None and value < low:
                raise ConfigError(f"{where}: {name} must be at least {low}, got {value}")
    if "exclude_tuning" in table:
        expect(table["exclude_tuning"], bool, where, "exclude_tuning")
    options = RankingOptions(pairs=data.as_dict(),
                             **{k: v for k, v in table.items() if k != "pairs"})
    available = len(distinct_pairs(load_pool(options)))
    if options.k + 1 > available:
        raise ConfigError(f"{where}: k = {options.k} needs at least {options.k + 1} distinct "
                          f"pairs, but the pairs hold {available}")
    return options


def load_pool(options: RankingOptions) -> list[Pair]:
    """The options' candidate pairs (tuning data adapters; `max_chars` applied)."""
    pairs = load_pairs(DataSpec(**options.pairs))
    if options.max_chars is not None:
        pairs = [p for p in pairs if len(p[0]) + len(p[1]) <= options.max_chars]
    return pairs


def distinct_pairs(pairs: Sequence[Pair]) -> list[Pair]:
    """The pairs once each, in first-seen order."""
    return list(dict.fromkeys((str(i), str(r)) for i, r in pairs))


# --------------------------------------------------------------------------------- items


def build_items(pairs: Sequence[Pair], n: int, k: int, seed: int,
                exclude: set[Pair] | frozenset[Pair] = frozenset()) -> list[RankItem]:
    """n items drawn by seed (all of them if fewer), each with k distractor responses.

    Pairs in `exclude` and duplicates are dropped first. Distractors are distinct responses of
    other pairs of the pool whose instruction and response both differ from the item's. The
    true response is placed at a seeded random index among the k+1 candidates. Items keep the
    pool's order. Deterministic for given pairs, n, k and seed.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"ranking: k must be a positive integer, got {k!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"ranking: n must be a positive integer, got {n!r}")
    excluded = {(str(i), str(r)) for i, r in exclude}
    pool = [p for p in distinct_pairs(pairs) if p not in excluded]
    if k + 1 > len(pool):
        raise ConfigError(f"ranking: k = {k} needs at least {k + 1} distinct pairs, but the "
                          f"pool holds {len(pool)}"
                          + (" after excluding training pairs" if excluded else ""))
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(pool)), min(n, len(pool))))
    responses = list(dict.fromkeys(r for _, r in pool))
    by_response: dict[str, set[str]] = {}
    for ins, resp in pool:
        by_response.setdefault(resp, set()).add(ins)
    items = []
    for index in chosen:
        ins, resp = pool[index]
        eligible = [r for r in responses if r != resp and ins not in by_response[r]]
        if len(eligible) < k:
            raise ConfigError(f"ranking: k = {k} but only {len(eligible)} responses to other "
                              f"instructions are available for an item")
        distractors = rng.sample(eligible, k)
        true_index = rng.randrange(k + 1)
        candidates = tuple(distractors[:true_index] + [resp] + distractors[true_index:])
        items.append(RankItem(id=content_hash([ins, resp], 12), instruction=ins,
                              candidates=candidates, true_index=true_index))
    return items


def score_requests(items: Sequence[RankItem],
                   format_prompt: Callable[[str], str]) -> list[tuple[str, str]]:
    """(context, continuation) per (item, candidate), item-major: request i·(k+1)+c is
    candidate c of item i, its context the item's formatted instruction."""
    out = []
    for item in items:
        context = format_prompt(item.instruction)
        out.extend((context, candidate) for candidate in item.candidates)
    return out


# ------------------------------------------------------------------------------- scoring


def rank(spec: Any, tokenizer: Any, items: Sequence[RankItem], batch_size: int = 8,
         backend: str = "harness") -> list[list[float]]:
    """Mean per-token log-likelihood of every candidate of every item for one variant.

    The mean divides the continuation's summed log-probability by its number of tokens
    (tokenizer, no special tokens). backend "hf" scores with lm-eval's HFLM instead of
    HarnessLM, correcting for HFLM's trailing-whitespace move (see
    harness.generate.lm_eval.hf_whitespace).
    """
    from harness.generate.lm_eval import hf_whitespace, loglikelihoods, make_lm  # torch

    requests = score_requests(items, lambda ins: format_prompt(spec, tokenizer, ins))
    lm = make_lm(spec, tokenizer, batch_size=batch_size, backend=backend)
    sums = [lp for lp, _ in loglikelihoods(lm, requests)]
    if backend == "hf":
        shift = hf_whitespace(lm, [c for c, _ in requests])
        sums = [s - shift.get(c, 0.0) for s, (c, _) in zip(sums, requests, strict=True)]
    out: list[list[float]] = []
    width = 0
    for item in items:
        row = []
        for candidate in item.candidates:
            n_tokens = len(tokenizer(candidate, add_special_tokens=False)["input_ids"])
            row.append(sums[width] / max(n_tokens, 1))
            width += 1
        out.append(row)
    return out


# ------------------------------------------------------------------------------ analysis


def _check_scores(items: Sequence[RankItem], rows: Any, variant: str) -> None:
    if not isinstance(rows, Sequence) or len(rows) != len(items):
        raise DataError(f"ranking: {variant} has scores for "
                        f"{len(rows) if isinstance(rows, Sequence) else 0} items, "
                        f"expected {len(items)}")
    for item, row in zip(items, rows, strict=True):
        if not isinstance(row, Sequence) or len(row) != len(item.candidates):
            raise DataError(f"ranking: {variant} item {item.id} needs "
                            f"{len(item.candidates)} candidate scores")
        if any(isinstance(v, float) and math.isnan(v) for v in row):
            raise DataError(f"ranking: {variant} item {item.id} has a NaN score")


def _bootstrap(correct: list[float], n_boot: int, seed: int) -> tuple[float | None, float | None]:
    """Percentile bootstrap 95% interval of the mean of `correct` (None without resamples)."""
    import numpy as np

    if n_boot < 1 or not correct:
        return None, None
    values = np.asarray(correct, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def analyse(items: Sequence[RankItem], mean_logprobs: dict[str, list[list[float]]],
            options: RankingOptions) -> dict[str, Any]:
    """Accuracy with a seeded bootstrap 95% CI, chance and mean rank of the true response per
    variant, plus one row per (variant, item). A tie between the true response and a
    distractor counts as incorrect, and ranks it below every tied distractor."""
    if not items:
        raise DataError("ranking: no items to analyse")
    headline: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for variant, scores in mean_logprobs.items():
        _check_scores(items, scores, variant)
        correct, ranks = [], []
        for item, row in zip(items, scores, strict=True):
            values = [float(v) for v in row]
            true = values[item.true_index]
            others = [v for c, v in enumerate(values) if c != item.true_index]
            best_other = max(others)
            predicted = max(range(len(values)), key=lambda c: (values[c], -c))
            hit = true > best_other
            correct.append(1.0 if hit else 0.0)
            ranks.append(1 + sum(v >= true for v in others))
            rows.append({"model": variant, "id": item.id, "true_index": item.true_index,
                         "predicted_index": predicted, "correct": hit,
                         "true_mean_logprob": true, "best_other_mean_logprob": best_other})
        low, high = _bootstrap(correct, options.bootstrap, options.seed)
        ks = {len(item.candidates) - 1 for item in items}
        k = ks.pop() if len(ks) == 1 else options.k
        headline[variant] = {"n": len(items), "k": k, "accuracy": sum(correct) / len(correct),
                             "ci_low": low, "ci_high": high, "chance": 1.0 / (k + 1),
                             "mean_true_rank": sum(ranks) / len(ranks)}
    return {"headline": headline, "tables": {"items": rows}}


@dataclass(frozen=True)
class RankingSettings:
    """A ranking task's settings (its pairs' source, k, n, seed...)."""

    options: RankingOptions

    def as_dict(self) -> dict[str, Any]:
        o = self.options
        return o.as_dict() if hasattr(o, "as_dict") else dataclasses.asdict(o)

    @property
    def n(self) -> int:
        return self.options.n

    @property
    def source(self) -> str:
        pairs = self.options.pairs
        return str(pairs.get("path") or pairs.get("kind")) if isinstance(pairs, dict) else ""


class Ranking:
    generating = False
    scored = True
    metric = "accuracy"
    compares = False
    leaderboard = False

    def parse_options(self, table: dict[str, Any], where: str, base: Path) -> RankingSettings:
        if "reference" in table:
            raise ConfigError(f"{where}: kind 'ranking' has no reference")
        return RankingSettings(parse_options(table, where))

    def judged(self, options: Any) -> bool:
        return False

    def limited(self, options: RankingSettings, limit: int | None) -> RankingSettings:
        if limit is not None and limit < options.n:  # --limit: N items
            return RankingSettings(dataclasses.replace(options.options, n=limit))
        return options

    def analyse(self, ev: Evidence) -> tuple[Rows, dict[str, Rows]]:
        result = analyse(ev.scores["items"], ev.scores["scores"], ev.task.options.options)
        return variant_rows(ev, result["headline"]), result["tables"]

    def headline(self, r: dict[str, Any]) -> str:
        return (f"accuracy {pct(r.get('accuracy'), '.1f')} "
                f"[{pct(r.get('ci_low'), '.1f')}, {pct(r.get('ci_high'), '.1f')}], chance "
                f"{pct(r.get('chance'), '.1f')} (k={r.get('k')})")

    def figures(self, name: str, tables: dict[str, Rows], caps: dict[str, Any]) -> list[Any]:
        return [figures.ranking(name, tables.get("summary", []))]


KIND = Ranking()
