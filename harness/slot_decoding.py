"""Continuous batching for the transformers backend: a row leaves the batch the step it ends.

``model.generate`` keeps every row of a batch until the longest is done. Under the rules most
rows end on EOS long before the cap, so 31% of a 32 x 128 gemma+rules batch's row-steps were
spent on finished rows. Here a batch has a number of slots: each step runs transformers' own
forward over the live rows only (a DynamicCache, left padding, explicit position ids); a row
that ends on EOS or at the cap is dropped from the cache at once, and when enough slots are free
the next prompts are prefilled together and joined to the running cache (the shorter side is
padded on the left). Columns that are padding in every row are trimmed. Per-row logits
processing (the rules) keeps its state in step with the rows through `RowScorer`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

#: The cost of prefilling one prompt token relative to decoding one token, for progress only
#: (72 gemma-3-270m prompts on 2 CPU cores: prefill 3 ms a token, a decoding step 9 ms a row).
PREFILL_WEIGHT = 1 / 3


@dataclass(frozen=True)
class Finished:
    """One ended response: the prompt's index, its tokens (EOS left out) and how it ended."""

    index: int
    tokens: list[int]
    finish_reason: str  # "eos" or "length"
    seconds: float  # from the prefill that admitted it to its last token


class RowScorer(Protocol):
    """Per-row logits processing whose state follows the live rows (the rules' used-token mask)."""

    def add(self, prompts: Sequence[Sequence[int]]) -> None:
        """Append rows for new prompts (after the live ones)."""

    def keep(self, index: torch.Tensor) -> None:
        """Keep only these rows, in this order."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores to choose the next token from, one row per live row."""

    def consume(self, tokens: torch.Tensor) -> None:
        """Each live row's chosen token."""


def supported(model: Any) -> bool:
    """Whether the model's cache is made of plain layers that this loop may slice and pad."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - an exotic config: use model.generate
        return False
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


def _window(cache: Any) -> int | None:
    windows = [layer.sliding_window for layer in cache.layers
               if getattr(layer, "is_sliding", False)]
    return min(windows) if windows else None


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _join(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor
          ) -> torch.Tensor:
    """Append new_cache's rows to cache (in place), padding the narrower one on the left."""
    width = max(mask.shape[1], new_mask.shape[1])
    for layer, new in zip(cache.layers, new_cache.layers, strict=True):
        layer.keys = torch.cat([_pad_left(layer.keys, width, 2), _pad_left(new.keys, width, 2)])
        layer.values = torch.cat([_pad_left(layer.values, width, 2),
                                  _pad_left(new.values, width, 2)])
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = width
    return torch.cat([_pad_left(mask, width, 1), _pad_left(new_mask, width, 1)])


