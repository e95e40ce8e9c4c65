"""Contrastive pairs with known answers, built from the shared AlpacaEval data.

Each pair puts a good answer (GPT-4-turbo's, or a strong development model's) against a
defect this harness's small models show: an answer to another instruction, an echo of the
instruction, a list of questions, leaked chat-role markup, a loop, an empty or one-line reply.
The good answer is complete or cut at the token cap (a seeded draw). Within a category the bad
side's ending is often fixed (an off-topic answer ends on EOS, a loop runs to the cap), so
ending on EOS points the right way in some categories and the wrong way in others. Every pair
records the instruction folds and development models its texts come from, so a judge fitted on
some folds is scored on the others without seeing their texts.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.core.cache import shared_data_dir
from harness.core.errors import DataError
from harness.data.alpaca_formats import read_annotations
from harness.judging.agreement import instruction_fold
from harness.judging.protocol import Candidate, PairwiseItem

CATEGORIES = ("cut_vs_offtopic", "vs_echo", "vs_questions", "vs_markup", "vs_loop", "vs_empty")
#: Development models whose outputs may serve as good answers (GPT-4-turbo's always do).
GOOD_MODELS = ("claude-2.1", "gpt-3.5-turbo-1106", "OpenHermes-2.5-Mistral-7B", "Qwen-14B-Chat")
CAP_WORDS = 95  # about 128 tokens of English
#: GPT-4-turbo, whose outputs are every annotation's output_1 (no annotated model of its own).
REFERENCE = "gpt4_1106_preview"
_PIECE = re.compile(r"\S+\s*")
_ROLE_LEAKS = (
    "\n<|user|>\n{q}\n<|assistant|>\n", "\n<start_of_turn>user\n{q}<end_of_turn>\n",
    "\n### Instruction:\n{q}\n\n### Response:\n", "\nUser: {q}\nAssistant: ",
    "\n<|im_start|>user\n{q}<|im_end|>\n", "\n<|manager|>\n{q}\n<|interviewer|>\n",
)
_ONE_LINERS = ("Sure, here it is:", "I can help with that.", "Here is my answer.", "Yes.",
               "Of course! Let me know if you have any other questions.", "")


@dataclass(frozen=True)
class ContrastivePair:
    """A pair with a known better side: `good` is 1 (output_1) or 2 (output_2).

    models and folds: every development model whose output, and every instruction fold whose
    instruction or answer, appears in the pair (its own fold included), so a held-out fit can
    leave out every pair that touches what it holds out."""

    category: str
    item: PairwiseItem
    good: int
    fold: int
    models: frozenset[str] = frozenset()
    folds: frozenset[int] = frozenset()


def cut(text: str, words: int = CAP_WORDS) -> str:
    """The text's first `words` whitespace pieces, as a generation cut at its cap would be."""
    return "".join(_PIECE.findall(text)[:words]).rstrip()


