"""Judge agreement: measure judges against GPT-4-turbo's AlpacaEval 2.0 preferences.

For each judge and each annotated model: agreement with the reference preferences (ties on
either side excluded and counted), Cohen's kappa, and the win rate the judge would give the model
beside the official one. The always-pick-the-longer judge is always reported as the baseline.
The combined judge is scored on held-out data: each model's pairs are judged with weights fitted
on the other models' pairs, and only on instructions outside the pair's fold (leave-one-model-
out x instruction folds), so neither the model nor the instruction was seen in fitting.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.cache import shared_data_dir
from harness.core.errors import ConfigError, DataError
from harness.data.alpaca_formats import read_annotations
from harness.judging import heuristic as hj
from harness.judging.protocol import Candidate, JudgeSpec, PairwiseItem
from harness.judging.registry import JUDGES_DIR, build_judge, load_judge_spec
from harness.stats.winrates import win_rate_summary


def default_annotations() -> Path:
    """AlpacaEval's GPT-4-turbo annotations in the shared data folder."""
    return shared_data_dir() / "alpaca_eval" / "annotations"


BASELINE_JUDGE = "longer"
DEFAULT_JUDGES = ("heuristic", "repetition", "relevance", "heuristic_combined")
COMBINED_TOML = JUDGES_DIR / "heuristic_combined.toml"
HOLDOUT_FOLDS = 5


@dataclass(frozen=True)
class AnnotationSet:
    """One model's annotated head-to-heads against the baseline (output_1)."""

    model: str
    items: tuple[PairwiseItem, ...]
    reference: np.ndarray  # reference preferences in [1, 2]
    dropped: int = 0  # records without a usable preference


def load_annotations(directory: Path | None = None, limit: int | None = None,
                     models: Sequence[str] | None = None) -> list[AnnotationSet]:
    """Read AlpacaEval annotation files (<model>.json) into AnnotationSets; one error if bad."""
    directory = Path(directory) if directory is not None else default_annotations()
    if not directory.is_dir():
        raise DataError(f"annotations folder not found: {directory}")
    files = sorted(directory.glob("*.json"))
    if models:
        known = {f.stem: f for f in files}
        missing = [m for m in models if m not in known]
        if missing:
            raise DataError(f"no annotations for {', '.join(missing)} in {directory}; "
                            f"known: {', '.join(sorted(known))}")
        files = [known[m] for m in models]
    if not files:
        raise DataError(f"no annotation files (*.json) in {directory}")
    sets = []
    for path in files:
        annotations = read_annotations(path)
        items, prefs, dropped = [], [], 0
        for n, a in enumerate(annotations[:limit] if limit else annotations):
            pref = math.nan if a.preference is None else a.preference
            if not 1.0 <= pref <= 2.0:  # also drops NaN
                dropped += 1
                continue
            items.append(PairwiseItem(
                instruction=a.instruction, output_1=Candidate(a.output_1, a.generator_1),
                output_2=Candidate(a.output_2, a.generator_2),
                instruction_id=str(a.extra.get("instruction_id", n))))
            prefs.append(pref)
        sets.append(AnnotationSet(path.stem, tuple(items), np.array(prefs), dropped))
    return sets


def discrete(prefs: np.ndarray) -> np.ndarray:
    """Map preferences to 1.0 (output_1 better), 2.0 (output_2 better) or 1.5 (tie)."""
    prefs = np.asarray(prefs, dtype=float)
    return np.where(prefs > 1.5, 2.0, np.where(prefs < 1.5, 1.0, 1.5))


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two label arrays (nan if empty; 0 when chance agreement is total)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) == 0:
        return math.nan
    labels = np.union1d(a, b)
    observed = float(np.mean(a == b))
    expected = float(sum(np.mean(a == lab) * np.mean(b == lab) for lab in labels))
    if expected >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return (observed - expected) / (1.0 - expected)


