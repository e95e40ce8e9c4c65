"""Tests of the response-ranking task and of our variants behind lm-eval's model interface."""

import json
import time

import pytest
import torch
from tiny import write_registry

from harness.core.errors import ConfigError, DataError, HarnessError
from harness.generate import lm_eval as lm_eval_model
from harness.generate.backends import template_prompt as format_prompt
from harness.generate.lm_eval import (
    HarnessLM,
    loglikelihoods,
    make_lm,
    rule_score_matrix,
    rules_logprobs,
)
from harness.generate.rules import combine, reference_generate, resolution_for, rule_scores
from harness.generate.transformers import encode_prompt, load_model, load_tokenizer
from harness.models.registry import load_registry
from harness.models.rules_config import RulesConfig
from harness.tasks.ranking import (
    RankingOptions,
    RankItem,
    analyse,
    build_items,
    load_pool,
    parse_options,
    rank,
    score_requests,
)

#: Log-likelihood sums are float32 on CPU; a padded batch changes the matmul shapes, so sums
#: over ~100 tokens may differ in the last bits. Agreement is required to this absolute value.
ATOL = 1e-4

EXTRA = '''
[models."tiny-rules"]
base = "tiny-base"
rules = { ramp = 4 }

[models."tiny-rules-prompt"]
base = "tiny-ref"
rules = { ramp = 6, eos_hold = false, diversity_scope = "prompt+response" }
'''

PAIRS = [
    ("Give three tips for staying healthy.", "Eat well, sleep enough and move every day."),
    ("Write a short poem about the sea.", "The waves roll in and out under the moon."),
    ("What is two plus two?", "Two plus two is four."),
    ("List some fruits.", "apple, pear, plum, apple, pear<eos>"),
    ("Explain how a bicycle works.", "Pedals turn a chain that turns the back wheel, and the "
     "wheel turns the bicycle forward; the rider steers with the handlebars."),
    ("", "An empty context is conditioned on the BOS (here EOS) token."),
]


@pytest.fixture(scope="module")
def tiny(tiny_dirs, tmp_path_factory):
    """The tiny registry (plain, chat and two rules variants), its specs and tokenizers."""
    path = write_registry(tmp_path_factory.mktemp("ranking") / "models.toml", *tiny_dirs,
                          extra=EXTRA)
    registry = load_registry(path)
    tokenizers = {name: load_tokenizer(spec) for name, spec in registry.items()}
    return registry, tokenizers


def _lm(tiny, name: str, batch_size: int = 8) -> HarnessLM:
    registry, tokenizers = tiny
    return HarnessLM(load_model(registry[name], tokenizers[name]), batch_size=batch_size)


def _requests(spec, tok) -> list[tuple[str, str]]:
    return [(format_prompt(spec, tok, ins) if ins else "", resp) for ins, resp in PAIRS]


@torch.no_grad()
def _direct(lm: HarnessLM, context: str, continuation: str,
            rules: RulesConfig | None = None) -> tuple[float, bool]:
    """One unpadded forward pass and a per-token loop (rules: rule_scores + combine per step)."""
    ctx = encode_prompt(lm.spec, lm.tokenizer, context) if context else [lm.eos_ids[0]]
    cont = lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    logits = lm.model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    total, greedy = 0.0, True
    for t, token in enumerate(cont):
        step = logits[len(ctx) - 1 + t]
        if rules is None:
            logprobs = torch.log_softmax(step, dim=-1)
        else:
            vocab = step.shape[-1]
            r = rule_scores(rules, resolution_for(rules, lm.tokenizer, vocab), lm.eos_ids, vocab,
                            response_ids=cont[:t], prompt_ids=ctx)
            logprobs = combine(step, r)
        total += float(logprobs[token])
        greedy = greedy and int(logprobs.argmax()) == token
    return total, greedy


# ------------------------------------------------------------------------- HarnessLM


