"""Out-of-domain style adherence (the study's Figure 5): do poem-tuned models write poems
everywhere, or only for instructions near the poetry domain?

No torch here except through the embedder passed in (harness.judging.embeddings.get_embedder() in a
run; a small fake in tests). A domain is a set of (instruction, response) examples: the held-out
poems of the poetry-tuning recipe (`kind = "poetry"`) or any JSONL file (`kind = "jsonl"`).
For each task instruction, its similarity to the domain is the mean cosine between its
embedding and the domain's instruction embeddings; instructions are binned by quantiles of
that similarity (the edges are computed once, the same for every variant; bin 0 is the
farthest from the domain, the last bin the nearest). Each response gets
- embedding_adherence: mean cosine to the domain's responses minus mean cosine to the general
  responses (LIMA's assistant responses), the study's measure;
- poem_score and is_poem from harness.tasks.poem_form (layout only, no embeddings);
- verse_layout (laid out as verse, a degenerate loop included: poem_form.layout_score) and
  loop (poem_form.loop_share at least LOOP_FULL: a line, block or phrase said over and over,
  a chorus aside), because a small model's greedy loops are verse-shaped but are not poems,
  and the two tell different stories.
Per variant and bin: means with seeded bootstrap intervals and the shares of poems, of
verse-shaped responses and of loops; per variant:
the OLS slope of adherence (and of poem_score) on instruction similarity, with a bootstrap
interval over instructions. A blank response has no adherence (None) and poem_score 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from harness.core.configs import expect
from harness.core.errors import ConfigError, DataError, unknown_name
from harness.core.hashing import content_hash
from harness.data.instruction_sets import resolve_path
from harness.data.tune_data import DataSpec, jsonl_pairs, load_pairs, poetry_heldout, subsample
from harness.tasks import figures
from harness.tasks.poem_form import LOOP_FULL, layout_score, loop_share, poem_score
from harness.tasks.protocol import Evidence, Rows, fmt, pct, variant_rows

DOMAIN_KINDS = ("poetry", "jsonl")
_DOMAIN_KEYS = {"poetry": ("kind", "name", "n", "seed"),
                "jsonl": ("kind", "name", "n", "seed", "path", "instruction_field",
                          "response_field")}
_OPTION_KEYS = ("bins", "poem_threshold", "bootstrap", "seed")

#: Columns of the "bins" table (one row per variant and bin).
BIN_COLUMNS = ("model", "bin", "similarity_low", "similarity_high", "similarity_mean", "n",
               "embedding_adherence", "embedding_adherence_ci_low",
               "embedding_adherence_ci_high", "poem_score", "poem_score_ci_low",
               "poem_score_ci_high", "poem_share", "verse_layout_share", "loop_share")
#: Columns of the "items" table (one row per variant and instruction).
ITEM_COLUMNS = ("model", "id", "source", "category", "instruction_similarity", "bin",
                "embedding_adherence", "poem_score", "is_poem", "verse_layout", "loop")
#: Keys of each variant's headline.
HEADLINE_KEYS = ("n", "bins", "poem_share", "poem_share_nearest_bin",
                 "poem_share_farthest_bin", "verse_layout_share_nearest_bin",
                 "verse_layout_share_farthest_bin", "loop_share", "adherence_nearest_bin",
                 "adherence_farthest_bin",
                 "mean_adherence", "adherence_slope", "adherence_slope_ci_low",
                 "adherence_slope_ci_high", "poem_score_slope", "poem_score_slope_ci_low",
                 "poem_score_slope_ci_high")


class Embedder(Protocol):
    """What analyse() needs of an embedder: L2-normalised rows, one per text."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class Item(Protocol):
    """What analyse() reads of an instruction (harness.data.instruction_sets.Instruction fits)."""

    id: str
    instruction: str
    category: str
    source: str


