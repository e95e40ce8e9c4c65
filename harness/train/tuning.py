"""Build tuned variants: transformers' Trainer on (prompt, response) pairs, loss on responses only.

`tune_variant(spec)` trains a variant's recipe (harness.models.recipes) on its data
(harness.data.tune_data) starting from its base weights, with LoRA (peft; merged into the weights
when saved) or a full fine-tune, and stores the result under <cache>/tuned/<recipe>-<data>/ as
a plain transformers model folder with its tokenizer and a marker (harness-tuned.json). The
output layer runs only where a response token is predicted (response_loss_sum); held-out pairs
give a validation curve (the loss before training and after each epoch) in the marker.

Checkpoints go to <build>.work/ every `save_steps` optimizer steps; an interrupted build
resumes from the last one (same data order, RNG states and schedule). Ctrl-C stops at the end
of the current step, saves a checkpoint there and raises TuneInterrupted.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.core.errors import ConfigError, HarnessError
from harness.data.tune_data import Pair, load_pairs, pairs_hash, validation_pairs
from harness.generate.backends import model_eos_ids
from harness.generate.backends import template_prompt as format_prompt
from harness.models.builds import (
    build_dir,
    build_recipe_hash,
    find_build,
    starting_spec,
    tune_command,
    weights_identity,
)
from harness.models.recipes import TUNED_MARKER, TuneSpec
from harness.models.registry import named
from harness.models.spec import ModelSpec
from harness.models.weights import resolve_model_dir

#: Measures a model in training (eval mode): (figures for the curve, one line of text).
Measure = Callable[[Any], tuple[dict[str, Any], str]]


class TuneInterrupted(HarnessError):
    """Training was stopped (Ctrl-C) after saving a checkpoint; the same command resumes."""

    exit_code = 130


@dataclass(frozen=True)
class TuneResult:
    """A finished (or already present) build."""

    name: str
    path: Path
    info: dict[str, Any]
    trained: bool  # False when the build already existed


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- examples


def eos_id(model: Any, tokenizer: Any) -> int:
    """The EOS id appended to each response: the tokenizer's, if generation stops on it."""
    ids = model_eos_ids(model, tokenizer)
    return tokenizer.eos_token_id if tokenizer.eos_token_id in ids else ids[0]


#: Where a shortened response may end, best first: a paragraph, a sentence, a line.
_BOUNDARIES = (re.compile(r"\n\s*\n"), re.compile(r"[.!?][\"')\]]?(?=\s)"), re.compile(r"\n"))


def shorten_response(tokenizer: Any, response: str, budget: int) -> list[int] | None:
    """The response cut at its last paragraph, sentence or line end within `budget` tokens
    (token ids, without EOS), or None when no such end lies in the budget's second half."""
    prefix = tokenizer.decode(tokenizer(response, add_special_tokens=False)["input_ids"][:budget])
    for pattern in _BOUNDARIES:
        ends = [m.end() if pattern.pattern.startswith("[") else m.start()
                for m in pattern.finditer(prefix)]
        for end in reversed(ends):
            ids = tokenizer(prefix[:end].rstrip(), add_special_tokens=False)["input_ids"]
            if len(ids) <= budget:
                if len(ids) >= budget // 2:
                    return ids
                break
    return None


