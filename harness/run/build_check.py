"""The check `tune` runs after a build: greedy outputs for a few held-out instructions, and how
often they end on EOS, loop and (for a poetry recipe) come out as verse.

The instructions are a seeded draw from the study's 56 validation instructions (never the
built-in 72 or AlpacaEval's 805), plus, for a poetry recipe, held-out poem requests (poems the
recipe never trained on). The figures go into the build record under "check".
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from typing import Any

from harness.core.cache import shared_data_dir
from harness.data.tune_data import poetry_heldout, read_jsonl
from harness.generate import backends
from harness.models.builds import require_build
from harness.models.recipes import TUNED_MARKER
from harness.models.spec import ModelSpec
from harness.tasks.poem_form import LOOP_FULL, loop_share, poem_score

#: Bumped when the instructions, the cap or the figures change.
CHECK_VERSION = 1
N_GENERAL = 12
N_POETRY = 6
SEED = 0
#: A build whose check outputs loop at least this often is reported as broken in one line.
LOOPING = 0.5
SAMPLE_CHARS = 160


def check_instructions(spec: ModelSpec) -> list[tuple[str, str]]:
    """(group, instruction): "general" from the study's validation set; "poetry" held-out poem
    requests when the recipe trains on poetry."""
    path = shared_data_dir() / "implicit_ins_val" / "val.jsonl"
    rows = [r["instruction"] for _, r in read_jsonl(path, "the study's validation instructions")]
    out = [("general", x) for x in random.Random(SEED).sample(rows, N_GENERAL)]
    if spec.tune is not None and spec.tune.data.kind == "poetry":
        poems = random.Random(SEED).sample(poetry_heldout(), N_POETRY)
        out += [("poetry", p.instruction) for p in poems]
    return out


def summarise(items: Sequence[tuple[str, str]], outputs: Sequence[str],
              finish_reasons: Sequence[str], max_new_tokens: int | None = None
              ) -> dict[str, Any]:
    """EOS, loop and verse shares, overall and per group, and two general samples."""
    def shares(idx: list[int]) -> dict[str, Any]:
        n = len(idx)
        return {"n": n,
                "eos_share": sum(finish_reasons[i] == "eos" for i in idx) / n,
                "loop_share": sum(loop_share(outputs[i]) >= LOOP_FULL for i in idx) / n,
                "verse_share": sum(poem_score(outputs[i]) >= 0.5 for i in idx) / n}

    groups = sorted({g for g, _ in items})
    every = list(range(len(items)))
    general = [i for i in every if items[i][0] == "general"]
    return {"version": CHECK_VERSION, "max_new_tokens": max_new_tokens, **shares(every),
            "groups": {g: shares([i for i in every if items[i][0] == g]) for g in groups},
            "samples": [{"instruction": items[i][1], "output": outputs[i],
                         "finish_reason": finish_reasons[i]} for i in general[:2]]}


def is_current(check: dict[str, Any] | None, spec: ModelSpec) -> bool:
    """Whether a stored check still says what check_build would: same version and token cap."""
    return (check is not None and check.get("version") == CHECK_VERSION
            and check.get("max_new_tokens") == spec.decoding.max_new_tokens)


def check_build(spec: ModelSpec, batch_size: int = backends.DEFAULT_BATCH_SIZE
                ) -> dict[str, Any]:
    """Generate greedily (the variant's own prompt and token cap, no rules: the build as
    trained) from the built weights for the check instructions, and summarise; the figures are
    also written into the build record (which variants adding rules share)."""
    spec = dataclasses.replace(spec, rules=None, decoding=dataclasses.replace(
        spec.decoding, do_sample=False))  # the build, as tuned
    items = check_instructions(spec)
    tokenizer = backends.load_tokenizer(spec)
    loaded = backends.load_model(spec, tokenizer)
    prompts = [backends.format_prompt(spec, tokenizer, x) for _, x in items]
    gens: dict[int, Any] = dict(backends.generate(loaded, prompts, batch_size))
    check = summarise(items, [gens[i].output for i in range(len(items))],
                      [gens[i].finish_reason for i in range(len(items))],
                      spec.decoding.max_new_tokens)
    marker = require_build(spec) / TUNED_MARKER
    info = json.loads(marker.read_text())
    info["check"] = check
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(marker)
    return check


def in_training(spec: ModelSpec):
    """For `tune --curve`: given the tokenizer, a function that generates greedily for the check
    instructions from the model being trained (transformers' generate, left-padded, one batch)
    and returns (the check's shares and samples, a short line)."""
    items = check_instructions(spec)

    def with_tokenizer(tokenizer: Any):
        import torch

        prompts = [backends.encode_prompt(spec, tokenizer,
                                          backends.template_prompt(spec, tokenizer, x))
                   for _, x in items]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def measure(model: Any) -> tuple[dict[str, Any], str]:
            eos = backends.model_eos_ids(model, tokenizer)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=spec.decoding.max_new_tokens,
                                     eos_token_id=eos,
                                     pad_token_id=pad)
            texts, reasons = [], []
            for row in out[:, width:].tolist():
                ends = [i for i, t in enumerate(row) if t in eos]
                reasons.append("eos" if ends else "length")
                texts.append(tokenizer.decode(row[:ends[0]] if ends else row,
                                              skip_special_tokens=True))
            check = summarise(items, texts, reasons, spec.decoding.max_new_tokens)
            line = (f"check: EOS {_pct(check['eos_share'])}, loops "
                    f"{_pct(check['loop_share'])}")
            if "poetry" in check["groups"]:
                line += (f", verse {_pct(check['groups']['poetry']['verse_share'])} / "
                         f"{_pct(check['groups']['general']['verse_share'])}")
            figures = {k: check[k] for k in ("eos_share", "loop_share", "verse_share")}
            figures["groups"] = check["groups"]
            figures["samples"] = [{"instruction": x, "output": t, "finish_reason": r}
                                  for (_, x), t, r in zip(items, texts, reasons, strict=True)]
            return figures, line

        return measure

    return with_tokenizer


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def check_lines(name: str, check: dict[str, Any]) -> list[str]:
    """What `tune` prints: the shares, verse near and far for poetry, two short samples, and a
    one-line warning when most outputs loop."""
    line = (f"{name}: check on {check['n']} held-out instructions (greedy, "
            f"{check['max_new_tokens']} tokens): EOS {_pct(check['eos_share'])}, loops "
            f"{_pct(check['loop_share'])}")
    groups = check["groups"]
    if "poetry" in groups:
        line += (f", verse {_pct(groups['poetry']['verse_share'])} of poem requests and "
                 f"{_pct(groups['general']['verse_share'])} of other instructions")
    out = [line]
    for s in check["samples"]:
        text = " ".join(s["output"].split())
        text = text[:SAMPLE_CHARS] + ("..." if len(text) > SAMPLE_CHARS else "")
        out.append(f"  {s['instruction'][:60]!r} -> {text!r} [{s['finish_reason']}]")
    if check["loop_share"] >= LOOPING:
        out.append(f"warning: {name} loops on {_pct(check['loop_share'])} of the check "
                   f"instructions; this recipe has not learned its task")
    return out
