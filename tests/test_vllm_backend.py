"""The vllm backend: the rules as vLLM's per-request logits processor (checked on CPU against the
study-style reference decoder), and in-process vLLM against the transformers backend (needs vLLM
and a CUDA GPU; skipped otherwise)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from harness.core.errors import BackendError
from harness.generate import backends
from harness.generate import transformers as generation
from harness.generate.rules import reference_generate
from harness.generate.vllm import RulesRequestProcessor, require_vllm, rules_args
from harness.models.rules_config import RulesConfig
from harness.models.spec import DecodingSpec, ModelSpec

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_GPU = torch.cuda.is_available()

CONFIGS = {
    "default": RulesConfig(ramp=6, eos_max=8.0),
    "prompt+response": RulesConfig(ramp=6, eos_max=8.0, diversity_scope="prompt+response"),
    "no-hold": RulesConfig(ramp=4, eos_max=3.0, eos_hold=False),
    "no-eos": RulesConfig(eos=False),
}


def _spec(model_dir, rules: RulesConfig | None = None, backend: str = "transformers",
          cap: int = 14) -> ModelSpec:
    from harness.models.backend_config import BackendOptions

    return ModelSpec(name="v", source="local", path=str(model_dir), prompt_format="plain",
                     decoding=DecodingSpec(max_new_tokens=cap), rules=rules, backend=backend,
                     backend_options=None if backend == "transformers" else
                     BackendOptions(kind=backend))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_vllm_rules_processor_decodes_as_the_reference_rules_decoder(tiny_dirs, name):
    """Greedy decoding with RulesRequestProcessor applied the way vLLM applies it (prompt ids,
    the live list of output ids, one logits row per step) gives the reference's tokens."""
    spec = _spec(tiny_dirs[1], CONFIGS[name])
    tok = generation.load_tokenizer(spec)
    loaded = generation.load_model(spec, tok)
    args = rules_args(spec, tok, loaded.eos_ids)
    for instruction in ("Give 3 tips for staying healthy.", "Write a short poem about the sea."):
        prompt = generation.encode_prompt(spec, tok, backends.template_prompt(spec, tok,
                                                                               instruction))
        want = reference_generate(loaded.model, tok, prompt, spec.rules, 14,
                                  eos_ids=loaded.eos_ids)
        proc, out = RulesRequestProcessor.from_args(args), []
        with torch.no_grad():
            for _ in range(14):
                ids = torch.tensor([prompt + out])
                logits = loaded.model(input_ids=ids).logits[0, -1].float()
                token = int(torch.argmax(proc(prompt, out, logits)))
                out.append(token)  # vLLM appends to the same list the processor holds
                if token in loaded.eos_ids:
                    break
        assert out == want, (name, instruction)


def test_the_rules_processor_restarts_when_its_request_is_rebuilt(tiny_dirs):
    spec = _spec(tiny_dirs[1], CONFIGS["default"])
    tok = generation.load_tokenizer(spec)
    proc = RulesRequestProcessor.from_args(rules_args(spec, tok, [1]))
    logits = torch.zeros(len(tok))
    first = proc([5, 6], [7, 8, 9], logits.clone())
    proc([5, 6], [7, 8, 9, 10], logits.clone())
    assert torch.equal(proc([5, 6], [7, 8, 9], logits.clone()), first)  # the list shrank


@pytest.mark.skipif(HAS_VLLM and HAS_GPU, reason="vLLM and a GPU are present")
def test_vllm_backend_without_vllm_or_a_gpu_is_one_line():
    with pytest.raises(BackendError, match="backend 'vllm' needs") as e:
        require_vllm()
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not (HAS_VLLM and HAS_GPU), reason=", ".join(filter(None, [
    "" if HAS_VLLM else "vLLM is not installed (pip install 'harness[vllm]')",
    "" if HAS_GPU else "torch sees no CUDA GPU"])))
@pytest.mark.parametrize("rules", [None, "default", "prompt+response"])
def test_vllm_greedy_outputs_match_the_transformers_backend(tmp_path, rules):
    from tiny import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()  # head_dim 64: a size vLLM's attention kernels support
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    config = None if rules is None else CONFIGS[rules]
    ref_spec, vllm_spec = _spec(tmp_path, config), _spec(tmp_path, config, backend="vllm")
    prompts = [backends.template_prompt(ref_spec, tok, f"Give {i} tips.") for i in range(6)]
    ref_tok = generation.load_tokenizer(ref_spec)
    ref = dict(generation.generate(generation.load_model(ref_spec, ref_tok), prompts, 6))
    got = dict(backends.generate(backends.load_model(vllm_spec, ref_tok), prompts))
    for i, r in ref.items():
        assert (got[i].output, got[i].finish_reason, got[i].n_tokens) == (
            r.output, r.finish_reason, r.n_tokens)
