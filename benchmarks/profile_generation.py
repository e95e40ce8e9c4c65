"""Where generation time goes: one batch of prompts through the transformers backend, split by part.

    python benchmarks/profile_generation.py [--models A,B] [--batch 32] [--new-tokens 128]

(default models: smollm2-135m-instruct, gemma3-270m, gemma3-270m+rules)

The batch runs once through the slot decoder with wall-clock timers around each part of a
decoding step (CPU work is synchronous, so a timer around a call is that call's cost): the
linear layers, the output projection, attention (with the share of its keys that are left
padding), the KV-cache update, the rest of the forward pass (norms, rotary embeddings,
activations, masks, the model's own Python), the rules, and the decoding loop outside the model
(argmax, dropping ended rows, joining new ones). Prefill passes (several tokens per row) are
split from decode steps. Then torch.profiler runs a shorter batch (same prompts,
--profile-tokens steps; the profiler's event store outgrows memory at 128) to give the share of
wall time spent outside any tensor op: the Python overhead. Compute spent on rows that had
already finished is the share of decode row-steps that made no token; the slot decoder drops a
row the step it ends, so it should read 0 (``model.generate`` kept them: 31% for gemma+rules).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.generate import backends  # noqa: E402
from harness.generate import transformers as generation  # noqa: E402
from harness.models.registry import load_registry  # noqa: E402
from harness.run.runner import override_cap  # noqa: E402
from harness.tasks.kinds import load_task  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)
ACTIVE: set[str] = set()


def _timed(part: str, fn):
    """fn, with its wall time added to TIMES[part] (and its signature: generate reads it)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if part in ACTIVE:  # a nested call of the same part (a subclass calling super) counts once
            return fn(*args, **kwargs)
        ACTIVE.add(part)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            ACTIVE.discard(part)
            TIMES[part] += time.perf_counter() - start
            COUNTS[part] += 1
    return wrapped


def instrument(model) -> None:
    """Timers around the linear layers, output projection, attention, cache and the rules."""
    from transformers import cache_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from harness.generate import slot_decoding
    from harness.generate.rules import RulesRows

    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _timed("lm_head" if module is head else "linear", module.forward)
    forward = model.forward

    @functools.wraps(forward)
    def timed_forward(*args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        part = "prefill" if ids.shape[1] > 1 else "decode"
        if mask is not None:  # a shared prefix's own pass has no padding and no mask
            TIMES["pad_keys"] += float((mask == 0).sum()) * ids.shape[1]
            TIMES["all_keys"] += float(mask.numel()) * ids.shape[1]
        if part == "decode":
            TIMES["decode_rows"] += ids.shape[0]
        else:
            TIMES["prefill_rows"] += ids.shape[0]
        return _timed(part, forward)(*args, **kwargs)

    model.forward = timed_forward
    for name in list(ALL_ATTENTION_FUNCTIONS.keys()):
        ALL_ATTENTION_FUNCTIONS[name] = _timed("attention", ALL_ATTENTION_FUNCTIONS[name])
    for cls in (cache_utils.DynamicLayer, cache_utils.DynamicSlidingWindowLayer,
                cache_utils.StaticLayer, cache_utils.StaticSlidingWindowLayer):
        if "update" in cls.__dict__:
            cls.update = _timed("kv_cache", cls.update)
    # the slot decoder's own layers append into room in their buffers
    slot_decoding._append = _timed("kv_cache", slot_decoding._append)
    RulesRows.__call__ = _timed("processors", RulesRows.__call__)
    RulesRows.consume = _timed("processors", RulesRows.consume)


def python_share(loaded, prompts: list[str], batch: int) -> float:
    """Share of wall time outside any tensor op, from torch.profiler over a short batch."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        list(generation.generate(loaded, prompts, batch))
        wall = time.perf_counter() - start
    in_ops = sum(ev.self_cpu_time_total for ev in prof.key_averages()
                 if ev.key.startswith("aten::")) / 1e6
    return max(0.0, 1 - in_ops / wall)


def profile_model(name: str, batch: int, new_tokens: int, profile_tokens: int,
                  instructions: list[str]) -> None:
    """Generate one batch with timers and print the breakdown."""
    spec = override_cap(load_registry()[name], new_tokens)
    tok = generation.load_tokenizer(spec)
    loaded = generation.load_model(spec, tok)
    prompts = [backends.template_prompt(spec, tok, x) for x in instructions[:batch]]
    list(generation.generate(loaded, prompts[:2], 2))  # warm-up
    start = time.perf_counter()
    plain = list(generation.generate(loaded, prompts, batch))
    wall_plain = time.perf_counter() - start
    short = generation.LoadedModel(override_cap(spec, profile_tokens), loaded.model, tok,
                                   loaded.eos_ids)
    py = python_share(short, prompts, batch)
    instrument(loaded.model)
    TIMES.clear()
    COUNTS.clear()
    start = time.perf_counter()
    gens = list(generation.generate(loaded, prompts, batch))
    wall = time.perf_counter() - start
    assert dict((i, g.output) for i, g in gens) == dict((i, g.output) for i, g in plain)
    t = TIMES
    n_tok = sum(g.n_tokens for _, g in gens)
    steps = COUNTS["prefill"] + COUNTS["decode"]
    lens = [g.n_prompt_tokens for _, g in gens]
    padded = max(lens)
    # each decode row-step should make a token (or the EOS that ends the row)
    useful = sum(g.n_tokens + (g.finish_reason == "eos") for _, g in gens) - t["prefill_rows"]
    finished = 1 - useful / max(1.0, t["decode_rows"])
    forward = t["prefill"] + t["decode"]
    named = t["linear"] + t["lm_head"] + t["attention"] + t["kv_cache"]
    rows = [
        ("matmuls (linear layers, not the output projection)", t["linear"]),
        ("output projection (lm_head)", t["lm_head"]),
        (f"attention ({100 * t['pad_keys'] / t['all_keys']:.0f}% of its keys are left padding)",
         t["attention"]),
        ("KV-cache update (append into the buffer's room)", t["kv_cache"]),
        ("rest of the forward pass (norms, rotary, activations, masks, glue)", forward - named),
        ("the rules (scores and used-token state)", t["processors"]),
        ("decoding loop outside the model (argmax, dropping and joining rows)",
         wall - forward - t["processors"]),
    ]
    print(f"\n{name}: {len(gens)} prompts of {min(lens)}-{padded} tokens, {steps} forward passes, "
          f"{n_tok} real tokens: {n_tok / wall_plain:.1f} tok/s ({wall_plain:.1f} s) untimed, "
          f"{wall:.1f} s timed; prefill {t['prefill']:.1f} s "
          f"({100 * t['prefill'] / wall:.0f}%), decode {1000 * t['decode'] / max(1, steps - 1):.0f}"
          f" ms/step")
    for label, s in rows:
        print(f"  {label:<70} {s:7.2f} s {100 * s / wall:5.1f}%")
    label = f"Python overhead: time outside any tensor op (profiler, {profile_tokens} steps)"
    print(f"  {label:<70} {'':>9} {100 * py:5.1f}%")
    print(f"  {'rows already finished (share of row-steps computed after EOS)':<70} "
          f"{'':>9} {100 * finished:5.1f}%")


def main() -> None:
    """Profile each model named on the command line."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m,gemma3-270m+rules")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--profile-tokens", type=int, default=16)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    instructions = [i.instruction for i in load_task("instructions").instructions]
    for name in args.models.split(","):
        profile_model(name, args.batch, args.new_tokens, args.profile_tokens, instructions)


if __name__ == "__main__":
    main()
