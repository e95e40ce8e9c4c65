"""A model's variants decoded one after another against as one batch, as the runner does.

    python benchmarks/variants_together.py [--variants A,B,...] [--new-tokens N] [--rounds 2]

(default: the five gemma-3-270m variants of the default run, the registry's cap, on the 72
built-in instructions). One after another is how the runner decoded them before: one variant
at a time at the default batch size, the later ones reusing the first one's prefill. Together
is `generation.generate_together`: the default batch size of prompts for every variant at
once, each prompt prefilled once, each row under its own variant's rules. The two run in
alternating rounds (this machine's speed drifts), from a fresh prefill store each time; the
figures are wall seconds, generated tokens per second, and whether every response is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.generate.backends import DEFAULT_BATCH_SIZE
from harness.generate.backends import template_prompt as format_prompt
from harness.generate.slot_decoding import PrefillStore  # noqa: E402
from harness.generate.transformers import (
    can_decode_together,
    generate,
    generate_together,
    load_model,
    load_tokenizer,
)
from harness.models.registry import load_registry  # noqa: E402
from harness.run.runner import override_cap  # noqa: E402
from harness.tasks.kinds import load_task  # noqa: E402

DEFAULT_VARIANTS = ("gemma3-270m,gemma3-270m+rules,gemma3-270m+rules-no-eos,"
                    "gemma3-270m+rules-no-diversity,gemma3-270m+rules-no-uniform")


def one_after_another(loaded, prompts, batch_size: int) -> dict:
    """Each variant's responses, decoded variant by variant (sharing one prefill store)."""
    store = PrefillStore()
    out = {}
    for v, one in enumerate(loaded):
        one = dataclasses.replace(one, prefills=store)
        for j, g in generate(one, prompts[v], batch_size):
            out[v, j] = (g.output, g.n_tokens)
    return out


def together(loaded, prompts, batch_size: int) -> dict:
    """Each variant's responses, decoded as one batch."""
    store = PrefillStore()
    loaded = [dataclasses.replace(x, prefills=store) for x in loaded]
    return {(v, j): (g.output, g.n_tokens)
            for v, j, g in generate_together(loaded, prompts, batch_size)}


def main() -> None:
    """Print both ways' time per round, their tokens/s, the speed-up and output identity."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: the registry's")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    registry = load_registry()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    specs = [registry[n] if args.new_tokens is None else override_cap(registry[n], args.new_tokens)
             for n in names]
    tok = load_tokenizer(specs[0])
    base = load_model(specs[0], tok)
    loaded = [dataclasses.replace(base, spec=s) for s in specs]
    if not can_decode_together(loaded):
        parser.error("these variants cannot decode as one batch (one model, one greedy "
                     "decoding)")
    instructions = [i.instruction for i in load_task("instructions").instructions]
    prompts = [[format_prompt(s, tok, x) for x in instructions] for s in specs]
    print(f"{len(specs)} variants x {len(instructions)} instructions, cap "
          f"{specs[0].decoding.max_new_tokens}, batch {args.batch_size}")
    totals = {"one after another": 0.0, "together": 0.0}
    results = {}
    for r in range(1, args.rounds + 1):
        for label, run in (("one after another", one_after_another), ("together", together)):
            start = time.perf_counter()
            results[label] = run(loaded, prompts, args.batch_size)
            seconds = time.perf_counter() - start
            totals[label] += seconds
            made = sum(n for _, n in results[label].values())
            print(f"round {r}  {label:<18} {seconds:7.1f} s  {made / seconds:6.1f} tok/s "
                  f"({made} tokens)", flush=True)
    same = results["one after another"] == results["together"]
    print(f"speed-up over {args.rounds} round(s): "
          f"{totals['one after another'] / totals['together']:.2f}x; "
          f"identical responses: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
