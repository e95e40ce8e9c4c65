"""Training speed of a tuning recipe: the old loss (full logits) against the response-only loss.

    python benchmarks/training.py                        # gemma3-270m+instruction-tuned's recipe
    python benchmarks/training.py --name gemma3-270m+poetry-tuned --steps 6 --rounds 3

Both modes run the recipe's own optimizer steps (LoRA or full, its batch size, sequence length and
response cap) on the same batches, drawn from its training pairs in a seeded order:

* old: the model's forward computes logits at every position (the 262k-row output layer on every
  prompt and padding token) and its own loss, as tuning did before;
* new: harness.train.tuning.response_loss_sum, logits only where a response token is predicted;
* new+grouped: the same, with each batch's examples of similar length (less padding), as
  group_by_length does.

Rounds alternate the modes (old, new, new+grouped, old, ...) so a change in machine load falls on
all of them. Reported: tokens/s per mode (non-padding tokens, as the Trainer counts them) as the
median over rounds, and the ratio to old.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402

from harness.data.tune_data import load_pairs  # noqa: E402
from harness.generate.transformers import set_threads  # noqa: E402
from harness.models.builds import starting_spec  # noqa: E402
from harness.models.registry import load_registry  # noqa: E402
from harness.models.weights import resolve_model_dir  # noqa: E402
from harness.train.tuning import (  # noqa: E402
    ResponseOnlyCollator,
    encode_pairs,
    eos_id,
    response_loss_sum,
    with_lora,
)


def batches(examples: list, size: int, n: int, seed: int, grouped: bool) -> list[list]:
    """n batches of `size` examples, drawn in a seeded order; grouped: each batch is taken
    from a sorted window of 8 batches' worth, so its lengths are alike."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    picked = [examples[i] for i in order[:size * n]]
    if grouped:
        windows = [sorted(picked[i:i + 8 * size], key=lambda e: len(e["input_ids"]))
                   for i in range(0, len(picked), 8 * size)]
        picked = [e for w in windows for e in w]
    return [picked[i:i + size] for i in range(0, len(picked), size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="gemma3-270m+instruction-tuned")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per mode and round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    set_threads()
    spec = load_registry()[args.name]
    recipe = spec.tune.effective(False)
    base_dir = resolve_model_dir(starting_spec(spec))
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    examples, stats = encode_pairs(spec, tok, load_pairs(spec.tune.data), recipe.max_seq_length,
                                   eos_id(model, tok), recipe.truncation,
                                   recipe.max_response_tokens)
    if recipe.method == "lora":
        set_seed(recipe.seed)
        model = with_lora(model, recipe)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    collate = ResponseOnlyCollator(tok.pad_token_id)
    size = recipe.batch_size * recipe.grad_accum
    print(f"{args.name}: {recipe.method}, micro-batch {recipe.batch_size} x {recipe.grad_accum}, "
          f"max_seq_length {recipe.max_seq_length}, max_response_tokens "
          f"{recipe.max_response_tokens}; {stats['examples']} examples, "
          f"{stats['tokens'] / stats['examples']:.0f} tokens each on average; "
          f"{torch.get_num_threads()} threads")

    def step(group: list, mode: str) -> int:
        tokens = 0
        for i in range(0, len(group), recipe.batch_size):
            batch = collate(group[i:i + recipe.batch_size])
            tokens += int(batch["attention_mask"].sum())
            if mode == "old":
                loss = model(**batch).loss
            else:
                total, n = response_loss_sum(model, batch)
                loss = total / n
            (loss / recipe.grad_accum).backward()
        opt.step()
        opt.zero_grad()
        return tokens

    modes = ("old", "new", "new+grouped")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes:
            groups = batches(examples, size, args.steps, seed=r, grouped=m == "new+grouped")
            step(groups[0], m)  # warm-up, not timed
            t0, tokens = time.perf_counter(), 0
            for g in groups:
                tokens += step(g, m)
            rate = tokens / (time.perf_counter() - t0)
            rates[m].append(rate)
            print(f"  round {r + 1} {m:12s} {rate:6.1f} tokens/s ({tokens} tokens)", flush=True)
    old = statistics.median(rates["old"])
    for m in modes:
        med = statistics.median(rates[m])
        print(f"{m:12s} {med:6.1f} tokens/s (median of {args.rounds}), {med / old:.2f}x old")


if __name__ == "__main__":
    main()
