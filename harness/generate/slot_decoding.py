"""Continuous batching for the transformers backend: a row leaves the batch the step it ends.

``model.generate`` keeps every row until the longest is done, and under the rules most rows end
on EOS long before the cap. Here each step runs transformers' own forward over the live rows
only (a DynamicCache, left padding, explicit position ids); a row that ends on EOS or at the cap
is dropped from the cache at once, and when enough slots are free the next prompts are
prefilled together and joined to the running cache (the shorter side padded on the left).
Columns that are padding in every row are trimmed; per-row logits processing (the rules) keeps
its state in step with the rows through `RowScorer`.

The work stays close to the real tokens: prompts of like length are prefilled together
(`prefill_groups`); each cache layer writes a step's keys and values into free room at the end
of its buffer (`ROOM`) instead of copying the cache; variants of one model may share their
prompts' prefill (`PrefillStore`); and the tokens every prompt admitted together starts with (a
chat template's system prompt) are prefilled once and copied to each row (`shared_prefix`).
What each part gains: README.md, Speed.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

#: The cost of prefilling one prompt token relative to decoding one token, for progress only
#: (measured: README.md, Speed).
PREFILL_WEIGHT = 1 / 3


#: The decoder's name and version as recorded in cache keys: prompts admitted together share
#: their common prefix's prefill. ``HARNESS_SHARED_PREFIX=off`` turns that off, with the keys
#: made before it.
SHARED_PREFIX = "shared-prefix-1"
#: Prompt tokens a shared prefix must save (its length times the other rows) to be worth its own
#: 1-row forward pass (timings: README.md, Speed).
MIN_SHARED_SAVING = 32


def shares_prefixes() -> bool:
    """Whether the decoder prefills a common prefix once (``HARNESS_SHARED_PREFIX`` not off)."""
    return os.environ.get("HARNESS_SHARED_PREFIX", "").strip().lower() not in ("off", "0", "no")


def shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens these prompts' prefill shares: their common prefix, leaving each
    at least one token of its own (the logits come from a row's last token), or 0 when sharing
    saves fewer than MIN_SHARED_SAVING tokens."""
    if len(rows) < 2:
        return 0
    first, n = rows[0], min(len(r) for r in rows) - 1
    p = 0
    while p < n and all(r[p] == first[p] for r in rows):
        p += 1
    return p if p * (len(rows) - 1) >= MIN_SHARED_SAVING else 0


def _prefix_cache(model: Any, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values) for one row holding the prefix at positions 0.."""
    cache = _new_cache(model, grow=False)
    model(input_ids=torch.tensor([list(prefix)]), position_ids=torch.arange(len(prefix))[None],
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass(frozen=True)
class Finished:
    """One ended response: the prompt's index, its tokens (EOS left out) and how it ended."""

    index: int
    tokens: list[int]
    finish_reason: str  # "eos" or "length"
    seconds: float  # from the prefill that admitted it to its last token


class RowScorer(Protocol):
    """Per-row logits processing whose state follows the live rows (the rules' used-token mask)."""

    def add(self, prompts: Sequence[Sequence[int]], indices: Sequence[int]) -> None:
        """Append rows for new prompts (after the live ones); indices: their places in the
        decoder's prompt list."""

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


#: Free columns a layer's key and value buffers keep after their last one. A decoding step writes
#: its column into that room instead of copying the whole cache with torch.cat, a copy that grows
#: with the length (its cost: README.md, Speed).
ROOM = 64


def _capacity(t: torch.Tensor) -> int:
    """Columns (dim 2) from t's first to the end of the buffer it views: t.shape[2] if no room."""
    b, h, n, d = t.shape
    s0, s1, s2, s3 = t.stride()
    if s3 != 1 or s2 != d or b == 0 or h == 0 or d == 0 or s0 % (h * d):
        return n
    cols = s0 // (h * d)
    offset = t.storage_offset()
    if (h > 1 and s1 != cols * d) or offset % d or offset >= cols * d:
        return n
    if t.untyped_storage().nbytes() < (b * h * cols * d) * t.element_size():
        return n
    return cols - offset // d


