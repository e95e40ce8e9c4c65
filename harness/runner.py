"""One evaluation run: generate (cached), judge against the reference (cached), summarise, report.

Every record is keyed by a content hash of what produced it, appended and flushed as it is
made, so a killed run resumes with no work redone and a repeated run performs none.
"""

import ctypes
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness import __version__
from harness.configs import path_component, project_dir
from harness.errors import ConfigError, DataError
from harness.generation import DEFAULT_BATCH_SIZE
from harness.hashing import canonical_json, content_hash, file_sha256
from harness.judging.agreement import resolve_spec
from harness.judging.protocol import Candidate, Judge, PairwiseItem
from harness.judging.registry import get_judge
from harness.judging.validation import cached_figures, headline
from harness.records import (
    GenerationRecord,
    JudgmentRecord,
    ScoreRecord,
    generation_key,
    judgment_key,
    score_key,
)
from harness.registry import ModelSpec, load_registry, reference_of, select_models
from harness.shards import Shard, analyse_slice, select_samples, shard_field
from harness.store import RunLock, Store, os_error
from harness.tasks import GENERATING, STORED, Task, available_tasks, load_task
from harness.tune_config import is_built, require_build

#: The default judge: response features that read content, fitted on the validation suite
#: (judges/content.toml; no API). `heuristic` is the simpler cascade.
DEFAULT_JUDGE = "content"
#: Folders of a results directory that are not runs (the shared record cache).
RESERVED_RUN_IDS = ("cache",)

#: (task name, variant name, instruction id): where a record sits in a run's tables.
Where = tuple[str, str, str]


def default_results_dir() -> Path:
    """results/ in the project folder (the working directory unless --project says otherwise)."""
    return project_dir() / "results"


@dataclass(frozen=True)
class RunConfig:
    """What the user asked for; the run id is derived from it unless given."""

    models: str = "all"
    tasks: tuple[str, ...] = ("instructions",)
    judge: str = DEFAULT_JUDGE
    limit: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    results_dir: Path | None = None
    run_id: str | None = None
    registry_path: Path | None = None
    shard: Shard | None = None


@dataclass
class RunResult:
    """What a run produced and how much work it did."""

    run_dir: Path
    summary: list[dict[str, Any]]
    report_path: Path
    n_generated: int = 0
    n_judged: int = 0
    seconds: float = 0.0
    n_scored: int = 0
    validity: dict[str, Any] | None = None  # the judge's validation figures (headline)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} "
                           "[{elapsed}<{remaining}, {rate_fmt}]")


def _advance(bar: tqdm, n: float) -> None:
    """Move the bar to n items (fractions allowed: a running batch's share of its work)."""
    delta = min(float(n), float(bar.total)) - bar.n
    if delta > 1e-9:
        bar.update(delta)


def override_cap(spec: ModelSpec, max_new_tokens: int | None) -> ModelSpec:
    """The spec with another max_new_tokens (None: unchanged)."""
    if max_new_tokens is None:
        return spec
    return dataclasses.replace(spec, decoding=dataclasses.replace(
        spec.decoding, max_new_tokens=max_new_tokens))


def task_names(selection: Sequence[str]) -> list[str]:
    """The requested task names, with `all` expanded to every registered task."""
    if list(selection) == ["all"]:
        return available_tasks()
    if "all" in selection:
        raise ConfigError("--tasks all cannot be combined with other task names")
    return list(selection)


def resolve(config: RunConfig) -> tuple[list[ModelSpec], ModelSpec, list[Task], Judge]:
    """Turn the request into specs, tasks and a judge; every reference variant is included."""
    specs, reference, tasks = resolve_tasks(config)
    return specs, reference, tasks, get_judge(config.judge)


def resolve_tasks(config: RunConfig) -> tuple[list[ModelSpec], ModelSpec, list[Task]]:
    """Turn the request into specs and tasks (no judge); every reference variant is included.

    Under `--tasks all`, a task whose reference variant is not registered, or is a tuned variant
    not yet built, is skipped with a note; named explicitly, it is one line (the nearest names,
    or the `tune` command).
    """
    registry = load_registry(config.registry_path)
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be positive")
    specs = [override_cap(s, config.max_new_tokens)
             for s in select_models(registry, config.models)]
    reference = override_cap(reference_of(registry), config.max_new_tokens)
    if reference.name not in {s.name for s in specs}:
        specs.insert(0, reference)
    if config.limit is not None and config.limit < 1:
        raise ConfigError("--limit must be positive")
    if config.batch_size < 1:
        raise ConfigError("--batch-size must be positive")
    if not config.tasks:
        raise ConfigError("--tasks is empty; give a comma-separated list of task names")
    every = list(config.tasks) == ["all"]
    tasks: list[Task] = []
    for name in task_names(config.tasks):
        task = load_task(name, config.limit)
        clash = next((t for t in tasks if t.name == task.name), None)
        if clash is not None:
            raise ConfigError(f"two tasks are named '{task.name}' ({clash.source} and "
                              f"{task.source}); give each task a unique name")
        if task.reference not in (None, STORED):
            if task.reference not in registry and every:
                print(f"task {task.name}: skipped, its reference {task.reference} is not in "
                      f"the registry", file=sys.stderr)
                continue
            if task.reference not in registry:
                from harness.errors import unknown_name

                raise unknown_name("model", task.reference, list(registry),
                                   f" (the reference of task '{task.name}')")
            ref = registry[task.reference]
            if ref.tune is not None and not is_built(ref):
                if every:
                    print(f"task {task.name}: skipped, its reference {ref.name} is not built "
                          f"(python -m harness tune {ref.name})", file=sys.stderr)
                    continue
                require_build(ref)
            if ref.name not in {s.name for s in specs}:
                specs.append(override_cap(ref, config.max_new_tokens))
        tasks.append(task)
    from harness.backends import check_tasks

    check_tasks(specs, [t.kind for t in tasks])
    return specs, reference, tasks