def encode_pairs(spec: ModelSpec, tokenizer: Any, pairs: Sequence[Pair], max_len: int,
                 eos: int, truncation: str = "boundary", max_response: int = 0
                 ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Each pair as {"input_ids", "prompt_len"}: the prompt exactly as the variant is prompted
    at evaluation (format_prompt, encoded as generation encodes it), then the response and EOS.

    A sequence longer than max_len, or a response longer than max_response tokens (when it is
    positive), keeps its prompt; with truncation "boundary" its response ends at the last
    paragraph or sentence end that fits and keeps its EOS (falling back to a plain cut with
    EOS), with "cut" it loses its tail and its EOS. A pair whose prompt alone leaves no room
    for 8 response tokens is skipped.
    """
    from harness.generate.transformers import encode_prompt

    out, truncated, skipped = [], 0, 0
    for instruction, response in pairs:
        prompt_ids = encode_prompt(spec, tokenizer, format_prompt(spec, tokenizer, instruction))
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        if len(prompt_ids) + 8 > max_len:
            skipped += 1
            continue
        ids = prompt_ids + response_ids
        budget = max_len - len(prompt_ids) - 1
        if max_response > 0:
            budget = min(budget, max_response)
        if len(response_ids) - 1 > budget:
            truncated += 1
            if truncation == "cut":
                ids = (prompt_ids + response_ids)[:len(prompt_ids) + budget + 1]
            else:
                short = shorten_response(tokenizer, response, budget)
                ids = prompt_ids + (short if short is not None else response_ids[:budget]) + [eos]
        out.append({"input_ids": ids, "prompt_len": len(prompt_ids)})
    if not out:
        raise ConfigError(f"{spec.name}: no training pair fits max_seq_length = {max_len}")
    return out, {"pairs": len(pairs), "examples": len(out), "truncated": truncated,
                 "skipped_long_prompt": skipped,
                 "response_tokens": sum(len(e["input_ids"]) - e["prompt_len"] for e in out),
                 "tokens": sum(len(e["input_ids"]) for e in out)}


class ResponseOnlyCollator:
    """Right-pads a batch; labels are the input ids on response tokens and -100 on prompt and
    padding tokens, so the loss covers the response (and its EOS) only."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            seq = torch.tensor(f["input_ids"], dtype=torch.long)
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
            labels[row, f["prompt_len"]:len(seq)] = seq[f["prompt_len"]:]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------- the loss

#: Response positions whose logits are computed at once; more go through in chunks, each
#: recomputed in the backward pass, so the logits (vocabulary x positions) never all coexist.
LOSS_CHUNK = 2048


def response_loss_sum(model: Any, batch: dict[str, Any], chunk: int = LOSS_CHUNK
                      ) -> tuple[Any, int]:
    """(summed cross-entropy, number of predicted tokens) over the labelled positions only.

    The decoder runs on the whole batch, but the output layer (the vocabulary: 262k rows for
    gemma-3) runs only on the hidden states that predict a labelled token, and in chunks of
    `chunk` positions; prompt and padding positions never reach it. The loss equals the one
    the model's own forward computes from full logits (tests hold it to that).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    hidden = decoder(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    h, t = hidden[:, :-1][keep], targets[keep]
    cap = getattr(base.config, "final_logit_softcapping", None)
    head = base.get_output_embeddings()

    def part(hs: Any, ts: Any) -> Any:
        logits = head(hs).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits, ts, reduction="sum")

    n = int(t.numel())
    if n <= chunk:
        return part(h, t), n
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + checkpoint(part, h[i:i + chunk], t[i:i + chunk], use_reentrant=False)
    return total, n


def _trainer_class() -> Any:
    """transformers' Trainer with the loss of response_loss_sum, normalised as the Trainer
    normalises a causal LM's own loss (over the labelled tokens of the accumulated batch)."""
    from transformers import Trainer

    class ResponseLossTrainer(Trainer):
        loss_is_scaled_for_ga = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            total, n = response_loss_sum(model, inputs)
            if num_items_in_batch is None:
                loss = total / max(n, 1) / self.current_gradient_accumulation_steps
            else:
                loss = total / num_items_in_batch
            return (loss, None) if return_outputs else loss

    return ResponseLossTrainer


def validation_loss(model: Any, examples: Sequence[dict[str, Any]], pad_id: int,
                    batch_size: int = 8) -> float:
    """Mean per-token loss of the model on held-out examples (eval mode, no gradients)."""
    import torch

    collate = ResponseOnlyCollator(pad_id)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in
                         collate(examples[i:i + batch_size]).items()}
                s, n = response_loss_sum(model, batch)
                total, count = total + float(s), count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- callbacks


