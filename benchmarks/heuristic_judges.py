"""Heuristic judges' throughput on real AlpacaEval pairs (pairs per second), cold and warm caches.

Usage: python benchmarks/heuristic_judges.py [--pairs 500] [--judges heuristic,longer,...]
The combined judge embeds texts with MiniLM on first sight (cached on disk after), so its cold
figure includes embedding; run it alone on a quiet machine.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.core.cache import shared_data_dir  # noqa: E402
from harness.data.alpaca_formats import read_annotations  # noqa: E402
from harness.judging import Candidate, PairwiseItem  # noqa: E402
from harness.judging import heuristic as hj  # noqa: E402
from harness.judging.registry import get_judge  # noqa: E402


def main() -> int:
    """Print pairs/s per judge for the first N claude-2.1 pairs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--judges", default="heuristic,longer,repetition,heuristic_combined")
    args = ap.parse_args()
    path = shared_data_dir() / "alpaca_eval" / "annotations" / "claude-2.1.json"
    items = [PairwiseItem(a.instruction, Candidate(a.output_1), Candidate(a.output_2))
             for a in read_annotations(path)[:args.pairs]]
    print(f"{'judge':<22} {'pairs':>6} {'cold pairs/s':>13} {'warm pairs/s':>13}")
    for name in args.judges.split(","):
        judge = get_judge(name)
        rates = []
        for _ in range(2):
            start = time.perf_counter()
            n = sum(1 for _ in judge.judge(items))
            rates.append(n / (time.perf_counter() - start))
        hj._tokens.cache_clear()
        hj.repetition_share.cache_clear()
        print(f"{name:<22} {len(items):>6} {rates[0]:>13.0f} {rates[1]:>13.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