def task_reference(task: Task, reference: ModelSpec) -> str | None:
    """The variant a task compares against, or None when it compares against stored outputs."""
    if task.reference == STORED:
        return None
    return task.reference or reference.name


def reference_name(task: Task, reference: ModelSpec) -> str:
    """What the task's reference is called in tables: a variant, or the stored outputs' name."""
    return task_reference(task, reference) or task.reference_label


def model_identities(specs: Sequence[ModelSpec], tokenizers: dict[str, Any]
                     ) -> dict[str, dict[str, Any]]:
    """Each variant's output identity: its spec's, plus its tokenizer and local weights hashes."""
    from harness.backends import fingerprints

    by_weights: dict[str, dict[str, Any]] = {}
    out = {}
    for spec in specs:
        wid = canonical_json([spec.weights_identity(), spec.dtype])
        if wid not in by_weights:
            by_weights[wid] = fingerprints(spec, tokenizers[spec.name])
        out[spec.name] = spec.output_identity(by_weights[wid])
    return out


def rules_token_report(specs: Sequence[ModelSpec], tokenizers: dict[str, Any]) -> dict[str, list]:
    """How each rules variant's token table maps onto its tokenizer; unmapped strings are logged."""
    reports = {}
    for spec in specs:
        if spec.rules is None:
            continue
        from harness.rules import resolution_for

        reports[spec.name] = resolution_for(spec.rules, tokenizers[spec.name]).report_list()
        for entry in reports[spec.name]:
            if entry["status"] != "mapped":
                print(f"rules ({spec.name}): {entry['string']!r} {entry['status']}: "
                      f"{entry['reason']}", file=sys.stderr)
    return reports


@dataclass(frozen=True)
class Wanted:
    """One record a run needs: where it goes, its content key, its labels and what computes it."""

    where: Where
    key: str
    labels: dict[str, Any]
    payload: Any


