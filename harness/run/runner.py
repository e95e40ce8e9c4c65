"""One evaluation run: generate (cached), judge against the reference (cached), summarise, report.

Every record is keyed by a content hash of what produced it, appended and flushed as it is
made, so a killed run resumes with no work redone and a repeated run performs none.
"""

import ctypes
import dataclasses
import gc
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness import __version__
from harness.core.configs import path_component, project_dir
from harness.core.errors import ConfigError, unknown_name
from harness.core.hashing import canonical_json, content_hash, file_sha256
from harness.data.tune_data import load_pairs
from harness.generate import backends
from harness.generate.backends import DEFAULT_BATCH_SIZE, output_identity
from harness.judging.agreement import resolve_spec
from harness.judging.protocol import Candidate, Judge, PairwiseItem
from harness.judging.registry import get_judge
from harness.judging.validation import cached_figures, headline
from harness.models.builds import is_built, require_build, weights_identity
from harness.models.registry import load_registry, reference_of, select_models
from harness.models.spec import ModelSpec
from harness.models.weights import prepare_weights
from harness.report.html import write_report
from harness.run.analyse import analyse_tasks, reference_name, task_reference
from harness.run.shards import Shard, analyse_slice, select_samples, shard_field
from harness.store.logs import RunLock, Store
from harness.store.records import (
    GenerationRecord,
    JudgmentRecord,
    ScoreRecord,
    Where,
    generation_key,
    judgment_key,
    score_key,
)
from harness.store.rundir import (
    claim_run_dir,
    git_commit,
    package_versions,
    write_tables,
    write_text,
)
from harness.tasks import kinds
from harness.tasks import ranking as rk
from harness.tasks.kinds import available_tasks, load_task
from harness.tasks.spec import STORED, Task

#: The default judge: response features that read content, fitted on the validation suite
#: (judges/content.toml; no API). `heuristic` is the simpler cascade.
DEFAULT_JUDGE = "content"
#: Folders of a results directory that are not runs (the shared record cache).
RESERVED_RUN_IDS = ("cache",)

#: (task name, variant name, instruction id): where a record sits in a run's tables.


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

    if any(kinds.get(t.kind).scored for t in tasks):
        backends.check_scoring(specs)
    return specs, reference, tasks


def model_identities(specs: Sequence[ModelSpec], tokenizers: dict[str, Any]
                     ) -> dict[str, dict[str, Any]]:
    """Each variant's output identity: its spec's, plus its tokenizer and local weights hashes."""

    by_weights: dict[str, dict[str, Any]] = {}
    out = {}
    for spec in specs:
        wid = canonical_json([weights_identity(spec), spec.dtype])
        if wid not in by_weights:
            by_weights[wid] = backends.fingerprints(spec, tokenizers[spec.name])
        out[spec.name] = output_identity(spec, by_weights[wid])
    return out


