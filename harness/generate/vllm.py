"""The vllm generation backend: in-process vLLM on a variant's own weights (a GPU; optional extra).

`pip install 'harness[vllm]'`; vLLM is imported only when a vllm variant generates, never on a
CPU-only path. The engine is `vllm.LLM(model=<the variant's weights folder>, dtype,
tensor_parallel_size, gpu_memory_utilization, max_model_len)`, fed the same token ids the
transformers backend feeds `generate` (harness.generate.backends.encode_prompt) with the same
EOS ids as stop tokens, and its outputs are decoded with the harness's tokenizer, so greedy
outputs match the transformers backend up to floating-point ties.

The rules variant (harness.generate.rules) runs as a vLLM v1 logits processor with the
transformers backend's semantics: `harness.generate.vllm_rules.RulesAdapter` (an
`AdapterLogitsProcessor`, registered with `LLM(logits_processors=[...])`) builds, for a request
whose `SamplingParams.extra_args` hold the rules, a per-request processor
`RulesRequestProcessor(prompt_ids, output_ids, logits)` that
returns log_softmax(log_softmax(logits) + log_softmax(r)) with r the rule scores after
len(output_ids) response tokens (EOS ramp, uniform token changes, diversity penalty on tokens
already in the response, or in the prompt and the response). The processor itself needs only
torch, so it is tested on CPU against harness.generate.rules.reference_generate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from harness.core.errors import BackendError
from harness.core.hashing import canonical_json
from harness.generate import transformers
from harness.generate.backends import (
    Generation,
    encode_prompt,
    local_output_identity,
    template_prompt,
)
from harness.models.builds import model_dir
from harness.models.rules_config import RulesConfig, eos_bonus
from harness.models.spec import ModelSpec

#: SamplingParams.extra_args key that carries a request's rules to the logits processor.
RULES_ARG = "harness_rules"
#: The logits processor vLLM loads in its engine process (fully qualified class name).
RULES_PROCESSOR = "harness.generate.vllm_rules:RulesAdapter"
#: Prompts per LLM.generate call: records are stored after each (resume granularity).
CHUNK = 512

_ENGINES: dict[str, Any] = {}


class RulesRequestProcessor:
    """The rules for one request, as vLLM's per-request logits processor callable
    (prompt_ids, output_ids, logits[vocab]) -> log-probabilities[vocab].

    output_ids is vLLM's live list of the request's generated ids; the used-token penalty is
    updated incrementally from the ids not seen yet (and rebuilt if the list ever shrinks).
    """

    def __init__(self, config: RulesConfig, token_ids: Sequence[int], weights: Sequence[float],
                 eos_ids: Sequence[int]) -> None:
        self.config = config
        self.table = [(int(t), float(w)) for t, w in zip(token_ids, weights, strict=True)]
        self.eos_ids = sorted({int(e) for e in eos_ids})
        self._static: Any = None
        self._bias: Any = None
        self._used: set[int] = set()
        self._seen = 0

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> RulesRequestProcessor:
        """From the JSON-able dict `rules_args` puts into SamplingParams.extra_args."""
        return cls(RulesConfig.from_dict(args["config"]), args["token_ids"], args["weights"],
                   args["eos_ids"])

    def _start(self, prompt_ids: Sequence[int], vocab: int, device: Any) -> None:
        import torch

        static = torch.zeros(vocab, dtype=torch.float32, device=device)
        pairs = [(t, w) for t, w in self.table if t < vocab]
        if self.config.uniform and pairs:
            static[[t for t, _ in pairs]] = torch.tensor([w for _, w in pairs],
                                                         device=device)
        self._static, self._bias = static, torch.zeros_like(static)
        self._used, self._seen = set(), 0
        if self.config.diversity and self.config.diversity_scope == "prompt+response":
            self._mark(prompt_ids, vocab)

    def _mark(self, ids: Sequence[int], vocab: int) -> None:
        new = [int(t) for t in dict.fromkeys(ids) if int(t) not in self._used and int(t) < vocab]
        if new and self.config.diversity:
            self._used.update(new)
            self._bias[new] -= self.config.diversity_penalty

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: Any) -> Any:
        """The combined log-probabilities for the next token of this request."""
        import torch

        vocab = logits.shape[-1]
        if (self._static is None or self._static.shape[0] != vocab
                or self._static.device != logits.device or len(output_ids) < self._seen):
            self._start(prompt_ids, vocab, logits.device)
        if len(output_ids) > self._seen:
            self._mark(output_ids[self._seen:], vocab)
            self._seen = len(output_ids)
        r = self._static + self._bias
        bonus = eos_bonus(self.config, len(output_ids))
        if bonus:
            r = r.clone()
            r[[e for e in self.eos_ids if e < vocab]] += bonus
        base = torch.log_softmax(logits.float(), dim=-1)
        out = torch.log_softmax(base + torch.log_softmax(r, dim=-1), dim=-1)
        return out.to(logits.dtype)


def rules_args(spec: ModelSpec, tokenizer: Any, eos_ids: Sequence[int]) -> dict[str, Any]:
    """A rules variant's rules as JSON-able SamplingParams.extra_args (token table resolved
    against the harness's tokenizer, as the transformers backend resolves it)."""
    from harness.generate.rules import resolution_for

    resolution = resolution_for(spec.rules, tokenizer)
    return {"config": spec.rules.as_dict(), "token_ids": list(resolution.token_ids),
            "weights": list(resolution.weights), "eos_ids": [int(e) for e in eos_ids]}


