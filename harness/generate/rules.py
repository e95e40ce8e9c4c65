"""The study's rule-based model, combined with a base model as a product of experts.

The rules give a score vector r over the vocabulary at every decoding step; the combined
next-token distribution is p(w) ∝ p_base(w) · softmax(r)(w), i.e. the log-probabilities
log_softmax(log_softmax(logits) + log_softmax(r)). Additive constants cancel under the final
log_softmax, so this equals log_softmax(logits + r), which is what the fast path computes.

Rules (all constants live in `RulesConfig`):

1. End of sequence: with n response tokens generated so far, every EOS id gets
   eos_max · n / ramp for 0 < n < ramp; for n >= ramp it gets eos_max (``eos_hold=True``) or
   nothing (``eos_hold=False``, the study's code).
2. Uniform token changes, defined by strings and mapped to each tokenizer's single token.
3. Diversity: −diversity_penalty for each distinct token already in the response (or in the
   prompt and the response, ``diversity_scope="prompt+response"``; padding never counts).

`RulesLogitsProcessor` is the batched, KV-cache-friendly implementation used inside
``model.generate``; `RulesRows` keeps the same state per row for the slot decoder
(`harness.generate.slot_decoding`), where rows leave and join between steps; `reference_generate` is
the study's straightforward version (batch size 1, no cache, r recomputed from scratch each
step), kept for equivalence tests and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from transformers import LogitsProcessor

from harness.core.errors import ConfigError
from harness.generate.backends import model_eos_ids
from harness.generate.slot_decoding import take_rows
from harness.models.rules_config import RulesConfig, eos_bonus

# ---------------------------------------------------------------------------------------------
# Mapping table strings to token ids


@dataclass(frozen=True)
class TokenResolution:
    """Token ids and weights of a table resolved against one tokenizer, with a per-string report."""

    token_ids: tuple[int, ...]
    weights: tuple[float, ...]
    report: tuple[dict[str, Any], ...] = field(default=())

    def report_list(self) -> list[dict[str, Any]]:
        """The resolution report as a list of dicts (for run logs and configs)."""
        return [dict(entry) for entry in self.report]


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: byte value -> printable character used in the vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def vocab_forms(text: str) -> list[tuple[str, str]]:
    """Candidate vocabulary spellings of a string: (kind, form), most literal first."""
    byte_map = _bytes_to_unicode()
    forms = [
        ("raw", text),
        ("sentencepiece", text.replace(" ", "▁")),
        ("byte-level", "".join(byte_map[b] for b in text.encode("utf-8"))),
    ]
    encoded = text.encode("utf-8")
    if len(encoded) == 1:
        forms.append(("byte-fallback", f"<0x{encoded[0]:02X}>"))
    seen: set[str] = set()
    unique = []
    for kind, form in forms:
        if form not in seen:
            seen.add(form)
            unique.append((kind, form))
    return unique


def _token_to_id(tokenizer: Any, form: str) -> int | None:
    """Id of an exact vocabulary entry, or None (never the unknown-token id for a missing one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.token_to_id(form)
    return tokenizer.get_vocab().get(form)


def resolve_token_table(
    tokenizer: Any, token_table: Sequence[tuple[str, float]], vocab_size: int | None = None
) -> TokenResolution:
    """Map each table string to the tokenizer's single token for it; unmappable ones are skipped.

    A string maps through its exact vocabulary entry (raw, "▁" for spaces, byte-level "Ġ"/"Ċ",
    or "<0xNN>" byte fallback, in that order); failing that, through encoding it without special
    tokens when that gives exactly one token that decodes back to the string. Strings that are no
    single token, ids outside ``vocab_size``, and a second string mapping to an id already mapped
    are skipped; every string gets a report entry saying what happened.
    """
    ids: list[int] = []
    weights: list[float] = []
    report: list[dict[str, Any]] = []
    for text, weight in token_table:
        encoded = list(tokenizer.encode(text, add_special_tokens=False))
        entry: dict[str, Any] = {"string": text, "weight": float(weight), "encodes_to": encoded}
        token_id = method = None
        for kind, form in vocab_forms(text):
            found = _token_to_id(tokenizer, form)
            if found is not None:
                token_id, method = found, f"vocab:{kind}"
                break
        if token_id is None and len(encoded) == 1:
            if tokenizer.decode(encoded, clean_up_tokenization_spaces=False) == text:
                token_id, method = encoded[0], "encode"
        if token_id is None:
            entry.update(status="skipped", token_id=None, token=None, method=None,
                         reason=f"not a single token (encodes to {len(encoded)} tokens)")
        elif vocab_size is not None and token_id >= vocab_size:
            entry.update(status="skipped", token_id=token_id, token=None, method=method,
                         reason=f"id {token_id} outside the model's vocabulary ({vocab_size})")
        elif token_id in ids:
            entry.update(status="duplicate", token_id=token_id, method=method,
                         token=tokenizer.convert_ids_to_tokens(token_id),
                         reason="id already mapped by an earlier string; not applied twice")
        else:
            ids.append(token_id)
            weights.append(float(weight))
            entry.update(status="mapped", token_id=token_id, method=method,
                         token=tokenizer.convert_ids_to_tokens(token_id),
                         agrees_with_encoding=encoded == [token_id])
        report.append(entry)
    return TokenResolution(tuple(ids), tuple(weights), tuple(report))


@lru_cache(maxsize=8)
def _cached_resolution(
    tokenizer: Any, token_table: tuple[tuple[str, float], ...], vocab_size: int | None
) -> TokenResolution:
    return resolve_token_table(tokenizer, token_table, vocab_size)


def resolution_for(
    config: RulesConfig, tokenizer: Any, vocab_size: int | None = None
) -> TokenResolution:
    """Resolved token table for a config and tokenizer, cached (empty when uniform is off)."""
    if not config.uniform:
        return TokenResolution((), (), ())
    try:
        return _cached_resolution(tokenizer, config.token_table, vocab_size)
    except TypeError:  # an unhashable tokenizer: resolve without the cache
        return resolve_token_table(tokenizer, config.token_table, vocab_size)


# ---------------------------------------------------------------------------------------------
# The straightforward (reference) computation


def rule_scores(
    config: RulesConfig,
    resolution: TokenResolution,
    eos_ids: Sequence[int],
    vocab_size: int,
    response_ids: Sequence[int],
    prompt_ids: Sequence[int] = (),
) -> torch.Tensor:
    """The rule scores r [vocab_size] for one sequence, computed from scratch."""
    r = torch.zeros(vocab_size, dtype=torch.float32)
    if config.uniform and resolution.token_ids:
        r[list(resolution.token_ids)] = torch.tensor(resolution.weights, dtype=torch.float32)
    bonus = eos_bonus(config, len(response_ids))
    if bonus:
        for eos in eos_ids:
            r[eos] += bonus
    if config.diversity:
        counted = list(response_ids)
        if config.diversity_scope == "prompt+response":
            counted = list(prompt_ids) + counted
        for token in set(counted):
            r[token] -= config.diversity_penalty
    return r


def combine(logits: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Product of experts, literally: log_softmax(log_softmax(logits) + log_softmax(r))."""
    base = torch.log_softmax(logits.float(), dim=-1)
    return torch.log_softmax(base + torch.log_softmax(r.float(), dim=-1), dim=-1)


@torch.no_grad()
def reference_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    config: RulesConfig,
    max_new_tokens: int,
    *,
    min_new_tokens: int = 0,
    eos_ids: Sequence[int] | None = None,
) -> list[int]:
    """Greedy decoding the study's way: batch 1, no KV cache, whole sequence and r recomputed.

    Returns the generated ids (ending with the EOS id if one was produced). ``min_new_tokens``
    forbids EOS before that many tokens, as ``generate(min_new_tokens=...)`` does.
    """
    eos = list(eos_ids) if eos_ids is not None else model_eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    prompt = [int(t) for t in prompt_ids]
    response: list[int] = []
    resolution: TokenResolution | None = None
    for _ in range(max_new_tokens):
        ids = torch.tensor([prompt + response], dtype=torch.long, device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float().cpu()
        if len(response) < min_new_tokens:
            logits[eos] = -math.inf
        if resolution is None:
            resolution = resolution_for(config, tokenizer, logits.shape[-1])
        r = rule_scores(config, resolution, eos, logits.shape[-1], response, prompt)
        token = int(torch.argmax(combine(logits, r)))
        response.append(token)
        if token in eos:
            break
    return response


def static_scores(config: RulesConfig, resolution: TokenResolution, vocab: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The part of r that never changes: the uniform token shifts [vocab] (zeros when off)."""
    static = torch.zeros(vocab, dtype=torch.float32, device=device)
    pairs = [(i, w) for i, w in zip(resolution.token_ids, resolution.weights, strict=True)
             if i < vocab]
    if config.uniform and pairs:
        index = torch.tensor([i for i, _ in pairs], device=device)
        static[index] = torch.tensor([w for _, w in pairs], device=device)
    return static


# ---------------------------------------------------------------------------------------------
# The batched logits processor


class RulesLogitsProcessor(LogitsProcessor):
    """Adds the rules to the base log-probabilities inside ``model.generate`` (batched, cached).

    ``prompt_length`` is the (left-padded) prompt length of the batch, so the number of response
    tokens is ``input_ids.shape[1] - prompt_length`` for every row. State is a per-row "used"
    mask [batch, vocab] updated with each step's last token; rows that produced an EOS id stop
    updating. If the rows' history changes under it (a new ``generate`` call, beam reordering),
    the state is rebuilt from ``input_ids``. One processor serves one ``generate`` call at a
    time (not thread-safe). Returns log-probabilities; user logits processors
    run before temperature/top-k/top-p warpers in transformers, so sampling draws from the
    combined distribution.
    """

    def __init__(
        self,
        config: RulesConfig,
        tokenizer: Any = None,
        *,
        eos_ids: Sequence[int],
        prompt_length: int,
        prompt_attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        resolution: TokenResolution | None = None,
    ) -> None:
        if resolution is None:
            if config.uniform and tokenizer is None:
                raise ConfigError("rules: a tokenizer (or a resolution) is needed for the table")
            resolution = resolution_for(config, tokenizer)
        if prompt_length < 0:
            raise ConfigError(f"rules: prompt_length must be >= 0, got {prompt_length}")
        if prompt_attention_mask is not None and prompt_attention_mask.shape[-1] != prompt_length:
            raise ConfigError(
                f"rules: prompt_attention_mask has width {prompt_attention_mask.shape[-1]}, "
                f"expected prompt_length {prompt_length}")
        self.config = config
        self.resolution = resolution
        self.eos_ids = [int(e) for e in eos_ids]
        self.prompt_length = int(prompt_length)
        self.prompt_attention_mask = prompt_attention_mask
        self.pad_token_id = pad_token_id
        self._static: torch.Tensor | None = None
        self._eos_index: torch.Tensor | None = None
        self._reset()

    @property
    def token_report(self) -> list[dict[str, Any]]:
        """How each table string was mapped to a token (list of dicts, for the run log)."""
        return self.resolution.report_list()

    def _reset(self) -> None:
        self._used: torch.Tensor | None = None  # [batch, vocab] bool
        self._bias: torch.Tensor | None = None  # [batch, vocab] float: static - penalty*used
        self._finished: torch.Tensor | None = None  # [batch] bool
        self._history: torch.Tensor | None = None  # [batch, seen] the ids consumed so far
        self._buffer: torch.Tensor | None = None  # [batch, vocab] work space
        self._seen = 0  # sequence length consumed so far

    def _static_scores(self, vocab: int, device: torch.device) -> torch.Tensor:
        if self._static is None or self._static.shape[0] != vocab or self._static.device != device:
            self._static = static_scores(self.config, self.resolution, vocab, device)
            self._eos_index = torch.tensor(
                [e for e in self.eos_ids if e < vocab], dtype=torch.long, device=device)
        return self._static

    def _consume(self, tokens: torch.Tensor) -> None:
        """Mark one column of new tokens [batch] as used (rows already finished are skipped)."""
        tokens = tokens.unsqueeze(1)
        active = ~self._finished.unsqueeze(1)
        first = ~self._used.gather(1, tokens) & active
        self._used.scatter_(1, tokens, self._used.gather(1, tokens) | first)
        self._bias.scatter_add_(1, tokens, first.float() * -self.config.diversity_penalty)
        self._finished |= torch.isin(tokens.squeeze(1), self._eos_index)

    def _rebuild(self, input_ids: torch.Tensor, static: torch.Tensor) -> None:
        batch, cur_len = input_ids.shape
        vocab, device = static.shape[0], input_ids.device
        self._finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self._used = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        if self.config.diversity and self.config.diversity_scope == "prompt+response":
            prompt = input_ids[:, : self.prompt_length]
            mask = self.prompt_attention_mask
            if mask is not None:
                keep = mask.to(device=device, dtype=torch.bool)
                if keep.shape[0] != batch:  # beams or several samples per prompt
                    keep = keep.repeat_interleave(batch // keep.shape[0], dim=0)
            elif self.pad_token_id is not None:
                keep = prompt != self.pad_token_id
            else:
                keep = torch.ones_like(prompt, dtype=torch.bool)
            counts = torch.zeros(batch, vocab, dtype=torch.int32, device=device)
            counts.scatter_add_(1, prompt, keep.to(torch.int32))  # duplicates add up
            self._used = counts > 0
        self._bias = static.unsqueeze(0) - self.config.diversity_penalty * self._used.float()
        self._seen = self.prompt_length
        for pos in range(self.prompt_length, cur_len):
            self._consume(input_ids[:, pos])
        self._seen = cur_len
        self._history = input_ids.clone()

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Combined log-probabilities for the next token of every row."""
        batch, cur_len = input_ids.shape
        if cur_len < self.prompt_length:
            raise ConfigError(
                f"rules: sequence length {cur_len} is shorter than prompt_length "
                f"{self.prompt_length}")
        static = self._static_scores(scores.shape[-1], scores.device)
        if (self._buffer is None or self._buffer.shape != scores.shape
                or self._buffer.is_inference() != torch.is_inference_mode_enabled()):
            # a reused work buffer: a fresh [batch, vocab] allocation costs as much as the add
            self._buffer = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        out = self._buffer
        if self.config.diversity:
            stale = (
                self._used is None
                or self._used.shape != (batch, static.shape[0])
                or cur_len <= self._seen
                or cur_len == self.prompt_length
                or not torch.equal(input_ids[:, : self._seen], self._history)
            )  # the history check is O(batch·length), far below the O(batch·vocab) step
            if stale:
                self._rebuild(input_ids, static)
            else:
                for pos in range(self._seen, cur_len):
                    self._consume(input_ids[:, pos])
                self._seen = cur_len
                self._history = input_ids.clone()
            torch.add(scores, self._bias, out=out)
        else:
            torch.add(scores, static, out=out)
        bonus = eos_bonus(self.config, cur_len - self.prompt_length)
        if bonus and self._eos_index.numel():
            out[:, self._eos_index] += bonus
        return torch.log_softmax(out, dim=-1)  # a new tensor: callers may keep it


def build_processor(
    config: RulesConfig,
    tokenizer: Any,
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    eos_ids: Sequence[int] | None = None,
) -> RulesLogitsProcessor:
    """A processor for one left-padded batch about to go through ``model.generate``."""
    vocab = model.get_output_embeddings().weight.shape[0] if model is not None else None
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None and model is not None:
        pad = getattr(model.generation_config, "pad_token_id", None)
    return RulesLogitsProcessor(
        config,
        tokenizer,
        eos_ids=list(eos_ids) if eos_ids is not None else model_eos_ids(model, tokenizer),
        prompt_length=int(input_ids.shape[1]),
        prompt_attention_mask=attention_mask,
        pad_token_id=pad,
        resolution=resolution_for(config, tokenizer, vocab),
    )


class _WorkSpace:
    """Two [rows, vocab] buffers a scorer reuses every step: a fresh one costs 5x the add."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self._sum = torch.empty((0, vocab), dtype=torch.float32)
        self._out = torch.empty((0, vocab), dtype=torch.float32)

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, result) views of `rows` rows, regrown when too small or made outside the
        current inference mode."""
        fresh = self._sum.is_inference() != torch.is_inference_mode_enabled()
        if self._sum.shape[0] < rows or fresh:
            self._sum = torch.empty((rows, self.vocab), dtype=torch.float32)
            self._out = torch.empty((rows, self.vocab), dtype=torch.float32)
        return self._sum[:rows], self._out[:rows]


def _add_eos_bonus(out: torch.Tensor, eos_index: torch.Tensor, bonus: list[float]) -> None:
    """Each row's EOS bonus onto its EOS columns (nothing when every bonus is 0)."""
    if any(bonus) and eos_index.numel():
        out[:, eos_index] += torch.tensor(bonus, dtype=out.dtype).unsqueeze(1)


class RulesRows:
    """The rules for the slot decoder: the processor's state held per row, so that a row can
    leave (`keep`) or join (`add`) between steps. Same arithmetic as `RulesLogitsProcessor`:
    logits + (static - penalty·used) + the EOS bonus for each row's own length, renormalised.
    """

    def __init__(self, config: RulesConfig, resolution: TokenResolution,
                 eos_ids: Sequence[int], vocab: int) -> None:
        self.config = config
        self.vocab = vocab
        self._static = static_scores(config, resolution, vocab)
        self._eos_index = torch.tensor([e for e in eos_ids if e < vocab], dtype=torch.long)
        self._used = torch.zeros((0, vocab), dtype=torch.bool)
        self._bias = torch.zeros((0, vocab), dtype=torch.float32)
        self._n: list[int] = []  # response tokens so far, per row
        self._work = _WorkSpace(vocab)

    def add(self, prompts: Sequence[Sequence[int]], indices: Sequence[int] = ()) -> None:
        """Rows for new prompts, after the live ones (indices: unused, see RowScorer)."""
        used = self.used_at_start(prompts)
        bias = self._static.unsqueeze(0) - self.config.diversity_penalty * used.float()
        self._used = torch.cat([self._used, used])
        self._bias = torch.cat([self._bias, bias])
        self._n += [0] * len(prompts)

    def used_at_start(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """New rows' used-token mask: the prompt's tokens when the penalty covers them."""
        used = torch.zeros((len(prompts), self.vocab), dtype=torch.bool)
        if self.config.diversity and self.config.diversity_scope == "prompt+response":
            for row, prompt in enumerate(prompts):
                used[row, [t for t in prompt if t < self.vocab]] = True
        return used

    def keep(self, index: torch.Tensor) -> None:
        """Keep these rows, in this order."""
        self._used, self._bias = take_rows(self._used, index), take_rows(self._bias, index)
        self._n = [self._n[i] for i in index.tolist()]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Combined log-probabilities for each live row's next token (valid until the next
        call: the result lives in a reused buffer)."""
        out, result = self._work.take(logits.shape[0])
        torch.add(logits, self._bias if self.config.diversity else self._static, out=out)
        _add_eos_bonus(out, self._eos_index, [eos_bonus(self.config, n) for n in self._n])
        return torch.log_softmax(out, dim=-1, out=result)

    def consume(self, tokens: torch.Tensor) -> None:
        """Each live row's chosen token: mark it used (a first use costs the penalty once)."""
        column = tokens.unsqueeze(1)
        first = ~self._used.gather(1, column)
        self._used.scatter_(1, column, True)
        self._bias.scatter_add_(1, column, first.float() * -self.config.diversity_penalty)
        self._n = [n + 1 for n in self._n]


class MixedRows:
    """The slot decoder's scorer for a batch that mixes variants of one model: each row is
    scored by its own variant's rules (`RulesRows`) or, for a variant without rules, left as the
    model's logits.

    Row by row the arithmetic is the variant's own: logits + its bias row (static shifts, minus
    its penalty on used tokens), its EOS bonus for the row's length, renormalised. A rule a
    variant leaves out adds zeros (the penalty's scatter adds -0.0, the bonus 0.0), which
    changes no value, so each row gets the scores that variant would give it alone.
    """

    def __init__(self, members: Sequence[RulesRows | None], owners: Sequence[int],
                 vocab: int) -> None:
        """members: each variant's rules (None: none); owners[i]: prompt i's variant."""
        self.members, self.owners, self.vocab = list(members), list(owners), vocab
        eos = {tuple(m._eos_index.tolist()) for m in self.members if m is not None}
        if len(eos) > 1:
            raise ValueError("variants decoded in one batch must share their EOS tokens")
        self._eos_index = torch.tensor(next(iter(eos), ()), dtype=torch.long)
        self._used = torch.zeros((0, vocab), dtype=torch.bool)
        self._bias = torch.zeros((0, vocab), dtype=torch.float32)
        self._penalty = torch.zeros((0, 1), dtype=torch.float32)  # -penalty on a first use
        self._plain = torch.zeros(0, dtype=torch.bool)  # rows whose variant has no rules
        self._who: list[int] = []
        self._n: list[int] = []
        self._work = _WorkSpace(vocab)

    def add(self, prompts: Sequence[Sequence[int]], indices: Sequence[int]) -> None:
        """Rows for new prompts (indices: their places in the prompt list, naming the variant)."""
        if not prompts:
            return
        used = torch.zeros((len(prompts), self.vocab), dtype=torch.bool)
        bias = torch.zeros((len(prompts), self.vocab), dtype=torch.float32)
        penalty, plain = [], []
        for row, (prompt, index) in enumerate(zip(prompts, indices, strict=True)):
            who = self.owners[index]
            member = self.members[who]
            self._who.append(who)
            plain.append(member is None)
            config = None if member is None else member.config
            penalty.append(-config.diversity_penalty if config and config.diversity else 0.0)
            if member is None:
                continue
            used[row] = member.used_at_start([prompt])[0]
            if config.diversity:
                bias[row] = member._static - config.diversity_penalty * used[row].float()
            else:  # RulesRows adds its static row alone
                bias[row] = member._static
        self._used = torch.cat([self._used, used])
        self._bias = torch.cat([self._bias, bias])
        self._penalty = torch.cat([self._penalty, torch.tensor(penalty).unsqueeze(1)])
        self._plain = torch.cat([self._plain, torch.tensor(plain, dtype=torch.bool)])
        self._n += [0] * len(prompts)

    def keep(self, index: torch.Tensor) -> None:
        """Keep these rows, in this order."""
        self._used, self._bias = take_rows(self._used, index), take_rows(self._bias, index)
        self._penalty, self._plain = self._penalty[index], self._plain[index]
        self._who = [self._who[i] for i in index.tolist()]
        self._n = [self._n[i] for i in index.tolist()]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Each live row's scores (valid until the next call: a reused buffer)."""
        out, result = self._work.take(logits.shape[0])
        torch.add(logits, self._bias, out=out)
        _add_eos_bonus(out, self._eos_index, [
            0.0 if self.members[w] is None else eos_bonus(self.members[w].config, n)
            for w, n in zip(self._who, self._n, strict=True)])
        torch.log_softmax(out, dim=-1, out=result)
        if bool(self._plain.any()):
            plain = self._plain.nonzero().flatten()
            result[plain] = logits[plain]
        return result

    def consume(self, tokens: torch.Tensor) -> None:
        """Each live row's chosen token: mark it used (a first use costs its penalty once)."""
        column = tokens.unsqueeze(1)
        first = ~self._used.gather(1, column)
        self._used.scatter_(1, column, True)
        self._bias.scatter_add_(1, column, first.float() * self._penalty)
        self._n = [n + 1 for n in self._n]


def build_rows(config: RulesConfig, tokenizer: Any, model: Any,
               eos_ids: Sequence[int]) -> RulesRows:
    """The per-row rules state for one model and tokenizer (see `RulesRows`)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return RulesRows(config, resolution_for(config, tokenizer, vocab), eos_ids, vocab)
