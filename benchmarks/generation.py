"""Tokens/s of the transformers backend against the machine's compute ceiling and against lm-eval.

    python benchmarks/generation.py [--models A,B] [--batch-sizes 1,8,32,64] [--new-tokens 64]
    HARNESS_KERNELS=plain python benchmarks/generation.py   # without the oneDNN output projection
    HARNESS_SHARED_PREFIX=off python benchmarks/generation.py  # each prompt prefilled whole

The ceiling is the measured fp32 matmul GFLOP/s (a 2048^3 GEMM with torch's threads) divided by
2 x parameters FLOP per token; the GEMM is re-measured after every row and the fastest rate seen
so far is used. Per model and batch size, every row is held to the full length
(EOS suppressed), so each counted token is a real one: no padding, no finished rows. Beside it,
the same run counting the prompt tokens it computed too, each at its share of a generated
token's FLOP (a prompt token skips the output projection): the compute it really did. Then the
peer figure: the built-in instructions through lm-eval's HFLM `generate_until` and through the
harness (default batch size), both stopping at EOS with the same cap, counting the tokens each
response really has, in alternating rounds (--peer-rounds); the ratio is ours over lm-eval's,
over the rounds' totals.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.generate import (
    backends,  # noqa: E402
    kernels,
    slot_decoding,
)
from harness.generate.backends import DEFAULT_BATCH_SIZE
from harness.generate.backends import template_prompt as format_prompt
from harness.generate.transformers import encode_prompt, generate, load_model, load_tokenizer
from harness.models.backend_config import BackendOptions  # noqa: E402
from harness.models.registry import load_registry  # noqa: E402
from harness.models.weights import resolve_model_dir  # noqa: E402
from harness.run.runner import override_cap  # noqa: E402
from harness.tasks.kinds import load_task  # noqa: E402


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 GEMM throughput of this machine with torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def forced_tokens_per_second(loaded, prompts: list[str], batch_size: int
                             ) -> tuple[float, float]:
    """(generated, processed) tokens per second for one batch, every row forced to full length.

    Processed tokens add the prompt tokens the prefill computed (a common prefix once), each
    weighted by its cost against a generated token's 2 x parameters FLOP: a prompt token skips
    the output projection (only the last one's logits are kept; gemma-3-270m's projection is
    63% of its parameters, SmolLM2-135M's 21%). So (processed tok/s) / ceiling is the share of
    the machine's compute the run used, while (generated tok/s) / ceiling also charges the
    prompts to it.
    """
    batch = prompts[:batch_size]
    start = time.perf_counter()
    got = list(generate(loaded, batch, batch_size, force_length=True))
    seconds = time.perf_counter() - start
    made = sum(g.n_tokens for _, g in got)
    # the batch is one admission: its common prefix was computed once, not once a row
    encoded = [encode_prompt(loaded.spec, loaded.tokenizer, p) for p in batch]
    shared = slot_decoding.shared_prefix(encoded) if slot_decoding.shares_prefixes() else 0
    computed = sum(map(len, encoded)) - shared * (len(encoded) - 1)
    params = sum(p.numel() for p in loaded.model.parameters())
    head = loaded.model.get_output_embeddings().weight.numel()
    return made / seconds, (made + computed * (params - head) / params) / seconds


def natural(loaded, prompts: list[str], batch_size: int) -> tuple[float, int]:
    """(seconds, real tokens) for all prompts, rows stopping at EOS or the cap."""
    start = time.perf_counter()
    got = list(backends.generate(loaded, prompts, batch_size))
    return time.perf_counter() - start, sum(g.n_tokens for _, g in got)


def main() -> None:
    """Print tokens/s per model and batch size next to the ceiling, then the lm-eval peer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--batch-sizes", default="1,8,32,64,72")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-peer", action="store_true", help="skip the lm-eval comparison")
    parser.add_argument("--peer-rounds", type=int, default=2,
                        help="alternating harness / lm-eval runs whose totals give the ratio")
    args = parser.parse_args()
    if args.peer_rounds < 1:
        parser.error("--peer-rounds must be at least 1")
    gflops = matmul_gflops()
    print(f"threads {torch.get_num_threads()}, fp32 matmul {gflops:.1f} GFLOP/s, output "
          f"projection kernel {kernels.choose('float32')}, shared prefixes "
          f"{'on' if slot_decoding.shares_prefixes() else 'off'}")
    registry = load_registry()
    instructions = [i.instruction for i in load_task("instructions").instructions]
    print(f"{'model':<24} {'params':>8} {'ceiling tok/s':>14} {'batch':>6} {'tok/s':>8} "
          f"{'of ceiling':>10} {'with prompts':>13} {'of ceiling':>10}")
    for name in args.models.split(","):
        spec = override_cap(registry[name], args.new_tokens)
        tok = load_tokenizer(spec)
        loaded = load_model(spec, tok)
        params = sum(p.numel() for p in loaded.model.parameters())
        ceiling = gflops * 1e9 / (2 * params)
        prompts = [format_prompt(spec, tok, x) for x in instructions]
        while len(prompts) < max(int(b) for b in args.batch_sizes.split(",")):
            prompts += prompts
        forced_tokens_per_second(loaded, prompts, 2)  # warm up
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            tps, work = forced_tokens_per_second(loaded, prompts, bs)
            # this machine's speed drifts within minutes: the ceiling is the fastest GEMM rate
            # seen so far, re-measured after every row, so a slow moment never flatters a row
            gflops = max(gflops, matmul_gflops())
            ceiling = gflops * 1e9 / (2 * params)
            print(f"{name:<24} {params / 1e6:>7.0f}M {ceiling:>14.1f} {bs:>6} {tps:>8.1f} "
                  f"{tps / ceiling:>10.2f} {work:>13.1f} {work / ceiling:>10.2f}", flush=True)
        if args.no_peer:
            continue
        prompts = prompts[:len(instructions)]
        folder = resolve_model_dir(spec)
        lm_spec = dataclasses.replace(
            spec, name=f"{name}@lm-eval", backend="lm-eval", source="",
            backend_options=BackendOptions(kind="lm-eval", lm_eval_model="hf",
                                           model_args=f"pretrained={folder},dtype={spec.dtype},"
                                                      f"batch_size={DEFAULT_BATCH_SIZE}"))
        peer = backends.load_model(lm_spec, tok)
        list(backends.generate(peer, prompts[:2], 2))  # warm up
        # rounds alternate (harness, lm-eval, harness, ...) so that the machine's drift within
        # minutes falls on both sides; the ratio is over the rounds' totals
        totals = {"harness": [0.0, 0], "lm-eval": [0.0, 0]}
        for r in range(args.peer_rounds):
            for side, model in (("harness", loaded), ("lm-eval", peer)):
                s_, n_ = natural(model, prompts, DEFAULT_BATCH_SIZE)
                totals[side][0] += s_
                totals[side][1] += n_
                print(f"{name:<24} round {r + 1}: {side} {n_ / s_:.1f} tok/s ({s_:.1f} s)",
                      flush=True)
        (ours_s, ours_n), (peer_s, peer_n) = totals["harness"], totals["lm-eval"]
        del loaded, peer
        print(f"{name:<24} {len(prompts)} instructions, stopping at EOS, cap {args.new_tokens}, "
              f"batch {DEFAULT_BATCH_SIZE}, {args.peer_rounds} alternating rounds: harness "
              f"{ours_n / ours_s:.1f} tok/s ({ours_s:.1f} s), lm-eval HFLM generate_until "
              f"{peer_n / peer_s:.1f} tok/s ({peer_s:.1f} s); ratio "
              f"{(ours_n / ours_s) / (peer_n / peer_s):.2f}", flush=True)


if __name__ == "__main__":
    main()