@pytest.mark.parametrize("name", ["tiny-base", "tiny-ref"])
def test_loglikelihood_equals_direct_computation_in_any_batching(tiny, name, monkeypatch):
    lm = _lm(tiny, name, batch_size=1)
    requests = _requests(lm.spec, lm.tokenizer)
    direct = [_direct(lm, c, x) for c, x in requests]
    one = loglikelihoods(lm, requests)
    lm.batch_size = 4  # uneven batches: 4 + 2, right-padded
    four = loglikelihoods(lm, requests)
    monkeypatch.setattr(lm_eval_model, "MAX_LOGITS", 2 * 60 * lm.vocab_size)  # ~2 rows a batch
    split = loglikelihoods(lm, requests)
    for (d, dg), *rest in zip(direct, one, four, split, strict=True):
        for lp, greedy in rest:
            assert lp == pytest.approx(d, abs=ATOL) and greedy == dg
    assert all(lp < 0 for lp, _ in one)


def test_greedy_flag_matches_greedy_generation(tiny):
    lm = _lm(tiny, "tiny-base")
    prompt = encode_prompt(lm.spec, lm.tokenizer, format_prompt(lm.spec, lm.tokenizer, "Hi"))
    out = lm.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                            min_new_tokens=8, pad_token_id=lm.pad_id)
    greedy = out[0, len(prompt):].tolist()
    changed = greedy[:-1] + [(greedy[-1] + 1) % len(lm.tokenizer)]
    (lp, is_greedy), (lp2, is_greedy2) = lm.score_encoded([(prompt, greedy), (prompt, changed)])
    assert is_greedy and not is_greedy2 and lp > lp2
    assert lm.score_encoded([(prompt, [])]) == [(0.0, True)]


def test_unsupported_requests_say_what_to_use(tiny):
    lm = _lm(tiny, "tiny-base")
    with pytest.raises(NotImplementedError, match="backend 'hf'"):
        lm.loglikelihood_rolling([])
    with pytest.raises(NotImplementedError, match="harness.generate.transformers"):
        lm.generate_until([])


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize("config", [
    RulesConfig(ramp=4),
    RulesConfig(ramp=6, eos_hold=False, diversity_scope="prompt+response"),
    RulesConfig(eos=False, uniform=False, diversity_penalty=2.5),
])
def test_rule_matrix_equals_reference_rule_scores(tiny, config):
    _, tokenizers = tiny
    tok = tokenizers["tiny-base"]
    vocab = len(tok) + 3  # a model may have more rows than the tokenizer has tokens
    resolution = resolution_for(config, tok, vocab)
    g = torch.Generator().manual_seed(0)
    cont = torch.randint(0, 40, (30,), generator=g).tolist() + [1, 5, 1]  # repeats and EOS
    prompt = torch.randint(0, 60, (12,), generator=g).tolist()
    eos = [1, 7]
    matrix = rule_score_matrix(config, resolution, eos, vocab, cont, prompt)
    reference = torch.stack([rule_scores(config, resolution, eos, vocab, cont[:t], prompt)
                             for t in range(len(cont))])
    assert torch.equal(matrix, reference)
    logits = torch.randn(len(cont), vocab, generator=g) * 3
    fast = rules_logprobs(logits, config, resolution, eos, cont, prompt)
    slow = torch.stack([combine(logits[t], reference[t]) for t in range(len(cont))])
    assert torch.allclose(fast, slow, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-rules", "tiny-rules-prompt"])
def test_rules_likelihood_is_the_stepwise_product_of_experts(tiny, name):
    lm = _lm(tiny, name, batch_size=3)
    base = _lm(tiny, {"tiny-rules": "tiny-base", "tiny-rules-prompt": "tiny-ref"}[name])
    requests = _requests(lm.spec, lm.tokenizer)
    got = loglikelihoods(lm, requests)
    reference = [_direct(lm, c, x, rules=lm.spec.rules) for c, x in requests]
    for (lp, greedy), (ref, ref_greedy) in zip(got, reference, strict=True):
        assert lp == pytest.approx(ref, abs=ATOL) and greedy == ref_greedy
    plain = loglikelihoods(base, requests)
    assert all(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(got, plain, strict=True))


def test_rules_greedy_flag_matches_the_rules_decoder(tiny):
    lm = _lm(tiny, "tiny-rules")
    prompt = encode_prompt(lm.spec, lm.tokenizer,
                           format_prompt(lm.spec, lm.tokenizer, "Write a poem."))
    response = reference_generate(lm.model, lm.tokenizer, prompt, lm.spec.rules, 10,
                                  eos_ids=lm.eos_ids)
    [(_, is_greedy)] = lm.score_encoded([(prompt, response)])
    assert is_greedy
    base = _lm(tiny, "tiny-base")
    base_greedy = base.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10,
                                      do_sample=False, pad_token_id=base.pad_id)
    assert base_greedy[0, len(prompt):].tolist() != response  # the rules change the decoding


