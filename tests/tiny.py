"""A tiny random-weight causal LM and tokenizer built at test time (no hub, no large weights)."""

from pathlib import Path

CORPUS = [
    "Give three tips for staying healthy. Eat well, sleep enough and move every day.",
    "Write a short poem about the sea. The waves roll in and out under the moon.",
    "Explain how a bicycle works: pedals turn a chain that turns the back wheel.",
    "What is two plus two? Two plus two is four. List some fruits: apple, pear, plum.",
    "<|user|>\n<|assistant|>\n1. 2. 3. - * # ## ! I We What should",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences, with eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Save a 2-layer random Llama and its tokenizer to out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # well-separated logits: greedy decoding is stable across batchings
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir


def tiny_spec(out_dir: Path, max_new_tokens: int, seed: int = 3):
    """A plain-prompt local ModelSpec over a fresh tiny model saved to out_dir."""
    from harness.models.spec import DecodingSpec, ModelSpec

    path = make_tiny_model(out_dir, seed=seed)
    return ModelSpec(name="tiny", source="local", path=str(path), prompt_format="plain",
                     decoding=DecodingSpec(max_new_tokens=max_new_tokens))


def write_registry(path: Path, ref_dir: Path, var_dir: Path, extra: str = "") -> Path:
    """A models.toml with a tiny reference (chat template) and a tiny variant (plain prompts)."""
    path.write_text(f'''
[defaults.decoding]
max_new_tokens = 12

[models.tiny-ref]
role = "reference"
source = "local"
path = "{ref_dir}"
prompt_format = "chat_template"

[models.tiny-base]
source = "local"
path = "{var_dir}"
prompt_format = "plain"
{extra}
''')
    return path


def write_task(dir_: Path, n: int = 6) -> Path:
    """A task file with n small instructions."""
    import json

    lines = [json.dumps({"id": f"t{i}", "category": "misc",
                         "instruction": f"Give {i + 2} tips for staying healthy."})
             for i in range(n)]
    (dir_ / "ins.jsonl").write_text("\n".join(lines) + "\n")
    (dir_ / "tiny.toml").write_text('name = "tiny"\ninstructions = "ins.jsonl"\n')
    return dir_ / "tiny.toml"


def sigint_default() -> None:
    """Popen preexec_fn: let the child see Ctrl-C even when the test runner ignores SIGINT (a
    background job of a non-interactive shell does, and its children inherit that)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
