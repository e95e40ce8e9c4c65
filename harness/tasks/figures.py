"""The report's figures, drawn from a run's tables as inline SVG (matplotlib, no network).

Each function takes table rows (as the run writes them to tables/*.json) and returns a Figure:
the SVG text and a caption that says what it shows and how many samples are behind it. The
SVG is deterministic (fixed hash salt, no date), so the same results give the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: One colour per variant, in the order variants first appear (colour-blind-safe palette).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#000000", "#999999", "#882255")


@dataclass(frozen=True)
class Figure:
    """An inline SVG figure and its caption."""

    name: str
    svg: str
    caption: str


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.hashsalt": "harness", "svg.fonttype": "none",
                                "font.size": 9, "axes.spines.top": False,
                                "axes.spines.right": False})
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    _plt().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: it sits inside HTML


def _ok(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _colours(models: Sequence[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(dict.fromkeys(models))}


def win_rates(task: str, rows: Sequence[dict[str, Any]], reference: str) -> Figure | None:
    """Win rate per variant with its 95% bootstrap interval, against the task's reference."""
    rows = [r for r in rows if r.get("role") != "reference" and _ok(r.get("win_rate"))]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(rows) + 0.9))
    names = [r["model"] for r in rows][::-1]
    values = [r["win_rate"] for r in rows][::-1]
    low = [r["win_rate"] - r["ci_low"] if _ok(r.get("ci_low")) else 0 for r in rows][::-1]
    high = [r["ci_high"] - r["win_rate"] if _ok(r.get("ci_high")) else 0 for r in rows][::-1]
    colours = _colours([r["model"] for r in rows])
    ax.barh(names, values, xerr=[low, high], color=[colours[n] for n in names],
            error_kw={"capsize": 3, "elinewidth": 1})
    ax.axvline(50, color="#888", linestyle=":", linewidth=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"win rate against {reference} (%)")
    n = rows[0].get("n", "?")
    return Figure(f"{task}-win-rates", _svg(fig),
                  f"Win rate of each variant against {reference} on {task} ({n} instructions "
                  f"per variant), with 95% bootstrap intervals; 50% is a tie.")


def lengths(task: str, items: Sequence[dict[str, Any]], cap: dict[str, Any]) -> Figure | None:
    """Response length (tokens) per variant as box plots, with each variant's cap."""
    by_model: dict[str, list[float]] = {}
    for r in items:
        if _ok(r.get("tokens")):
            by_model.setdefault(r["model"], []).append(float(r["tokens"]))
    if not by_model:
        return None
    plt = _plt()
    names = list(by_model)
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(names) + 0.9))
    ax.boxplot([by_model[n] for n in names][::-1], orientation="horizontal", widths=0.6,
               tick_labels=names[::-1], flierprops={"markersize": 2})
    caps = {c for c in cap.values() if _ok(c)}
    for c in sorted(caps):
        ax.axvline(c, color="#a00", linestyle="--", linewidth=1)
    ax.set_xlabel("response length (tokens)" + ("; dashed: the cap" if caps else ""))
    n = len(next(iter(by_model.values())))
    return Figure(f"{task}-lengths", _svg(fig),
                  f"Response length in tokens per variant on {task} ({n} responses each): "
                  f"box = quartiles, whiskers = 1.5 IQR; a response at the dashed line hit the "
                  f"cap instead of ending on EOS.")


