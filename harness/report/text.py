"""The text a run prints: the head-to-head table, one line per other task and variant, the
cap warning and the judge's validity line."""

from __future__ import annotations

from typing import Any

from harness.tasks import kinds
from harness.tasks.protocol import fmt

#: How much more often (in win-rate points) a variant must win the pairs where only the
#: reference hit the cap than the others before the table warns.
CAP_WARNING_POINTS = 5.0


def cap_warning(r: dict[str, Any]) -> str:
    """One line when a variant's win rate rests mostly on pairs where the reference hit the
    token cap and the variant ended on EOS: more than half of its win mass comes from them, and
    it wins there at least CAP_WARNING_POINTS more than on the pairs where neither or both hit
    the cap; "" otherwise."""
    share = r.get("cap_vs_eos_win_share")
    there, elsewhere = r.get("win_rate_cap_vs_eos"), r.get("win_rate_without_cap_vs_eos")
    if r.get("role") == "reference" or share is None or share <= 0.5 or there is None or \
            (elsewhere is not None and there < elsewhere + CAP_WARNING_POINTS):
        return ""
    return (f"warning: {r['task']}/{r['model']}: {100 * share:.0f}% of its win rate comes from "
            f"pairs where the reference hit the cap and it ended on EOS; it wins {fmt(there)}% "
            f"of the pairs where one side hit the cap, {fmt(elsewhere)}% of the others")


def validity_line(v: dict[str, Any] | None, judge: str) -> str:
    """The judge's held-out validity figures in one line (or how to measure them)."""
    if not v or not v.get("measured"):
        return (f"judge {judge}: validity not measured; run `python -m harness validate-judges "
                f"--judges {judge}` once")
    return (f"judge {judge} ({v['how']}): contrastive pairs {fmt(v['contrastive_all'])}% "
            f"right (worst {v['contrastive_worst_category']} {fmt(v['contrastive_worst'])}%); "
            f"blind labels {fmt(v['blind_agreement'])}% agreement (n={v['blind_n']}, win "
            f"rates within {fmt(v['blind_max_abs_delta'])} pts); GPT-4-turbo "
            f"{fmt(v['annotations_agreement'])}%, "
            f"{fmt(v.get('annotations_agreement_without_adversarial'))}% without NullModel "
            f"(model rank rho {fmt(v['annotations_spearman'], '.2f')}, "
            f"{fmt(v.get('annotations_spearman_without_adversarial'), '.2f')})")


def format_table(summary: list[dict]) -> str:
    """The short tables printed after a run: head-to-head rows, then one line per other task
    and variant; undefined values print as "–"."""
    h2h = [r for r in summary if kinds.get(r.get("kind", "head_to_head")).leaderboard]
    lines = []
    if h2h:
        header = f"{'task':<16} {'variant':<34} {'n':>4} {'win rate':>15} {'LC':>6} " \
                 f"{'tokens':>7} {'EOS%':>5}"
        lines += [header, "-" * len(header)]
    for r in h2h:
        if r["role"] == "reference":
            wr, lc = "reference", ""
        else:
            wr = f"{fmt(r.get('win_rate'))} ± {fmt(r.get('standard_error'))}"
            lc = fmt(r.get("length_controlled_winrate"))
        eos = None if r.get("eos_share") is None else 100 * r["eos_share"]
        lines.append(f"{r['task']:<16} {r['model']:<34} {r['n']:>4} {wr:>15} {lc:>6} "
                     f"{fmt(r.get('mean_tokens')):>7} {fmt(eos, '.0f'):>5}")
    lines += [w for r in h2h if (w := cap_warning(r))]
    task = None
    for r in summary:
        if kinds.get(r.get("kind", "head_to_head")).leaderboard:
            continue
        if r["task"] != task:
            task = r["task"]
            lines += ["", f"{task} ({r['kind']}, n = {r.get('n')})"]
        lines.append(f"  {r['model']:<34} {kinds.get(r['kind']).headline(r)}")
    return "\n".join(lines)
