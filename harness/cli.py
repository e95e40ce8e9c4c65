"""Command line: `python -m harness run|merge|list|export|report|leaderboard|...`.

Every handler lives here; the modules they call hold the work. Bad input of any kind (unknown
name, malformed file, unreachable judge, unwritable directory) prints one line and exits 2.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from harness.core.cache import shared_data_dir
from harness.core.configs import PROJECT_ENV, find_named, load_named_toml, read_json
from harness.core.errors import ConfigError, DataError, HarnessError
from harness.generate.backends import DEFAULT_BATCH_SIZE
from harness.judging import blind
from harness.judging.registry import available_judges, load_judge_spec
from harness.models.builds import build_status
from harness.models.registry import load_registry
from harness.report import html as rp
from harness.report.text import format_table, validity_line
from harness.run import build_check
from harness.run.shards import parse_shard
from harness.store.logs import RecordLog, os_error
from harness.store.records import GenerationRecord, to_dict
from harness.tasks.kinds import available_tasks
from harness.tasks.protocol import fmt
from harness.train import tuning


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit code 2), like every other error."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _shard(text: str) -> Any:
    try:
        return parse_shard(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ------------------------------------------------------------------------------------ run


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.run.runner import RunConfig, run

    config = RunConfig(models=args.models, tasks=tuple(t.strip() for t in args.tasks.split(",")
                                                       if t.strip()),
                       judge=args.judge, limit=args.limit, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size,
                       results_dir=Path(args.results_dir) if args.results_dir else None,
                       run_id=args.run_id,
                       registry_path=Path(args.registry) if args.registry else None,
                       shard=args.shard)
    result = run(config)
    print(f"report: {result.report_path}")
    print(f"generated {result.n_generated}, judged {result.n_judged}, scored "
          f"{result.n_scored}, {result.seconds:.1f} s")
    if args.shard is not None:
        print(f"shard {args.shard}: the tables cover this shard's samples only; merge the "
              f"shards (python -m harness merge) for the run's results")
    print(format_table(result.summary))
    print(validity_line(result.validity, args.judge))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from harness.run.merge import merge

    if args.out and (args.run_id or args.results_dir):
        raise ConfigError("merge: --out names the run directory; it cannot be combined with "
                          "--run-id or --results-dir")
    result = merge([Path(d) for d in args.dirs], out=_out(args), run_id=args.run_id,
                   results_dir=Path(args.results_dir) if args.results_dir else None,
                   allow_partial=args.allow_partial)
    print(f"report: {result.report_path}")
    print(f"merged {len(args.dirs)} shard directories into {result.run_dir}, "
          f"{result.seconds:.1f} s")
    print(format_table(result.summary))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    print("models:")
    for spec in load_registry(Path(args.registry) if args.registry else None).values():
        flags = [spec.role] if spec.role == "reference" else []
        if not spec.enabled:
            flags.append("not in 'all'")
        if spec.tune is not None:  # tuned: built (in 'all'), or the command that builds it

            flags.append(build_status(spec))
        extra = f" [{', '.join(flags)}]" if flags else ""
        print(f"  {spec.name}{extra}: {spec.description or spec.source}")

    print("tasks:")
    for name in available_tasks():
        try:
            data = load_named_toml("tasks", name)[1]
        except HarnessError as e:
            print(f"  {name} [unreadable: {e}]")
            continue
        kind, desc = data.get("kind", "head_to_head"), data.get("description", "")
        print(f"  {name} [{kind}]: {desc}" if desc else f"  {name} [{kind}]")
    print("judges:\n  " + "\n  ".join(available_judges()))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from harness.report.export import export_run

    for path in export_run(Path(args.run_dir), Path(args.out) if args.out else None):
        print(path)
    return 0


# ---------------------------------------------------------------------------- leaderboard


def _print_comparison(table: Any) -> None:
    """Print ours next to the official leaderboard, then the summary lines."""
    import pandas as pd

    show = {
        "WR": table["win_rate"], "WR off": table["win_rate_official"],
        "WR diff": table["win_rate_diff"], "SE diff": table.get("standard_error_diff"),
        "counts ok": table["counts_match"],
        "LC": table["length_controlled_winrate"],
        "LC off": table["length_controlled_winrate_official"],
        "LC diff": table["length_controlled_winrate_diff"],
    }
    frame = pd.DataFrame({k: v for k, v in show.items() if v is not None})
    print(frame.to_string(float_format=lambda v: f"{v:.2f}"))
    lc_err = table["length_controlled_winrate_diff"].abs()
    rho = table["length_controlled_winrate"].corr(table["length_controlled_winrate_official"],
                                                  method="spearman")
    print(f"win rate: max |diff| {table['win_rate_diff'].abs().max():.2e}; "
          f"counts match for {int(table['counts_match'].sum())}/{len(table)} models")
    print(f"LC win rate: median |diff| {lc_err.median():.2f}, max |diff| {lc_err.max():.2f} "
          f"({lc_err.idxmax()}), Spearman {rho:.3f} over {len(table)} models")


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness.stats.leaderboard import (
        compare_leaderboards,
        read_leaderboard_csv,
        reproduce_leaderboard,
    )

    annotations = Path(args.annotations or shared_data_dir() / "alpaca_eval" / "annotations")
    start = time.perf_counter()
    ours = reproduce_leaderboard(annotations, use_hub=args.hub)
    elapsed = time.perf_counter() - start
    if args.compare is None:
        print(ours.to_string(float_format=lambda v: f"{v:.2f}"))
    else:
        _print_comparison(compare_leaderboards(ours, read_leaderboard_csv(Path(args.compare))))
    print(f"{len(ours)} models in {elapsed:.1f} s "
          f"({'hub difficulty and df_gamed' if args.hub else 'offline joint difficulty fit'})")
    return 0


# ------------------------------------------------------------------------ judge-agreement


def _log(message: str) -> None:
    """Progress and notes go to stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def _cmd_judge_agreement(args: argparse.Namespace) -> int:
    from harness.judging import agreement as ja

    names = [n.strip() for n in args.judges.split(",") if n.strip()]
    if not names:
        raise ConfigError("--judges: give at least one judge name")
    for n in names:
        ja.resolve_spec(n)  # fail fast, before any work, on an unknown name
    if ja.BASELINE_JUDGE not in names:
        names.insert(0, ja.BASELINE_JUDGE)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    annotations = Path(args.annotations) if args.annotations else None
    sets = ja.load_annotations(annotations, limit=args.limit, models=models)
    _log(f"{len(sets)} models, {sum(len(s.items) for s in sets)} annotated pairs"
         + (f" ({sum(s.dropped for s in sets)} without a preference dropped)"
            if any(s.dropped for s in sets) else ""))
    if args.refit:
        weights = ja.refit_combined(sets)
        _log(f"refitted {ja.COMBINED_TOML.name}: " + ", ".join(f"{k}={v:+.3f}"
                                                              for k, v in weights.items()))
    rows = ja.evaluate(names, sets, holdout=not args.no_holdout, log=_log)
    print(ja.format_report(rows))
    if args.refit:  # record the held-out result beside the weights it validates
        pooled = {r["judge"]: r["agreement"] for r in rows if r["model"] == "ALL"}
        combined = next((n for n in names if ja.is_combined(ja.resolve_spec(n))), None)
        if combined is not None and not args.no_holdout:
            ja.refit_combined(sets, baseline_agreement=pooled[ja.BASELINE_JUDGE],
                              held_out_agreement=pooled[combined])
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=float),
                                       encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot write {args.json}: {e.strerror}") from None
        _log(f"wrote {args.json}")
    return 0