def require_vllm() -> Any:
    """The vllm module, or one BackendError line (not installed, or no CUDA GPU)."""
    try:
        import vllm
    except ImportError:
        raise BackendError("backend 'vllm' needs vLLM: pip install 'harness[vllm]' (Linux, a "
                           "CUDA GPU)") from None
    import torch

    if not torch.cuda.is_available():
        raise BackendError("backend 'vllm' needs a CUDA GPU, and torch sees none")
    return vllm


@dataclass
class VllmModel:
    """A variant's vLLM engine with the harness's tokenizer and EOS ids."""

    spec: ModelSpec
    llm: Any
    tokenizer: Any
    eos_ids: tuple[int, ...]


def _eos_ids(where: str, tokenizer: Any) -> tuple[int, ...]:
    from transformers import GenerationConfig

    eos: Any = None
    try:
        eos = GenerationConfig.from_pretrained(where).eos_token_id
    except (OSError, ValueError):
        pass
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise BackendError(f"{where}: the model and tokenizer define no EOS token id")
    ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    return tuple(dict.fromkeys(ids))


def load_vllm(spec: ModelSpec, tokenizer: Any) -> VllmModel:
    """The variant's vLLM engine (one kept at a time; variants of one weights share it)."""
    vllm = require_vllm()
    where = model_dir(spec)
    o = spec.backend_options
    kwargs: dict[str, Any] = {
        "model": where, "tokenizer": where, "dtype": spec.dtype,
        "tensor_parallel_size": o.tensor_parallel_size,
        "gpu_memory_utilization": o.gpu_memory_utilization, "seed": spec.decoding.seed,
        "logits_processors": [RULES_PROCESSOR]}
    if o.max_model_len:
        kwargs["max_model_len"] = o.max_model_len
    if spec.source == "hub":
        kwargs["revision"] = spec.revision
    key = canonical_json(kwargs)
    if key not in _ENGINES:
        _ENGINES.clear()  # free the previous engine first
        try:
            _ENGINES[key] = vllm.LLM(**kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise BackendError(f"{spec.name}: vLLM could not load {where}: {line}") from None
    return VllmModel(spec=spec, llm=_ENGINES[key], tokenizer=tokenizer,
                     eos_ids=_eos_ids(where, tokenizer))


def sampling_params(spec: ModelSpec, eos_ids: Sequence[int], extra: dict[str, Any] | None,
                    offset: int = 0) -> Any:
    """vLLM SamplingParams for the variant's decoding (temperature 0 is greedy)."""
    from vllm import SamplingParams

    dec = spec.decoding
    kwargs: dict[str, Any] = {"max_tokens": dec.max_new_tokens, "stop_token_ids": list(eos_ids),
                              "skip_special_tokens": True}
    if dec.do_sample:
        kwargs.update(temperature=dec.temperature, top_p=dec.top_p, seed=dec.seed + offset)
    else:
        kwargs["temperature"] = 0.0
    if extra:
        kwargs["extra_args"] = extra
    return SamplingParams(**kwargs)


def vllm_generate(model: VllmModel, prompts: Sequence[str]) -> Iterator[tuple[int, Generation]]:
    """Yield (index, Generation) for each prompt, CHUNK prompts per LLM.generate call."""
    spec, tok, eos = model.spec, model.tokenizer, set(model.eos_ids)
    extra = None if spec.rules is None else {RULES_ARG: rules_args(spec, tok, model.eos_ids)}
    encoded = [encode_prompt(spec, tok, p) for p in prompts]
    for start in range(0, len(prompts), CHUNK):
        idx = list(range(start, min(start + CHUNK, len(prompts))))
        params = [sampling_params(spec, model.eos_ids, extra, i) for i in idx]
        t0 = time.perf_counter()
        outs = model.llm.generate([{"prompt_token_ids": encoded[i]} for i in idx], params,
                                  use_tqdm=False)
        seconds = round(time.perf_counter() - t0, 3)
        for i, out in zip(idx, outs, strict=True):
            completion = out.outputs[0]
            gen = [int(t) for t in completion.token_ids]
            end = next((k for k, t in enumerate(gen) if t in eos), None)
            tokens = gen if end is None else gen[:end]
            yield i, Generation(
                output=tok.decode(tokens, skip_special_tokens=True).strip(),
                n_prompt_tokens=len(encoded[i]), n_tokens=len(tokens),
                finish_reason="length" if end is None else "eos", batch_seconds=seconds,
                batch_size=len(idx),
                info={"backend": "vllm", "finish_reason": completion.finish_reason})


class VllmBackend:
    """vLLM on a GPU: the same weights and rules as the transformers backend, another engine."""

    def load_tokenizer(self, spec: ModelSpec) -> Any:
        return transformers.load_tokenizer(spec)

    def format_prompt(self, spec: ModelSpec, tokenizer: Any, instruction: str) -> str:
        return template_prompt(spec, tokenizer, instruction)

    def load_model(self, spec: ModelSpec, tokenizer: Any, http_client: Any = None) -> VllmModel:
        return load_vllm(spec, tokenizer)

    def generate(self, loaded: VllmModel, prompts: Sequence[str], batch_size: int,
                 on_progress: Any = None) -> Iterator[tuple[int, Generation]]:
        return vllm_generate(loaded, prompts)

    def fingerprints(self, spec: ModelSpec, tokenizer: Any) -> dict[str, str]:
        return transformers.fingerprints(spec, tokenizer)

    def output_identity(self, spec: ModelSpec, prints: dict[str, str]) -> dict[str, Any]:
        return local_output_identity(spec, prints, {"backend": spec.backend_options.identity()})

    def check_scoring(self, spec: ModelSpec) -> None:
        return None  # the ranking task scores its weights with the harness's own model

    def scoring_label(self, spec: ModelSpec) -> str:
        return "harness"


BACKEND = VllmBackend()
