"""Progress that tells the truth: the bar moves as tokens are made, not once per batch."""

import pytest

from harness.generate.backends import template_prompt as format_prompt
from harness.generate.transformers import generate, load_model, load_tokenizer
from harness.run import runner

PROMPTS = ["Write a haiku about rain.", "List three colours.", "What is 2 + 2?",
           "Explain gravity to a child in one sentence."]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from tiny import tiny_spec

    spec = tiny_spec(tmp_path_factory.mktemp("tiny") / "m", max_new_tokens=12)
    return load_model(spec, load_tokenizer(spec))


def test_generation_reports_each_step_and_ends_at_the_batch_size(loaded):
    """What the bar shows (records out + the progress heard) moves every step, never back."""
    events: list[tuple[str, float]] = []
    prompts = [format_prompt(loaded.spec, loaded.tokenizer, p) for p in PROMPTS]
    got = []
    for _, g in generate(loaded, prompts, batch_size=4,
                         on_progress=lambda x: events.append(("tick", x))):
        events.append(("record", 0.0))
        got.append(g)
    steps = max(g.n_tokens + (g.finish_reason == "eos") for g in got)
    assert sum(kind == "tick" for kind, _ in events) == steps  # once per decoding step
    shown, out, heard = [], 0, 0.0
    for kind, x in events:
        if kind == "tick":
            heard = x
        else:
            out, heard = out + 1, heard - 1
        shown.append(out + heard)
    assert shown == sorted(shown) and shown[0] < 4
    assert shown[-1] == pytest.approx(4.0) and out == 4  # every row ended or reached the cap


def test_the_bar_moves_between_records_and_stops_at_the_total(tmp_path, monkeypatch):
    positions: list[float] = []
    real_advance = runner._advance

    def spy(bar, n):
        real_advance(bar, n)
        positions.append(bar.n)

    monkeypatch.setattr(runner, "_advance", spy)
    wanted = [runner.Wanted(("t", "m", str(i)), f"k{i}", {}, None) for i in range(4)]

    def compute(todo, tick):
        for step in range(1, 5):  # one batch of 4 running for 4 steps
            tick(step)
        yield from ((i, {"key": w.key}) for i, w in enumerate(todo))

    class Memory:
        def __init__(self):
            self.records = {}

        def lookup(self, key, labels):
            return None

        def add(self, rec):
            self.records[rec["key"]] = rec

    _, made = runner.fill(Memory(), wanted, compute, "test")
    assert made == 4
    assert positions[:4] == [1.0, 2.0, 3.0, 4.0]  # the bar moved while the batch ran
    assert max(positions) == 4.0 and positions[-1] == 4.0  # records did not push it past
