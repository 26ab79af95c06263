"""`ft-desk eval RUN_DIR`: measure what fine-tuning changed - task metrics for the base and the tuned model side by
side, and whether general abilities survived (the retention probe).

What it does, in order:
  1. Held-out set: RUN_DIR/data/val.jsonl (the run's validation split) or --data FILE in any supported format.
     Prompts are rendered exactly as in training (same chat template or plain rendering, data.max_length); the
     reference is the last assistant turn / completion. Raw text rows have no separate answer: each is cut as
     data/render.text_split says (after its last line's answer label such as "A:", else before its last line,
     else a one-line row at its middle word), the report's notes say which cut was used, and exact match is left
     out when every row was cut at the middle (a continuation of half a sentence cannot match exactly).
  2. One model load: the run's base loaded as training loads it (4-bit NF4 for qlora) with the adapter on top;
     the base model's answers come from the same weights with the adapter disabled (peft `disable_adapter`),
     which is exactly the quantized base. Full fine-tunes load the base, then the trained weights.
  3. Per model: teacher-forced loss on the examples (the labels training uses: every assistant turn and its turn
     end, so the tuned loss equals the run's validation loss on val.jsonl), batched generation (greedy unless
     --sample) and the perplexity of the shipped general-English probe (trainer/assets/general_english.txt).
  4. Metrics for base and tuned with the change and 95% intervals (evaluate/metrics.py), the retention verdict,
     per-example rows sorted by the size of the change, then RUN_DIR/eval/<time>-<checkpoint>/report.json and
     report.md (a new folder each time; an earlier report is never overwritten).

Events (the events.py envelope; the TUI's Evaluate screen renders them):
  eval_started   run_dir, run_name, checkpoint {requested, folder, step}, data, examples, metrics, device,
                 generation {mode, max_new_tokens, batch_size, temperature, top_p, seed}
  eval_progress  phase (load|loss|generate|retention|semantic), model (base|tuned|both), done, total, elapsed_s
  eval_report    report_dir, examples, metrics [rows: name, label, better, scale, n, base, tuned, delta,
                 base_ci95, tuned_ci95, delta_ci95, verdict (better|worse|unclear|same|-), few, note],
                 retention {base_ppl, tuned_ppl, rise, rise_ci95, threshold, flagged, message, try, note} or
                 null, notes [str], top_rows (the biggest wins, then the biggest losses)
  eval_finished  status (completed|failed), exit_code, error, hint, elapsed_s, and on success report_dir,
                 report_json, report_md, metrics, retention, notes (the result for --json readers)
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from ft_desk.quant.device import resolve_device
from ft_desk.quant.policy import torch_dtype
from ft_desk.trainer import run_folder
from ft_desk.trainer.chat_format import stop_token_ids
from ft_desk.trainer.data.formats import RowError
from ft_desk.trainer.data.prepare import load_examples, resolve_data_path
from ft_desk.trainer.data.render import example_renderer, text_split_counts, text_split_notes
from ft_desk.trainer.demo import retention_probe_path
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.evaluate import metrics as em
from ft_desk.trainer.evaluate import scoring
from ft_desk.trainer.evaluate.embed import find_embedding_model, similarities
from ft_desk.trainer.evaluate.report import build_rows, retention_result, write_report
from ft_desk.trainer.events import EventSink, make_event
from ft_desk.trainer.generation import Sampling, generate, pad_id_for
from ft_desk.trainer.training.model import load_base, load_run_config, load_trained, run_dtypes
from ft_desk.trainer.training.threads import apply_threads

METRICS = ("loss", "exact", "rouge", "chrf", "bleu", "json", "regex", "stop", "length", "semantic", "retention")
NEEDS_GENERATION = frozenset(METRICS) - {"loss", "retention"}
# Note: a relative rise of the probe's perplexity above this is called forgetting. Adapting to a new task or style
# moves general-text perplexity by a few percent, and on the 120-passage probe the paired 95% bootstrap interval of
# the change is itself about +/-2% wide (measured on the demo run: -11.4%, interval -13.6% to -9.4%). A rise past
# +10% is several times that noise: the model has become measurably worse at ordinary text, which is the point to
# trade some task fit for retention.
RETENTION_MAX_RISE = 0.10
# Note: a base model whose probe perplexity is above this share of its vocabulary predicts English hardly better
# than a uniform guess, so it has nothing to forget and the check only reports numbers.
CHANCE_SHARE = 0.5
# Note: rows shown as the biggest wins and the biggest losses (events, terminal, report.md).
TOP_ROWS = 5
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class EvalOptions:
    checkpoint: str = "best"
    data: str | None = None  # None: RUN_DIR/data/val.jsonl
    format: str = "auto"
    columns: tuple[str, ...] = ()  # data.columns for the --data file: role=column pairs
    metrics: tuple[str, ...] | None = None  # None: every metric that applies
    json_schema: str | None = None
    regex: str | None = None
    max_new_tokens: int | None = None  # None: room for the longest reference
    batch_size: int = DEFAULT_BATCH_SIZE
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    limit: int | None = None
    device: str | None = None  # None: the run's train.device (auto: cuda > mps > cpu)
    threads: int | None = None  # CPU threads for torch; None: the run's train.threads (0: the free cores)
    probe: str | None = None  # None: the shipped general-English probe


@dataclass
class _Item:
    """One held-out example on its way through evaluation."""

    index: int
    where: str
    prompt_ids: list[int]
    reference: str
    tokenized: Any  # TokenizedExample (labels as in training)
    ref_tokens: int
    prompt_text: str  # the prompt as the model sees it, special tokens included


def parse_metrics(text: str | None) -> tuple[str, ...] | None:
    """`loss,exact,rouge` -> a tuple of metric names (checked); None or "all" -> None (every metric that applies)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UserError(f"--metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}",
                        hint="pass a comma-separated list of those names, or leave --metrics out for all that apply")
    return names