def _cmd_validate_judges(args: argparse.Namespace) -> int:
    from harness.judging import validation as jv
    from harness.judging.agreement import resolve_spec

    names = [n.strip() for n in args.judges.split(",") if n.strip()]
    if not names:
        raise ConfigError("--judges: give at least one judge name")
    for n in names:
        resolve_spec(n)  # fail fast, before any work, on an unknown name
    custom = bool(args.annotations or args.pairs or args.labels)  # runs print the built-in's
    if custom and args.ship:
        raise ConfigError("--ship writes the built-in suite's figures: drop --annotations, "
                          "--pairs and --labels")
    suite = jv.load_suite(Path(args.annotations) if args.annotations else None,
                          Path(args.pairs) if args.pairs else None,
                          Path(args.labels) if args.labels else None)
    _log(f"suite: {sum(len(s.items) for s in suite.annotations)} annotated pairs of "
         f"{len(suite.annotations)} models, {len(suite.contrastive)} contrastive pairs, "
         f"{len(suite.blind)} blind-labelled pairs ({len(suite.stale)} stale, "
         f"{len(suite.unlabelled)} unlabelled)")
    if args.against:
        gens = _run_generations(Path(args.against))
        stale = blind.stale_against_run(blind.read_pairs(Path(args.pairs) if args.pairs
                                                         else blind.PAIRS_FILE), gens)
        _log(f"{len(stale)} labelled pairs differ from {args.against}'s outputs"
             + (f": {', '.join(stale[:10])}" if stale else ""))
    if args.refit:
        path = find_named("judges", args.refit)
        weights = jv.refit(path, suite)
        load_judge_spec(str(path))  # the rewritten config must read back as a judge
        _log(f"refitted {path}: " + ", ".join(f"{k}={v:+.3f}" for k, v in weights.items()))
    results = jv.run_suite(names, suite, store=not custom, ship=args.ship, log=_log)
    print(jv.format_suite(results))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot write {args.json}: {e.strerror}") from None
    return 0