def _trim(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row."""
    first = int(mask.argmax(dim=1).min())
    if first == 0:
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = layer.keys.shape[2]
    return mask[:, first:]


def _select(cache: Any, keep: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, keep)
        layer.values = layer.values.index_select(0, keep)


def _chooser(do_sample: bool, temperature: float | None, top_p: float | None, seed: int
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Greedy argmax, or transformers' temperature and top-p warpers then a seeded draw."""
    if not do_sample:
        return lambda scores: scores.argmax(dim=-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = []
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    gen = torch.Generator().manual_seed(seed)

    def draw(scores: torch.Tensor) -> torch.Tensor:
        for w in warpers:
            scores = w(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)

    return draw


def decode(model: Any, prompts: Sequence[Sequence[int]], *, slots: int, max_new_tokens: int,
           eos_ids: Sequence[int], pad_id: int, do_sample: bool = False,
           temperature: float | None = None, top_p: float | None = None, seed: int = 0,
           force_length: bool = False, scorer: RowScorer | None = None,
           on_progress: Callable[[float], None] | None = None,
           admit_at: int | None = None) -> Iterator[Finished]:
    """Yield each prompt's response as it ends, keeping up to `slots` rows running.

    Prompts are admitted longest first; new ones join when `admit_at` slots are free (default a
    quarter of the slots) or nothing runs. force_length bans EOS until the cap (benchmarks).
    on_progress(items) hears each step how far the unfinished work has got (a row that ends
    this step counts 1 until it is yielded, a running row its share of its prompt and cap).
    """
    from transformers.cache_utils import DynamicCache

    slots = max(1, slots)
    admit_at = max(1, slots // 4) if admit_at is None else max(1, admit_at)
    queue = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    if not queue or max_new_tokens < 1:
        for i in queue:
            yield Finished(i, [], "length", 0.0)
        return
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long)
    choose = _chooser(do_sample, temperature, top_p, seed)
    window = _window(DynamicCache(config=model.config))
    longest = max(len(p) for p in prompts) + max_new_tokens
    joinable = window is None or longest < window - 1  # a sliding layer never drops a column

    rows: list[int] = []  # the prompt index of each live row
    made: list[list[int]] = []
    started: list[float] = []
    cache: Any = None
    mask = torch.zeros((0, 0), dtype=torch.long)
    position = torch.zeros(0, dtype=torch.long)
    pending = torch.zeros(0, dtype=torch.long)
    with torch.inference_mode():
        while rows or queue:
            parts = []
            if rows:
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                out = model(input_ids=pending[:, None], attention_mask=mask,
                            position_ids=position[:, None], past_key_values=cache,
                            use_cache=True)
                parts.append(out.logits[:, -1].float())
                position = position + 1
            free = slots - len(rows)
            if queue and (not rows or (joinable and free >= min(admit_at, len(queue)))):
                take = [queue.popleft() for _ in range(min(free, len(queue)))]
                ids, new_mask = _left_pad([prompts[i] for i in take], pad_id)
                new_pos = (new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
                new_cache = DynamicCache(config=model.config)
                out = model(input_ids=ids, attention_mask=new_mask, position_ids=new_pos,
                            past_key_values=new_cache, use_cache=True, logits_to_keep=1)
                parts.append(out.logits[:, -1].float())
                if rows:
                    mask = _join(cache, mask, new_cache, new_mask)
                else:
                    cache, mask = new_cache, new_mask
                position = torch.cat([position, new_mask.sum(-1)])
                now = time.perf_counter()
                rows += take
                made += [[] for _ in take]
                started += [now] * len(take)
                if scorer is not None:
                    scorer.add([prompts[i] for i in take])
            logits = torch.cat(parts) if len(parts) > 1 else parts[0]
            scores = scorer(logits) if scorer is not None else logits
            if force_length:
                scores[:, eos] = -float("inf")
            tokens = choose(scores)
            if scorer is not None:
                scorer.consume(tokens)
            ended = torch.isin(tokens, eos)
            for r, t in enumerate(tokens.tolist()):
                if not ended[r]:
                    made[r].append(t)
            lengths = torch.tensor([len(m) for m in made])
            done = ended | (lengths >= max_new_tokens)
            if on_progress is not None:
                # a row's work: its prompt (at PREFILL_WEIGHT a token) and then the cap; the
                # prefill counts as soon as it is done, so the first ETA is not 20x too long
                pre = PREFILL_WEIGHT * torch.tensor([len(prompts[i]) for i in rows],
                                                    dtype=torch.float32)
                share = ((pre + lengths.clamp(max=max_new_tokens)) / (pre + max_new_tokens))
                share = share[~done].sum()
                on_progress(float(done.sum()) + float(share))
            now = time.perf_counter()
            for r in done.nonzero().flatten().tolist():
                yield Finished(rows[r], made[r], "eos" if ended[r] else "length",
                               round(now - started[r], 3))
            if bool(done.any()):
                keep = (~done).nonzero().flatten()
                rows = [rows[r] for r in keep.tolist()]
                made = [made[r] for r in keep.tolist()]
                started = [started[r] for r in keep.tolist()]
                mask, position = mask[keep], position[keep]
                if scorer is not None:
                    scorer.keep(keep)
                if not rows:
                    cache = None
                else:
                    _select(cache, keep)
                    if joinable:
                        mask = _trim(cache, mask)
            pending = tokens[~done]
