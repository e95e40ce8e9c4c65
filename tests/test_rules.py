"""Tests of the rule-based model: score vectors, token mapping, batched/cached generation."""

import math
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList, PreTrainedTokenizerFast

from harness.core.errors import ConfigError
from harness.generate.rules import (
    RulesLogitsProcessor,
    TokenResolution,
    build_processor,
    combine,
    reference_generate,
    resolve_token_table,
    rule_scores,
)
from harness.models.rules_config import DEFAULT_TOKEN_TABLE, RulesConfig, eos_bonus

OFF = RulesConfig(eos=False, uniform=False, diversity=False)
FILLER = [" the", " cat", " sat", " on", " mat", "hello", " world", " dog", " ran", "."]


def _bpe_tokenizer(pieces: list[str], byte_level: bool) -> PreTrainedTokenizerFast:
    """A tiny BPE tokenizer whose vocabulary holds exactly the given multi-character pieces."""
    specials = ["<pad>", "<s>", "</s>"]
    if byte_level:
        to_form = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    else:
        alphabet = sorted(set("".join(pieces).replace(" ", "▁")) | set("abcdefghijklmnop.▁"))
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    merges: list[tuple[str, str]] = []
    for piece in pieces:
        form = to_form.pre_tokenize_str(piece)[0][0] if byte_level else piece.replace(" ", "▁")
        for i in range(1, len(form)):
            if form[: i + 1] not in vocab:
                vocab[form[: i + 1]] = len(vocab)
                merges.append((form[:i], form[i]))
    if byte_level:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
    else:  # gemma style: spaces become "▁" in the normaliser, no byte-level mapping
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<pad>"))
        tk.normalizer = normalizers.Replace(" ", "▁")
        tk.decoder = decoders.Replace("▁", " ")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer holding every table string as one token except " ##"."""
    pieces = [s for s, _ in DEFAULT_TOKEN_TABLE if s != " ##"] + FILLER
    return _bpe_tokenizer(pieces, byte_level=True)


def _tiny_model(vocab: int, seed: int = 0, scale: float = 8.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval().float()
    with torch.no_grad():  # spread the logits so that greedy choices have no near-ties
        model.lm_head.weight.mul_(scale)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model(tok) -> LlamaForCausalLM:
    return _tiny_model(len(tok))


def _prompts(tok, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, len(tok), (n - 1,), generator=g).tolist() for n in lengths]


def _left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _batched(model, tok, prompts, config, max_new, **gen) -> list[list[int]]:
    """Responses from one left-padded, KV-cached generate call, cut after the first EOS."""
    ids, mask = _left_pad(prompts)
    procs = [] if config is None else [build_processor(config, tok, model, ids, mask)]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                         logits_processor=LogitsProcessorList(procs), use_cache=True,
                         do_sample=gen.pop("do_sample", False), **gen)
    responses = []
    for row in out[:, ids.shape[1]:].tolist():
        responses.append(row[: row.index(2) + 1] if 2 in row else row)
    return responses


# --- configuration ------------------------------------------------------------------------


def test_config_defaults_hash_and_validation():
    cfg = RulesConfig()
    d = cfg.as_dict()
    assert d["eos_max"] == 15.0 and d["ramp"] == 250 and d["diversity_penalty"] == 1.5
    assert ["  ", 1.0] in d["token_table"] and len(d["token_table"]) == 15
    assert RulesConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="diversity_scope"):
        RulesConfig(diversity_scope="everything")
    with pytest.raises(ConfigError, match="unknown key"):
        RulesConfig.from_dict({"eos_maxx": 3})
    with pytest.raises(ConfigError, match="ramp"):
        RulesConfig(ramp=0)


@pytest.mark.parametrize(
    "n, held, study",
    [(0, 0.0, 0.0), (1, 15 / 250, 15 / 250), (249, 15 * 249 / 250, 15 * 249 / 250),
     (250, 15.0, 0.0), (251, 15.0, 0.0)],
)
def test_eos_bonus_at_boundaries(n, held, study):
    assert eos_bonus(RulesConfig(), n) == pytest.approx(held)
    assert eos_bonus(RulesConfig(eos_hold=False), n) == pytest.approx(study)
    assert eos_bonus(RulesConfig(eos=False), n) == 0.0


# --- hand-computed score vectors on a vocabulary of 8 -------------------------------------

TINY = TokenResolution(token_ids=(3, 5), weights=(-4.0, 1.0))


def _processor(config, prompt_length, mask=None):
    return RulesLogitsProcessor(config, eos_ids=[1, 7], prompt_length=prompt_length,
                                prompt_attention_mask=mask, pad_token_id=0, resolution=TINY)


@pytest.mark.parametrize("hold", [True, False])
@pytest.mark.parametrize("n", [0, 1, 249, 250, 251])
def test_processor_scores_by_hand(n, hold):
    cfg = RulesConfig(eos_hold=hold)
    prompt = [0, 0, 6, 2]  # two pads, then a 2-token prompt
    response = ([3, 3, 4] + [4] * n)[:n]  # used tokens: {3} at n=1, else {3, 4}
    ids = torch.tensor([prompt + response])
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0, 0.3, -0.2, 0.7]])
    out = _processor(cfg, len(prompt))(ids, logits.clone())
    bonus = {0: 0.0, 1: 0.06, 249: 14.94}.get(n, 15.0 if hold else 0.0)
    d3 = 1.5 if n >= 1 else 0.0
    d4 = 1.5 if n >= 3 else 0.0
    r = torch.tensor([0.0, bonus, 0.0, -4.0 - d3, -d4, 1.0, 0.0, bonus])
    expected = torch.log_softmax(logits[0] + r, dim=-1)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0], combine(logits[0], r), rtol=0, atol=1e-5)
    assert torch.logsumexp(out[0], dim=-1).item() == pytest.approx(0.0, abs=1e-5)


def test_diversity_prompt_scope_skips_padding():
    cfg = RulesConfig(eos=False, uniform=False, diversity_scope="prompt+response")
    ids = torch.tensor([[0, 0, 6, 6, 5], [6, 4, 4, 0, 5]])  # row 1 has a real token 0 in it
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = _processor(cfg, prompt_length=5, mask=mask)(ids, torch.zeros(2, 8))
    r0 = torch.tensor([0.0, 0, 0, 0, 0, -1.5, -1.5, 0])  # 6 counted once, pads not at all
    r1 = torch.tensor([-1.5, 0, 0, 0, -1.5, -1.5, -1.5, 0])
    torch.testing.assert_close(out, torch.log_softmax(torch.stack([r0, r1]), -1))
    response_only = _processor(RulesConfig(eos=False, uniform=False), 5)(ids, torch.zeros(2, 8))
    torch.testing.assert_close(response_only, torch.full((2, 8), -math.log(8)))


def test_incremental_state_matches_scores_from_scratch():
    """Drive the processor step by step (one row finishes early) and recompute r each step."""
    cfg = RulesConfig(ramp=5, diversity_scope="prompt+response")
    g = torch.Generator().manual_seed(0)
    prompts = torch.tensor([[0, 6, 3], [4, 4, 5]])
    mask = (prompts != 0).long()
    proc = _processor(cfg, 3, mask)
    ids = prompts
    finished = [False, False]
    for step in range(9):
        logits = torch.randn(2, 8, generator=g)
        out = proc(ids, logits.clone())
        for row in range(2):
            if finished[row]:
                continue
            prompt = prompts[row][mask[row].bool()].tolist()
            r = rule_scores(cfg, TINY, [1, 7], 8, ids[row, 3:].tolist(), prompt)
            torch.testing.assert_close(out[row], combine(logits[row], r), rtol=0, atol=1e-5)
        nxt = torch.randint(2, 7, (2,), generator=g)
        if step == 2:
            nxt[0] = 7  # row 0 emits an EOS id, then gets padding like generate does
        nxt[0] = 0 if finished[0] else nxt[0]
        finished[0] = finished[0] or nxt[0].item() == 7
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert finished[0]


def test_state_rebuilt_when_rows_are_reordered():
    """Beam search reorders rows between steps: the used-token state must follow the rows."""
    cfg = RulesConfig(eos=False, uniform=False)
    proc = _processor(cfg, 1)
    ids = torch.tensor([[6, 3, 3], [6, 4, 5]])
    proc(ids, torch.zeros(2, 8))
    reordered = torch.cat([ids[[1, 0]], torch.tensor([[2], [2]])], dim=1)
    out = proc(reordered, torch.zeros(2, 8))
    for row in range(2):
        r = rule_scores(cfg, TINY, [1, 7], 8, reordered[row, 1:].tolist())
        torch.testing.assert_close(out[row], combine(torch.zeros(8), r))


# --- mapping strings to tokens ------------------------------------------------------------


def test_resolution_byte_level(tok):
    res = resolve_token_table(tok, DEFAULT_TOKEN_TABLE)
    report = {e["string"]: e for e in res.report_list()}
    vocab = tok.get_vocab()
    assert report[" should"]["token_id"] == vocab["Ġshould"]
    assert report["\n"]["token_id"] == vocab["Ċ"]
    assert report["  "]["token_id"] == vocab["ĠĠ"]
    assert report["I"]["token_id"] == vocab["I"] != report[" I"]["token_id"] == vocab["ĠI"]
    assert report[" ##"]["status"] == "skipped" and "2 tokens" in report[" ##"]["reason"]
    assert dict(zip(res.token_ids, res.weights, strict=True))[vocab["Ġshould"]] == -6.0
    mapped = [e for e in report.values() if e["status"] == "mapped"]
    assert len(mapped) == 14 == len(res.token_ids)
    assert all(e["agrees_with_encoding"] for e in mapped)


def test_resolution_sentencepiece_style():
    sp = _bpe_tokenizer([" I", "I", " We", " ##", " #", "  "], byte_level=False)
    res = resolve_token_table(sp, [(" I", -5), ("I", -5), (" We", -3), (" ##", 1), ("  ", 1),
                                   (" What", -5)])
    report = {e["string"]: e for e in res.report_list()}
    vocab = sp.get_vocab()
    assert report[" I"]["token_id"] == vocab["▁I"]
    assert report[" I"]["method"] == "vocab:sentencepiece"
    assert report["I"]["token_id"] == vocab["I"]
    assert report[" ##"]["token_id"] == vocab["▁##"] and report["  "]["token_id"] == vocab["▁▁"]
    assert report[" What"]["status"] == "skipped"


# --- generation -------------------------------------------------------------------------


def test_rules_off_equal_base_model(model, tok):
    prompts = _prompts(tok, [5, 9, 3])
    assert _batched(model, tok, prompts, OFF, 12) == _batched(model, tok, prompts, None, 12)
    ids, mask = _left_pad(prompts)
    base = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    proc = build_processor(OFF, tok, model, ids, mask)
    torch.testing.assert_close(proc(ids, base.clone()), torch.log_softmax(base, -1))


@pytest.mark.parametrize(
    "config",
    [RulesConfig(), RulesConfig(ramp=12, eos_hold=True),
     RulesConfig(ramp=6, eos_hold=False, diversity_scope="prompt+response")],
    ids=["default", "short-ramp", "study-eos-prompt-scope"],
)
def test_batched_cached_generation_matches_reference(model, tok, config):
    prompts = _prompts(tok, [4, 11, 7, 2], seed=3)
    batched = _batched(model, tok, prompts, config, 20)
    reference = [reference_generate(model, tok, p, config, 20) for p in prompts]
    assert batched == reference
    assert batched != _batched(model, tok, prompts, None, 20)  # the rules changed something
    if config.ramp <= 12:
        assert any(r[-1] == 2 and len(r) < 20 for r in batched)  # some rows finished early


def test_sampling_warpers_apply_to_combined_distribution(model, tok):
    """top_p runs after the processor: a tiny top_p samples the combined argmax."""
    prompts = _prompts(tok, [4, 11, 7, 2], seed=3)
    greedy = _batched(model, tok, prompts, RulesConfig(), 15)
    torch.manual_seed(0)
    sampled = _batched(model, tok, prompts, RulesConfig(), 15, do_sample=True,
                       temperature=0.7, top_p=1e-6, top_k=0)
    assert sampled == greedy != _batched(model, tok, prompts, None, 15)


def test_min_new_tokens_forces_length(model, tok):
    prompts = _prompts(tok, [4, 6], seed=5)
    cfg = RulesConfig(ramp=2)  # EOS would win almost at once
    ids, mask = _left_pad(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                         do_sample=False,
                         logits_processor=LogitsProcessorList(
                             [build_processor(cfg, tok, model, ids, mask)]))
    assert out.shape[1] - ids.shape[1] == 10 and not (out[:, ids.shape[1]:-1] == 2).any()
    assert reference_generate(model, tok, prompts[0], cfg, 10, min_new_tokens=10) == \
        out[0, ids.shape[1]:].tolist()


# --- the real base model ----------------------------------------------------------------


def _gemma_dir() -> str:
    """gemma3-270m weights: $HARNESS_RULES_MODEL_DIR, else the registry (skip if unavailable)."""
    if os.environ.get("HARNESS_RULES_MODEL_DIR"):
        return os.environ["HARNESS_RULES_MODEL_DIR"]
    try:
        from harness.models.registry import load_registry
        from harness.models.weights import resolve_model_dir

        return resolve_model_dir(load_registry()["gemma3-270m"])
    except Exception as exc:  # noqa: BLE001 - any failure means the weights are not here
        pytest.skip(f"gemma3-270m weights unavailable: {exc}")


@pytest.mark.slow
def test_gemma_batched_matches_reference():
    model_dir = _gemma_dir()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gtok = AutoTokenizer.from_pretrained(model_dir)
    gmodel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gtok.padding_side = "left"
    texts = [f"<|user|>\n{t}\n<|assistant|>\n" for t in (
        "Write a short poem about the sea.",
        "What are three tips for staying healthy? Answer briefly and clearly, please.",
        "List some fruits")]
    prompts = [gtok(t).input_ids for t in texts]
    config = RulesConfig(ramp=12)  # EOS reaches full strength within the 16 tokens
    batch = gtok(texts, return_tensors="pt", padding=True)
    proc = build_processor(config, gtok, gmodel, batch.input_ids, batch.attention_mask)
    assert all(e["status"] == "mapped" for e in proc.token_report)
    out = gmodel.generate(**batch, max_new_tokens=16, do_sample=False,
                          logits_processor=LogitsProcessorList([proc]))
    base = gmodel.generate(**batch, max_new_tokens=16, do_sample=False)
    assert not torch.equal(out, base)  # the rules changed the output
    eos = set(proc.eos_ids)
    for row, prompt in zip(out[:, batch.input_ids.shape[1]:].tolist(), prompts, strict=True):
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert row[:cut] == reference_generate(gmodel, gtok, prompt, config, 16)
