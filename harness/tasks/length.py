"""Response length as a task: the length distribution, EOS versus the cap, and length vs winning.

The cap-hit share is the study's failure mode of base models (they ramble until cut off), so it
leads the headline. When the task is judged head-to-head, responses are binned by length
(quantile edges over all variants' responses, the same for every variant) and each bin gets a
win rate with its interval; the Spearman correlation of length (and of the length difference
to the reference) with the preference says how much winning tracks length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.configs import expect
from harness.core.errors import ConfigError
from harness.tasks import figures
from harness.tasks.protocol import Evidence, Rows, fmt, pct, variant_rows


@dataclass(frozen=True)
class LengthOptions:
    """judge: also judge head-to-head, for win rate by length; bins: length bins for that."""

    judge: bool = True
    bins: int = 4
    bootstrap: int = 1000
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"judge": self.judge, "bins": self.bins, "bootstrap": self.bootstrap,
                "seed": self.seed}


def parse_options(table: dict[str, Any], where: str) -> LengthOptions:
    """A length task's settings, type-checked; one line for anything wrong."""
    unknown = sorted(set(table) - {"judge", "bins", "bootstrap", "seed"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) for kind 'length': {', '.join(unknown)}")
    opts = LengthOptions(**{k: expect(v, bool if k == "judge" else int, where, k)
                            for k, v in table.items()})
    if opts.bins < 1 or opts.bootstrap < 1:
        raise ConfigError(f"{where}: bins and bootstrap must be positive")
    return opts


def _f(x: Any) -> float | None:
    """A plain float, or None for NaN/None."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import spearmanr

    return _f(spearmanr(x, y).statistic)


@dataclass(frozen=True)
class Response:
    """What the length analysis reads of one response (and its judgment, if any)."""

    id: str
    tokens: int
    words: int
    chars: int
    finish_reason: str
    preference: float | None = None  # 1 = reference better, 2 = this response better
    reference_tokens: int | None = None


def _win(pref: float | None) -> float | None:
    return None if pref is None or pref != pref else pref - 1.0


def _mean_ci(values: list[float], reps: int, seed: int) -> tuple[float | None, float | None,
                                                                 float | None]:
    if not values:
        return None, None, None
    from harness.stats.winrates import bootstrap_ci

    arr = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(list(1.0 + arr), n_boot=reps, seed=seed) if len(arr) > 1 else (None,
                                                                                      None)
    return _f(100 * arr.mean()), _f(low), _f(high)


def analyse(responses: dict[str, list[Response]], cap: dict[str, int], options: LengthOptions
            ) -> dict[str, Any]:
    """Headline per variant, and tables: distribution, by_length_bin, items (see module doc)."""
    headline: dict[str, dict[str, Any]] = {}
    dist_rows, bin_rows, item_rows = [], [], []
    all_tokens = [r.tokens for rs in responses.values() for r in rs]
    qs = np.linspace(0, 1, options.bins + 1)[1:-1]
    edges = sorted(set(float(np.quantile(all_tokens, q)) for q in qs)) if all_tokens else []
    for variant, rs in responses.items():
        toks = np.array([r.tokens for r in rs], dtype=float)
        words = np.array([r.words for r in rs], dtype=float)
        chars = np.array([r.chars for r in rs], dtype=float)
        eos = float(np.mean([r.finish_reason == "eos" for r in rs])) if rs else None
        row: dict[str, Any] = {
            "n": len(rs), "cap": cap.get(variant),
            "cap_share": None if eos is None else 1.0 - eos, "eos_share": eos,
            "mean_tokens": _f(toks.mean()) if rs else None,
            "median_tokens": _f(np.median(toks)) if rs else None,
            "p90_tokens": _f(np.quantile(toks, 0.9)) if rs else None,
            "mean_words": _f(words.mean()) if rs else None,
            "median_words": _f(np.median(words)) if rs else None,
            "mean_chars": _f(chars.mean()) if rs else None,
        }
        judged = [(r, _win(r.preference)) for r in rs if _win(r.preference) is not None]
        if judged:
            wins = [w for _, w in judged]
            row["win_rate"] = _f(100 * np.mean(wins))
            row["length_win_spearman"] = _spearman([r.tokens for r, _ in judged], wins)
            diffs = [(r.tokens - r.reference_tokens, w) for r, w in judged
                     if r.reference_tokens is not None]
            row["length_diff_win_spearman"] = _spearman([d for d, _ in diffs],
                                                        [w for _, w in diffs])
            index = np.searchsorted(edges, [r.tokens for r, _ in judged], side="right")
            bounds = [-math.inf, *edges, math.inf]
            for b in range(len(edges) + 1):
                members = [w for (_, w), i in zip(judged, index, strict=True) if i == b]
                rate, low, high = _mean_ci(members, options.bootstrap, options.seed)
                bin_rows.append({"model": variant, "bin": b, "tokens_low": _f(bounds[b]),
                                 "tokens_high": _f(bounds[b + 1]), "n": len(members),
                                 "win_rate": rate, "ci_low": low, "ci_high": high})
        headline[variant] = row
        dist_rows.append({"model": variant, **row})
        for r in rs:
            item_rows.append({"model": variant, "id": r.id, "tokens": r.tokens,
                              "words": r.words, "chars": r.chars,
                              "finish_reason": r.finish_reason,
                              "preference": _f(r.preference)})
    for row in bin_rows:  # infinite outer edges are written as None (JSON has no infinity)
        for k in ("tokens_low", "tokens_high"):
            if row[k] is not None and math.isinf(row[k]):
                row[k] = None
    return {"headline": headline,
            "tables": {"distribution": dist_rows, "by_length_bin": bin_rows,
                       "items": item_rows}}


class Length:
    generating = True
    scored = False
    metric = "cap_share"
    compares = True
    leaderboard = False

    def parse_options(self, table: dict[str, Any], where: str, base: Path) -> LengthOptions:
        return parse_options({k: v for k, v in table.items() if k != "reference"}, where)

    def judged(self, options: LengthOptions) -> bool:
        return bool(options.judge)

    def limited(self, options: Any, limit: int | None) -> Any:
        return options

    def analyse(self, ev: Evidence) -> tuple[Rows, dict[str, Rows]]:
        task, responses = ev.task, {}
        for spec in ev.specs:
            rs = []
            for ins in task.instructions:
                g = ev.generations[(task.name, spec.name, ins.id)]
                j = ev.judgments.get((task.name, spec.name, ins.id))
                ref_tokens = None
                if ev.reference is not None and j is not None:
                    ref_tokens = ev.generations[(task.name, ev.reference, ins.id)].n_tokens
                rs.append(Response(id=ins.id, tokens=g.n_tokens, words=len(g.output.split()),
                                   chars=len(g.output), finish_reason=g.finish_reason,
                                   preference=None if j is None else j.preference,
                                   reference_tokens=ref_tokens))
            responses[spec.name] = rs
        result = analyse(responses, {s.name: s.decoding.max_new_tokens for s in ev.specs},
                         task.options)
        return variant_rows(ev, result["headline"]), result["tables"]

    def headline(self, r: dict[str, Any]) -> str:
        text = (f"hit the cap {pct(r.get('cap_share'))} (EOS {pct(r.get('eos_share'))}); "
                f"tokens median {fmt(r.get('median_tokens'), '.0f')}, mean "
                f"{fmt(r.get('mean_tokens'))}; words mean {fmt(r.get('mean_words'))}")
        if r.get("win_rate") is not None:
            text += (f"; win {fmt(r.get('win_rate'))}, length~win rho "
                     f"{fmt(r.get('length_win_spearman'), '+.2f')}")
        return text

    def figures(self, name: str, tables: dict[str, Rows], caps: dict[str, Any]) -> list[Any]:
        return [figures.lengths(name, tables.get("items", []), caps),
                figures.length_bins(name, tables.get("by_length_bin", []))]


KIND = Length()