def fill(store: Store, wanted: Sequence[Wanted],
         compute: Callable[[list[Wanted], Callable[[float], None]], Iterator[tuple[int, Any]]],
         desc: str) -> tuple[dict[Where, Any], int]:
    """The shared loop: look each record up, compute the missing ones, store each as it is made.

    compute(todo, tick) yields (index into todo, record) in any order; each record is stored at
    once. tick(progress) may report, in items, how far the work in flight has got, so the bar
    and its ETA move between records. A key wanted in several places (one prompt in two tasks)
    is computed once and relabelled.
    """
    out: dict[Where, Any] = {}
    todo: list[Wanted] = []
    first: dict[str, int] = {}  # key -> its index in todo
    again: dict[int, list[Wanted]] = {}  # index in todo -> later places wanting the same key
    for w in wanted:
        rec = store.lookup(w.key, w.labels)
        if rec is not None:
            out[w.where] = rec
        elif w.key in first:
            again.setdefault(first[w.key], []).append(w)
        else:
            first[w.key] = len(todo)
            todo.append(w)
    if not todo:
        return out, 0
    bar = _bar(len(todo), desc)
    made, inflight = 0, 0.0

    def tick(progress: float) -> None:
        nonlocal inflight
        inflight = progress
        _advance(bar, made + inflight)

    try:
        for i, rec in compute(todo, tick):
            store.add(rec)
            out[todo[i].where] = rec
            for w in again.get(i, []):
                out[w.where] = store.lookup(w.key, w.labels)
            made += 1
            inflight = max(0.0, inflight - 1)
            _advance(bar, made + inflight)
    finally:
        bar.close()
    return out, made


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def release_memory() -> None:
    """Hand freed memory back to the system between models (glibc keeps freed heap memory).

    A decoding batch's buffers (KV cache layers of 10-30 MB, grown and dropped) come from the
    heap once glibc has raised its mmap threshold, and freed heap memory stays with the
    process: a run of three gemma-3-270m variants grew by 2 GB a variant, to 9.3 GB.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def decoding_groups(specs: Sequence[ModelSpec]) -> list[list[ModelSpec]]:
    """Runs of consecutive variants that may decode as one batch: the transformers backend, the
    same weights and dtype, the same greedy decoding (rules may differ)."""
    groups: list[list[ModelSpec]] = []
    for spec in specs:
        prev = groups[-1][-1] if groups else None
        if (prev is not None and spec.backend == prev.backend == "transformers"
                and not spec.decoding.do_sample and spec.decoding == prev.decoding
                and spec.weights_identity() == prev.weights_identity()
                and spec.dtype == prev.dtype):
            groups[-1].append(spec)
        else:
            groups.append([spec])
    return groups


def generate_all(specs: Sequence[ModelSpec], tasks: Sequence[Task], store: Store,
                 batch_size: int, tokenizers: dict[str, Any],
                 identities: dict[str, dict[str, Any]]
                 ) -> tuple[dict[Where, GenerationRecord], int]:
    """Ensure every (task, variant, instruction) has a generation; return them and count made.

    Variants of one model with the same greedy decoding (a base and its rules variants) decode
    as one batch (`generation.generate_together`); each gets what it would alone.
    """
    from harness.backends import format_prompt, generate, load_model
    from harness.generation import can_decode_together, generate_together

    out: dict[Where, GenerationRecord] = {}
    made = 0
    last: tuple[str, Any] | None = None  # (weights+dtype, LoadedModel): variants share a load

    def load(spec: ModelSpec) -> Any:
        nonlocal last
        weights = canonical_json([spec.weights_identity(), spec.dtype])
        if last is not None and last[0] == weights:
            loaded = dataclasses.replace(last[1], spec=spec)
        else:
            last = None  # free the previous model before loading the next
            release_memory()
            loaded = load_model(spec, tokenizers[spec.name])
            if hasattr(loaded, "prefills"):  # the transformers backend: variants of this
                from harness.slot_decoding import PrefillStore  # model share prompt prefills

                loaded = dataclasses.replace(loaded, prefills=PrefillStore())
        last = (weights, loaded)
        return loaded

    for group in decoding_groups(specs):
        wanted = []
        for spec in group:
            tokenizer = tokenizers[spec.name]
            for task in tasks:
                if task.kind not in GENERATING:
                    continue
                for ins in task.instructions:
                    prompt = format_prompt(spec, tokenizer, ins.instruction)
                    labels = {"task": task.name, "model": spec.name, "instruction_id": ins.id,
                              "instruction": ins.instruction}
                    wanted.append(Wanted((task.name, spec.name, ins.id),
                                         generation_key(identities[spec.name], prompt), labels,
                                         prompt))

        def compute(todo: list[Wanted], tick: Callable[[float], None],
                    group: list[ModelSpec] = group) -> Iterator[tuple[int, Any]]:
            # each variant's missing prompts (their places in todo), in the group's order
            mine = {s.name: [i for i, w in enumerate(todo) if w.labels["model"] == s.name]
                    for s in group}
            members = [s for s in group if mine[s.name]]
            loaded = [load(members[0])]
            loaded += [dataclasses.replace(loaded[0], spec=s) for s in members[1:]]

            def record(spec: ModelSpec, i: int, gen: Any) -> GenerationRecord:
                w = todo[i]
                return GenerationRecord(
                    key=w.key, **w.labels, prompt=w.payload, output=gen.output,
                    n_prompt_tokens=gen.n_prompt_tokens, n_tokens=gen.n_tokens,
                    finish_reason=gen.finish_reason, model_spec_hash=spec.spec_hash(),
                    decoding=dataclasses.asdict(spec.decoding), batch_seconds=gen.batch_seconds,
                    batch_size=gen.batch_size, created=_now(), info=gen.info)

            if len(loaded) > 1 and can_decode_together(loaded):
                prompts = [[todo[i].payload for i in mine[s.name]] for s in members]
                for v, j, gen in generate_together(loaded, prompts, batch_size,
                                                   on_progress=tick):
                    i = mine[members[v].name][j]
                    yield i, record(members[v], i, gen)
                return
            for spec, one in zip(members, loaded, strict=True):
                idx = mine[spec.name]
                for j, gen in generate(one, [todo[i].payload for i in idx], batch_size,
                                       on_progress=tick):
                    yield idx[j], record(spec, idx[j], gen)

        label = group[0].name + (f" and {len(group) - 1} more" if len(group) > 1 else "")
        got, n = fill(store, wanted, compute, f"generate {label}")
        out.update(got)
        made += n
    return out, made


def judge_all(specs: Sequence[ModelSpec], reference: ModelSpec, tasks: Sequence[Task],
              generations: dict[Where, GenerationRecord], judge: Judge,
              store: Store) -> tuple[dict[Where, JudgmentRecord], int]:
    """Judge every variant's response against its task's reference (a variant's response or a
    stored output); returns judgments and the count made."""
    wanted = []
    for task in tasks:
        if not task.judged:
            continue
        ref_variant = task_reference(task, reference)
        ref_name = reference_name(task, reference)
        for spec in specs:
            if spec.name == ref_variant:
                continue
            for ins in task.instructions:
                if ref_variant is None:
                    assert ins.reference is not None
                    ref_output, ref_finish = ins.reference, "eos"
                else:
                    ref = generations[(task.name, ref_variant, ins.id)]
                    ref_output, ref_finish = ref.output, ref.finish_reason
                gen = generations[(task.name, spec.name, ins.id)]
                item = PairwiseItem(
                    instruction=ins.instruction, instruction_id=ins.id,
                    output_1=Candidate(ref_output, ref_name, ref_finish),
                    output_2=Candidate(gen.output, spec.name, gen.finish_reason))
                labels = {"task": task.name, "model": spec.name, "instruction_id": ins.id,
                          "generator_1": ref_name, "generator_2": spec.name}
                wanted.append(Wanted((task.name, spec.name, ins.id),
                                     judgment_key(judge.spec, item), labels, item))
    spec_hash = content_hash(judge.spec.as_dict())

    def compute(todo: list[Wanted], tick: Callable[[float], None]) -> Iterator[tuple[int, Any]]:
        for i, j in judge.judge([w.payload for w in todo]):
            info = j.info
            if todo[i].labels["generator_1"] not in names:  # a stored output: keep it for export
                info = {**(info or {}), "reference_output": todo[i].payload.output_1.output}
            yield i, JudgmentRecord(key=todo[i].key, **todo[i].labels, judge=judge.spec.name,
                                    judge_spec_hash=spec_hash, preference=j.preference,
                                    raw=j.raw, info=info, created=_now())

    names = {s.name for s in specs}
    if not wanted:
        return {}, 0
    return fill(store, wanted, compute, f"judge ({judge.spec.name})")


def tuning_pairs(specs: Sequence[ModelSpec]) -> set[tuple[str, str]]:
    """Every training pair of the tuned variants in the run (ranking never tests on them)."""
    from harness.tune_data import load_pairs

    out: set[tuple[str, str]] = set()
    for spec in specs:
        if spec.tune is not None:
            out.update(load_pairs(spec.tune.data))
    return out


def _scoring_group(spec: ModelSpec) -> str:
    """Variants with one group share forward passes: same weights, dtype and prompts."""
    return canonical_json([spec.weights_identity(), spec.dtype, spec.prompt_format,
                           spec.system_prompt])


def _shared_lm(spec: ModelSpec, specs: Sequence[ModelSpec], tokenizers: dict[str, Any],
               batch_size: int, lms: dict[str, Any]) -> Any:
    """The variant's lm-eval LM; the first of its group loads the model once for the group
    (a base and its rules variants: one forward pass scores a request for all of them)."""
    if spec.name not in lms:
        from harness.lm_eval_model import scoring_lms

        lms.clear()  # free the previous group's model first
        group = [s for s in specs if _scoring_group(s) == _scoring_group(spec)]
        lms.update(scoring_lms(spec, group, tokenizers[spec.name], batch_size))
    return lms[spec.name]


#: Log-likelihood requests sent to the model per batch between stores (resume granularity).
SCORE_CHUNK = 16


def ranking_items(specs: Sequence[ModelSpec], tasks: Sequence[Task],
                  keep: Callable[[str], bool] | None = None) -> dict[str, list[Any]]:
    """Each ranking task's items (seeded; tuned variants' training pairs excluded), only those
    whose instruction `keep` accepts when given (a shard)."""
    ranking = [t for t in tasks if t.kind == "ranking"]
    if not ranking:
        return {}
    from harness import ranking as rk

    exclude = tuning_pairs(specs)
    prepared = {}
    for task in ranking:
        opts = task.options.options
        items = rk.build_items(rk.load_pool(opts), opts.n, opts.k, opts.seed,
                               exclude=exclude if opts.exclude_tuning else set())
        prepared[task.name] = [i for i in items if keep is None or keep(i.instruction)]
    return prepared


def mean_logprobs(task: Task, model: str, items: Sequence[Any],
                  records: dict[Where, ScoreRecord]) -> list[list[float]]:
    """One variant's mean per-token log-likelihood per candidate of each item of a task."""
    return [[r.logprob / max(r.n_tokens, 1) for r in
             (records[(task.name, model, f"{item.id}#{c}")] for c in range(len(item.candidates)))]
            for item in items]