def test_make_lm_backends(tiny):
    registry, tokenizers = tiny
    with pytest.raises(ConfigError, match="cannot apply the rules"):
        make_lm(registry["tiny-rules"], tokenizers["tiny-rules"], backend="hf")
    with pytest.raises(ConfigError, match="unknown lm backend"):
        make_lm(registry["tiny-base"], tokenizers["tiny-base"], backend="vllm")
    assert isinstance(make_lm(registry["tiny-base"], tokenizers["tiny-base"]), HarnessLM)


@pytest.mark.parametrize("name", ["tiny-base", "tiny-ref"])
def test_harness_lm_agrees_with_lm_evals_hflm_on_tiny(tiny, name):
    """HFLM moves a context's trailing whitespace into the continuation; `rank` corrects for
    it, so both backends give the same mean log-likelihoods."""
    registry, tokenizers = tiny
    spec, tok = registry[name], tokenizers[name]
    items = [RankItem(id=str(i), instruction=ins, candidates=tuple(r for _, r in PAIRS[:4]),
                      true_index=i) for i, (ins, _) in enumerate(PAIRS[:4])]
    ours = rank(spec, tok, items, batch_size=4)
    theirs = rank(spec, tok, items, batch_size=4, backend="hf")
    for a, b in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=ATOL)


# --------------------------------------------------------------------------- ranking


def _pool(n: int) -> list[tuple[str, str]]:
    return [(f"instruction {i}", f"response {i}") for i in range(n)]


def test_build_items_is_deterministic_excludes_and_never_uses_own_instruction():
    pool = _pool(30) + _pool(5) + [("instruction 0", "another response to 0")]
    items = build_items(pool, n=12, k=3, seed=4, exclude={("instruction 1", "response 1")})
    assert items == build_items(pool, n=12, k=3, seed=4,
                                exclude={("instruction 1", "response 1")})
    assert items != build_items(pool, n=12, k=3, seed=5)
    assert len(items) == 12 and len({i.id for i in items}) == 12
    for item in items:
        assert item.instruction != "instruction 1"
        assert len(item.candidates) == 4 and len(set(item.candidates)) == 4
        true = item.candidates[item.true_index]
        assert (item.instruction, true) in pool
        for c, cand in enumerate(item.candidates):
            if c != item.true_index:  # a distractor answers another instruction
                assert (item.instruction, cand) not in pool and cand != "response 1"
    everything = build_items(pool, n=1000, k=3, seed=0)
    assert len(everything) == 31  # n is capped at the pool (30 + the second answer to 0)
    assert {i.true_index for i in everything} == {0, 1, 2, 3}


def test_score_requests_order_is_item_major():
    items = build_items(_pool(10), n=3, k=2, seed=0)
    requests = score_requests(items, lambda ins: f"<{ins}>")
    assert len(requests) == 9
    assert requests[4] == (f"<{items[1].instruction}>", items[1].candidates[1])