def _check_options(options: EvalOptions) -> None:
    if options.batch_size < 1:
        raise UserError(f"--batch-size must be a positive int, got {options.batch_size}")
    if options.max_new_tokens is not None and options.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be a positive int, got {options.max_new_tokens}")
    if options.threads is not None and options.threads < 0:
        raise UserError(f"--threads must be 0 (auto: the free cores) or a positive int, got {options.threads}")
    if options.limit is not None and options.limit < 1:
        raise UserError(f"--limit must be a positive int, got {options.limit}")
    if options.sample:
        if not options.temperature > 0:
            raise UserError(f"--temperature must be above 0, got {options.temperature}",
                            hint="leave out --sample for greedy decoding")
        if not 0 < options.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {options.top_p}")
    if options.metrics is not None and "regex" in options.metrics and not options.regex:
        raise UserError("--metrics regex needs a pattern", hint="add --regex PATTERN")


def _wanted(options: EvalOptions) -> set[str]:
    """Metrics to compute. json joins when a schema is given (and, by default, when references look like JSON)."""
    if options.metrics is None:
        wanted = set(METRICS) - {"regex"}
    else:
        wanted = set(options.metrics)
    if options.json_schema:
        wanted.add("json")
    if options.regex:
        wanted.add("regex")
    return wanted


def _held_out(run_dir: Path, options: EvalOptions):
    """(examples, path) of the held-out set, limited."""
    if options.data:
        path = resolve_data_path(options.data)
    else:
        path = run_folder.val_path(run_dir)
        if not path.is_file() or not path.read_text(encoding="utf-8").strip():
            raise UserError(f"{run_dir} has no validation examples (data/val.jsonl is missing or empty)",
                            hint="pass a test file with --data FILE")
    examples, _fmt, _counts = load_examples(path, options.format, False, options.columns if options.data else ())
    if options.limit:
        examples = examples[: options.limit]
    return examples, path


def _report_folder(run_dir: Path, label: str, when: datetime) -> Path:
    base = run_folder.eval_dir(run_dir) / f"{when:%Y%m%d-%H%M%S}-{label}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:  # never overwrite an earlier report
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def _checkpoint_info(run_dir: Path, requested: str) -> dict[str, Any]:
    folder = run_folder.checkpoint_folder(run_dir, requested)
    step = run_folder.weights_step(run_dir, folder)
    label = "best" if requested == "best" else ("last" if requested == "last" else f"step-{step}")
    return {"requested": requested, "folder": folder.name, "step": step, "label": label}