def _extend(t: torch.Tensor, columns: int) -> torch.Tensor:
    """t's view widened to `columns` columns of its buffer (the caller checked the capacity)."""
    b, h, _, d = t.shape
    return t.as_strided((b, h, columns, d), t.stride(), t.storage_offset())


def _buffer(rows: int, like: torch.Tensor, width: int, room: int) -> torch.Tensor:
    """An uninitialised [rows, heads, width + room, dim] buffer for like's dtype and heads."""
    return like.new_empty((rows, like.shape[1], width + room, like.shape[3]))


def _append(t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """t with new's columns after it, written into t's buffer when it has room (else a new one)."""
    if t.dim() != 4 or t.shape[2] == 0:
        buf = _buffer(new.shape[0], new, new.shape[2], ROOM)
        buf[:, :, :new.shape[2]] = new
        return buf[:, :, :new.shape[2]]
    n, k = t.shape[2], new.shape[2]
    if _capacity(t) < n + k:
        buf = _buffer(t.shape[0], t, n + k, ROOM)
        buf[:, :, :n] = t
        t = buf[:, :, :n]
    out = _extend(t, n + k)
    out[:, :, n:] = new
    return out


def _growing(layer: Any) -> None:
    """Make a cache layer append in place (the slot decoder's own caches only)."""
    sliding = hasattr(layer, "cumulative_length")

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # a DynamicLayer's update, or a sliding layer's before its window fills (the decoder
        # only grows sliding layers whose window its rows can never reach)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if sliding:
            layer.cumulative_length += key_states.shape[-2]
        layer.keys = _append(layer.keys, key_states)
        layer.values = _append(layer.values, value_states)
        return layer.keys, layer.values

    layer.update = update


#: Bytes of prefilled prompt groups a PrefillStore keeps; the oldest go first.
STORE_BYTES = 2 << 30


class PrefillStore:
    """Prefilled prompt groups of one loaded model, for the variants that share its weights.

    Variants of one model that differ only in how they choose tokens (the rules, decoding)
    compute the same keys, values and last logits for the same prompts, so one prefill serves
    them all (what it saves: README.md, Speed). A group is found by its exact prompts (and pad
    id), so a variant gets, bit for bit, the prefill it would have computed itself. Stored
    tensors are copies that nothing writes to.
    """

    def __init__(self, max_bytes: int = STORE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self._items: OrderedDict[Any, tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                            torch.Tensor, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Any) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None:
        """The group's per-layer (keys, values) and last logits, or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self.hits += 1
        return item[0], item[1]

    def put(self, key: Any, cache: Any, logits: torch.Tensor) -> None:
        """Keep copies of a freshly prefilled group's cache and last logits."""
        size = logits.nbytes + sum(layer.keys.nbytes + layer.values.nbytes
                                   for layer in cache.layers)
        if size > self.max_bytes or key in self._items:
            return
        while self._bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old[2]
        kv = [(layer.keys.clone(memory_format=torch.contiguous_format),
               layer.values.clone(memory_format=torch.contiguous_format))
              for layer in cache.layers]
        self._items[key] = (kv, logits.clone(), size)
        self._bytes += size


def _stored_cache(model: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], grow: bool,
                  width: int) -> Any:
    """A cache holding given keys and values: a stored group's, or copies of a shared prefix's
    (appends copy them out first).

    width: the group's padded prompt length (a sliding layer may keep fewer columns).
    """
    cache = _new_cache(model, grow)
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = width
    return cache


def _new_cache(model: Any, grow: bool) -> Any:
    """A DynamicCache for the model; grow: its layers append in place (`_growing`)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    if grow:
        for layer in cache.layers:
            _growing(layer)
    return cache


def _join(parts: Sequence[tuple[Any, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
    """One cache and mask holding every part's rows in order, the narrower padded on the left.

    The first part's cache object is reused; each layer's keys and values are copied once into
    a buffer with room to grow.
    """
    if len(parts) == 1:
        return parts[0]
    width = max(m.shape[1] for _, m in parts)
    cache = parts[0][0]
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            tensors = [getattr(c.layers[i], name) for c, _ in parts]
            buf = _buffer(sum(t.shape[0] for t in tensors), tensors[0], width, ROOM)
            start = 0
            for t in tensors:
                rows, pad = slice(start, start + t.shape[0]), width - t.shape[2]
                buf[rows, :, :pad] = 0  # masked keys must still be finite
                buf[rows, :, pad:width] = t
                start += t.shape[0]
            setattr(layer, name, buf[:, :, :width])
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = width
    return cache, torch.cat([_pad_left(m, width, 1) for _, m in parts])


def prefill_groups(lengths: Sequence[int], slack: float = 0.1) -> list[list[int]]:
    """Positions of prompts (sorted longest first) in groups prefilled together.

    A group grows while its left-padded size stays within `slack` of its real tokens, so that
    little of a prefill is padding (README.md, Speed).
    """
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for pos in sorted(range(len(lengths)), key=lambda p: -lengths[p]):
        n = lengths[pos]
        if group and (len(group) + 1) * lengths[group[0]] > (1 + slack) * (real + n):
            groups.append(group)
            group, real = [], 0
        group.append(pos)
        real += n
    if group:
        groups.append(group)
    return groups


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


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


def fill_holes(done: torch.Tensor) -> torch.Tensor:
    """The rows to keep when `done` rows end, ordered so that the fewest rows move.

    The live rows keep their places, except that each ended row's place among the first
    (live count) is taken by a live row from beyond them: keeping a 72-row batch that loses one
    row moves one row, where keeping the live rows in order moved every row after it.
    """
    live = (~done).nonzero().flatten()
    n = live.numel()
    keep = torch.arange(n)
    keep[done[:n].nonzero().flatten()] = live[live >= n]
    return keep


def take_rows(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """t[keep], written into t's own first rows (t's buffer changes): only moved rows are copied.

    Meant for `fill_holes`'s order, where few rows move; a cache buffer keeps its room.
    """
    n = keep.numel()
    moved = (keep != torch.arange(n)).nonzero().flatten()
    if moved.numel():
        t[moved] = t[keep[moved]]  # the right side is gathered first, so sources stay intact
    return t[:n]


def _copy_rows(cache: Any, index: torch.Tensor) -> None:
    """Every layer's rows in this order, copied (a row may repeat; the tensors are new)."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)