def rules_token_report(specs: Sequence[ModelSpec], tokenizers: dict[str, Any]) -> dict[str, list]:
    """How each rules variant's token table maps onto its tokenizer; unmapped strings are logged."""
    reports = {}
    for spec in specs:
        if spec.rules is None:
            continue
        from harness.generate.rules import resolution_for  # torch

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
                and weights_identity(spec) == weights_identity(prev)
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
    from harness.generate.transformers import (  # torch
        can_decode_together,
        generate_together,
    )

    out: dict[Where, GenerationRecord] = {}
    made = 0
    last: tuple[str, Any] | None = None  # (weights+dtype, LoadedModel): variants share a load

    def load(spec: ModelSpec) -> Any:
        nonlocal last
        weights = canonical_json([weights_identity(spec), spec.dtype])
        if last is not None and last[0] == weights:
            loaded = dataclasses.replace(last[1], spec=spec)
        else:
            last = None  # free the previous model before loading the next
            release_memory()
            loaded = backends.load_model(spec, tokenizers[spec.name])
            if hasattr(loaded, "prefills"):  # the transformers backend: variants of this
                from harness.generate.slot_decoding import (
                    PrefillStore,  # model share prompt prefills
                )

                loaded = dataclasses.replace(loaded, prefills=PrefillStore())
        last = (weights, loaded)
        return loaded

    for group in decoding_groups(specs):
        wanted = []
        for spec in group:
            tokenizer = tokenizers[spec.name]
            for task in tasks:
                if not kinds.get(task.kind).generating:
                    continue
                for ins in task.instructions:
                    prompt = backends.format_prompt(spec, tokenizer, ins.instruction)
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
                for j, gen in backends.generate(one, [todo[i].payload for i in idx], batch_size,
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
    out: set[tuple[str, str]] = set()
    for spec in specs:
        if spec.tune is not None:
            out.update(load_pairs(spec.tune.data))
    return out


def _scoring_group(spec: ModelSpec) -> str:
    """Variants with one group share forward passes: same weights, dtype and prompts."""
    return canonical_json([weights_identity(spec), spec.dtype, spec.prompt_format,
                           spec.system_prompt])


def _shared_lm(spec: ModelSpec, specs: Sequence[ModelSpec], tokenizers: dict[str, Any],
               batch_size: int, lms: dict[str, Any]) -> Any:
    """The variant's lm-eval LM; the first of its group loads the model once for the group
    (a base and its rules variants: one forward pass scores a request for all of them)."""
    if spec.name not in lms:
        from harness.generate.lm_eval import scoring_lms  # torch, lm_eval

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
    ranking = [t for t in tasks if kinds.get(t.kind).scored]
    if not ranking:
        return {}
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

    ranking = [t for t in tasks if kinds.get(t.kind).scored]
    if not ranking:
        return {}, 0
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
                                         backends.format_prompt(s, t, ins))
            for (item, cand), (context, continuation) in zip(
                    ((i, c) for i in items for c in range(len(i.candidates))), requests,
                    strict=True):
                labels = {"task": task.name, "model": spec.name,
                          "instruction_id": f"{item.id}#{cand}"}
                wanted.append(Wanted((task.name, spec.name, labels["instruction_id"]),
                                     score_key(identities[spec.name],
                                               backends.scoring_backend(spec),
                                               context, continuation),
                                     labels, (context, continuation)))

        def compute(todo: list[Wanted], tick: Callable[[float], None],
                    spec: ModelSpec = spec) -> Iterator[tuple[int, Any]]:
            from harness.generate.lm_eval import loglikelihoods  # torch, lm_eval

            lm = _shared_lm(spec, specs, tokenizers, batch_size, lms)
            for start in range(0, len(todo), SCORE_CHUNK):
                chunk = todo[start:start + SCORE_CHUNK]
                got = loglikelihoods(lm, [w.payload for w in chunk])
                for j, ((logprob, greedy), w) in enumerate(zip(got, chunk, strict=True)):
                    n_tok = len(tokenizers[spec.name](w.payload[1],
                                                      add_special_tokens=False)["input_ids"])
                    yield start + j, ScoreRecord(key=w.key, **w.labels, logprob=float(logprob),
                                                 n_tokens=n_tok, is_greedy=bool(greedy),
                                                 backend=backends.scoring_backend(spec),
                                                 created=_now())

        got, n = fill(store, wanted, compute, f"score {spec.name}")
        made += n
        for task in ranking:
            out[task.name]["scores"][spec.name] = mean_logprobs(task, spec.name,
                                                                prepared[task.name], got)
    return out, made


#: What a tokenizer loads from a model folder: everything but weights and the harness's markers.
_NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def tokenizer_source(spec: ModelSpec) -> str:
    """What a variant's tokenizer is loaded from, so that equal ones load once: its weights'
    identity; for a tuned build (a folder holding its own copy of its base's tokenizer), the
    content of the folder's files other than weights and build markers."""
    if spec.tune is None or spec.backend != "transformers":
        return canonical_json(weights_identity(spec))
    folder = require_build(spec)
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(
        "harness-") and not f.name.endswith(_NOT_TOKENIZER))
    return canonical_json({"files": {f.name: file_sha256(str(f)) for f in files}})


def run(config: RunConfig) -> RunResult:
    """Run the whole path and write results/<run-id>/ (config, records, summary, report)."""
    start = time.time()
    if config.run_id is not None:  # before any work: a run id is one folder in the results
        path_component(config.run_id, "--run-id", RESERVED_RUN_IDS)
    specs, reference, tasks, judge = resolve(config)
    prepare_weights(specs)  # a first run's GGUF conversions, side by side
    by_source: dict[str, Any] = {}  # variants of one base model share its tokenizer
    tokenizers = {}
    for s in specs:
        key = tokenizer_source(s)
        tokenizers[s.name] = (by_source.get(key)
                              or by_source.setdefault(key, backends.load_tokenizer(s)))
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
    claim_run_dir(run_dir, resolved)
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
        write_text(run_dir / "summary.json", canonical_json({"meta": meta, "rows": summary})
                    + "\n")
        report = write_report(run_dir)
    return RunResult(run_dir=run_dir, summary=summary, report_path=report, n_generated=n_gen,
                     n_judged=n_judged, seconds=seconds, n_scored=n_scored, validity=validity)
