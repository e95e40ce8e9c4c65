"""Export a stored run in AlpacaEval's own file formats (model outputs and annotations per
variant), so AlpacaEval's tools can read what the harness made."""

from __future__ import annotations

from pathlib import Path

from harness.core.configs import path_component
from harness.core.errors import DataError
from harness.data.alpaca_formats import (
    Annotation,
    ModelOutput,
    write_annotations,
    write_model_outputs,
)
from harness.store.logs import RecordLog, by_row
from harness.store.records import GenerationRecord, JudgmentRecord


def export_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write a run's outputs and judgments as AlpacaEval files: <out>/<model>/{model_outputs,
    annotations}.json, so AlpacaEval (or any tool reading its formats) can use them."""
    run_dir = Path(run_dir)
    gens_path, judg_path = run_dir / "generations.jsonl", run_dir / "judgments.jsonl"
    if not gens_path.exists():
        raise DataError(f"{run_dir} is not a run directory (no generations.jsonl)")
    out_dir = Path(out_dir) if out_dir else run_dir / "alpaca_eval"
    gens = list(RecordLog(gens_path, GenerationRecord, by_row))
    for model in dict.fromkeys(g.model for g in gens):  # each becomes <out>/<model>/
        path_component(model, f"{gens_path}: variant name")
    by_where = {(g.task, g.model, g.instruction_id): g for g in gens}
    written = []
    for model in dict.fromkeys(g.model for g in gens):
        outs = [ModelOutput(g.instruction, g.output, model, g.task)
                for g in gens if g.model == model]
        path = out_dir / model / "model_outputs.json"
        write_model_outputs(path, outs)
        written.append(path)
    judgments = (list(RecordLog(judg_path, JudgmentRecord, by_row)) if judg_path.exists()
                 else [])
    for model in dict.fromkeys(j.model for j in judgments):
        anns = []
        for j in judgments:
            if j.model != model:
                continue
            g1 = by_where.get((j.task, j.generator_1, j.instruction_id))
            g2 = by_where.get((j.task, j.generator_2, j.instruction_id))
            stored = (j.info or {}).get("reference_output")  # judged against stored outputs
            if g2 is None or (g1 is None and not isinstance(stored, str)):
                raise DataError(f"{judg_path}: judgment of {j.model} on {j.task}/"
                                f"{j.instruction_id} has no generation in {gens_path}")
            ref_output = g1.output if g1 is not None else stored
            anns.append(Annotation(g2.instruction, ref_output, g2.output, j.preference,
                                   j.generator_1, j.generator_2, j.judge, j.raw,
                                   (j.info or {}).get("cost_usd"), j.task))
        path = out_dir / model / "annotations.json"
        write_annotations(path, anns)
        written.append(path)
    return written
