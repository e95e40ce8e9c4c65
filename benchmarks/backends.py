"""Tokens/s of the generation backends on one model and the same prompts, and the harness's own
per-request overhead on the openai backend.

    python benchmarks/backends.py --quick                      # tiny random model, 4 prompts
    python benchmarks/backends.py --model smollm2-135m-instruct --n 72
    python benchmarks/backends.py --model X --base-url http://127.0.0.1:8000/v1 --served-model M

Rows: the transformers backend (batched), lm-eval's hf model (generate_until), the openai backend
against a local server at 1, 8 and 32 requests in flight (tests/tiny_server.py serving the same
folder, greedy with a KV cache but one forward pass at a time; or --base-url, e.g. vLLM serve),
and the openai backend against a server that answers at once with a fixed reply: its seconds per
request are the harness's overhead (client, JSON, threads, record building), not the model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from harness.generate import backends  # noqa: E402
from harness.models.backend_config import BackendOptions  # noqa: E402
from harness.models.registry import load_registry  # noqa: E402
from harness.models.spec import DecodingSpec, ModelSpec  # noqa: E402


def tiny_spec(workdir: Path, cap: int) -> ModelSpec:
    """The tests' tiny random Llama, saved under workdir."""
    from tiny import make_tiny_model

    path = make_tiny_model(workdir / "tiny", seed=0)
    return ModelSpec(name="tiny", source="local", path=str(path), prompt_format="chat_template",
                     decoding=DecodingSpec(max_new_tokens=cap))


def instructions(n: int) -> list[str]:
    """The first n built-in instructions (repeated if n exceeds them)."""
    from harness.tasks.kinds import load_task

    pool = [i.instruction for i in load_task("instructions", None).instructions]
    return [pool[i % len(pool)] + ("" if i < len(pool) else f" ({i})") for i in range(n)]


def timed(spec: ModelSpec, tokenizer, texts: list[str], batch_size: int) -> tuple[float, int, int]:
    """(seconds, generated tokens, responses) for one backend over the instructions."""
    prompts = [backends.format_prompt(spec, tokenizer, t) for t in texts]
    loaded = backends.load_model(spec, tokenizer)
    list(backends.generate(loaded, prompts[:1], batch_size))  # warm-up: load, connect, first pass
    t0 = time.perf_counter()
    got = list(backends.generate(loaded, prompts, batch_size))
    return time.perf_counter() - t0, sum(g.n_tokens for _, g in got), len(got)


def served(spec: ModelSpec, base_url: str, model: str, concurrency: int) -> ModelSpec:
    """The spec as an openai variant of base_url (chat for chat templates, else completions)."""
    endpoint = "chat" if spec.prompt_format == "chat_template" else "completions"
    return dataclasses.replace(spec, name=f"{spec.name}@openai", backend="openai",
                               backend_options=BackendOptions(
                                   kind="openai", base_url=base_url, model=model,
                                   endpoint=endpoint, max_concurrency=concurrency,
                                   timeout_s=600.0))


def row(label: str, seconds: float, tokens: int, n: int) -> None:
    """Print one result line."""
    print(f"{label:<50} {tokens / seconds:>10.1f} tok/s {seconds:>8.2f} s  "
          f"{1000 * seconds / n:>8.2f} ms/response  ({n} responses, {tokens} tokens)",
          flush=True)


def main() -> None:
    """Run every row once and print it."""
    import tiny_server

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a registry variant (default: a tiny random model)")
    p.add_argument("--n", type=int, default=32, help="prompts (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--base-url", help="an already running OpenAI-compatible server to time")
    p.add_argument("--served-model", default="tiny", help="its model name (with --base-url)")
    p.add_argument("--skip", default="", help="rows to skip: transformers,lm-eval,openai,"
                                              "overhead")
    p.add_argument("--quick", action="store_true", help="4 prompts, 8 tokens (a smoke test)")
    args = p.parse_args()
    if args.quick:
        args.n, args.max_new_tokens, args.batch_size = 4, 8, 4
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model:
            spec = load_registry()[args.model]
            spec = dataclasses.replace(spec, decoding=dataclasses.replace(
                spec.decoding, max_new_tokens=args.max_new_tokens))
        else:
            spec = tiny_spec(work, args.max_new_tokens)
        from harness.models.weights import resolve_model_dir

        folder = resolve_model_dir(spec)
        tok = backends.load_tokenizer(spec)
        texts = instructions(args.n)
        print(f"model {spec.name} ({folder}), {args.n} prompts, max_new_tokens "
              f"{args.max_new_tokens}, batch size {args.batch_size}")
        if "transformers" not in skip:
            row("transformers (batched generate)", *timed(spec, tok, texts, args.batch_size))
        if "lm-eval" not in skip:
            lm_spec = dataclasses.replace(
                spec, name=f"{spec.name}@lm-eval", backend="lm-eval", source="",
                backend_options=BackendOptions(kind="lm-eval", lm_eval_model="hf",
                                               model_args=f"pretrained={folder},"
                                                          f"dtype={spec.dtype}"))
            row("lm-eval hf (generate_until)", *timed(lm_spec, tok, texts, args.batch_size))
        procs = []
        try:
            if "openai" not in skip:
                base, model = args.base_url, args.served_model
                if base is None:
                    proc, base = tiny_server.start(["serve-tiny-model", folder], {}, 600)
                    procs.append(proc)
                    model = "tiny"
                for c in levels:
                    row(f"openai, {c} in flight", *timed(served(spec, base, model, c), tok,
                                                         texts, args.batch_size))
            if "overhead" not in skip:
                proc, base = tiny_server.start(["serve-fixed", "a fixed reply of six words"])
                procs.append(proc)
                n = max(args.n, 64)
                for c in levels:
                    seconds, tokens, k = timed(served(spec, base, "fixed", c), tok,
                                               instructions(n), args.batch_size)
                    row(f"openai overhead (instant server), {c} in flight", seconds, tokens, k)
        finally:
            for proc in procs:
                tiny_server.stop(proc)


if __name__ == "__main__":
    main()