def length_bins(task: str, bins: Sequence[dict[str, Any]]) -> Figure | None:
    """Win rate by response-length bin per variant, with 95% bootstrap intervals."""
    rows = [b for b in bins if _ok(b.get("win_rate"))]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    colours = _colours([b["model"] for b in rows])
    for model in colours:
        mine = sorted((b for b in rows if b["model"] == model), key=lambda b: b["bin"])
        x = [b["bin"] for b in mine]
        y = [b["win_rate"] for b in mine]
        err = [[b["win_rate"] - b["ci_low"] if _ok(b.get("ci_low")) else 0 for b in mine],
               [b["ci_high"] - b["win_rate"] if _ok(b.get("ci_high")) else 0 for b in mine]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=model, color=colours[model])
    labels = []
    for b in sorted({b["bin"] for b in rows}):
        row = next(r for r in rows if r["bin"] == b)
        lo, hi = row.get("tokens_low"), row.get("tokens_high")
        labels.append(f"{'' if lo is None else int(lo)}–{'' if hi is None else int(hi)}")
    ax.set_xticks(sorted({b["bin"] for b in rows}), labels)
    ax.set_xlabel("response length bin (tokens)")
    ax.set_ylabel("win rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, frameon=False)
    total = sum(b["n"] for b in rows if b["model"] == rows[0]["model"])
    return Figure(f"{task}-win-by-length", _svg(fig),
                  f"Win rate by response-length bin on {task} ({total} judged responses per "
                  f"variant, split into length quantiles), with 95% bootstrap intervals.")


def style_curve(task: str, bins: Sequence[dict[str, Any]]) -> Figure | None:
    """Style adherence (and poem share) against the instruction's similarity to the domain."""
    rows = [b for b in bins if _ok(b.get("similarity_mean"))]
    if not rows:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.8, 3.2))
    colours = _colours([b["model"] for b in rows])
    for model in colours:
        mine = sorted((b for b in rows if b["model"] == model), key=lambda b: b["bin"])
        x = [b["similarity_mean"] for b in mine]
        pts = [(b["embedding_adherence"], b.get("embedding_adherence_ci_low"),
                b.get("embedding_adherence_ci_high")) for b in mine]
        xs = [xi for xi, p in zip(x, pts, strict=True) if _ok(p[0])]
        ys = [p[0] for p in pts if _ok(p[0])]
        err = [[p[0] - p[1] if _ok(p[1]) else 0 for p in pts if _ok(p[0])],
               [p[2] - p[0] if _ok(p[2]) else 0 for p in pts if _ok(p[0])]]
        ax1.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=model, color=colours[model])
        share = [(xi, b["poem_share"] * 100) for xi, b in zip(x, mine, strict=True)
                 if _ok(b.get("poem_share"))]
        ax2.plot([s[0] for s in share], [s[1] for s in share], marker="o",
                 color=colours[model], label=model)
        verse = [(xi, b["verse_layout_share"] * 100) for xi, b in zip(x, mine, strict=True)
                 if _ok(b.get("verse_layout_share"))]
        ax2.plot([v[0] for v in verse], [v[1] for v in verse], linestyle="--", linewidth=1,
                 color=colours[model])
    ax1.axhline(0, color="#888", linestyle=":", linewidth=1)
    ax1.set_xlabel("instruction similarity to the domain")
    ax1.set_ylabel("style adherence (embedding)")
    ax2.set_xlabel("instruction similarity to the domain")
    ax2.set_ylabel("responses that are poems (%)")
    ax2.set_ylim(0, 100)
    ax2.legend(fontsize=7, frameon=False)
    per_bin = [b["n"] for b in rows if b["model"] == rows[0]["model"]]
    return Figure(f"{task}-style", _svg(fig),
                  f"Style adherence on {task}: instructions binned by their similarity to the "
                  f"domain ({sum(per_bin)} instructions in {len(per_bin)} bins of "
                  f"{min(per_bin)}–{max(per_bin)}). Left: similarity of each response to the "
                  f"domain's responses minus that to general responses, mean and 95% bootstrap "
                  f"interval; right: share of responses the poem-form score calls poems "
                  f"(solid) and share laid out as verse, degenerate loops included (dashed).")


def ranking(task: str, rows: Sequence[dict[str, Any]]) -> Figure | None:
    """Ranking accuracy per variant with its interval and the chance line."""
    rows = [r for r in rows if _ok(r.get("accuracy"))]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(rows) + 0.9))
    names = [r["model"] for r in rows][::-1]
    acc = [100 * r["accuracy"] for r in rows][::-1]
    low = [100 * (r["accuracy"] - r["ci_low"]) if _ok(r.get("ci_low")) else 0
           for r in rows][::-1]
    high = [100 * (r["ci_high"] - r["accuracy"]) if _ok(r.get("ci_high")) else 0
            for r in rows][::-1]
    colours = _colours([r["model"] for r in rows])
    ax.barh(names, acc, xerr=[low, high], color=[colours[n] for n in names],
            error_kw={"capsize": 3, "elinewidth": 1})
    chance = 100 * rows[0]["chance"]
    ax.axvline(chance, color="#a00", linestyle="--", linewidth=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel("ranking accuracy (%); dashed: chance")
    return Figure(f"{task}-ranking", _svg(fig),
                  f"Share of {rows[0].get('n')} instructions whose true response has the highest "
                  f"mean per-token log-likelihood among {rows[0].get('k', 0) + 1} candidates, "
                  f"with 95% bootstrap intervals; chance is {chance:.0f}%.")