def score_all(specs: Sequence[ModelSpec], tasks: Sequence[Task], store: Store,
              batch_size: int, tokenizers: dict[str, Any],
              identities: dict[str, dict[str, Any]], keep: Callable[[str], bool] | None = None
              ) -> tuple[dict[str, dict[str, Any]], int]:
    """Ranking tasks: each variant's mean per-token log-likelihood of every candidate response
    (through lm-eval's model interface), cached per (model, context, continuation); with
    `keep`, only the items whose instruction it accepts (a shard).

    Returns {task: {"items": [...], "scores": {variant: [[mean logprob per candidate]]}}}.
    """
    from harness.backends import format_prompt, scoring_backend

    ranking = [t for t in tasks if t.kind == "ranking"]
    if not ranking:
        return {}, 0
    from harness import ranking as rk

    prepared = ranking_items(specs, ranking, keep)
    out: dict[str, dict[str, Any]] = {t.name: {"items": prepared[t.name], "scores": {}}
                                      for t in ranking}
    made = 0
    lms: dict[str, Any] = {}  # the lm-eval LMs of the variants sharing weights and prompts
    for spec in specs:
        tokenizer = tokenizers[spec.name]
        wanted = []
        for task in ranking:
            items = prepared[task.name]
            requests = rk.score_requests(items, lambda ins, s=spec, t=tokenizer:
                                         format_prompt(s, t, ins))
            for (item, cand), (context, continuation) in zip(
                    ((i, c) for i in items for c in range(len(i.candidates))), requests,
                    strict=True):
                labels = {"task": task.name, "model": spec.name,
                          "instruction_id": f"{item.id}#{cand}"}
                wanted.append(Wanted((task.name, spec.name, labels["instruction_id"]),
                                     score_key(identities[spec.name], scoring_backend(spec),
                                               context, continuation),
                                     labels, (context, continuation)))

        def compute(todo: list[Wanted], tick: Callable[[float], None],
                    spec: ModelSpec = spec) -> Iterator[tuple[int, Any]]:
            from harness.lm_eval_model import loglikelihoods

            lm = _shared_lm(spec, specs, tokenizers, batch_size, lms)
            for start in range(0, len(todo), SCORE_CHUNK):
                chunk = todo[start:start + SCORE_CHUNK]
                got = loglikelihoods(lm, [w.payload for w in chunk])
                for j, ((logprob, greedy), w) in enumerate(zip(got, chunk, strict=True)):
                    n_tok = len(tokenizers[spec.name](w.payload[1],
                                                      add_special_tokens=False)["input_ids"])
                    yield start + j, ScoreRecord(key=w.key, **w.labels, logprob=float(logprob),
                                                 n_tokens=n_tok, is_greedy=bool(greedy),
                                                 backend=scoring_backend(spec), created=_now())

        got, n = fill(store, wanted, compute, f"score {spec.name}")
        made += n
        for task in ranking:
            out[task.name]["scores"][spec.name] = mean_logprobs(task, spec.name,
                                                                prepared[task.name], got)
    return out, made


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}


