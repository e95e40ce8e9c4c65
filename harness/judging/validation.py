"""The judge validation suite: (a) contrastive pairs with known answers, (b) blind-labelled
pairs of this harness's own outputs, (c) AlpacaEval's GPT-4-turbo annotations, model held out.

A fitted judge (method "combined" with `fit_sources`) is fitted on all three sources with equal
total weight per source, and every figure it gets here is held out: each instruction fold is
judged by weights fitted without it, and each annotated model also without that model.
Unfitted judges are scored as they are. The figures of a resolved judge spec are cached, so a
run can print them beside its win rates without recomputing them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.cache import cache_root
from harness.core.errors import ConfigError
from harness.core.hashing import canonical_json, content_hash
from harness.judging import blind, contrastive
from harness.judging import heuristic as hj
from harness.judging.agreement import (
    HOLDOUT_FOLDS,
    AnnotationSet,
    agreement_stats,
    discrete,
    instruction_fold,
    load_annotations,
    resolve_spec,
    win_rate,
)
from harness.judging.protocol import JudgeSpec, PairwiseItem
from harness.judging.registry import build_judge, load_judge_spec

SUITE_VERSION = 1
SOURCES = ("annotations", "contrastive", "blind")
#: Annotated models whose outputs are an attack on the annotator: NullModel answers every
#: instruction with one prompt-injection string, and GPT-4-turbo prefers it 77% of the time.
#: Agreeing with the annotator there is agreeing with a fooled judge: (c) is also reported
#: without them, and a fitted judge may leave them out (params.exclude_models).
ADVERSARIAL_MODELS = ("NullModel",)


@dataclass(frozen=True)
class Suite:
    """Everything the suite judges: the pairs of each set and their known answers."""

    annotations: list[AnnotationSet]
    contrastive: list[contrastive.ContrastivePair]
    blind: list[blind.LabelledPair]
    stale: tuple[str, ...] = ()
    unlabelled: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """A hash of the suite's content (what its figures were measured on)."""
        return content_hash({
            "version": SUITE_VERSION,
            "annotations": [(s.model, len(s.items), float(np.sum(s.reference)))
                            for s in self.annotations],
            "contrastive": [(p.category, p.item.instruction, p.item.output_1.output,
                             p.item.output_2.output, p.good) for p in self.contrastive],
            "blind": [(lp.pair.pair_id, lp.pair.sha256_a, lp.pair.sha256_b, lp.label.p_b)
                      for lp in self.blind]}, 16)


def load_suite(annotations: Path | None = None, pairs: Path | None = None,
               labels: Path | None = None, seed: int = 0, per_category: int = 200) -> Suite:
    """The three sets: annotations from shared data, contrastive pairs built from it, and the
    committed blind pairs with their fresh labels (stale and unlabelled ones are counted)."""
    sets = load_annotations(annotations)
    con = contrastive.build(seed=seed, per_category=per_category)
    fresh, stale, missing = blind.join(blind.read_pairs(pairs or blind.PAIRS_FILE),
                                       blind.read_labels(labels or blind.LABELS_FILE))
    return Suite(sets, con, fresh, tuple(stale), tuple(missing))


@dataclass(frozen=True)
class Rows:
    """The suite as one table of pairs: items, targets P(output_2 better), and fit metadata."""

    items: list[PairwiseItem]
    y: np.ndarray
    source: np.ndarray  # index into SOURCES
    fold: np.ndarray
    model: np.ndarray  # annotated model's index, -1 elsewhere
    models: tuple[str, ...] = ()  # the annotated models' names, by index
    folds_of: tuple[frozenset[int], ...] = ()  # every instruction fold a row's texts come from
    models_of: tuple[frozenset[int], ...] = ()  # every annotated model whose output it shows


def suite_rows(suite: Suite) -> Rows:
    """Every pair of the suite once (contrastive pairs in both orders), with the instruction
    folds and annotated models each one's texts come from."""
    names = [s.model for s in suite.annotations]
    items: list[PairwiseItem] = []
    y, source, fold, model = [], [], [], []
    folds_of: list[frozenset[int]] = []
    models_of: list[frozenset[int]] = []
    for m, s in enumerate(suite.annotations):
        items += s.items
        y += list(s.reference - 1.0)
        source += [0] * len(s.items)
        own = [instruction_fold(it.instruction) for it in s.items]
        fold += own
        model += [m] * len(s.items)
        folds_of += [frozenset({f}) for f in own]
        models_of += [frozenset({m})] * len(s.items)
    for p in suite.contrastive:
        for item, good in ((p.item, p.good), (contrastive.swapped(p.item), 3 - p.good)):
            items.append(item)
            y.append(1.0 if good == 2 else 0.0)
            source.append(1)
            fold.append(p.fold)
            model.append(-1)
            folds_of.append(p.folds | {p.fold})
            models_of.append(frozenset(names.index(n) for n in p.models if n in names))
    for lp in suite.blind:
        items.append(lp.pair.as_item())
        y.append(lp.preference - 1.0)
        source.append(2)
        fold.append(instruction_fold(lp.pair.instruction))
        model.append(-1)
        folds_of.append(frozenset({fold[-1]}))
        models_of.append(frozenset())
    return Rows(items, np.array(y), np.array(source), np.array(fold), np.array(model),
                tuple(names), tuple(folds_of), tuple(models_of))