def _models(run_dir: Path, cfg, checkpoint: str, device: str) -> Iterator[tuple[str, Any, Any]]:
    """("base", model, tokenizer) then ("tuned", model, tokenizer). Adapters: one load, the base is the same
    weights with the adapter disabled. Full fine-tunes: the base, freed, then the trained model."""
    if cfg.train.method == "full":
        model, tokenizer, _ = load_base(cfg, device)
        model.eval()
        yield "base", model, tokenizer
        del model
        _free(device)
        model, tokenizer, _ = load_trained(run_dir, checkpoint, device)
        yield "tuned", model, tokenizer
        return
    model, tokenizer, _ = load_trained(run_dir, checkpoint, device)
    with model.disable_adapter():
        yield "base", model, tokenizer
    yield "tuned", model, tokenizer


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _autocast(cfg, device: str) -> Callable | None:
    """Evaluate under the autocast training used, so the loss is the training validation loss: full fine-tunes
    on accelerators, and bf16 matmuls on CPUs with native bf16 (training.run.cpu_bf16_autocast)."""
    import torch

    if device == "cpu":
        from ft_desk.trainer.training.run import cpu_bf16_autocast

        return (lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16)) if cpu_bf16_autocast(cfg) else None
    if cfg.train.method != "full":
        return None

    compute, _ = run_dtypes(cfg, device)
    return lambda: torch.autocast(device_type=device, dtype=torch_dtype(compute))


def _prepare(examples, tokenizer, cfg) -> tuple[list[_Item], list[str]]:
    """Prompts, references and training labels of every example; rows the template refuses are left out."""
    renderer = example_renderer(tokenizer, cfg.data, examples, examples[0].where if examples else "data")
    items, skipped = [], []
    for index, example in enumerate(examples):
        try:
            ids, reference = renderer.generation_prompt(example, cfg.data.max_length)
            tokenized = renderer.tokenize(example, cfg.data.max_length)
        except RowError as err:
            skipped.append(str(err))
            continue
        ref_tokens = len(tokenizer(reference, add_special_tokens=False)["input_ids"])
        items.append(_Item(index, example.where, list(ids), reference, tokenized, ref_tokens,
                           tokenizer.decode(ids, skip_special_tokens=False)))
    return items, skipped


def _only_middle_cuts(examples) -> bool:
    counts = text_split_counts(examples)
    return bool(counts) and set(counts) == {"middle"} and len(examples) == counts["middle"]


def _max_new_tokens(options: EvalOptions, items: list[_Item], model) -> tuple[int, str | None]:
    """The token limit: as given, or room for the longest reference (x1.25 + 8, 16..1024); capped by the
    model's context."""
    if options.max_new_tokens:
        limit = options.max_new_tokens
    else:
        longest = max((it.ref_tokens for it in items), default=16)
        limit = max(16, min(1024, math.ceil(longest * 1.25) + 8))
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest_prompt = max((len(it.prompt_ids) for it in items), default=0)
    if isinstance(context, int) and longest_prompt + limit > context:
        capped = max(1, context - longest_prompt)
        return capped, f"generation limited to {capped} new tokens by the model's context of {context} tokens"
    return limit, None


@dataclass
class _Plan:
    """Everything settled before a model is loaded, so bad input fails fast."""

    run_dir: Path
    options: EvalOptions
    cfg: Any
    wanted: set[str]
    validator: Any  # jsonschema validator or None
    pattern: Any  # compiled regex or None
    checkpoint: dict[str, Any]
    examples: list
    data_path: Path
    probe_path: Path | None
    device: str
    sampling: Sampling | None  # None: greedy
    generation: dict[str, Any]
    when: datetime
    started: float


@dataclass
class _Measured:
    """What the models produced: per-example outputs and losses, probe losses, timings."""

    items: list[_Item]
    outputs: dict[str, list]
    losses: dict[str, list[tuple[float, int]]]
    probe: dict[str, list[tuple[float, int]]]
    timings: dict[str, Any]
    notes: list[str]
    vocab: int
    stop_ids: list[int]
    semantic: dict[str, list[float]] | None = None  # cosine similarity per example, when an embedding model is here