def _win_rates(prefs: list[float | None]) -> dict[str, Any]:
    """Win rate ± SE, counts and a bootstrap interval of one list of preferences."""
    from harness.stats import bootstrap_ci, win_rate_summary

    row = win_rate_summary(prefs)
    try:
        row["ci_low"], row["ci_high"] = bootstrap_ci(prefs, seed=0)
    except DataError:  # no valid verdict at all
        row["ci_low"] = row["ci_high"] = None
    return row


def cap_against_eos(prefs: Sequence[float | None], ref_finish: Sequence[str],
                    var_finish: Sequence[str]) -> dict[str, Any]:
    """How much of a variant's result rests on pairs where exactly one side hit the token cap:
    their share of the verdicts, the share of the variant's win mass from pairs where the
    reference was cut and the variant ended on EOS, and the win rates on such pairs and on
    the others."""
    from harness.stats import win_rate_summary

    one_cut = [(r == "length") != (v == "length") for r, v in zip(ref_finish, var_finish,
                                                                   strict=True)]
    valid = [p is not None and p == p for p in prefs]
    wins = [p - 1.0 if ok else 0.0 for p, ok in zip(prefs, valid, strict=True)]
    total = sum(wins)
    from_cut_ref = sum(w for w, r, v in zip(wins, ref_finish, var_finish, strict=True)
                       if r == "length" and v != "length")
    def rate(keep: bool) -> float | None:
        chosen = [p for p, c in zip(prefs, one_cut, strict=True) if c == keep]
        try:
            return win_rate_summary(chosen)["win_rate"] if chosen else None
        except DataError:  # no valid verdict among them
            return None

    return {"cap_vs_eos_share": sum(c for c, ok in zip(one_cut, valid, strict=True) if ok)
            / max(1, sum(valid)),
            "cap_vs_eos_win_share": from_cut_ref / total if total > 0 else None,
            "win_rate_cap_vs_eos": rate(True), "win_rate_without_cap_vs_eos": rate(False)}