@dataclass(frozen=True)
class Domain:
    """The domain's example instructions and responses (aligned), and a name for reports."""

    name: str
    instructions: tuple[str, ...]
    responses: tuple[str, ...]


@dataclass(frozen=True)
class StyleOptions:
    """bins: similarity bins (>= 2); poem_threshold: is_poem cut-off; bootstrap: resamples."""

    bins: int = 5
    poem_threshold: float = 0.5
    bootstrap: int = 1000
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON form (recorded in the run's resolved config)."""
        return {"bins": self.bins, "poem_threshold": self.poem_threshold,
                "bootstrap": self.bootstrap, "seed": self.seed}


def parse_options(table: dict[str, Any], where: str) -> StyleOptions:
    """A style-adherence task's settings, type-checked; one line for anything wrong."""
    expect(table, dict, where, "style_adherence settings")
    unknown = sorted(set(table) - set(_OPTION_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) for kind 'style_adherence': "
                          f"{', '.join(unknown)}")
    values: dict[str, Any] = {}
    for k in ("bins", "bootstrap", "seed"):
        if k in table:
            values[k] = expect(table[k], int, where, k)
    if "poem_threshold" in table:
        values["poem_threshold"] = float(expect(table["poem_threshold"], (int, float), where,
                                                "poem_threshold"))
    opts = StyleOptions(**values)
    if opts.bins < 2:
        raise ConfigError(f"{where}: bins must be at least 2, got {opts.bins}")
    if opts.bootstrap < 1:
        raise ConfigError(f"{where}: bootstrap must be at least 1, got {opts.bootstrap}")
    if not 0.0 <= opts.poem_threshold <= 1.0:
        raise ConfigError(f"{where}: poem_threshold must lie in [0, 1], "
                          f"got {opts.poem_threshold}")
    return opts


# ---------------------------------------------------------------------------------- domains


def domain_path(path: str, base_dir: Path) -> Path:
    """A domain file's location: `shared:` means the shared data folder; relative means
    relative to base_dir (the task file's folder)."""
    return resolve_path(path, base_dir)


def load_domain(table: Any, where: str, base_dir: Path | None = None) -> Domain:
    """The task config's `domain` table as a Domain (pairs subsampled by n and seed).

    { kind = "poetry", n = 120, seed = 0 }: "Write a poem ..." -> poem pairs from the poems the
    poetry-tuning recipe never sees (harness.data.tune_data.poetry_heldout()).
    { kind = "jsonl", path = "...", instruction_field = "instruction", response_field =
    "response", n, seed }: any JSONL file (`shared:` prefix or relative to base_dir).
    Pairs with a blank instruction or response are dropped; an empty domain is an error.
    """
    w = f"{where} domain"
    expect(table, dict, where, "domain")
    kind = expect(table.get("kind"), str, w, "kind")
    if kind not in _DOMAIN_KEYS:
        raise unknown_name("domain kind", kind, list(DOMAIN_KINDS), f" (in {where})")
    unknown = sorted(set(table) - set(_DOMAIN_KEYS[kind]))
    if unknown:
        raise ConfigError(f"{w}: unknown field(s) for kind '{kind}': {', '.join(unknown)}")
    n = table.get("n")
    if n is not None and expect(n, int, w, "n") < 1:
        raise ConfigError(f"{w}: n must be positive, got {n}")
    seed = expect(table.get("seed", 0), int, w, "seed")
    for k in ("name", "path", "instruction_field", "response_field"):
        if k in table and not expect(table[k], str, w, k).strip():
            raise ConfigError(f"{w}: {k} must not be empty")
    if kind == "poetry":
        pairs = [(p.instruction, p.text) for p in poetry_heldout()]
        what = "the held-out poems"
        name = "poetry"
    else:
        if "path" not in table:
            raise ConfigError(f"{w}: kind 'jsonl' needs path")
        path = domain_path(table["path"], base_dir if base_dir is not None else Path("."))
        pairs = jsonl_pairs(path, table.get("instruction_field", "instruction"),
                            table.get("response_field", "response"), "domain file")
        what = str(path)
        name = path.stem
    pairs = [(i, r) for i, r in pairs if i.strip() and r.strip()]
    if not pairs:
        raise DataError(f"{w} is empty: no (instruction, response) pair with text in {what}")
    pairs = subsample(pairs, n, seed)
    return Domain(name=table.get("name", name), instructions=tuple(i for i, _ in pairs),
                  responses=tuple(r for _, r in pairs))


def general_responses(n: int = 200, seed: int = 0) -> tuple[str, ...]:
    """LIMA's assistant responses (the study's "general" response distribution), n by seed."""
    if n < 1:
        raise ConfigError(f"general responses: n must be positive, got {n}")
    return tuple(r for _, r in load_pairs(DataSpec(kind="lima", n=n, seed=seed)))


# ---------------------------------------------------------------------------------- statistics


def _f(x: Any) -> float | None:
    """A plain float, or None for NaN/None/infinity."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _mean_ci(values: Sequence[float], reps: int, seed: int
             ) -> tuple[float | None, float | None, float | None]:
    """Mean and seeded percentile-bootstrap 95% interval (None where undefined)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return None, None, None
    if arr.size == 1:
        return _f(arr[0]), None, None
    rng = np.random.default_rng(seed)
    means = np.empty(reps)
    for start in range(0, reps, 256):
        stop = min(reps, start + 256)
        means[start:stop] = arr[rng.integers(0, arr.size, (stop - start, arr.size))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return _f(arr.mean()), _f(low), _f(high)


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """OLS slope of y on x per row (NaN where x does not vary)."""
    dx = x - x.mean(axis=-1, keepdims=True)
    dy = y - y.mean(axis=-1, keepdims=True)
    var = (dx * dx).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, (dx * dy).sum(axis=-1) / var, np.nan)


def _slope_ci(x: Sequence[float], y: Sequence[float | None], reps: int, seed: int
              ) -> tuple[float | None, float | None, float | None]:
    """OLS slope of y on x and a seeded bootstrap 95% interval over (x, y) pairs."""
    keep = [(a, b) for a, b in zip(x, y, strict=True) if b is not None]
    if len(keep) < 2:
        return None, None, None
    xs = np.asarray([a for a, _ in keep], dtype=float)
    ys = np.asarray([b for _, b in keep], dtype=float)
    slope = _f(_slopes(xs, ys))
    if slope is None or len(keep) < 3:
        return slope, None, None
    rng = np.random.default_rng(seed)
    boots = np.empty(reps)
    for start in range(0, reps, 256):
        stop = min(reps, start + 256)
        idx = rng.integers(0, xs.size, (stop - start, xs.size))
        boots[start:stop] = _slopes(xs[idx], ys[idx])
    if np.all(np.isnan(boots)):
        return slope, None, None
    low, high = np.nanquantile(boots, [0.025, 0.975])
    return slope, _f(low), _f(high)


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a no-op for the real embedder's output)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def similarity_edges(similarities: Sequence[float], bins: int) -> list[float]:
    """Interior quantile edges of the similarities (duplicates merged, so maybe fewer bins)."""
    if not len(similarities):
        return []
    qs = np.linspace(0, 1, bins + 1)[1:-1]
    return sorted({float(np.quantile(similarities, q)) for q in qs})


# ---------------------------------------------------------------------------------- analysis


def analyse(items: Sequence[Item], outputs: Mapping[str, Sequence[str]], domain: Domain,
            general: Sequence[str], embedder: Embedder, options: StyleOptions
            ) -> dict[str, Any]:
    """Headline per variant and tables "bins" and "items" (see the module doc and *_COLUMNS)."""
    if not items:
        raise DataError("style adherence: the task has no instructions")
    if not domain.instructions or not domain.responses:
        raise DataError(f"style adherence: domain '{domain.name}' is empty")
    if not general:
        raise DataError("style adherence: no general responses to compare with")
    for variant, outs in outputs.items():
        if len(outs) != len(items):
            raise DataError(f"style adherence: variant '{variant}' has {len(outs)} responses "
                            f"for {len(items)} instructions")
    # One embedding call for every distinct text (the real embedder batches and caches).
    texts = list(dict.fromkeys([*domain.instructions, *domain.responses, *general,
                                *(it.instruction for it in items),
                                *(o for outs in outputs.values() for o in outs if o.strip())]))
    vectors = _unit(np.asarray(embedder.embed(texts), dtype=float))
    if vectors.shape[0] != len(texts):
        raise DataError(f"style adherence: the embedder returned {vectors.shape[0]} rows for "
                        f"{len(texts)} texts")
    row = {t: i for i, t in enumerate(texts)}

    def centroid(group: Sequence[str]) -> np.ndarray:
        # mean cosine to a group == dot product with the mean of its unit vectors
        return vectors[[row[t] for t in group]].mean(axis=0)

    domain_ins, domain_resp, general_c = (centroid(domain.instructions),
                                          centroid(domain.responses), centroid(general))
    sims = [float(vectors[row[it.instruction]] @ domain_ins) for it in items]
    edges = similarity_edges(sims, options.bins)
    index = [int(b) for b in np.searchsorted(edges, sims, side="right")]
    n_bins = len(edges) + 1
    bounds = [min(sims), *edges, max(sims)]
    reps, seed = options.bootstrap, options.seed

    headline: dict[str, dict[str, Any]] = {}
    bin_rows: list[dict[str, Any]] = []
    item_rows: list[dict[str, Any]] = []
    for variant, outs in outputs.items():
        adherence: list[float | None] = []
        scores: list[float] = []
        verse: list[bool] = []
        loops: list[bool] = []
        for o in outs:
            verse.append(layout_score(o) >= options.poem_threshold)
            loops.append(loop_share(o) >= LOOP_FULL)
            if o.strip():
                v = vectors[row[o]]
                adherence.append(float(v @ domain_resp - v @ general_c))
            else:
                adherence.append(None)
            scores.append(poem_score(o))
        poems = [s >= options.poem_threshold for s in scores]
        per_bin: list[dict[str, Any]] = []
        for b in range(n_bins):
            members = [i for i, k in enumerate(index) if k == b]
            adh, adh_lo, adh_hi = _mean_ci([adherence[i] for i in members], reps, seed)
            ps, ps_lo, ps_hi = _mean_ci([scores[i] for i in members], reps, seed)
            per_bin.append({
                "model": variant, "bin": b, "similarity_low": _f(bounds[b]),
                "similarity_high": _f(bounds[b + 1]),
                "similarity_mean": _f(np.mean([sims[i] for i in members])) if members else None,
                "n": len(members), "embedding_adherence": adh,
                "embedding_adherence_ci_low": adh_lo, "embedding_adherence_ci_high": adh_hi,
                "poem_score": ps, "poem_score_ci_low": ps_lo, "poem_score_ci_high": ps_hi,
                "poem_share": _f(np.mean([poems[i] for i in members])) if members else None,
                "verse_layout_share": (_f(np.mean([verse[i] for i in members])) if members
                                       else None),
                "loop_share": _f(np.mean([loops[i] for i in members])) if members else None,
            })
        bin_rows += per_bin
        a_slope, a_lo, a_hi = _slope_ci(sims, adherence, reps, seed)
        p_slope, p_lo, p_hi = _slope_ci(sims, scores, reps, seed)
        valid = [a for a in adherence if a is not None]
        headline[variant] = {
            "n": len(outs), "bins": n_bins, "poem_share": _f(np.mean(poems)),
            "poem_share_nearest_bin": per_bin[-1]["poem_share"],
            "poem_share_farthest_bin": per_bin[0]["poem_share"],
            "verse_layout_share_nearest_bin": per_bin[-1]["verse_layout_share"],
            "verse_layout_share_farthest_bin": per_bin[0]["verse_layout_share"],
            "loop_share": _f(np.mean(loops)),
            "adherence_nearest_bin": per_bin[-1]["embedding_adherence"],
            "adherence_farthest_bin": per_bin[0]["embedding_adherence"],
            "mean_adherence": _f(np.mean(valid)) if valid else None,
            "adherence_slope": a_slope, "adherence_slope_ci_low": a_lo,
            "adherence_slope_ci_high": a_hi, "poem_score_slope": p_slope,
            "poem_score_slope_ci_low": p_lo, "poem_score_slope_ci_high": p_hi,
        }
        for i, it in enumerate(items):
            item_rows.append({"model": variant, "id": it.id, "source": it.source,
                              "category": it.category, "instruction_similarity": _f(sims[i]),
                              "bin": index[i], "embedding_adherence": _f(adherence[i]),
                              "poem_score": _f(scores[i]), "is_poem": poems[i],
                              "verse_layout": verse[i], "loop": loops[i]})
    return {"headline": headline, "tables": {"bins": bin_rows, "items": item_rows}}


@dataclass(frozen=True)
class StyleSettings:
    """A style-adherence task's settings and its domain (example instructions and responses)."""

    options: StyleOptions
    domain: Domain

    def as_dict(self) -> dict[str, Any]:
        d = self.domain
        return {**self.options.as_dict(),
                "domain": {"name": d.name, "n": len(d.instructions),
                           "hash": content_hash([list(d.instructions), list(d.responses)])}}


class StyleAdherence:
    generating = True
    scored = False
    metric = "poem_share_nearest_bin"
    compares = False
    leaderboard = False

    def parse_options(self, table: dict[str, Any], where: str, base: Path) -> StyleSettings:
        rest = {k: v for k, v in table.items() if k != "reference"}
        if "domain" not in rest:
            raise ConfigError(f"{where}: kind 'style_adherence' needs a 'domain' table")
        domain = load_domain(rest.pop("domain"), where, base)
        return StyleSettings(parse_options(rest, where), domain)

    def judged(self, options: Any) -> bool:
        return False

    def limited(self, options: Any, limit: int | None) -> Any:
        return options

    def analyse(self, ev: Evidence) -> tuple[Rows, dict[str, Rows]]:
        from harness.judging.embeddings import get_embedder  # torch

        task, settings = ev.task, ev.task.options
        outputs = {s.name: [ev.generations[(task.name, s.name, i.id)].output
                            for i in task.instructions] for s in ev.specs}
        general = general_responses(seed=settings.options.seed)
        result = analyse(task.instructions, outputs, settings.domain, general,
                         get_embedder(), settings.options)
        return variant_rows(ev, result["headline"]), result["tables"]

    def headline(self, r: dict[str, Any]) -> str:
        return (f"poems: nearest bin {pct(r.get('poem_share_nearest_bin'))}, farthest "
                f"{pct(r.get('poem_share_farthest_bin'))}; verse-shaped "
                f"{pct(r.get('verse_layout_share_nearest_bin'))} / "
                f"{pct(r.get('verse_layout_share_farthest_bin'))}; loops "
                f"{pct(r.get('loop_share'))}; adherence slope "
                f"{fmt(r.get('adherence_slope'), '+.3f')} "
                f"[{fmt(r.get('adherence_slope_ci_low'), '+.3f')}, "
                f"{fmt(r.get('adherence_slope_ci_high'), '+.3f')}]")

    def figures(self, name: str, tables: dict[str, Rows], caps: dict[str, Any]) -> list[Any]:
        return [figures.style_curve(name, tables.get("bins", []))]


KIND = StyleAdherence()