def _is_fitted(spec: JudgeSpec) -> bool:
    return spec.kind == "heuristic" and spec.params.get("method") == "combined"


def _sample_weights(rows: Rows, sources: Sequence[str], shares: dict[str, float]
                    ) -> np.ndarray:
    """Each named source gets equal total weight (or its share in `shares`), others none."""
    w = np.zeros(len(rows.y))
    for k, name in enumerate(SOURCES):
        here = rows.source == k
        if name in sources and here.any() and shares.get(name, 1.0) > 0:
            w[here] = shares.get(name, 1.0) / here.sum()
    return w * len(rows.y) / max(w.sum(), 1e-12)


def design(spec: JudgeSpec, rows: Rows) -> tuple[list[str], np.ndarray]:
    """Feature names of a combined judge and their output_2-minus-output_1 differences."""
    params = hj.build(spec).params
    names = list(params["weights"]) or list(hj.FEATURES)
    return names, hj.feature_differences(rows.items, names, params["ngram"],
                                         params["relevance_max_length"])


def fit(spec: JudgeSpec, names: list[str], x: np.ndarray, rows: Rows,
        train: np.ndarray) -> np.ndarray:
    """Weights fitted on the training rows of params.fit_sources, each source with equal total
    weight (features in params.fixed keep their value; annotated models in
    params.exclude_models are never fitted on)."""
    p = spec.params
    fixed = [n for n in p.get("fixed", []) if n in names]
    w = np.zeros(len(names))
    for n in fixed:
        w[names.index(n)] = float(p.get("weights", {}).get(n, 0.0))
    excluded = [i for i, m in enumerate(rows.models) if m in p.get("exclude_models", [])]
    sw = _sample_weights(rows, p.get("fit_sources") or ["annotations"],
                         p.get("source_weights", {}))
    keep = train & ~np.isin(rows.model, excluded) & (sw > 0)
    free = [j for j, n in enumerate(names) if n not in fixed]
    w[free] = hj.fit_logistic(x[keep][:, free], rows.y[keep], l2=float(p.get("l2", 1.0)),
                              offset=x[keep] @ w, sample_weight=sw[keep])
    return w


def held_out(spec: JudgeSpec, rows: Rows, names: list[str], x: np.ndarray,
             folds: int = HOLDOUT_FOLDS) -> np.ndarray:
    """Preferences where every row is judged by weights fitted without any row whose texts
    come from its instruction fold and, for an annotated model's row, without any row that
    shows that model's outputs."""
    prefs = np.full(len(rows.y), np.nan)
    models = sorted(set(rows.model[rows.model >= 0].tolist()))
    for k in range(folds):
        groups = [(None, (rows.fold == k) & (rows.model < 0)),
                  *[(m, (rows.fold == k) & (rows.model == m)) for m in models]]
        for m, test in groups:
            if test.any():
                w = fit(spec, names, x, rows, training_rows(rows, k, m))
                prefs[test] = 1.0 + hj.combined_probabilities(x[test], w)
    return prefs


def training_rows(rows: Rows, fold: int, model: int | None = None) -> np.ndarray:
    """The rows a fit may use to score instruction fold `fold` (and annotated model `model`):
    none whose texts come from that fold, nor, with a model, any that shows its outputs."""
    keep = np.array([fold not in f for f in rows.folds_of], dtype=bool)
    if model is not None:
        keep &= np.array([model not in ms for ms in rows.models_of], dtype=bool)
    return keep