def order_agreement(infos: Sequence[dict[str, Any]]) -> float | None:
    """For a judge asked in both orders (an LLM judge's both_orders mode): the share of its
    verdicts whose two orders picked the same winner; None for any other judge."""
    both = [not info["orders_disagree"] for info in infos if "orders_disagree" in info]
    return sum(both) / len(both) if both else None


def _head_to_head(task: Task, specs: Sequence[ModelSpec], reference: ModelSpec,
                  generations: dict[Where, GenerationRecord],
                  judgments: dict[Where, JudgmentRecord]
                  ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Rows per variant (win rate ± SE, bootstrap CI, LC win rate, lengths, EOS share) and
    the by-category and by-source tables."""
    import numpy as np
    import pandas as pd

    from harness.stats import length_controlled_win_rate

    ref_variant = task_reference(task, reference)
    rows, by_category, by_source = [], [], []
    for spec in specs:
        gens = [generations[(task.name, spec.name, i.id)] for i in task.instructions]
        row: dict[str, Any] = {
            "task": task.name, "kind": task.kind, "model": spec.name,
            "role": "reference" if spec.name == ref_variant else "variant",
            "reference": reference_name(task, reference), "n": len(gens),
            "mean_tokens": float(np.mean([g.n_tokens for g in gens])),
            "mean_words": float(np.mean([len(g.output.split()) for g in gens])),
            "eos_share": float(np.mean([g.finish_reason == "eos" for g in gens])),
            "max_new_tokens": spec.decoding.max_new_tokens,
        }
        if spec.name != ref_variant:
            prefs = [judgments[(task.name, spec.name, i.id)].preference
                     for i in task.instructions]
            row.update(_win_rates(prefs))
            if ref_variant is not None:
                ref_gens = [generations[(task.name, ref_variant, i.id)]
                            for i in task.instructions]
                row.update(cap_against_eos(prefs, [g.finish_reason for g in ref_gens],
                                           [g.finish_reason for g in gens]))
            agree = order_agreement([judgments[(task.name, spec.name, i.id)].info
                                     for i in task.instructions])
            if agree is not None:
                row["order_agreement"] = agree
            refs = [i.reference if ref_variant is None else
                    generations[(task.name, ref_variant, i.id)].output
                    for i in task.instructions]
            if ref_variant is None:  # the regression gate sees a change of stored outputs
                row["reference_outputs_hash"] = content_hash(refs)
            frame = pd.DataFrame({"output_1": refs, "output_2": [g.output for g in gens],
                                  "preference": prefs})
            try:
                row.update(length_controlled_win_rate(frame, None))
                # Without instruction difficulty every prediction is equal: that SEM is 0 by
                # construction, not a measured uncertainty, so it is not reported.
                row["lc_standard_error"] = None
            except DataError as e:  # too few valid pairs for the GLM's cross-validation
                row.update(length_controlled_winrate=None, lc_standard_error=None,
                           lc_note=f"no LC fit: {e}")
            for field, out in (("category", by_category), ("source", by_source)):
                groups: dict[str, list] = {}
                for ins, p in zip(task.instructions, prefs, strict=True):
                    groups.setdefault(getattr(ins, field) or "-", []).append(p)
                for group, ps in sorted(groups.items()):
                    wr = _win_rates(ps)
                    out.append(_clean({"model": spec.name, field: group, "n": len(ps),
                                       "win_rate": wr["win_rate"],
                                       "standard_error": wr["standard_error"],
                                       "ci_low": wr["ci_low"], "ci_high": wr["ci_high"]}))
        rows.append(_clean(row))
    tables = {"summary": rows, "by_category": by_category}
    if len({i.source for i in task.instructions}) > 1:
        tables["by_source"] = by_source
    return rows, tables


def _length(task: Task, specs: Sequence[ModelSpec], reference: ModelSpec,
            generations: dict[Where, GenerationRecord], judgments: dict[Where, JudgmentRecord]
            ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    from harness.length_analysis import Response, analyse

    ref_variant = task_reference(task, reference)
    responses = {}
    for spec in specs:
        rs = []
        for ins in task.instructions:
            g = generations[(task.name, spec.name, ins.id)]
            j = judgments.get((task.name, spec.name, ins.id))
            ref_tokens = None
            if ref_variant is not None and j is not None:
                ref_tokens = generations[(task.name, ref_variant, ins.id)].n_tokens
            rs.append(Response(id=ins.id, tokens=g.n_tokens, words=len(g.output.split()),
                               chars=len(g.output), finish_reason=g.finish_reason,
                               preference=None if j is None else j.preference,
                               reference_tokens=ref_tokens))
        responses[spec.name] = rs
    result = analyse(responses, {s.name: s.decoding.max_new_tokens for s in specs},
                     task.options)
    return result["headline"], result["tables"]


def _style(task: Task, specs: Sequence[ModelSpec], generations: dict[Where, GenerationRecord]
           ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    from harness import style_adherence
    from harness.embeddings import get_embedder

    settings = task.options
    outputs = {s.name: [generations[(task.name, s.name, i.id)].output
                        for i in task.instructions] for s in specs}
    general = style_adherence.general_responses(seed=settings.options.seed)
    result = style_adherence.analyse(task.instructions, outputs, settings.domain, general,
                                     get_embedder(), settings.options)
    return result["headline"], result["tables"]


def analyse_tasks(specs: Sequence[ModelSpec], reference: ModelSpec, tasks: Sequence[Task],
                  generations: dict[Where, GenerationRecord],
                  judgments: dict[Where, JudgmentRecord], scores: dict[str, dict[str, Any]],
                  timings: dict[str, float] | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[dict[str, Any]]]]]:
    """One headline row per (task, variant), and each task's tables by name.

    A value that is undefined for the data (the SE of one sample, LC without enough pairs for
    its fit) is None, and prints as "–".
    """
    rows: list[dict[str, Any]] = []
    tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task in tasks:
        started = time.time()
        try:
            _analyse_one(task, specs, reference, generations, judgments, scores, rows, tables)
        finally:
            if timings is not None:
                timings[task.name] = round(time.time() - started, 2)
    return rows, tables


def _analyse_one(task: Task, specs: Sequence[ModelSpec], reference: ModelSpec,
                 generations: dict[Where, GenerationRecord],
                 judgments: dict[Where, JudgmentRecord], scores: dict[str, dict[str, Any]],
                 rows: list[dict[str, Any]], tables: dict[str, Any]) -> None:
    """Append one task's headline rows to `rows` and put its tables in `tables`."""
    if task.kind == "head_to_head":
        task_rows, tables[task.name] = _head_to_head(task, specs, reference, generations,
                                                     judgments)
        rows.extend(task_rows)
        tables[task.name]["instructions"] = instruction_rows(task)
        return
    if task.kind == "length":
        headline, tables[task.name] = _length(task, specs, reference, generations,
                                              judgments)
    elif task.kind == "style_adherence":
        headline, tables[task.name] = _style(task, specs, generations)
    else:
        from harness import ranking

        got = scores[task.name]
        result = ranking.analyse(got["items"], got["scores"], task.options.options)
        headline, tables[task.name] = result["headline"], result["tables"]
    ref_variant = task_reference(task, reference) if task.judged else None
    for spec in specs:
        rows.append(_clean({"task": task.name, "kind": task.kind, "model": spec.name,
                            "role": "reference" if spec.name == ref_variant else "variant",
                            **headline[spec.name]}))
    tables[task.name] = {"summary": [r for r in rows if r["task"] == task.name],
                         **tables[task.name]}
    if task.kind in GENERATING:
        tables[task.name]["instructions"] = instruction_rows(task)


def instruction_rows(task: Task) -> list[dict[str, Any]]:
    """A task's samples as a table (id, source, category, instruction) for the report."""
    return [{"id": i.id, "source": i.source, "category": i.category,
             "instruction": i.instruction} for i in task.instructions]


#: Packages whose versions a run records (they change what a run computes).
PACKAGES = ("torch", "transformers", "lm-eval", "peft", "numpy", "scikit-learn", "openai")


def package_versions() -> dict[str, str]:
    """The installed versions of the packages that shape a run's numbers."""
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str:
    """The checkout's commit (with '+dirty' for uncommitted changes), or '' outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty else "")


def write_tables(run_dir: Path, tables: dict[str, dict[str, list[dict[str, Any]]]]
                 ) -> list[Path]:
    """Each task's tables as run_dir/tables/<task>.<table>.json and .csv; returns the paths."""
    import pandas as pd

    out_dir = run_dir / "tables"
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise os_error(e, out_dir, "create") from None
    paths = []
    for task, by_name in tables.items():
        for name, table in by_name.items():
            json_path, csv_path = (out_dir / f"{task}.{name}.{ext}" for ext in ("json", "csv"))
            _write_text(json_path, json.dumps(table, indent=1) + "\n")
            frame = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict | list) else v)
                                   for k, v in r.items()} for r in table])
            _write_text(csv_path, frame.to_csv(index=False))
            paths += [json_path, csv_path]
    return paths