def _run_generations(run_dir: Path) -> list[dict[str, Any]]:
    """A run's stored generations as plain rows."""
    path = run_dir / "generations.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no generations.jsonl (is it a run directory?)")
    return [to_dict(r) for r in RecordLog(path, GenerationRecord)]


def _cmd_blind_pairs(args: argparse.Namespace) -> int:
    gens = [g for d in args.runs for g in _run_generations(Path(d))]
    reference = args.reference
    if not reference:
        summary = read_json(Path(args.runs[0]) / "summary.json", "run summary")
        reference = summary.get("meta", {}).get("reference") if isinstance(summary, dict) \
            else None
        if not isinstance(reference, str):
            raise DataError(f"{args.runs[0]}/summary.json names no reference; give --reference")
    pairs = blind.build_pairs(gens, reference, args.per_variant, seed=args.seed)
    blind.write_jsonl(Path(args.out), pairs)
    if args.views:
        blind.write_jsonl(Path(args.views), [blind.reader_view(p) for p in pairs])
    _log(f"wrote {len(pairs)} pairs to {args.out}"
         + (f" and what readers see to {args.views}" if args.views else ""))
    return 0


# ------------------------------------------------------------------------ baseline / check


def _cmd_report(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.runs]
    if len(runs) > 2:
        raise ConfigError("report takes one run, or two to compare (RUN_A RUN_B)")
    if args.format == "html":
        if len(runs) == 2:
            path = rp.write_report(runs[1], compare_with=runs[0], out=_out(args))
        else:
            path = rp.write_report(runs[0], out=_out(args))
        print(path)
        return 0
    rows = rp.load_run(runs[-1], records=False).rows
    if len(runs) == 2:
        rows = rp.compare_rows(rp.load_run(runs[0], records=False).rows, rows)
    text = rp.to_markdown(rows, compare=len(runs) == 2) if args.format == "md" \
        else rp.to_csv(rows)
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as e:
            raise os_error(e, Path(args.out), "write") from None
        print(args.out)
    else:
        sys.stdout.write(text)
    return 0


def _out(args: argparse.Namespace) -> Path | None:
    return Path(args.out) if args.out else None


def _cmd_baseline(args: argparse.Namespace) -> int:
    from harness.report.regression import write_baseline

    print(write_baseline(Path(args.run_dir), Path(args.output)))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from harness.report import regression as rg

    rule = rg.Rule(alpha=args.alpha, z=args.z, min_delta=args.min_delta)
    comparisons = rg.check(Path(args.run_dir), Path(args.baseline), rule, args.allow_changed)
    print(rg.format_table(comparisons))
    outputs = rg.CheckOutputs(junit=Path(args.junit) if args.junit else None,
                              markdown=Path(args.markdown) if args.markdown else None)
    rg.write_reports(comparisons, rule, outputs)
    for path in outputs.written:
        print(f"wrote {path}")
    if args.update:
        rg.write_baseline(Path(args.run_dir), Path(args.baseline))
        print(f"updated {args.baseline} from {args.run_dir}")
        return 0
    bad = [c for c in comparisons if c.verdict in rg.FAILING]
    if bad:
        print(f"FAILED: {len(bad)} of {len(comparisons)} rows "
              f"({', '.join(sorted({c.verdict for c in bad}))})", file=sys.stderr)
        return 1
    print(f"passed: {len(comparisons)} rows, no regression")
    return 0