def preferences(spec: JudgeSpec, rows: Rows) -> tuple[np.ndarray, str]:
    """Every row's preference under a judge (held out if fitted), and how it was obtained."""
    if _is_fitted(spec):
        names, x = design(spec, rows)
        if spec.params.get("fit_sources"):
            return held_out(spec, rows, names, x), "held out (fold and model)"
        # fitted on annotations only: those are scored held out, the rest with stored weights
        weights = np.array([float(spec.params["weights"][n]) for n in names])
        prefs = 1.0 + hj.combined_probabilities(x, weights)
        ann = rows.source == 0
        if ann.any():
            dev_spec = JudgeSpec(spec.name, spec.kind,
                                 {**spec.params, "fit_sources": ["annotations"]})
            keep = np.flatnonzero(ann)
            sub = Rows([rows.items[i] for i in keep], rows.y[ann], rows.source[ann],
                       rows.fold[ann], rows.model[ann], rows.models,
                       tuple(rows.folds_of[i] for i in keep),
                       tuple(rows.models_of[i] for i in keep))
            prefs[ann] = held_out(dev_spec, sub, names, x[ann])
        return prefs, "annotations held out; other sets never fitted"
    judge = build_judge(spec)
    prefs = np.full(len(rows.y), np.nan)
    for i, j in judge.judge(rows.items):
        prefs[i] = j.preference
    return prefs, "not fitted"


def _hard(prefs: np.ndarray) -> np.ndarray:
    return discrete(np.where(np.isnan(prefs), 1.5, prefs))


def contrastive_table(suite: Suite, rows: Rows, prefs: np.ndarray) -> list[dict[str, Any]]:
    """(a): per category, the share of judgments (both orders) that pick the good answer;
    a tie counts as half."""
    here = rows.source == 1
    cats = [p.category for p in suite.contrastive for _ in range(2)]
    hard, good = _hard(prefs[here]), np.where(rows.y[here] > 0.5, 2.0, 1.0)
    score = np.where(hard == good, 1.0, np.where(hard == 1.5, 0.5, 0.0))
    out = []
    for cat in contrastive.CATEGORIES:
        m = np.array([c == cat for c in cats])
        if m.any():
            out.append({"category": cat, "n": int(m.sum()),
                        "accuracy": round(float(score[m].mean()) * 100, 1)})
    if len(score):
        out.append({"category": "ALL", "n": int(len(score)),
                    "accuracy": round(float(score.mean()) * 100, 1)})
    return out


def blind_table(suite: Suite, rows: Rows, prefs: np.ndarray) -> list[dict[str, Any]]:
    """(b): per variant, agreement on pairs both the judge and the reader call, and the win
    rate each gives the variant (hard verdicts, ties as half)."""
    here = rows.source == 2
    variants = [lp.pair.variant for lp in suite.blind]
    j, r = _hard(prefs[here]), rows.y[here] + 1.0
    out = []
    for name in [*sorted(set(variants)), "ALL"]:
        m = np.array([name in ("ALL", v) for v in variants]) if variants else np.zeros(0, bool)
        if not m.any():
            continue
        both = m & (j != 1.5) & (r != 1.5)
        out.append({"variant": name, "n": int(m.sum()), "n_both_call": int(both.sum()),
                    "agreement": round(float(np.mean(j[both] == r[both])) * 100, 1)
                    if both.any() else None,
                    "judge_win_rate": round(win_rate(j[m]), 1),
                    "label_win_rate": round(win_rate(r[m]), 1),
                    "delta": round(win_rate(j[m]) - win_rate(r[m]), 1)})
    return out


def annotations_table(suite: Suite, rows: Rows, prefs: np.ndarray) -> dict[str, Any]:
    """(c): pooled agreement and kappa with GPT-4-turbo, the Spearman correlation of the
    per-model win rates with the official ones, and the same without ADVERSARIAL_MODELS."""
    here = rows.source == 0
    if not here.any():
        return {}
    out: dict[str, Any] = {"models": len(suite.annotations)}
    adversarial = [i for i, m in enumerate(rows.models) if m in ADVERSARIAL_MODELS]
    for suffix, drop in (("", []), ("_without_adversarial", adversarial)):
        mask = here & ~np.isin(rows.model, drop)
        stats = agreement_stats(prefs[mask], rows.y[mask] + 1.0)
        judged, official = [], []
        for m, s in enumerate(suite.annotations):
            if m not in drop:
                judged.append(win_rate(prefs[here & (rows.model == m)]))
                official.append(win_rate(s.reference))
        out.update({f"n{suffix}": stats["n_used"], f"agreement{suffix}": _r(stats["agreement"]),
                    f"kappa{suffix}": _r(stats["kappa"], 3),
                    f"spearman{suffix}": _r(_spearman(judged, official), 3)})
    out["adversarial_win_rates"] = {
        rows.models[m]: {"judge": _r(win_rate(prefs[here & (rows.model == m)])),
                         "official": _r(win_rate(suite.annotations[m].reference))}
        for m in adversarial}
    return out