def _write_text(path: Path, text: str) -> None:
    """Write a small file atomically, or fail with one line naming it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise os_error(e, path, "write") from None


def _claim_run_dir(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Create the run directory, or check an existing one was made by the same config."""
    config_path = run_dir / "config.json"
    text = canonical_json(resolved) + "\n"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = config_path.read_text(encoding="utf-8") if config_path.exists() else None
    except OSError as e:
        raise os_error(e, run_dir, "create the run directory") from None
    if old is not None and old != text:
        try:
            same = content_hash(json.loads(old)) == content_hash(resolved)
        except ValueError:
            same = False
        if not same:
            raise ConfigError(f"run directory {run_dir} holds a run with another config; pass "
                              f"another --run-id, or delete that directory")
    _write_text(config_path, text)


#: What a tokenizer loads from a model folder: everything but weights and the harness's markers.
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def tokenizer_source(spec: ModelSpec) -> str:
    """What a variant's tokenizer is loaded from, so that equal ones load once: its weights'
    identity; for a tuned build (a folder holding its own copy of its base's tokenizer), the
    content of the folder's files other than weights and build markers."""
    if spec.tune is None or spec.backend != "transformers":
        return canonical_json(spec.weights_identity())
    folder = require_build(spec)
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(
        "harness-") and not f.name.endswith(_NOT_TOKENIZER))
    return canonical_json({"files": {f.name: file_sha256(str(f)) for f in files}})


