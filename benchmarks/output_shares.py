"""EOS, loop and verse shares of a run's stored outputs, per task and variant.

    python benchmarks/output_shares.py results/<run-id>
    python benchmarks/output_shares.py results/<run-id> --quote gemma3-270m+poetry-tuned --n 3

The shares are the post-build check's (harness.run.build_check.summarise): EOS is the share of
outputs that ended on their own, a loop has poem_form.loop_share at least LOOP_FULL, verse has
poem_score at least 0.5. --quote prints the first outputs of a variant for each task.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.run.build_check import summarise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--quote", help="a variant whose outputs to print")
    ap.add_argument("--n", type=int, default=2, help="outputs quoted per task")
    args = ap.parse_args()
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seen = set()
    for line in (args.run_dir / "generations.jsonl").read_text().splitlines():
        r = json.loads(line)
        if (r["task"], r["model"], r["instruction_id"]) in seen:
            continue  # one output per instruction (a resumed run may repeat a record)
        seen.add((r["task"], r["model"], r["instruction_id"]))
        rows[r["task"], r["model"]].append(r)
    print(f"{'task':36s} {'variant':40s} {'n':>4s} {'EOS':>5s} {'loops':>6s} {'verse':>6s}")
    for (task, model), rs in sorted(rows.items()):
        s = summarise([("general", r["instruction"]) for r in rs], [r["output"] for r in rs],
                      [r["finish_reason"] for r in rs])
        print(f"{task:36s} {model:40s} {s['n']:4d} {100 * s['eos_share']:4.0f}% "
              f"{100 * s['loop_share']:5.0f}% {100 * s['verse_share']:5.0f}%")
    if args.quote:
        for (task, model), rs in sorted(rows.items()):
            if model != args.quote:
                continue
            for r in rs[:args.n]:
                print(f"\n[{task}] {r['instruction']!r} ({r['finish_reason']})\n{r['output']}")


if __name__ == "__main__":
    main()