def _r(v: float, digits: int = 1) -> float | None:
    """Rounded, or None for NaN (a judge that never decides has no agreement)."""
    return None if v is None or v != v else round(float(v), digits)


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import pandas as pd

    if len(a) < 3:
        return math.nan
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def validate(spec: JudgeSpec, suite: Suite, rows: Rows | None = None) -> dict[str, Any]:
    """The judge's figures on (a), (b) and (c), and how they were obtained."""
    rows = rows or suite_rows(suite)
    prefs, how = preferences(spec, rows)
    return {"judge": spec.name, "how": how, "suite": suite.fingerprint(),
            "contrastive": contrastive_table(suite, rows, prefs),
            "blind": blind_table(suite, rows, prefs),
            "annotations": annotations_table(suite, rows, prefs),
            "blind_stale": len(suite.stale), "blind_unlabelled": len(suite.unlabelled)}


#: Parameters that change only how a judge is fitted, so only its held-out figures.
FIT_PARAMS = ("fit_sources", "source_weights", "exclude_models", "l2", "fixed")


def spec_hash(resolved: JudgeSpec, raw: JudgeSpec) -> str:
    """What a judge's figures are keyed by: its resolved spec (what its judgments' keys hold),
    the fitting parameters of its unresolved spec, and the suite's version."""
    judge = {k: v for k, v in resolved.as_dict().items() if k != "name"}
    fitting = {k: raw.params[k] for k in FIT_PARAMS if k in raw.params}
    return content_hash({"judge": judge, "fitting": fitting, "suite_version": SUITE_VERSION}, 24)


def figures_path(resolved: JudgeSpec, raw: JudgeSpec) -> Path:
    """Where a judge's figures on the built-in suite are cached."""
    return cache_root() / "validation" / f"{spec_hash(resolved, raw)}.json"


def shipped_figures(name: str) -> Path:
    """The figures committed beside the built-in judges (judges/validation/<name>.json)."""
    return blind.VALIDATION_DIR / f"{name}.json"