def _select(cache: Any, keep: torch.Tensor) -> None:
    """Keep these rows of every layer, with the room their buffers had.

    The decoder's own buffers (those with room) are rearranged in place: under the rules rows
    end on most steps, and copying the cache each time is slow (README.md, Speed). A stored
    prefill's tensors (no room; they must not change) and a cache the model grew itself are
    copied.
    """
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            n, capacity = t.shape[2], _capacity(t)
            if capacity > n:
                setattr(layer, name, take_rows(t, keep))
            else:
                setattr(layer, name, _extend(t, capacity).index_select(0, keep)[:, :, :n])


def greedy(scores: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Each row's argmax (the first index of its maximum), faster than torch's on wide rows.

    torch's argmax over wide rows is much slower than amax (README.md, Speed): so take each
    chunk's max, find the first chunk that holds the row's maximum, and look in it only.
    """
    rows, width = scores.shape
    if width % chunk or width <= chunk:
        return scores.argmax(dim=-1)
    chunks = scores.view(rows, width // chunk, chunk)
    best = chunks.amax(dim=-1)
    if bool(best.isnan().any()):  # torch's argmax takes a NaN as the maximum
        return scores.argmax(dim=-1)
    first = (best == best.amax(dim=-1, keepdim=True)).to(torch.uint8).argmax(dim=-1)
    return first * chunk + chunks[torch.arange(rows), first].argmax(dim=-1)


def _chooser(do_sample: bool, temperature: float | None, top_p: float | None, seed: int
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Greedy argmax, or transformers' temperature and top-p warpers then a seeded draw."""
    if not do_sample:
        return greedy
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
           admit_at: int | None = None, prefills: PrefillStore | None = None,
           share_prefix: bool | None = None) -> Iterator[Finished]:
    """Yield each prompt's response as it ends, keeping up to `slots` rows running.

    Prompts are admitted longest first; new ones join when `admit_at` slots are free (default a
    quarter of the slots) or nothing runs. force_length bans EOS until the cap (benchmarks).
    on_progress(items) hears each step how far the unfinished work has got (a row that ends
    this step counts 1 until it is yielded, a running row its share of its prompt and cap).
    prefills: groups already prefilled by an earlier call on the same model are reused. A
    prompt given several times (one per variant, see `generation.generate_together`) is
    prefilled once per admission and its row copied. share_prefix (default: `shares_prefixes`):
    the prompts admitted together prefill their common prefix once (`shared_prefix`).
    """
    slots = max(1, slots)
    admit_at = max(1, slots // 4) if admit_at is None else max(1, admit_at)
    queue = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    if not queue or max_new_tokens < 1:
        for i in queue:
            yield Finished(i, [], "length", 0.0)
        return
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long)
    choose = _chooser(do_sample, temperature, top_p, seed)
    window = _window(_new_cache(model, grow=False))
    longest = max(len(p) for p in prompts) + max_new_tokens
    joinable = window is None or longest < window - 1  # a sliding layer never drops a column
    share_prefix = shares_prefixes() if share_prefix is None else share_prefix

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
                taken = [queue.popleft() for _ in range(min(free, len(queue)))]
                # one prompt given several times (one instruction for several variants of the
                # model, in one batch) is prefilled once and its row copied
                copies: dict[tuple[int, ...], list[int]] = {}
                for i in taken:
                    copies.setdefault(tuple(prompts[i]), []).append(i)
                unique = [c[0] for c in copies.values()]
                # the admitted prompts' common prefix is prefilled once (when first needed) and
                # each group prefills its rows' own tokens after a copy of it: a row reads
                # [prefix, padding, its tokens], its positions counting on from the prefix
                shared = (shared_prefix([prompts[i] for i in unique])
                          if share_prefix and joinable else 0)
                prefix_kv = None
                # prompts of like length are prefilled together, so that padding costs little
                # compute; a cache whose window its rows can reach is prefilled as one batch
                groups = (prefill_groups([len(prompts[i]) - shared for i in unique]) if joinable
                          else [list(range(len(unique)))])
                unique = [unique[p] for g in groups for p in g]
                joined = [(cache, mask)] if rows else []
                start, take = 0, []
                for g in groups:
                    firsts = unique[start:start + len(g)]
                    group = [prompts[i] for i in firsts]
                    start += len(g)
                    ids, own = _left_pad([p[shared:] for p in group], pad_id)
                    new_mask = torch.cat([own.new_ones((len(group), shared)), own], dim=1)
                    key = (None if prefills is None
                           else (pad_id, shared, tuple(tuple(int(t) for t in p) for p in group)))
                    hit = prefills.get(key) if prefills is not None else None
                    if hit is not None:
                        new_cache = _stored_cache(model, hit[0], joinable, new_mask.shape[1])
                        parts.append(hit[1].clone())  # the choice may write into its scores
                    else:
                        new_pos = shared + (own.cumsum(-1) - 1).masked_fill(own == 0, 0)
                        if shared:
                            if prefix_kv is None:
                                prefix_kv = _prefix_cache(model, group[0][:shared])
                            new_cache = _stored_cache(
                                model, [(k.expand(len(group), -1, -1, -1),
                                         v.expand(len(group), -1, -1, -1)) for k, v in prefix_kv],
                                joinable, shared)
                        else:
                            new_cache = _new_cache(model, grow=joinable)
                        out = model(input_ids=ids, attention_mask=new_mask,
                                    position_ids=new_pos, past_key_values=new_cache,
                                    use_cache=True, logits_to_keep=1)
                        parts.append(out.logits[:, -1].float())
                        if prefills is not None:
                            prefills.put(key, new_cache, parts[-1])
                    sets = [copies[tuple(p)] for p in group]
                    take += [i for same in sets for i in same]
                    if len(sets) < sum(map(len, sets)):
                        expand = torch.tensor([j for j, same in enumerate(sets) for _ in same])
                        _copy_rows(new_cache, expand)
                        new_mask, parts[-1] = new_mask[expand], parts[-1][expand]
                    joined.append((new_cache, new_mask))
                    position = torch.cat([position, new_mask.sum(-1)])
                cache, mask = _join(joined)
                now = time.perf_counter()
                rows += take
                made += [[] for _ in take]
                started += [now] * len(take)
                if scorer is not None:
                    scorer.add([prompts[i] for i in take], take)
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
                keep = fill_holes(done)
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
            pending = tokens[keep] if bool(done.any()) else tokens