def test_analyse_counts_ties_as_incorrect_and_bootstraps_with_a_seed():
    items = [RankItem(id=f"i{n}", instruction="x", candidates=("a", "b", "c", "d"),
                      true_index=n % 4) for n in range(4)]
    scores = [[-1.0, -2.0, -3.0, -4.0],   # true 0: best -> correct
              [-1.0, -2.0, -3.0, -4.0],   # true 1: rank 2
              [-1.0, -1.0, -1.0, -1.0],   # true 2: all tied -> incorrect, rank 4
              [-5.0, -5.0, -5.0, -0.5]]   # true 3: best -> correct
    options = RankingOptions(pairs={"kind": "lima"}, bootstrap=500, seed=1)
    result = analyse(items, {"m": scores}, options)
    head = result["headline"]["m"]
    assert head["n"] == 4 and head["k"] == 3 and head["chance"] == 0.25
    assert head["accuracy"] == 0.5 and head["mean_true_rank"] == (1 + 2 + 4 + 1) / 4
    assert 0.0 <= head["ci_low"] <= 0.5 <= head["ci_high"] <= 1.0
    assert analyse(items, {"m": scores}, options) == result
    rows = result["tables"]["items"]
    assert [r["correct"] for r in rows] == [True, False, False, True]
    assert rows[2]["predicted_index"] == 0 and rows[1]["best_other_mean_logprob"] == -1.0
    json.dumps(result)  # plain values only
    with pytest.raises(DataError, match="scores for 3 items"):
        analyse(items, {"m": scores[:3]}, options)
    with pytest.raises(DataError, match="4 candidate scores"):
        analyse(items, {"m": [s[:3] for s in scores]}, options)


def _jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_bad_options_are_one_line_errors(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(3)])
    pairs = {"kind": "jsonl", "path": good, "instruction_field": "q", "response_field": "a"}
    options = parse_options({"pairs": pairs, "k": 2, "n": 5}, "task t.toml")
    assert options.k == 2 and options.exclude_tuning and len(load_pool(options)) == 3
    bad = _jsonl(tmp_path / "bad.jsonl", [{"q": "q0", "a": "a0"}, {"q": "q1", "answer": "a1"}])
    cases = [
        ({"pairs": pairs, "k": 3}, ConfigError, "k = 3 needs at least 4 distinct pairs"),
        ({"pairs": {**pairs, "path": bad}}, DataError, r"bad\.jsonl:2: needs string fields"),
        ({"pairs": pairs, "n": 0}, ConfigError, "n must be at least 1"),
        ({"pairs": pairs, "k": 0}, ConfigError, "k must be at least 1"),
        ({"pairs": pairs, "k": "3"}, ConfigError, "k must be an integer"),
        ({"pairs": pairs, "exclude_tuning": 1}, ConfigError, "exclude_tuning must be true"),
        ({"pairs": pairs, "kk": 3}, ConfigError, "unknown field"),
        ({"k": 3}, ConfigError, "needs pairs"),
        ({"pairs": {"kind": "lima", "path": "x"}}, ConfigError, "unknown field"),
    ]
    for table, error, message in cases:
        with pytest.raises(error, match=message) as info:
            parse_options(table, "task t.toml")
        assert isinstance(info.value, HarnessError) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="k = 5 needs at least 6"):
        build_items(_pool(5), n=3, k=5, seed=0)
    with pytest.raises(ConfigError, match="after excluding training pairs"):
        build_items(_pool(5), n=3, k=4, seed=0, exclude={("instruction 0", "response 0")})
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        build_items(_pool(5), n=0, k=1, seed=0)


# --------------------------------------------------------------------- accuracy on LIMA


def _lima_items(max_chars: int, n: int = 40, k: int = 3) -> tuple[RankingOptions, list]:
    options = RankingOptions(pairs={"kind": "lima", "n": None, "seed": 0}, k=k, n=n,
                             max_chars=max_chars)
    return options, build_items(load_pool(options), options.n, options.k, options.seed)