# ------------------------------------------------------------------------------------ tune


def _cmd_tune(args: argparse.Namespace) -> int:
    registry = load_registry(Path(args.registry) if args.registry else None)
    for spec in tuning.tunable(registry, args.names):
        try:
            result = tuning.tune_variant(spec, device=args.device, measure=(
                build_check.in_training(spec) if args.curve else None))
        except tuning.TuneInterrupted as e:
            print(e, file=sys.stderr)  # "interrupted at step k of n; ...; resume with: ..."
            return e.exit_code
        info = result.info
        if not result.trained:
            print(f"{spec.name}: already built: {result.path}")
        else:
            val = info.get("validation_loss")
            print(f"{spec.name}: built {result.path} ({info['steps']} steps, final loss "
                  f"{fmt(info['final_loss'], '.4f')}"
                  + (f", validation loss {val:.4f}" if val is not None else "")
                  + f", {info['tokens_trained']} tokens in {info['seconds']:.0f} s on "
                  f"{info['device']}, {fmt(info['tokens_per_second'])} tokens/s)")
        if args.no_check:
            continue
        check = info.get("check")
        if not build_check.is_current(check, spec):
            try:
                check = build_check.check_build(spec)
            except HarnessError as e:  # the build stands; only its check could not run
                print(f"warning: {spec.name}: post-build check skipped: {e}", file=sys.stderr)
                continue
        for line in build_check.check_lines(spec.name, check):
            print(line)
    return 0


# --------------------------------------------------------------------------------- parser