def _plan(run_dir: Path | str, options: EvalOptions, clock: Callable[[], float]) -> _Plan:
    started = clock()
    when = datetime.now()
    run_dir = Path(run_dir).expanduser().resolve()
    _check_options(options)
    cfg = load_run_config(run_dir)
    wanted = _wanted(options)
    # The option files first: a bad schema or pattern is said before any data is read.
    validator = em.load_schema_validator(options.json_schema) if options.json_schema else None
    pattern = em.compile_regex(options.regex) if options.regex else None
    examples, data_path = _held_out(run_dir, options)
    if "exact" in wanted and options.metrics is None and _only_middle_cuts(examples):
        wanted.discard("exact")  # the notes say why (see _finish)
    checkpoint = _checkpoint_info(run_dir, options.checkpoint)
    probe_path = Path(options.probe).expanduser() if options.probe else None
    if "retention" in wanted:
        probe_path = probe_path or retention_probe_path()
        if not probe_path.is_file():
            raise UserError(f"--probe {probe_path}: no such file", hint="pass a plain-text file, one passage a line")
    device = resolve_device(options.device or cfg.train.device)
    sampling = None
    if options.sample:
        sampling = Sampling(options.temperature, options.top_p, options.seed)
    generation = {"mode": "sample" if sampling else "greedy", "max_new_tokens": options.max_new_tokens,
                  "batch_size": options.batch_size, "temperature": options.temperature if sampling else None,
                  "top_p": options.top_p if sampling else None, "seed": options.seed if sampling else None}
    return _Plan(run_dir, options, cfg, wanted, validator, pattern, checkpoint, examples, data_path, probe_path,
                 device, sampling, generation, when, started)