def test_tiny_random_model_ranks_near_chance(tiny):
    registry, tokenizers = tiny
    # short pairs: the tiny tokenizer is nearly byte-level and the model holds 512 positions
    options, items = _lima_items(max_chars=400)
    scores = rank(registry["tiny-base"], tokenizers["tiny-base"], items, batch_size=8)
    head = analyse(items, {"tiny": scores}, options)["headline"]["tiny"]
    print(f"tiny random model: accuracy {head['accuracy']:.3f} "
          f"[{head['ci_low']:.3f}, {head['ci_high']:.3f}], chance {head['chance']}")
    assert head["n"] == 40 and head["chance"] == 0.25
    assert head["ci_low"] <= 0.25 <= head["ci_high"]
    assert abs(head["accuracy"] - 0.25) <= 0.2


@pytest.mark.slow
def test_smollm2_ranks_true_responses_above_chance_and_matches_hflm():
    """SmolLM2-135M-Instruct on 60 short LIMA pairs (k = 3) through HarnessLM; then the first
    10 items' requests through lm-eval's own HFLM: mean log-likelihoods agree to 1e-3 nats per
    token (HFLM pads and batches differently; float32 on CPU)."""
    spec = load_registry()["smollm2-135m-instruct"]
    tok = load_tokenizer(spec)
    # pairs of at most 400 characters (68 of LIMA's 1,030) keep this to minutes on 2 CPU cores
    options, items = _lima_items(max_chars=400, n=60)
    start = time.perf_counter()
    ours = rank(spec, tok, items, batch_size=8)
    seconds = time.perf_counter() - start
    head = analyse(items, {"smollm2": ours}, options)["headline"]["smollm2"]
    print(f"\nSmolLM2-135M-Instruct: accuracy {head['accuracy']:.3f} [{head['ci_low']:.3f}, "
          f"{head['ci_high']:.3f}] on {head['n']} items, chance {head['chance']}, mean true "
          f"rank {head['mean_true_rank']:.2f}; {seconds / (4 * len(items)):.2f} s per request")
    assert head["ci_low"] > 0.25 or head["accuracy"] > 0.5
    subset = items[:10]
    theirs = rank(spec, tok, subset, batch_size=8, backend="hf")
    diff = max(abs(a - b) for ra, rb in zip(ours[:len(subset)], theirs, strict=True)
               for a, b in zip(ra, rb, strict=True))
    print(f"HarnessLM vs HFLM on {4 * len(subset)} requests: max |mean log-likelihood "
          f"difference| {diff:.2e} nats/token")
    assert diff < 1e-3


def test_a_base_and_its_rules_variant_share_forward_passes_with_equal_results(tiny):
    """group_lms scores a request for every variant of one set of weights in one pass: each
    variant still gets exactly what its own HarnessLM gives, and the second asks the model
    nothing."""
    from harness.generate.lm_eval import group_lms

    registry, tokenizers = tiny
    base, rules = registry["tiny-base"], registry["tiny-rules"]
    lms = group_lms(load_model(base, tokenizers["tiny-base"]), [base, rules], batch_size=4)
    requests = _requests(base, tokenizers["tiny-base"])
    got_base = loglikelihoods(lms["tiny-base"], requests)
    calls = []
    lms["tiny-rules"].model.register_forward_hook(lambda *a: calls.append(1))
    got_rules = loglikelihoods(lms["tiny-rules"], requests)
    assert calls == []  # answered from the shared pass
    for got, name in ((got_base, "tiny-base"), (got_rules, "tiny-rules")):
        alone = loglikelihoods(_lm(tiny, name), requests)
        for (a, ga), (b, gb) in zip(got, alone, strict=True):
            assert a == pytest.approx(b, abs=ATOL) and ga == gb