def run(config: RunConfig) -> RunResult:
    """Run the whole path and write results/<run-id>/ (config, records, summary, report)."""
    from harness.backends import load_tokenizer
    from harness.report import write_report
    from harness.weights import prepare_weights

    start = time.time()
    if config.run_id is not None:  # before any work: a run id is one folder in the results
        path_component(config.run_id, "--run-id", RESERVED_RUN_IDS)
    specs, reference, tasks, judge = resolve(config)
    prepare_weights(specs)  # a first run's GGUF conversions, side by side
    by_source: dict[str, Any] = {}  # variants of one base model share its tokenizer
    tokenizers = {}
    for s in specs:
        key = tokenizer_source(s)
        tokenizers[s.name] = by_source.get(key) or by_source.setdefault(key, load_tokenizer(s))
    identities = model_identities(specs, tokenizers)
    resolved = {
        "harness_version": __version__,
        "models": [s.as_dict() for s in specs], "reference": reference.name,
        "output_identities": identities,
        "tasks": [t.describe() for t in tasks],
        "judge": judge.spec.as_dict(), "limit": config.limit,
        "rules_token_resolution": rules_token_report(specs, tokenizers),
    }
    keep = None
    if config.shard is not None:  # the unsharded config, plus which shard this is
        keep = config.shard.holds
        resolved["shard"] = shard_field(config, dict(resolved))
        tasks = [select_samples(t, keep) for t in tasks]
    run_id = config.run_id or "run-" + content_hash(resolved, 10)
    results_dir = Path(config.results_dir or default_results_dir())
    run_dir = results_dir / run_id
    _claim_run_dir(run_dir, resolved)
    with RunLock(run_dir):
        gen_store = Store(results_dir, run_dir, "generations", GenerationRecord)
        judge_store = Store(results_dir, run_dir, "judgments", JudgmentRecord)
        preflight = getattr(judge, "preflight", None)
        if preflight is not None:  # a wrong URL or key fails now, not after all generation
            preflight()
        stages: dict[str, float] = {"setup": time.time() - start}
        t = time.time()
        generations, n_gen = generate_all(specs, tasks, gen_store, config.batch_size, tokenizers,
                                          identities)
        stages["generate"], t = time.time() - t, time.time()
        judgments, n_judged = judge_all(specs, reference, tasks, generations, judge, judge_store)
        stages["judge"], t = time.time() - t, time.time()
        score_store = Store(results_dir, run_dir, "scores", ScoreRecord)
        scores, n_scored = score_all(specs, tasks, score_store, config.batch_size, tokenizers,
                                     identities, keep)
        stages["score"], t = time.time() - t, time.time()
        task_seconds: dict[str, float] = {}
        analyse = analyse_tasks if config.shard is None else analyse_slice
        summary, tables = analyse(specs, reference, tasks, generations, judgments, scores,
                                  task_seconds)
        write_tables(run_dir, tables)
        validity = headline(cached_figures(judge.spec, resolve_spec(config.judge)))
        stages["analyse"] = time.time() - t
        seconds = time.time() - start
        meta = {"run_id": run_id, "judge": judge.spec.name, "reference": reference.name,
                "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "git_commit": git_commit(), "packages": package_versions(),
                "generated": n_gen, "judged": n_judged, "scored": n_scored,
                "seconds": round(seconds, 1), "judge_validity": validity,
                "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
                "analysis_seconds": task_seconds}
        if config.shard is not None:
            meta.update(shard=str(config.shard),
                        base_config_hash=resolved["shard"]["base_config_hash"])
        _write_text(run_dir / "summary.json", canonical_json({"meta": meta, "rows": summary})
                    + "\n")
        report = write_report(run_dir)
    return RunResult(run_dir=run_dir, summary=summary, report_path=report, n_generated=n_gen,
                     n_judged=n_judged, seconds=seconds, n_scored=n_scored, validity=validity)