def cached_figures(resolved: JudgeSpec, raw: JudgeSpec) -> dict[str, Any] | None:
    """A judge's figures on the built-in suite from the cache, or from the committed file when
    they were measured for this very judge; None when neither holds them."""
    for path in (figures_path(resolved, raw), shipped_figures(resolved.name)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("spec_hash") == spec_hash(resolved, raw):
            return data
    return None


def store_figures(resolved: JudgeSpec, raw: JudgeSpec, figures: dict[str, Any],
                  ship: bool = False) -> Path:
    """Cache a judge's figures (and, with ship, write the committed copy too)."""
    data = {**figures, "spec_hash": spec_hash(resolved, raw)}
    text = canonical_json(data) + "\n"
    paths = [figures_path(resolved, raw)] + ([shipped_figures(resolved.name)] if ship else [])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return paths[-1]


def run_suite(judge_names: Sequence[str], suite: Suite, store: bool = True, ship: bool = False,
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Validate each judge, reusing cached figures measured on the same suite. With store
    (the built-in suite), the figures are cached for runs to print; with ship, also written
    beside the built-in judges."""
    rows = suite_rows(suite)
    out = []
    for name in judge_names:
        spec = resolve_spec(name)
        resolved = build_judge(spec).spec
        cached = cached_figures(resolved, spec)
        if cached is not None and cached.get("suite") == suite.fingerprint() and not ship:
            out.append(cached)
            continue
        figures = validate(spec, suite, rows)
        figures["name"] = name
        if store or ship:
            store_figures(resolved, spec, figures, ship=ship and Path(name).suffix != ".toml")
        out.append(figures)
        if log:
            log(f"{name}: validated")
    return out


def format_suite(results: Sequence[dict[str, Any]]) -> str:
    """The three tables, judges side by side."""
    names = [r["judge"] for r in results]
    width = max(12, *(len(n) + 2 for n in names))
    head = lambda first: first.ljust(30) + "".join(n.rjust(width) for n in names)  # noqa: E731
    lines = ["(a) contrastive pairs with known answers: % picking the good answer "
             "(both orders; a tie is half)", head("category"), "-" * (30 + width * len(names))]
    cats = [row["category"] for row in results[0]["contrastive"]] if results else []
    for cat in cats:
        vals = [next((r["accuracy"] for r in res["contrastive"] if r["category"] == cat), None)
                for res in results]
        n = next(r["n"] for r in results[0]["contrastive"] if r["category"] == cat)
        lines.append(f"{cat} (n={n})".ljust(30) + "".join(_f(v, width) for v in vals))
    lines += ["", "(b) blind-labelled pairs of this harness's outputs: agreement % on pairs both "
              "call / win rate judge vs labels", head("variant"), "-" * (30 + width * len(names))]
    variants = [row["variant"] for row in results[0]["blind"]] if results else []
    for v in variants:
        cells = []
        for res in results:
            r = next((x for x in res["blind"] if x["variant"] == v), None)
            cells.append("" if r is None else
                         f"{_s(r['agreement'])} / {r['judge_win_rate']:.1f}")
        label = next(x for x in results[0]["blind"] if x["variant"] == v)
        lines.append(f"{v.replace('gemma3-270m', 'g')[:22]} ({label['label_win_rate']:.1f})"
                     .ljust(30)
                     + "".join(c.rjust(width) for c in cells))
    lines += ["  (in brackets: the labels' win rate)", "",
              "(c) AlpacaEval GPT-4-turbo annotations, leave-one-model-out: agreement % / kappa / "
              "Spearman of per-model win rates", head("models")]
    for suffix, label in (("", "all 12"), ("_without_adversarial",
                                           "without " + "+".join(ADVERSARIAL_MODELS))):
        cells = [f"{_s(a.get('agreement' + suffix))}/{_s(a.get('kappa' + suffix), 2)}/"
                 f"{_s(a.get('spearman' + suffix), 2)}" if (a := res["annotations"]) else "-"
                 for res in results]
        lines.append(label.ljust(30) + "".join(c.rjust(width) for c in cells))
    for model in ADVERSARIAL_MODELS:
        cells = [_s(res["annotations"].get("adversarial_win_rates", {}).get(model, {})
                    .get("judge")) for res in results]
        official = next((r["annotations"]["adversarial_win_rates"][model]["official"]
                         for r in results if model in r["annotations"].get(
                             "adversarial_win_rates", {})), None)
        lines.append(f"{model} win rate ({_s(official)})".ljust(30)
                     + "".join(c.rjust(width) for c in cells))
    lines += ["", "how: " + "; ".join(f"{r['judge']}: {r['how']}" for r in results)]
    stale = results[0]["blind_stale"] if results else 0
    if stale:
        lines.append(f"warning: {stale} blind labels are stale (their outputs changed)")
    return "\n".join(lines)


def _s(v: Any, digits: int = 1) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def _f(v: Any, width: int) -> str:
    return _s(v).rjust(width)


def headline(figures: dict[str, Any] | None) -> dict[str, Any]:
    """The few numbers a run prints and records about its judge's validity."""
    if not figures:
        return {"measured": False}
    con = {r["category"]: r["accuracy"] for r in figures["contrastive"]}
    bl = next((r for r in figures["blind"] if r["variant"] == "ALL"), {})
    worst = min((v, k) for k, v in con.items() if k != "ALL") if len(con) > 1 else (None, None)
    return {"measured": True, "how": figures["how"],
            "contrastive_all": con.get("ALL"), "contrastive_worst": worst[0],
            "contrastive_worst_category": worst[1],
            "blind_agreement": bl.get("agreement"), "blind_n": bl.get("n"),
            "blind_max_abs_delta": max((abs(r["delta"]) for r in figures["blind"]
                                        if r["variant"] != "ALL"), default=None),
            "annotations_agreement": figures["annotations"].get("agreement"),
            "annotations_kappa": figures["annotations"].get("kappa"),
            "annotations_spearman": figures["annotations"].get("spearman"),
            "annotations_agreement_without_adversarial":
                figures["annotations"].get("agreement_without_adversarial"),
            "annotations_spearman_without_adversarial":
                figures["annotations"].get("spearman_without_adversarial")}


def refit(path: Path, suite: Suite) -> dict[str, float]:
    """Fit a combined judge with fit_sources on the whole suite and rewrite its TOML, keeping
    its comment block up to the weights."""
    from harness.judging.agreement import write_combined_toml

    spec = load_judge_spec(str(path))
    if not (_is_fitted(spec) and spec.params.get("fit_sources")):
        raise ConfigError(f"{path}: only a combined judge with params.fit_sources can be refitted")
    rows = suite_rows(suite)
    names, x = design(spec, rows)
    w = fit(spec, names, x, rows, np.ones(len(rows.y), bool))
    weights = {n: round(float(v), 6) for n, v in zip(names, w, strict=True)}
    comment = [ln[2:] if ln.startswith("# ") else ln.lstrip("#")
               for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("#")]
    write_combined_toml(path, spec, weights, comment)
    return weights
