"""The report's size, render time and Chromium load time for a large run (805 x 10 by default).

No model runs: a run directory is written with AlpacaEval's 805 instructions, GPT-4-turbo's
outputs (cut and varied per variant, so each variant's text differs) as ten variants'
generations, and heuristic-style judgments against the stored outputs; then the report is
rendered from it as `python -m harness report` does, and loaded in headless Chromium.

    python benchmarks/report_size.py [--variants 10] [--instructions 805] [--keep DIR]
    python benchmarks/report_size.py --run results/RUN_ID     # time a real run's report instead
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.core.cache import shared_data_dir  # noqa: E402
from harness.core.hashing import canonical_json  # noqa: E402
from harness.report.html import write_report  # noqa: E402
from harness.store.records import GenerationRecord, JudgmentRecord, to_dict  # noqa: E402


def fabricate(run_dir: Path, n_variants: int, n_instructions: int) -> None:
    """A finished head-to-head run against stored outputs, written as the runner writes it."""
    rows = json.loads((shared_data_dir() / "alpaca_eval/gpt4_1106_preview_outputs.json")
                      .read_text(encoding="utf-8"))[:n_instructions]
    rng = random.Random(0)
    models = [f"variant-{i:02d}" for i in range(n_variants)]
    task = "alpaca_eval_gpt4"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "tables").mkdir(exist_ok=True)
    gens, judgments, summary = [], [], []
    for m, model in enumerate(models):
        prefs = []
        for i, row in enumerate(rows):
            donor = rows[(i + 7 * m) % len(rows)]["output"]  # another answer's text
            cut = rng.randint(200, 2400)
            out = donor[:cut]
            finish = "eos" if cut < len(donor) or rng.random() < 0.5 else "length"
            gens.append(GenerationRecord(
                key=f"{m}-{i}", task=task, model=model, instruction_id=str(i),
                instruction=row["instruction"], prompt=row["instruction"], output=out,
                n_prompt_tokens=len(row["instruction"]) // 4, n_tokens=len(out) // 4,
                finish_reason=finish))
            pref = rng.choice([1.0, 1.0, 1.5, 2.0])
            prefs.append(pref)
            judgments.append(JudgmentRecord(
                key=f"j{m}-{i}", task=task, model=model, instruction_id=str(i),
                judge="heuristic_combined", judge_spec_hash="x", generator_1="gpt4_1106_preview",
                generator_2=model, preference=pref, raw="",
                info={"method": "combined", "logit": round(rng.uniform(-3, 3), 6),
                      "reference_output": row["output"]}))
        win = 100 * (sum(prefs) / len(prefs) - 1)
        summary.append({"task": task, "kind": "head_to_head", "model": model, "role": "variant",
                        "reference": "gpt4_1106_preview", "n": len(rows), "win_rate": win,
                        "standard_error": 1.5, "ci_low": win - 3, "ci_high": win + 3,
                        "length_controlled_winrate": win, "n_wins": prefs.count(2.0),
                        "n_wins_base": prefs.count(1.0), "n_draws": prefs.count(1.5),
                        "mean_tokens": 120.0, "eos_share": 0.5})
    with (run_dir / "generations.jsonl").open("w") as f:
        f.writelines(json.dumps(to_dict(g)) + "\n" for g in gens)
    with (run_dir / "judgments.jsonl").open("w") as f:
        f.writelines(json.dumps(to_dict(j)) + "\n" for j in judgments)
    config = {"harness_version": "bench", "reference": "none",
              "models": [{"name": m, "decoding": {"seed": 0, "max_new_tokens": 600}}
                         for m in models],
              "tasks": [{"name": task, "kind": "head_to_head", "n": len(rows),
                         "reference": "outputs", "source": "alpaca_eval"}],
              "judge": {"name": "heuristic_combined", "kind": "heuristic", "params": {},
                        "template": ""}}
    (run_dir / "config.json").write_text(canonical_json(config) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"meta": {"run_id": run_dir.name},
                                                      "rows": summary}))
    (run_dir / "tables" / f"{task}.summary.json").write_text(json.dumps(summary))
    (run_dir / "tables" / f"{task}.instructions.json").write_text(json.dumps(
        [{"id": str(i), "source": "alpaca_eval", "category": r["dataset"],
          "instruction": r["instruction"]} for i, r in enumerate(rows)]))


PROBE = """<script>addEventListener("load", () => {
  const nav = performance.getEntriesByType("navigation")[0];
  const paint = performance.getEntriesByName("first-contentful-paint")[0];
  const t = {dom: nav.domContentLoadedEventEnd, load: performance.now(),
             paint: paint ? paint.startTime : null};
  document.documentElement.innerHTML = "<body><pre id=probe>" + JSON.stringify(t) + "</pre>";
});</script>"""


def chromium_load_seconds(path: Path, repeats: int = 3) -> dict[str, float | None] | None:
    """Median seconds to DOMContentLoaded, first contentful paint and the load event in headless
    Chromium, read by a probe script appended to a copy of the report (the browser's own clock)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probed.html"
        probe.write_bytes(path.read_bytes() + PROBE.encode())
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 f"--user-data-dir={tmp}/profile", "--dump-dom", probe.as_uri()]
        for _ in range(repeats):
            out = subprocess.run(flags, capture_output=True, text=True, timeout=300).stdout
            runs.append(json.loads(out.split("<pre id=\"probe\">")[1].split("</pre>")[0]))
    out: dict[str, float | None] = {}
    for k in ("dom", "paint", "load"):  # no paint entry: Chromium painted nothing contentful
        got = sorted(r[k] / 1000 for r in runs if r[k] is not None)
        out[k] = got[len(got) // 2] if got else None
    return out


def describe(load: dict[str, float | None] | None) -> str:
    """The load figures as one phrase ("–" where Chromium gave none)."""
    if load is None:
        return "no chromium to time the load"

    def s(k: str) -> str:
        return "–" if load[k] is None else f"{load[k]:.2f} s"

    return f"Chromium: DOM ready {s('dom')}, first paint {s('paint')}, load event {s('load')}"


def measure(run_dir: Path) -> str:
    """Render the run's report as `python -m harness report` does; its size, render and load."""
    start = time.perf_counter()
    path = write_report(run_dir)
    render = time.perf_counter() - start
    return (f"report {path.stat().st_size / 1e6:.1f} MB, rendered in {render:.1f} s; "
            + describe(chromium_load_seconds(path)))


def main() -> None:
    """Fabricate, render, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", type=int, default=10)
    parser.add_argument("--instructions", type=int, default=805)
    parser.add_argument("--keep", help="write the run here and keep it")
    parser.add_argument("--run", help="re-render and time this existing run directory instead")
    args = parser.parse_args()
    if args.run:
        run_dir = Path(args.run).resolve()
        print(f"{run_dir}: {measure(run_dir)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep) if args.keep else Path(tmp) / "run-bench"
        fabricate(run_dir, args.variants, args.instructions)
        print(f"{args.instructions} instructions x {args.variants} variants: {measure(run_dir)}")

if __name__ == "__main__":
    main()