def jv_default_judges() -> tuple[str, ...]:
    """The judges validate-judges shows by default (the default judge first)."""
    from harness.run.runner import DEFAULT_JUDGE

    rest = ("heuristic_combined", "longer", "termination")
    return (DEFAULT_JUDGE, *(j for j in rest if j != DEFAULT_JUDGE))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from harness.run.runner import DEFAULT_JUDGE

    parser = _Parser(prog="python -m harness", description=__doc__.splitlines()[0])
    parser.add_argument("--project", metavar="DIR",
                        help="folder whose models.toml, tasks/ and judges/ add to the built-in "
                             "ones, and whose results/ holds runs (default: the working dir)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="generate, judge, summarise and report")
    p.add_argument("--models", default="all", help="'all' or a comma-separated list of variants")
    p.add_argument("--tasks", default="instructions",
                   help="comma-separated task names, or 'all' (python -m harness list)")
    p.add_argument("--judge", default=DEFAULT_JUDGE, help="judge name (judges/<name>.toml) or path")
    p.add_argument("--limit", type=_positive_int,
                   help="first N instructions of each task's each source (N pairs for ranking)")
    p.add_argument("--max-new-tokens", type=_positive_int, help="override every variant's cap")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                   help="prompts decoded at once per variant; the variants of one model "
                        "decode together, batch x variants rows (default %(default)s)")
    p.add_argument("--results-dir", help="where runs go (default: results/ in the project)")
    p.add_argument("--run-id", help="name of the run directory (default: derived from config)")
    p.add_argument("--registry", help="a models.toml that replaces the built-in registry")
    p.add_argument("--shard", type=_shard, metavar="i/N",
                   help="run only shard i of N (0-based, 0 <= i < N), e.g. 0/4; samples are "
                        "assigned by their instruction; `merge` combines the shards")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("merge", help="combine the shard runs of one config into one run",
                       description="Union the records of shard run directories (run --shard "
                                   "i/N) and recompute the tables, summary and report as the "
                                   "unsharded run would, with no model or judge. Every shard "
                                   "0..N-1 must be given unless --allow-partial.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="shard run directories")
    p.add_argument("--out", help="the merged run directory (default: RESULTS_DIR/RUN_ID)")
    p.add_argument("--run-id", help="name of the merged run (default: the id the unsharded run "
                                    "would have)")
    p.add_argument("--results-dir", help="where the merged run goes (default: beside the first "
                                         "shard)")
    p.add_argument("--allow-partial", action="store_true",
                   help="merge an incomplete set of shards (a warning, and the run is marked "
                        "partial) instead of refusing it")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("list", help="registered variants, tasks and judges")
    p.add_argument("--registry", help="a models.toml that replaces the built-in registry")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("export", help="write a run as AlpacaEval model_outputs/annotations files")
    p.add_argument("run_dir", help="results/<run-id>")
    p.add_argument("--out", help="output folder (default: <run_dir>/alpaca_eval)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("report", help="re-render a run's report from its stored results",
                       description="Re-render from stored results (no model or judge): HTML "
                                   "(default), or the leaderboards as Markdown or CSV. Two runs "
                                   "(RUN_A RUN_B) add run A's numbers and the delta.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="results/<run-id> (one, or two)")
    p.add_argument("--format", choices=("html", "md", "csv"), default="html")
    p.add_argument("--out", help="file to write (default: html into the run, md/csv to stdout)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("baseline", help="write a regression baseline from a finished run")
    p.add_argument("run_dir", help="results/<run-id>")
    p.add_argument("-o", "--output", required=True, help="baseline file to write (JSON)")
    p.set_defaults(func=_cmd_baseline)

    p = sub.add_parser("check", help="compare a run with a baseline; exit 1 on a regression",
                       description="Per task x variant: a paired bootstrap on per-instruction "
                                   "preferences when both judged the same instructions, else "
                                   "|delta| > z*sqrt(SE_base^2 + SE_now^2); a change must also "
                                   "reach --min-delta points. Exit 1 on a regression or a "
                                   "changed config, 0 otherwise, 2 on bad input.")
    p.add_argument("run_dir", help="results/<run-id>")
    p.add_argument("--baseline", required=True, help="baseline file (from `baseline`)")
    p.add_argument("--alpha", type=float, default=0.05, help="test level (default 0.05)")
    p.add_argument("--z", type=float, default=1.96, help="z of the unpaired rule (default 1.96)")
    p.add_argument("--min-delta", type=float, default=1.0,
                   help="smallest win-rate change in points that counts (default 1.0)")
    p.add_argument("--allow-changed", action="store_true",
                   help="compare rows whose model, prompts or judge changed")
    p.add_argument("--update", action="store_true",
                   help="after printing the check, rewrite the baseline from this run")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML")
    p.add_argument("--markdown", metavar="FILE", help="also write a Markdown table")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "leaderboard", help="recompute AlpacaEval 2.0 win rates and LC win rates from annotations",
        description="Recompute the AlpacaEval 2.0 leaderboard columns from <model>.json "
                    "annotation files; with --compare, print them next to an official csv.")
    p.add_argument("--annotations", default=None,
                   help="folder of <model>.json AlpacaEval annotations (default: "
                        "alpaca_eval/annotations in the shared data folder)")
    p.add_argument("--compare", default=None, metavar="CSV",
                   help="official leaderboard csv to compare with, e.g. leaderboard_dev.csv")
    p.add_argument("--hub", action="store_true",
                   help="use AlpacaEval's instruction difficulty and gamed-baseline rows "
                        "from the Hugging Face hub instead of the offline joint fit")
    p.set_defaults(func=_cmd_leaderboard)

    p = sub.add_parser(
        "judge-agreement",
        help="measure judges against GPT-4-turbo's AlpacaEval 2.0 preferences",
        description="Agreement (ties excluded), Cohen's kappa and per-model win rates of each "
                    "judge against reference annotations; always-pick-the-longer is the baseline. "
                    "Judges fitted to these annotations (heuristic_combined) are scored held-out.")
    p.add_argument("--judges", default="heuristic,repetition,relevance,heuristic_combined",
                   help="comma-separated judge names (judges/<name>.toml) or built-in heuristic "
                        "methods length, termination, repetition, relevance, target_length "
                        "(default: %(default)s)")
    p.add_argument("--annotations", default=None,
                   help="folder of AlpacaEval annotation files <model>.json (default: "
                        "alpaca_eval/annotations in the shared data folder)")
    p.add_argument("--models", default="", help="comma-separated subset of models (file stems)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="use the first N pairs of each model")
    p.add_argument("--json", default="", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--refit", action="store_true",
                   help="refit heuristic_combined's weights on these annotations and rewrite "
                        "judges/heuristic_combined.toml (then report held-out agreement)")
    p.add_argument("--no-holdout", action="store_true",
                   help="score fitted judges with their stored weights (in-sample; optimistic)")
    p.set_defaults(func=_cmd_judge_agreement)

    p = sub.add_parser(
        "validate-judges", help="score judges on the validation suite: (a) contrastive pairs, "
                                "(b) blind-labelled pairs, (c) AlpacaEval annotations",
        description="Each judge beside `longer` and `termination`: (a) contrastive pairs with "
                    "known answers built from the shared AlpacaEval data, both orders; (b) the "
                    "blind-labelled pairs of this harness's own outputs (judges/validation/); "
                    "(c) GPT-4-turbo's annotations, leave-one-model-out. Fitted judges are "
                    "scored held out. The figures are cached per resolved judge spec; runs "
                    "print them beside their win rates.")
    p.add_argument("--judges", default=",".join(jv_default_judges()),
                   help="comma-separated judge names or built-in methods (default: %(default)s)")
    p.add_argument("--annotations", default=None, help="folder of <model>.json annotations "
                                                        "(default: the shared data's)")
    p.add_argument("--pairs", default=None, help="blind pairs JSONL (default: the built-in)")
    p.add_argument("--labels", default=None, help="blind labels JSONL (default: the built-in)")
    p.add_argument("--against", default=None, metavar="RUN",
                   help="also count the labelled pairs whose outputs differ from a run's")
    p.add_argument("--refit", default=None, metavar="JUDGE",
                   help="refit a combined judge with fit_sources on the whole suite and "
                        "rewrite its TOML before validating")
    p.add_argument("--ship", action="store_true",
                   help="also write the figures beside the built-in judges "
                        "(judges/validation/<name>.json)")
    p.add_argument("--json", default="", metavar="PATH", help="also write the figures as JSON")
    p.set_defaults(func=_cmd_validate_judges)

    p = sub.add_parser(
        "blind-pairs", help="build blind pairs of runs' outputs for labelling",
        description="Each variant against the reference on the labelled tasks "
                    "(implicit_ins_val, mtbench; never the built-in 72 or AlpacaEval's 805): "
                    "a seeded sample, sides drawn, shuffled across variants, every output's "
                    "sha256 stored.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="results/<run-id> folders")
    p.add_argument("--out", required=True, help="pairs JSONL to write")
    p.add_argument("--views", help="also write what readers see (ids, instruction, A, B)")
    p.add_argument("--per-variant", type=_positive_int, default=80)
    p.add_argument("--reference", help="the reference variant (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_blind_pairs)
    p = sub.add_parser(
        "tune", help="build tuned variants (instruction-, response-, poetry-tuned)",
        description="Train each named variant's [tune] recipe (models.toml) from its base "
                    "weights and store it in the cache, keyed by the recipe and its data. An "
                    "interrupted build resumes from its last checkpoint; a built one is kept. "
                    "Each build is then checked: greedy outputs for a few held-out "
                    "instructions, with their EOS, loop and verse shares and two samples.")
    p.add_argument("names", help="a tuned variant, a comma-separated list, or 'all'")
    p.add_argument("--curve", action="store_true",
                   help="also run the check (greedy outputs, EOS, loop and verse shares) before "
                        "training and after each epoch; every output goes into the curve of "
                        "the build record")
    p.add_argument("--no-check", action="store_true",
                   help="skip the post-build check (greedy outputs on held-out instructions)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (default: cuda when available); on cuda the recipe's "
                        "gpu settings apply")
    p.add_argument("--registry", help="a models.toml that replaces the built-in registry")
    p.set_defaults(func=_cmd_tune)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, Slurm and `kill` send), handled as Ctrl-C is."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input gives one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (main() called from a worker): leave it be
        pass
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.project:
            if not Path(args.project).is_dir():
                raise ConfigError(f"--project {args.project}: not a directory")
            os.environ[PROJECT_ENV] = str(Path(args.project).resolve())
        return int(args.func(args) or 0)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # stdout closed early (e.g. `| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a filesystem error no module mapped: still one line, with the path
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot access{where}: {e.strerror or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}: everything computed so far is saved; run the same command to resume",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
