"""Head-to-head: each variant's response against the reference's, judged; win rates with
standard errors, bootstrap intervals and AlpacaEval's length control."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core.errors import ConfigError, DataError
from harness.core.hashing import content_hash
from harness.stats.winrates import bootstrap_ci, length_controlled_win_rate, win_rate_summary
from harness.tasks import figures
from harness.tasks.protocol import Evidence, Rows, clean, fmt


def _win_rates(prefs: list[float | None]) -> dict[str, Any]:
    """Win rate ± SE, counts and a bootstrap interval of one list of preferences."""
    row = win_rate_summary(prefs)
    try:
        row["ci_low"], row["ci_high"] = bootstrap_ci(prefs, seed=0)
    except DataError:  # no valid verdict at all
        row["ci_low"] = row["ci_high"] = None
    return row


def cap_against_eos(prefs: Sequence[float | None], ref_finish: Sequence[str],
                    var_finish: Sequence[str]) -> dict[str, Any]:
    """How much of a variant's result rests on pairs where exactly one side hit the token cap:
    their share of the verdicts, the share of the variant's win mass from pairs where the
    reference was cut and the variant ended on EOS, and the win rates on such pairs and on
    the others."""
    one_cut = [(r == "length") != (v == "length") for r, v in zip(ref_finish, var_finish,
                                                                   strict=True)]
    valid = [p is not None and p == p for p in prefs]
    wins = [p - 1.0 if ok else 0.0 for p, ok in zip(prefs, valid, strict=True)]
    total = sum(wins)
    from_cut_ref = sum(w for w, r, v in zip(wins, ref_finish, var_finish, strict=True)
                       if r == "length" and v != "length")
    def rate(keep: bool) -> float | None:
        chosen = [p for p, c in zip(prefs, one_cut, strict=True) if c == keep]
        try:
            return win_rate_summary(chosen)["win_rate"] if chosen else None
        except DataError:  # no valid verdict among them
            return None

    return {"cap_vs_eos_share": sum(c for c, ok in zip(one_cut, valid, strict=True) if ok)
            / max(1, sum(valid)),
            "cap_vs_eos_win_share": from_cut_ref / total if total > 0 else None,
            "win_rate_cap_vs_eos": rate(True), "win_rate_without_cap_vs_eos": rate(False)}


def order_agreement(infos: Sequence[dict[str, Any]]) -> float | None:
    """For a judge asked in both orders (an LLM judge's both_orders mode): the share of its
    verdicts whose two orders picked the same winner; None for any other judge."""
    both = [not info["orders_disagree"] for info in infos if "orders_disagree" in info]
    return sum(both) / len(both) if both else None


def analyse(ev: Evidence) -> tuple[Rows, dict[str, Rows]]:
    """Rows per variant (win rate ± SE, bootstrap CI, LC win rate, lengths, EOS share) and
    the by-category and by-source tables."""
    task, generations, judgments, ref_variant = ev.task, ev.generations, ev.judgments, ev.reference
    rows, by_category, by_source = [], [], []
    for spec in ev.specs:
        gens = [generations[(task.name, spec.name, i.id)] for i in task.instructions]
        row: dict[str, Any] = {
            "task": task.name, "kind": task.kind, "model": spec.name,
            "role": "reference" if spec.name == ref_variant else "variant",
            "reference": ev.reference_label, "n": len(gens),
            "mean_tokens": float(np.mean([g.n_tokens for g in gens])),
            "mean_words": float(np.mean([len(g.output.split()) for g in gens])),
            "eos_share": float(np.mean([g.finish_reason == "eos" for g in gens])),
            "max_new_tokens": spec.decoding.max_new_tokens,
        }
        if spec.name != ref_variant:
            prefs = [judgments[(task.name, spec.name, i.id)].preference
                     for i in task.instructions]
            row.update(_win_rates(prefs))
            if ref_variant is not None:
                ref_gens = [generations[(task.name, ref_variant, i.id)]
                            for i in task.instructions]
                row.update(cap_against_eos(prefs, [g.finish_reason for g in ref_gens],
                                           [g.finish_reason for g in gens]))
            agree = order_agreement([judgments[(task.name, spec.name, i.id)].info
                                     for i in task.instructions])
            if agree is not None:
                row["order_agreement"] = agree
            refs = [i.reference if ref_variant is None else
                    generations[(task.name, ref_variant, i.id)].output
                    for i in task.instructions]
            if ref_variant is None:  # the regression gate sees a change of stored outputs
                row["reference_outputs_hash"] = content_hash(refs)
            frame = pd.DataFrame({"output_1": refs, "output_2": [g.output for g in gens],
                                  "preference": prefs})
            try:
                row.update(length_controlled_win_rate(frame, None))
                # Without instruction difficulty every prediction is equal: that SEM is 0 by
                # construction, not a measured uncertainty, so it is not reported.
                row["lc_standard_error"] = None
            except DataError as e:  # too few valid pairs for the GLM's cross-validation
                row.update(length_controlled_winrate=None, lc_standard_error=None,
                           lc_note=f"no LC fit: {e}")
            for field, out in (("category", by_category), ("source", by_source)):
                groups: dict[str, list] = {}
                for ins, p in zip(task.instructions, prefs, strict=True):
                    groups.setdefault(getattr(ins, field) or "-", []).append(p)
                for group, ps in sorted(groups.items()):
                    wr = _win_rates(ps)
                    out.append(clean({"model": spec.name, field: group, "n": len(ps),
                                       "win_rate": wr["win_rate"],
                                       "standard_error": wr["standard_error"],
                                       "ci_low": wr["ci_low"], "ci_high": wr["ci_high"]}))
        rows.append(clean(row))
    tables = {"by_category": by_category}
    if len({i.source for i in task.instructions}) > 1:
        tables["by_source"] = by_source
    return rows, tables


class HeadToHead:
    generating = True
    scored = False
    metric = "win_rate"
    compares = True
    leaderboard = True

    def parse_options(self, table: dict[str, Any], where: str, base: Path) -> None:
        unknown = sorted(set(table) - {"reference"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        return None

    def judged(self, options: Any) -> bool:
        return True

    def limited(self, options: Any, limit: int | None) -> Any:
        return options

    def analyse(self, evidence: Evidence) -> tuple[Rows, dict[str, Rows]]:
        return analyse(evidence)

    def headline(self, row: dict[str, Any]) -> str:
        if row.get("role") == "reference":
            return "reference"
        return (f"{fmt(row.get('win_rate'))} ± {fmt(row.get('standard_error'))} "
                f"(LC {fmt(row.get('length_controlled_winrate'))})")

    def figures(self, name: str, tables: dict[str, Rows], caps: dict[str, Any]) -> list[Any]:
        summary = tables.get("summary", [])
        reference = summary[0].get("reference", "the reference") if summary else ""
        return [figures.win_rates(name, summary, reference)]


KIND = HeadToHead()