def _good_answers(data: Path) -> dict[str, list[tuple[str, str]]]:
    """instruction -> good answers as (text, model): GPT-4-turbo's and the strong development
    models'."""
    try:
        ref = json.loads((data / "gpt4_1106_preview_outputs.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read GPT-4-turbo's outputs in {data}: {e}") from None
    good: dict[str, list[tuple[str, str]]] = {r["instruction"]: [(r["output"], REFERENCE)]
                                               for r in ref}
    for model in GOOD_MODELS:
        path = data / "annotations" / f"{model}.json"
        if path.is_file():
            for a in read_annotations(path):
                if a.instruction in good and len(a.output_2.split()) >= 20:
                    good[a.instruction].append((a.output_2, model))
    return good


def _is_question(text: str) -> bool:
    """A one-line question of at most 25 words (a word problem's first line is no question)."""
    text = text.strip()
    return "\n" not in text and text.endswith("?") and len(text.split()) <= 25


def _questions(instruction: str, others: Sequence[str], rng: random.Random
               ) -> tuple[str, list[str]]:
    """A list of questions on the instruction's topic: its nearest question-shaped instructions
    by shared words, and questions made from its own content words; and the instructions used."""
    words = {w for w in re.findall(r"[a-z]{4,}", instruction.lower())}
    asked = sorted((o for o in others if _is_question(o) and o != instruction),
                   key=lambda o: -len(words & set(re.findall(r"[a-z]{4,}", o.lower()))))[:4]
    topic = " ".join(re.findall(r"[A-Za-z]{4,}", instruction)[:3]) or "this"
    made = [f"What is the best way to think about {topic}?", f"Why does {topic} matter?",
            f"How do you explain {topic}?"]
    qs = [q.strip().splitlines()[0] for q in asked] + made
    rng.shuffle(qs)
    return "\n".join(qs[:rng.randint(3, 6)]), asked


def _loop(answer: str, rng: random.Random) -> str:
    """The answer's opening sentence (or line) repeated until about the cap."""
    first = re.split(r"(?<=[.!?])\s+|\n", answer.strip(), maxsplit=1)[0][:200] or answer[:80]
    sep = rng.choice(("\n", " ", "\n\n"))
    return cut(sep.join([first] * 60))


def build(seed: int = 0, per_category: int = 200, folds: int = 5,
          data: Path | None = None) -> list[ContrastivePair]:
    """per_category pairs of each category over a seeded sample of AlpacaEval's instructions;
    the good side is output_1 or output_2 by a seeded draw."""
    data = data or shared_data_dir() / "alpaca_eval"
    good = _good_answers(data)
    instructions = sorted(good)
    rng = random.Random(seed)
    pairs = []
    for category in CATEGORIES:
        for instruction in rng.sample(instructions, min(per_category, len(instructions))):
            answer, model = rng.choice(good[instruction])
            used, models = [instruction], {model}  # whose texts the pair shows
            complete = rng.random() < 0.5
            shown = answer if complete else cut(answer)
            ok = Candidate(shown, "good", "eos" if complete or shown == answer else "length")
            if category == "cut_vs_offtopic":
                ok = Candidate(cut(answer), "good", "length" if cut(answer) != answer else "eos")
                other = rng.choice([i for i in instructions if i != instruction])
                text, by = rng.choice(good[other])
                bad = Candidate(text, "bad", "eos")
                used, models = used + [other], models | {by}
            elif category == "vs_echo":
                once = rng.random() < 0.5
                bad = Candidate(instruction if once else cut("\n".join([instruction] * 40)),
                                "bad", "eos" if once else "length")
            elif category == "vs_questions":
                text, asked = _questions(instruction, instructions, rng)
                bad = Candidate(text, "bad", "eos")
                used += asked
            elif category == "vs_markup":
                template = rng.choice(_ROLE_LEAKS)  # drawn before the question, as ever
                asked = rng.choice(instructions)
                leak = template.format(q=asked.splitlines()[0])
                head = cut(answer, rng.randint(15, 50))
                other = rng.choice(instructions)
                text, by = rng.choice(good[other])
                tail = cut(text, rng.randint(10, 40))
                bad = Candidate(head + leak + tail, "bad", rng.choice(("eos", "length")))
                used, models = used + [asked, other], models | {by}
            elif category == "vs_loop":
                bad = Candidate(_loop(answer, rng), "bad", "length")
            else:
                line = rng.choice(_ONE_LINERS + (answer.strip().splitlines()[0][:60],))
                bad = Candidate(line, "bad", "eos")
            good_side = rng.choice((1, 2))
            item = (PairwiseItem(instruction, ok, bad, category) if good_side == 1
                    else PairwiseItem(instruction, bad, ok, category))
            pairs.append(ContrastivePair(
                category, item, good_side, instruction_fold(instruction, folds),
                frozenset(models - {REFERENCE}),
                frozenset(instruction_fold(i, folds) for i in used)))
    return pairs


def swapped(item: PairwiseItem) -> PairwiseItem:
    """The same pair with its two outputs in the other order."""
    return PairwiseItem(item.instruction, item.output_2, item.output_1, item.instruction_id)