def _callbacks(name: str):
    """The progress bar (loss in its postfix, ETA from tqdm) and the Ctrl-C handler."""
    from transformers import ProgressCallback, TrainerCallback

    class LossBar(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(f"tune {name}")
                self.training_bar.update(state.global_step)  # resumed: start where it stopped
                self.current_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=True)

    class StopOnSignal(TrainerCallback):
        """First Ctrl-C: finish the current step, checkpoint it, stop. Second: abort."""

        def __init__(self):
            self.requested = False
            self.stopped_at: int | None = None

        def handler(self, signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested and self.stopped_at is None:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    return LossBar(), StopOnSignal()


def _curve_callback(examples: Sequence[dict[str, Any]], pad_id: int, path: Path, log,
                    measure: Measure | None = None):
    """Measures the validation loss (and `measure`, when given) before training and after each
    epoch; the curve is kept in `path` (the work folder) so a resumed build keeps the points
    measured before."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self):
            self.points = json.loads(path.read_text()) if path.is_file() else []
            self.seconds = 0.0  # spent measuring in this session (not training)

        def _measure(self, state, model):
            if any(p["step"] == state.global_step for p in self.points):
                return
            t0 = time.time()
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            point = {"epoch": round(state.epoch or 0.0, 3), "step": state.global_step,
                     "train_loss": losses[-1] if losses else None,
                     "validation_loss": round(validation_loss(model, examples, pad_id), 4)
                     if examples else None}
            line = f"  epoch {point['epoch']:g} (step {point['step']}):"
            if examples:
                line += f" validation loss {point['validation_loss']:.4f}"
            if measure is not None:
                was_training = model.training
                model.eval()
                try:
                    figures, text = measure(model)
                finally:
                    model.train(was_training)
                point.update(figures)
                line += f" {text}"
            self.points.append(point)
            path.write_text(json.dumps(self.points, indent=1))
            log(line)
            self.seconds += time.time() - t0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and model is not None:
                self._measure(state, model)

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if model is not None:
                self._measure(state, model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if model is not None:  # max_steps or a fractional epoch ends mid-epoch
                self._measure(state, model)

    return Curve()


# ------------------------------------------------------------------------------- training


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return device


def _update_steps(n_examples: int, recipe: TuneSpec) -> int:
    if recipe.max_steps > 0:
        return recipe.max_steps
    per_epoch = math.ceil(math.ceil(n_examples / recipe.batch_size) / recipe.grad_accum)
    return math.ceil(per_epoch * recipe.epochs)


def training_arguments(recipe: TuneSpec, work: Path, on_gpu: bool, n_examples: int) -> Any:
    """The Trainer's arguments for a recipe (warmup as steps, computed here for any version)."""
    from transformers import TrainingArguments

    warmup = round(recipe.warmup_ratio * _update_steps(n_examples, recipe))
    return TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum, learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.schedule, warmup_steps=warmup,
        weight_decay=recipe.weight_decay, num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps if recipe.max_steps > 0 else -1,
        logging_steps=1, save_strategy="steps", save_steps=recipe.save_steps,
        save_total_limit=2, seed=recipe.seed, data_seed=recipe.seed,
        bf16=recipe.dtype == "bfloat16", fp16=recipe.dtype == "float16",
        use_cpu=not on_gpu, report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, dataloader_pin_memory=on_gpu,
        include_num_input_tokens_seen="non_padding", disable_tqdm=False)