def agreement_stats(judge: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Agreement and kappa on pairs where neither side is a tie, with the exclusions counted."""
    j, r = discrete(judge), discrete(reference)
    ref_tie, judge_tie = r == 1.5, j == 1.5
    used = ~(ref_tie | judge_tie)
    return {
        "n": int(len(j)),
        "n_used": int(used.sum()),
        "ref_ties": int(ref_tie.sum()),
        "judge_ties": int((judge_tie & ~ref_tie).sum()),  # not already excluded as ref ties
        "agreement": float(np.mean(j[used] == r[used])) * 100 if used.any() else math.nan,
        "kappa": cohen_kappa(j[used], r[used]),
    }


def win_rate(prefs: np.ndarray) -> float:
    """Win rate (%) of output_2 by AlpacaEval's definition (NaN when there is no preference)."""
    prefs = np.asarray(prefs, dtype=float)
    return float(win_rate_summary(prefs.tolist())["win_rate"]) if len(prefs) else math.nan


def resolve_spec(name: str) -> JudgeSpec:
    """A judge by config name/path, or a built-in heuristic method name (e.g. 'relevance')."""
    try:
        return load_judge_spec(name)
    except ConfigError:
        if name in hj.METHODS and name != "combined":
            return hj.method_spec(name)
        raise


def is_combined(spec: JudgeSpec) -> bool:
    """True for a heuristic judge whose weights were fitted (scored held-out)."""
    return spec.kind == "heuristic" and spec.params.get("method") == "combined"


def judge_preferences(spec: JudgeSpec, sets: Sequence[AnnotationSet]) -> list[np.ndarray]:
    """The judge's preference for every item of every set (one call over all items)."""
    judge = build_judge(spec)
    items = [it for s in sets for it in s.items]
    prefs = np.full(len(items), np.nan)
    for i, judgment in judge.judge(items):
        prefs[i] = judgment.preference
    bounds = np.cumsum([0] + [len(s.items) for s in sets])
    return [prefs[bounds[k]:bounds[k + 1]] for k in range(len(sets))]


def instruction_fold(instruction: str, folds: int = HOLDOUT_FOLDS) -> int:
    """Deterministic fold of an instruction (the same instruction is in one fold for all models)."""
    return int(hashlib.sha256(instruction.encode("utf-8")).hexdigest()[:8], 16) % folds


def _design(spec: JudgeSpec, sets: Sequence[AnnotationSet]
            ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Feature names, differences, soft targets, model index and fold of every pair."""
    p = hj.build(spec).params
    names = list(p["weights"]) or list(hj.FEATURES)
    items = [it for s in sets for it in s.items]
    x = hj.feature_differences(items, names, p["ngram"], p["relevance_max_length"])
    y = np.concatenate([s.reference for s in sets]) - 1.0
    model = np.concatenate([np.full(len(s.items), k) for k, s in enumerate(sets)])
    fold = np.array([instruction_fold(it.instruction) for it in items])
    return names, x, y, model, fold


def _fit(spec: JudgeSpec, names: list[str], x: np.ndarray, y: np.ndarray,
         l2: float) -> np.ndarray:
    """Fit weights; features in params.fixed keep their configured weight (an offset)."""
    fixed = [n for n in spec.params.get("fixed", []) if n in names]
    w = np.zeros(len(names))
    for n in fixed:
        w[names.index(n)] = float(spec.params.get("weights", {}).get(n, 0.0))
    free = [j for j, n in enumerate(names) if n not in fixed]
    offset = x @ w
    w[free] = hj.fit_logistic(x[:, free], y, l2=l2, offset=offset)
    return w


def held_out_preferences(spec: JudgeSpec, sets: Sequence[AnnotationSet],
                         folds: int = HOLDOUT_FOLDS) -> tuple[list[np.ndarray], str]:
    """Combined-judge preferences where each pair is judged by weights fitted without its model
    (when there are 2+ models) and without its instruction fold; returns (prefs, how)."""
    names, x, y, model, fold = _design(spec, sets)
    l2 = float(spec.params.get("l2", 1.0))
    soft = bool(spec.params.get("soft", True))
    prefs = np.full(len(y), np.nan)
    by_model = len(sets) > 1
    for m in range(len(sets)):
        for k in range(folds):
            test = (model == m) & (fold == k)
            if not test.any():
                continue
            train = (fold != k) & ((model != m) if by_model else True)
            w = _fit(spec, names, x[train], y[train], l2)
            z = x[test] @ w
            prefs[test] = 1.0 + hj.combined_probabilities(x[test], w) if soft else \
                np.where(z > 0, 2.0, np.where(z < 0, 1.0, 1.5))
    how = (f"held out: leave-one-model-out x {folds} instruction folds" if by_model
           else f"held out: {folds} instruction folds")
    bounds = np.cumsum([0] + [len(s.items) for s in sets])
    return [prefs[bounds[k]:bounds[k + 1]] for k in range(len(sets))], how


def fit_combined(sets: Sequence[AnnotationSet], spec: JudgeSpec | None = None,
                 l2: float | None = None) -> dict[str, float]:
    """Fit the combined judge's weights on all the given annotations; feature -> weight."""
    spec = spec or load_judge_spec(str(COMBINED_TOML))
    names, x, y, _, _ = _design(spec, sets)
    w = _fit(spec, names, x, y, float(spec.params.get("l2", 1.0) if l2 is None else l2))
    return {n: round(float(v), 6) for n, v in zip(names, w, strict=True)}


def _toml_value(v: Any) -> str:
    """A TOML literal for a str, bool, int, float or list of those."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def write_combined_toml(path: Path, spec: JudgeSpec, weights: dict[str, float],
                        comment: Sequence[str]) -> None:
    """Write the combined judge's config: comment lines, params, then [params.weights]."""
    lines = [f"# {c}" if c else "#" for c in comment]
    lines += [f"name = {_toml_value(spec.name)}", 'kind = "heuristic"', "", "[params]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in spec.params.items() if k != "weights"]
    lines += ["", "[params.weights]"] + [f"{k} = {_toml_value(v)}" for k, v in weights.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def refit_combined(sets: Sequence[AnnotationSet], path: Path = COMBINED_TOML,
                   baseline_agreement: float | None = None,
                   held_out_agreement: float | None = None) -> dict[str, float]:
    """Refit the combined judge on sets and rewrite its TOML (with how it was fitted)."""
    spec = load_judge_spec(str(path))
    weights = fit_combined(sets, spec)
    n = sum(len(s.items) for s in sets)
    fixed = ", ".join(f"{n}={weights[n]:g}" for n in spec.params.get("fixed", []) if n in weights)
    text = (
        "Combined heuristic judge: P(output_2 better) = sigmoid(sum_k w_k * (f_k(output_2) - "
        "f_k(output_1))), preference = 1 + P; features: harness.judging.heuristic.FEATURES. "
        "Weights fitted by `python -m harness judge-agreement --refit` "
        "(harness.judging.agreement.refit_combined): L2-regularised logistic regression "
        f"(l2={spec.params.get('l2', 1.0)} on standardised features; no intercept, so swapping "
        "the outputs flips the preference) against the soft preferences of AlpacaEval 2.0's "
        f"weighted_alpaca_eval_gpt4_turbo on {n} pairs of {len(sets)} models vs "
        f"gpt4_1106_preview ({', '.join(s.model for s in sets)}). "
        f"Set by hand, not fitted (params.fixed): {fixed or 'none'}; the annotations carry no "
        "finish reason and no empty outputs, so these cannot be learnt from them.")
    if held_out_agreement is not None and baseline_agreement is not None:
        text += (f" Held-out agreement with GPT-4-turbo (leave-one-model-out x {HOLDOUT_FOLDS} "
                 f"instruction folds, ties excluded): {held_out_agreement:.1f}% vs "
                 f"{baseline_agreement:.1f}% for always-pick-the-longer.")
    comment = textwrap.wrap(text, width=96, break_on_hyphens=False)
    write_combined_toml(path, spec, weights, comment)
    return weights


def evaluate(judge_names: Sequence[str], sets: Sequence[AnnotationSet],
             holdout: bool = True, log: Any = None) -> list[dict[str, Any]]:
    """One row per (judge, model) plus an 'ALL' row per judge pooling every model's pairs."""
    rows = []
    reference_all = np.concatenate([s.reference for s in sets])
    for name in judge_names:
        spec = resolve_spec(name)
        start = time.perf_counter()
        how = "stored weights" if is_combined(spec) else ""
        if is_combined(spec) and holdout:
            prefs, how = held_out_preferences(spec, sets)
        else:
            prefs = judge_preferences(spec, sets)
        seconds = time.perf_counter() - start
        if log:
            log(f"{name}: {sum(len(s.items) for s in sets)} pairs in {seconds:.1f}s")
        for s, p in zip(sets, prefs, strict=True):
            rows.append({"judge": name, "model": s.model, **agreement_stats(p, s.reference),
                         "judge_win_rate": win_rate(p), "official_win_rate": win_rate(s.reference),
                         "note": how, "seconds": None})
        pooled = np.concatenate(prefs)
        rows.append({"judge": name, "model": "ALL", **agreement_stats(pooled, reference_all),
                     "judge_win_rate": win_rate(pooled),
                     "official_win_rate": win_rate(reference_all), "note": how,
                     "seconds": round(seconds, 2)})
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    """Readable tables: pooled summary per judge, agreement per model, win rates per model."""
    import pandas as pd

    df = pd.DataFrame(rows)
    judges = list(dict.fromkeys(df["judge"]))
    models = [m for m in dict.fromkeys(df["model"]) if m != "ALL"]
    pooled = df[df["model"] == "ALL"].set_index("judge")
    per_model = df[df["model"] != "ALL"]
    official = per_model.drop_duplicates("model").set_index("model")["official_win_rate"]
    corr = {}
    for j in judges:
        wr = per_model[per_model["judge"] == j].set_index("model")["judge_win_rate"]
        corr[j] = wr.rank().corr(official.rank()) if len(wr) > 2 else math.nan
    summary = pd.DataFrame({
        "pairs": pooled["n"], "used": pooled["n_used"],
        "excl_ref_ties": pooled["ref_ties"], "excl_judge_ties": pooled["judge_ties"],
        "agreement_%": pooled["agreement"].round(1), "kappa": pooled["kappa"].round(3),
        "winrate_rank_corr": pd.Series(corr).round(3), "seconds": pooled["seconds"],
        "note": pooled["note"]})
    agree = per_model.pivot(index="model", columns="judge", values="agreement")[judges]
    kappa = per_model.pivot(index="model", columns="judge", values="kappa")[judges]
    wins = per_model.pivot(index="model", columns="judge", values="judge_win_rate")[judges]
    wins.insert(0, "OFFICIAL", official)
    order = official.sort_values(ascending=False).index
    parts = [
        "Agreement with GPT-4-turbo (weighted_alpaca_eval_gpt4_turbo), all models pooled; "
        "ties on either side excluded:",
        summary.to_string(),
        "",
        "Agreement % per model (ties excluded):",
        agree.loc[[m for m in order if m in models]].round(1).to_string(),
        "",
        "Cohen's kappa per model:",
        kappa.loc[[m for m in order if m in models]].round(3).to_string(),
        "",
        "Win rate % of each model against gpt4_1106_preview: official vs each judge's:",
        wins.loc[[m for m in order if m in models]].round(2).to_string(),
    ]
    return "\n".join(parts)
