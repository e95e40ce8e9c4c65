"""Throughput of the rule-based product of experts: base model vs rules vs the study's approach.

    python benchmarks/rules.py                                   # gemma3-270m, batch 1 and 32
    python benchmarks/rules.py --model-dir /path/to/model --new-tokens 64 --reference-prompts 2

Every run generates exactly --new-tokens tokens per prompt (EOS is forbidden until then through
``min_new_tokens``), greedy, with the KV cache and left padding. Reported:

* tokens/s of the base model and of the rules variant (RulesLogitsProcessor) at each batch size,
  and the rules overhead in % (goal <= 10 %), plus the processor's own time per step measured
  alone (less noisy than the difference of two generate timings);
* tokens/s of the study's reference approach (batch 1, no KV cache, whole sequence and rule
  scores recomputed every step), timed on --reference-prompts prompts for --reference-tokens
  tokens each and extrapolated per token; with fewer tokens than --new-tokens this flatters the
  reference (its per-token cost grows with length), so the speed-up shown is a lower bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
)

from harness.generate.rules import build_processor, reference_generate  # noqa: E402
from harness.models.rules_config import RulesConfig  # noqa: E402
from harness.models.spec import PLAIN_TEMPLATE as TEMPLATE  # noqa: E402

INSTRUCTIONS = [
    "Write a short poem about the sea.",
    "What are three tips for staying healthy?",
    "Explain photosynthesis to a ten-year-old.",
    "List five fruits that are rich in vitamin C.",
    "How do I make a cup of green tea?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Write an email asking my manager for a day off next Friday.",
    "What is the capital of Australia and why was it chosen?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Suggest a name for a bakery that sells only croissants.",
    "Describe the water cycle.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Compare cats and dogs as pets.",
    "Write a haiku about autumn leaves.",
]


def default_model_dir() -> str:
    """gemma3-270m through the weights registry (fetched and converted once)."""
    from harness.models.registry import load_registry
    from harness.models.weights import resolve_model_dir

    return resolve_model_dir(load_registry()["gemma3-270m"])


def prompts(n: int) -> list[str]:
    """n distinct prompt texts in the study's plain format."""
    out = []
    for i in range(n):
        text = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        if i >= len(INSTRUCTIONS):
            text += f" (variant {i // len(INSTRUCTIONS)})"
        out.append(TEMPLATE.format(instruction=text))
    return out


class _Timed:
    """Wraps a logits processor and adds up the seconds spent in it."""

    def __init__(self, proc):
        self.proc = proc
        self.seconds = 0.0

    def __call__(self, input_ids, scores):
        t = time.perf_counter()
        out = self.proc(input_ids, scores)
        self.seconds += time.perf_counter() - t
        return out


def timed_generate(model, tok, texts, new_tokens, config) -> tuple[float, float, float]:
    """One batched, cached generate of exactly new_tokens tokens: wall s, CPU s, processor s."""
    batch = tok(texts, return_tensors="pt", padding=True)
    start, cpu = time.perf_counter(), time.process_time()
    procs = []
    if config is not None:
        procs = [_Timed(build_processor(config, tok, model, batch.input_ids,
                                        batch.attention_mask))]
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList(procs))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if out.shape[1] - batch.input_ids.shape[1] != new_tokens:
        raise RuntimeError("generate stopped early despite min_new_tokens")
    return elapsed, cpu, (procs[0].seconds if procs else 0.0)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="base model directory (default: gemma3-270m)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median)")
    ap.add_argument("--reference-prompts", type=int, default=2)
    ap.add_argument("--reference-tokens", type=int, default=None,
                    help="tokens per reference prompt (default: --new-tokens)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = RulesConfig()
    T = args.new_tokens
    vocab = model.get_output_embeddings().weight.shape[0]
    print(f"model {model_dir}  vocab {vocab}  threads {torch.get_num_threads()}  "
          f"new tokens {T}  repeats {args.repeats}")
    timed_generate(model, tok, prompts(2), 4, config)  # warm-up

    ours: dict[int, float] = {}
    ours_cpu: dict[int, float] = {}  # CPU seconds per token
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        texts = prompts(b)
        base, rules = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            base.append(timed_generate(model, tok, texts, T, None))
            rules.append(timed_generate(model, tok, texts, T, config))
        base_s, base_cpu = (statistics.median(r[i] for r in base) for i in (0, 1))
        rules_s, rules_cpu, proc_s = (statistics.median(r[i] for r in rules) for i in (0, 1, 2))
        ours[b] = b * T / rules_s
        ours_cpu[b] = rules_cpu / (b * T)
        print(f"batch {b:3d}: base {b * T / base_s:8.2f} tok/s | rules {ours[b]:8.2f} tok/s | "
              f"overhead {100 * (rules_s - base_s) / base_s:+6.1f}% wall, "
              f"{100 * (rules_cpu - base_cpu) / base_cpu:+6.1f}% CPU time | "
              f"processor alone {1000 * proc_s / T:6.2f} ms/step = "
              f"{100 * proc_s / base_s:4.1f}% of base time")

    ref_tokens = args.reference_tokens or T
    ref_texts = prompts(args.reference_prompts)
    start, cpu = time.perf_counter(), time.process_time()
    produced = 0
    with torch.inference_mode():
        for text in ref_texts:
            ids = tok(text).input_ids
            out = reference_generate(model, tok, ids, config, ref_tokens,
                                     min_new_tokens=ref_tokens)
            produced += len(out)
    ref_s, ref_cpu = time.perf_counter() - start, time.process_time() - cpu
    ref_rate = produced / ref_s
    label = "measured" if ref_tokens == T else f"EXTRAPOLATED per token from {ref_tokens} tokens"
    print(f"reference (batch 1, no cache): {ref_rate:8.2f} tok/s over {len(ref_texts)} prompts x "
          f"{ref_tokens} tokens ({label}); {1000 * ref_cpu / produced:.0f} ms CPU/token")
    for b, rate in ours.items():
        print(f"speed-up of ours at batch {b:3d}: {rate / ref_rate:7.1f}x wall, "
              f"{ref_cpu / produced / ours_cpu[b]:7.1f}x CPU time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