def with_lora(model: Any, recipe: TuneSpec) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = (list(recipe.target_modules) if isinstance(recipe.target_modules, tuple)
               else recipe.target_modules)
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                        lora_dropout=recipe.lora_dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)  # peft 0.21 on transformers 5: harmless
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in this architecture
        raise ConfigError(f"LoRA: {e}".splitlines()[0]) from None


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def tune_variant(spec: ModelSpec, device: str = "auto", callbacks: Sequence[Any] = (),
                 log=_log, measure: Callable[[Any], Measure] | None = None) -> TuneResult:
    """Train a tuned variant's recipe and store the merged model; an existing build is kept.

    callbacks: extra transformers TrainerCallbacks (tests use one to interrupt).
    measure: given the tokenizer, a function measuring the model in training; it runs with the
    validation loss (before training and after each epoch) and its figures join the curve.
    """
    if spec.tune is None:
        raise ConfigError(f"{spec.name} has no [tune] recipe; only tuned variants can be built")
    pairs = load_pairs(spec.tune.data)  # missing or malformed data fails before any model load
    digest = pairs_hash(pairs)
    device = _device(device)
    on_gpu = device == "cuda"
    recipe = spec.tune.effective(on_gpu)
    held_out = validation_pairs(spec.tune.data, recipe.validation)
    out = build_dir(spec, on_gpu, digest)
    existing = find_build(spec)  # the build evaluation uses (either device kind's) is kept
    if existing is not None:
        info = json.loads((existing / TUNED_MARKER).read_text())
        return TuneResult(spec.name, existing, info, False)

    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        ProgressCallback,
        TrainerState,
        set_seed,
    )
    from transformers.trainer_utils import get_last_checkpoint

    from harness.generate.transformers import set_threads as _set_threads

    _set_threads()
    start_spec = starting_spec(spec)
    base_dir = resolve_model_dir(start_spec)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    eos = eos_id(model, tokenizer)
    examples, stats = encode_pairs(spec, tokenizer, pairs, recipe.max_seq_length, eos,
                                   recipe.truncation, recipe.max_response_tokens)
    val_examples = encode_pairs(spec, tokenizer, held_out, recipe.max_seq_length, eos,
                                recipe.truncation, recipe.max_response_tokens)[0] \
        if held_out else []
    if recipe.method == "lora":
        set_seed(recipe.seed)  # LoRA's initial A matrices are random: seeded like training
        model = with_lora(model, recipe)

    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(
        {"name": spec.name, "recipe": recipe.as_dict(), "data_hash": digest}, indent=1))
    bar, stopper = _callbacks(spec.name)
    curve = (_curve_callback(val_examples, tokenizer.pad_token_id, work / "curve.json", log,
                             measure(tokenizer) if measure else None)
             if val_examples or measure else None)
    trainer = _trainer_class()(
        model=model, args=training_arguments(recipe, work, on_gpu, len(examples)),
        train_dataset=examples, data_collator=ResponseOnlyCollator(tokenizer.pad_token_id))
    trainer.remove_callback(ProgressCallback)
    for cb in (bar, stopper, *([curve] if curve else []), *callbacks):
        trainer.add_callback(cb)
    last = get_last_checkpoint(str(work))
    resumed_tokens, finished = 0, False  # tokens/s counts this session only
    if last and (Path(last) / "trainer_state.json").is_file():
        state = json.loads((Path(last) / "trainer_state.json").read_text())
        resumed_tokens = state.get("num_input_tokens_seen", 0)
        # Training ended but saving did not: take the final checkpoint as it is (the Trainer
        # would run one more step when that checkpoint falls mid-epoch).
        finished = state.get("global_step", 0) >= _update_steps(len(examples), recipe)
    log(f"tune {spec.name}: {stats['examples']} examples ({stats['tokens']} tokens, "
        f"{stats['response_tokens']} in responses; {stats['truncated']} shortened to fit "
        f"{recipe.max_seq_length} tokens"
        + (f" and responses of {recipe.max_response_tokens}" if recipe.max_response_tokens
           else "")
        + f"), {recipe.method}, {_update_steps(len(examples), recipe)} "
        f"steps on {device}" + (f"; resuming from {Path(last).name}" if last else ""))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, stopper.handler) if main_thread else None
    t0 = time.time()
    try:
        if finished:
            trainer._load_from_checkpoint(last)
            trainer.state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
            train_loss = None
        else:
            train_loss = trainer.train(resume_from_checkpoint=last).training_loss
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    measuring = curve.seconds if curve else 0.0
    seconds = time.time() - t0 - measuring
    if stopper.stopped_at is not None:
        raise TuneInterrupted(f"interrupted at step {stopper.stopped_at} of "
                              f"{trainer.state.max_steps}; checkpoint saved in {work}; resume "
                              f"with: {tune_command(spec)}")

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model = trainer.model
    if recipe.method == "lora":
        model = model.merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    session_tokens = trainer.state.num_input_tokens_seen - resumed_tokens
    info = {
        "name": spec.name, "recipe": recipe.as_dict(), "recipe_hash": spec.tune.recipe_hash(),
        "build_recipe_hash": build_recipe_hash(spec, on_gpu), "gpu_settings": on_gpu and bool(
            spec.tune.gpu), "data": spec.tune.data.as_dict(), "data_hash": digest, **stats,
        "from": weights_identity(start_spec), "prompt_format": spec.prompt_format,
        "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_loss_last_5": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "train_loss": train_loss, "tokens_trained": trainer.state.num_input_tokens_seen,
        "validation_pairs": len(val_examples),
        "curve": curve.points if curve else [],
        "validation_loss": curve.points[-1]["validation_loss"] if curve and curve.points
        and val_examples else None,
        "seconds": round(seconds, 1), "seconds_measuring_curve": round(measuring, 1),
        "resumed_from": Path(last).name if last else None,
        "tokens_per_second": round(session_tokens / seconds, 1) if seconds > 0 else None,
        "device": device, "device_name": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if on_gpu
        else None,
        "threads": torch.get_num_threads(), "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (tmp / TUNED_MARKER).write_text(json.dumps(info, indent=1, default=str))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    shutil.rmtree(work, ignore_errors=True)
    return TuneResult(spec.name, out, info, True)


def tunable(registry: dict[str, ModelSpec], selection: str) -> list[ModelSpec]:
    """The variants `tune` builds: `all` (every variant with a recipe), or a comma list."""
    if selection.strip() == "all":
        specs, seen = [], set()
        for s in registry.values():  # a variant that only adds rules shares its base's build
            key = None if s.tune is None else build_recipe_hash(s, False)  # data spec in it
            if key is not None and key not in seen:
                seen.add(key)
                specs.append(s)
        if not specs:
            raise ConfigError("no variant in the registry has a [tune] recipe")
        return specs
    out = named(registry, selection, "tune")
    for spec in out:
        if spec.tune is None:
            raise ConfigError(f"{spec.name} has no [tune] recipe; tuned variants: "
                              + (", ".join(s.name for s in registry.values()
                                           if s.tune is not None) or "none"))
    return out