def evaluate_run(run_dir: Path | str, options: EvalOptions, sink: EventSink,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Evaluate a run (see the module docstring); returns the report (also written to its folder)."""
    plan = _plan(run_dir, options, clock)
    sink.emit(make_event("eval_started", run_dir=str(plan.run_dir), run_name=plan.run_dir.name,
                         checkpoint=plan.checkpoint, data=str(plan.data_path), examples=len(plan.examples),
                         metrics=sorted(plan.wanted), device=plan.device, generation=plan.generation))
    threads = options.threads if options.threads is not None else plan.cfg.train.threads
    with _torch_threads(threads):
        measured = _measure(plan, sink, clock)
    return _finish(plan, measured, sink, clock)


@contextlib.contextmanager
def _torch_threads(threads: int):
    """torch's CPU thread count for the evaluation (0: the free cores), restored afterwards (callers may run more
    in-process)."""
    import torch

    before = torch.get_num_threads()
    apply_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure(plan: _Plan, sink: EventSink, clock: Callable[[], float]) -> _Measured:
    """Load once, then per model (base, tuned): reference loss, generation, probe perplexity."""
    cfg, options, wanted = plan.cfg, plan.options, plan.wanted

    def progress(phase: str, side: str) -> Callable[[int, int], None]:
        return lambda done, total: sink.emit(make_event(
            "eval_progress", phase=phase, model=side, done=done, total=total,
            elapsed_s=round(clock() - plan.started, 3)))

    m = _Measured(items=[], outputs={}, losses={}, probe={}, timings={}, notes=[], vocab=0, stop_ids=[])
    tokenizer = None
    max_new = 0
    load_started = clock()
    progress("load", "both")(0, 1)
    for side, model, tok in _models(plan.run_dir, cfg, options.checkpoint, plan.device):
        if tokenizer is None:
            m.timings["load_seconds"] = round(clock() - load_started, 3)
            tokenizer = tok
            m.vocab = len(tokenizer)
            m.items, skipped = _prepare(plan.examples, tokenizer, cfg)
            if skipped:
                m.notes.append(f"{len(skipped)} example(s) left out because the chat template refused them "
                               f"(first: {skipped[0]})")
            m.notes.extend(text_split_notes(plan.examples))
            if not m.items:
                raise UserError(f"{plan.data_path}: no example could be rendered for this model",
                                hint="check the file with: ft-desk data check FILE")
            m.stop_ids = stop_token_ids(tokenizer, vocabulary_fallback=True)
            max_new, capped_note = _max_new_tokens(options, m.items, model)
            plan.generation["max_new_tokens"] = max_new
            if capped_note:
                m.notes.append(capped_note)
        side_timing: dict[str, Any] = {}
        pad_id = pad_id_for(tokenizer, m.stop_ids)
        autocast = _autocast(cfg, plan.device)
        batching = dict(pad_id=pad_id, device=plan.device, batch_size=options.batch_size,
                        chunk_tokens=cfg.train.loss_chunk_tokens, autocast=autocast, clock=clock)
        if "loss" in wanted:
            m.losses[side], t = scoring.losses(model, [it.tokenized for it in m.items],
                                               progress=progress("loss", side), **batching)
            side_timing["loss"] = t.to_dict()
        if wanted & NEEDS_GENERATION:
            started = clock()
            m.outputs[side] = generate(model, tokenizer, [it.prompt_ids for it in m.items],
                                       max_new_tokens=max_new, batch_size=options.batch_size,
                                       stop_ids=m.stop_ids, device=plan.device, sampling=plan.sampling,
                                       progress=progress("generate", side))
            t = scoring.PhaseTiming(clock() - started, sum(g.tokens for g in m.outputs[side]))
            side_timing["generate"] = t.to_dict()
        if "retention" in wanted:
            lines = plan.probe_path.read_text(encoding="utf-8").splitlines()
            passages = scoring.probe_passages(tokenizer, lines, cfg.data.max_length, str(plan.probe_path))
            m.probe[side], t = scoring.losses(model, passages, progress=progress("retention", side), **batching)
            side_timing["retention"] = t.to_dict()
        m.timings[side] = side_timing
        del model
    _free(plan.device)

    if "semantic" in wanted and m.outputs:
        folder, where = find_embedding_model()
        if folder is None:
            m.notes.append(where)
        else:
            sem_started = clock()
            references = [it.reference for it in m.items]
            device = "cuda" if plan.device == "cuda" else "cpu"
            m.semantic = {side: similarities(folder, [g.text for g in m.outputs[side]], references,
                                             device=device) for side in ("base", "tuned")}
            progress("semantic", "both")(len(m.items), len(m.items))
            m.timings["semantic"] = {"seconds": round(clock() - sem_started, 3), "model": where}
    return m


def _finish(plan: _Plan, m: _Measured, sink: EventSink, clock: Callable[[], float]) -> dict[str, Any]:
    """Metrics, retention verdict, rows; the report written to a new folder and sent as eval_report."""
    options, wanted, items, notes = plan.options, plan.wanted, m.items, m.notes
    outputs, timings = m.outputs, m.timings
    metrics, per_example = _metric_rows(wanted, items, outputs, m.losses, m.semantic, plan.validator, plan.pattern)
    if "json" in wanted and outputs and options.metrics is None and not options.json_schema:
        metrics, per_example = _drop_json_unless_references_are_json(metrics, per_example, items)
    retention = None
    if "retention" in wanted:
        retention = retention_result(m.probe, plan.cfg, m.vocab, RETENTION_MAX_RISE, CHANCE_SHARE,
                                     str(plan.probe_path))
    if options.metrics is None and "exact" not in wanted and _only_middle_cuts(plan.examples):
        notes.append("exact match left out: every row is one line of text cut at its middle, and a continuation "
                     "of half a sentence is not expected to match the other half word for word; ROUGE-L and chrF "
                     "measure how close it came")
    if len(items) < em.MIN_EXAMPLES:
        notes.insert(0, f"only {len(items)} held-out examples: numbers carry wide 95% intervals (shown as +/-) and "
                        f"a change is called better or worse only when its interval excludes zero; "
                        f"evaluate a larger file with --data for firmer numbers")
    rows = build_rows(items, outputs, per_example)
    timings["total_seconds"] = round(clock() - plan.started, 3)
    run_dir, cfg, checkpoint, when = plan.run_dir, plan.cfg, plan.checkpoint, plan.when
    data_path, generation, stop_ids, device = plan.data_path, plan.generation, m.stop_ids, plan.device
    report = {
        "version": 1,
        "created": when.astimezone().isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "run_name": run_dir.name,
        "model": cfg.model.name,
        "method": cfg.train.method,
        "device": device,
        "checkpoint": checkpoint,
        "data": {"path": str(data_path), "examples": len(items), "limit": options.limit,
                 "default_split": options.data is None},
        "generation": {**generation, "stop_token_ids": stop_ids},
        "metrics": [row.to_dict() for row in metrics],
        "retention": retention,
        "notes": notes,
        "min_examples": em.MIN_EXAMPLES,
        "timings": timings,
        "rows": rows,
    }
    folder = _report_folder(run_dir, checkpoint["label"], when)
    report["report_dir"] = str(folder)
    write_report(report, folder, TOP_ROWS)
    sink.emit(make_event("eval_report", report_dir=str(folder), examples=len(items), metrics=report["metrics"],
                         retention=retention, notes=notes, top_rows=top_rows(rows, TOP_ROWS)))
    return report


def top_rows(rows: list[dict], k: int) -> list[dict]:
    """The k biggest wins, then the k biggest losses (rows with a change only), texts shortened for events."""
    wins = sorted((r for r in rows if r["change"] == "win"), key=lambda r: -r["delta"])[:k]
    losses = sorted((r for r in rows if r["change"] == "loss"), key=lambda r: r["delta"])[:k]

    def short(row: dict) -> dict:
        return {"index": row["index"], "where": row["where"], "change": row["change"], "delta": row["delta"],
                "sort_metric": row["sort_metric"], "reference": row["reference"][:500],
                "base_output": (row["base"]["output"] or "")[:500],
                "tuned_output": (row["tuned"]["output"] or "")[:500]}

    return [short(r) for r in wins + losses]


def _metric_rows(wanted: set[str], items: list[_Item], outputs: dict, losses: dict, semantic: dict | None,
                 validator, pattern) -> tuple[list[em.MetricRow], dict[str, dict[str, list]]]:
    """The metrics table and the per-example values behind it: {side: {metric key: [value per item]}}."""
    refs = [it.reference for it in items]
    per: dict[str, dict[str, list]] = {"base": {}, "tuned": {}}
    generated = bool(outputs)
    for side in ("base", "tuned"):
        values = per[side]
        if "loss" in wanted and side in losses:
            values["loss_sum"] = [s for s, _ in losses[side]]
            values["loss_tokens"] = [c for _, c in losses[side]]
            values["loss"] = [s / c if c else None for s, c in losses[side]]
        if not generated:
            continue
        gens = outputs[side]
        texts = [g.text for g in gens]
        values["tokens"] = [g.tokens - (1 if g.stopped else 0) for g in gens]
        values["stopped"] = [float(g.stopped) for g in gens]
        if "exact" in wanted:
            values["exact"] = [em.exact_match(o, r) for o, r in zip(texts, refs)]
            values["norm_exact"] = [em.normalized_exact_match(o, r) for o, r in zip(texts, refs)]
        if "rouge" in wanted:
            values["rouge_l"] = [em.rouge_l(o, r) for o, r in zip(texts, refs)]
        if "chrf" in wanted:
            values["chrf"] = [em.chrf(o, r) for o, r in zip(texts, refs)]
        if "bleu" in wanted:
            values["bleu"] = [em.bleu(o, r) for o, r in zip(texts, refs)]
        if "json" in wanted:
            parsed = [em.parse_json_output(o) for o in texts]
            values["json"] = [float(ok) for ok, _ in parsed]
            if validator is not None:
                values["schema"] = [float(ok and em.schema_valid(validator, v)) for ok, v in parsed]
        if "regex" in wanted and pattern is not None:
            values["regex"] = [em.regex_match(pattern, o) for o in texts]
        if semantic is not None:
            values["semantic"] = semantic[side]
        values["length_ratio"] = [t / max(it.ref_tokens, 1) for t, it in zip(values["tokens"], items)]

    b, t = per["base"], per["tuned"]
    rows: list[em.MetricRow] = []
    if "loss" in wanted and "loss" in b:
        keep = [i for i, c in enumerate(b["loss_tokens"]) if c]
        bl = em.ratio_of([b["loss_sum"][i] for i in keep], [b["loss_tokens"][i] for i in keep])
        tl = em.ratio_of([t["loss_sum"][i] for i in keep], [t["loss_tokens"][i] for i in keep])
        rows.append(em.compare("loss", "loss (per token)", bl, tl, len(keep), better="lower", scale="loss"))
        rows.append(em.compare("perplexity", "perplexity", em.exp_of(bl), em.exp_of(tl), len(keep),
                               better="lower", scale="ppl"))
    if not generated:
        return rows, per
    if "exact" in wanted:
        rows.append(em.compare_rates("exact_match", "exact match", b["exact"], t["exact"]))
        rows.append(em.compare_rates("normalized_exact_match", "exact match (normalized)",
                                     b["norm_exact"], t["norm_exact"]))
    if "rouge" in wanted:
        rows.append(em.compare_means("rouge_l", "ROUGE-L F1", b["rouge_l"], t["rouge_l"]))
    base_texts = [g.text for g in outputs["base"]]
    tuned_texts = [g.text for g in outputs["tuned"]]
    refs_n = len(refs)
    if "chrf" in wanted:
        rows.append(em.compare("chrf", "chrF", em.corpus_score("chrf", base_texts, refs),
                               em.corpus_score("chrf", tuned_texts, refs), refs_n, scale="x100"))
    if "bleu" in wanted:
        rows.append(em.compare("bleu", "BLEU", em.corpus_score("bleu", base_texts, refs),
                               em.corpus_score("bleu", tuned_texts, refs), refs_n, scale="x100"))
    if semantic is not None:
        rows.append(em.compare_means("semantic_similarity", "semantic similarity", b["semantic"], t["semantic"]))
    if "json" in wanted:
        rows.append(em.compare_rates("json_parse", "JSON parses", b["json"], t["json"]))
        if "schema" in b:
            rows.append(em.compare_rates("json_schema", "JSON matches schema", b["schema"], t["schema"]))
    if "regex" in b:
        rows.append(em.compare_rates("regex_match", "regex matches", b["regex"], t["regex"]))
    if "stop" in wanted:
        rows.append(em.compare_rates("stop_rate", "stops by itself", b["stopped"], t["stopped"]))
    if "length" in wanted:
        mean_ref = sum(it.ref_tokens for it in items) / max(1, len(items))
        length = em.compare_means("output_tokens", "output length (tokens)", b["tokens"], t["tokens"],
                                  better="none", scale="tokens")
        length.note = "; ".join(x for x in (f"reference: {mean_ref:.1f}", length.note) if x)
        rows.append(length)
        rows.append(em.compare_means("length_ratio", "length / reference", b["length_ratio"], t["length_ratio"],
                                     better="closer_to_1", scale="ratio"))
    return rows, per


def _drop_json_unless_references_are_json(metrics, per_example, items):
    """By default JSON parse rate is reported only when most references are JSON themselves."""
    json_refs = sum(em.parse_json_output(it.reference)[0] for it in items)
    if json_refs * 2 > len(items):
        return metrics, per_example
    metrics = [m for m in metrics if m.name not in ("json_parse", "json_schema")]
    for side in per_example.values():
        side.pop("json", None)
    return metrics, per_example


def result_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What eval_finished carries and --json prints: the report without the per-example rows."""
    folder = Path(report["report_dir"])
    return {"report_dir": str(folder), "report_json": str(folder / "report.json"),
            "report_md": str(folder / "report.md"), "examples": report["data"]["examples"],
            "checkpoint": report["checkpoint"], "metrics": report["metrics"], "retention": report["retention"],
            "notes": report["notes"], "timings": report["timings"]}


__all__ = ["EvalOptions", "METRICS", "RETENTION_MAX_RISE", "evaluate_run", "parse_metrics", "result_summary",
           "top_rows"]
