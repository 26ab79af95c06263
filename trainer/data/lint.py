"""The lint report of `ft-desk data check`: is this file usable for this model, and what will training see?

`lint_file(path, tokenizer, cfg)` reads the whole file (collecting broken rows instead of stopping at the first),
then renders every usable row exactly as training would and reports: the detected format, row counts, token
lengths (statistics and a histogram against data.max_length), truncated rows, duplicates, empty turns, rows with
nothing to learn within max_length, and a few rendered samples (the first row, the longest, the shortest, a
truncated one, one with nothing to learn) split into (text, trained) pieces so a CLI can bracket or colour the
tokens that carry loss. It also lists the file's columns with a sample value each, the column mapping applied
(data.columns, or what was assumed from the names, with a note saying so) and, when the columns fill no format
(or are preference pairs), an `error` with the `--columns` value that would map them (`suggested_columns`): what
the TUI's mapping dialog starts from. Problems with the whole file (missing, empty, not UTF-8) raise
`DataError`. `tokenizer=None` gives the parts that need no tokenizer. `LintReport.to_dict()` is the --json form.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ft_desk.trainer.columns import columns_line
from ft_desk.trainer.config import DataConfig
from ft_desk.trainer.data.formats import MAX_PROBLEMS_KEPT, ColumnsMismatch, Example, RowError, scan_file
from ft_desk.trainer.data.render import IGNORE, example_renderer
from ft_desk.trainer.errors import DataError
from ft_desk.trainer.recipe_sizing import auto_max_length, is_auto, token_limit

# Note: how many file:line locations are listed per finding (all are counted).
MAX_LOCATIONS = 5
HISTOGRAM_BUCKETS = 8


@dataclass
class LintReport:
    path: str
    format: str
    rows: int  # rows read, broken ones included
    usable_rows: int
    max_length: int
    train_on: str
    rendering: str = ""  # "chat_template" | "plain" | "" (no tokenizer)
    token_stats: dict = field(default_factory=dict)  # min, median, mean, p95, max tokens per example
    histogram: list = field(default_factory=list)  # [{"lo", "hi" (None: above max_length), "count"}]
    total_tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    truncated_where: list = field(default_factory=list)
    duplicates: int = 0
    duplicates_where: list = field(default_factory=list)  # [{"where", "same_as"}]
    dedupe: bool = True
    empty_turns: int = 0
    empty_turns_where: list = field(default_factory=list)
    no_target: int = 0  # rows whose replies lie entirely beyond max_length
    no_target_where: list = field(default_factory=list)
    broken_count: int = 0
    broken_rows: list = field(default_factory=list)  # [{"where", "reason", "kind"}], the first few
    broken_by_reason: dict = field(default_factory=dict)
    # [{"label", "where", "segments": [[text, trained]], "tokens", "trained_tokens", "truncated"}], first row first
    samples: list = field(default_factory=list)
    error: str | None = None  # why the file cannot be used with this model at all
    error_hint: str = ""
    auto_max_length: bool = False  # data.max_length was auto: max_length is what the data sized it to
    lengths: list = field(default_factory=list, repr=False)  # tokens per usable example as trained (not in to_dict)
    columns: list = field(default_factory=list)  # the first row's columns: [{"name", "sample", "kind"}]
    column_mapping: str = ""  # the mapping applied, as a --columns value ("" for none)
    columns_note: str = ""  # what was assumed about the columns ("" when nothing was)
    suggested_columns: str = ""  # when the columns fit no format: the --columns value that would map them

    @property
    def usable(self) -> bool:
        return self.error is None and self.usable_rows > 0

    def ok(self, skip_bad_rows: bool) -> bool:
        """Training would start: usable, and no broken rows unless they are to be skipped."""
        return self.usable and (self.broken_count == 0 or skip_bad_rows)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("lengths")
        out["usable"] = self.usable
        return out


def _percentile(sorted_values: list[int], q: float) -> int:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _histogram(lengths: list[int], max_length: int) -> list[dict]:
    width = max(1, math.ceil(max_length / HISTOGRAM_BUCKETS))
    buckets = []
    lo = 1
    while lo <= max_length:
        hi = min(lo + width - 1, max_length)
        buckets.append({"lo": lo, "hi": hi, "count": sum(lo <= n <= hi for n in lengths)})
        lo = hi + 1
    buckets.append({"lo": max_length + 1, "hi": None, "count": sum(n > max_length for n in lengths)})
    return buckets


def _note(where_list: list, item) -> None:
    if len(where_list) < MAX_LOCATIONS:
        where_list.append(item)


def _add_broken(report: LintReport, err: RowError) -> None:
    report.broken_count += 1
    report.broken_by_reason[err.kind] = report.broken_by_reason.get(err.kind, 0) + 1
    if len(report.broken_rows) < MAX_PROBLEMS_KEPT:
        report.broken_rows.append({"where": err.where, "reason": err.reason, "kind": err.kind})


def _content_findings(report: LintReport, examples: list[Example]) -> None:
    first_seen: dict = {}
    for example in examples:
        key = example.key()
        if key in first_seen:
            report.duplicates += 1
            _note(report.duplicates_where, {"where": example.where, "same_as": first_seen[key]})
        else:
            first_seen[key] = example.where
        if any(m.role != "assistant" and not m.content.strip() for m in example.messages or ()):
            report.empty_turns += 1
            _note(report.empty_turns_where, example.where)


def _token_findings(report: LintReport, examples: list[Example], tokenizer, cfg: DataConfig) -> None:
    try:
        renderer = example_renderer(tokenizer, cfg, examples, report.path)
    except DataError as err:
        report.error, report.error_hint = str(err), err.hint
        return
    report.rendering = "chat_template" if renderer.use_template else "plain"
    encoded_rows = []
    for example in examples:
        try:
            encoded_rows.append((example, renderer.encode(example)))
        except RowError as err:
            report.usable_rows -= 1
            _add_broken(report, err)
    if is_auto(cfg.max_length):  # sized from the data, as training will size it
        cfg = dataclasses.replace(cfg, max_length=auto_max_length([len(e.input_ids) for _, e in encoded_rows]))
        report.max_length = cfg.max_length
    lengths = []
    picks: dict[str, tuple[int, Example]] = {}  # sample label -> (tokens, example)
    for example, encoded in encoded_rows:
        n = len(encoded.input_ids)
        lengths.append(n)
        report.total_tokens += min(n, cfg.max_length)
        trained = sum(1 for x in encoded.labels[1 : cfg.max_length] if x != IGNORE)
        report.trained_tokens += trained
        if n > cfg.max_length:
            report.truncated += 1
            _note(report.truncated_where, example.where)
            picks.setdefault("truncated", (n, example))
        if trained == 0:
            report.no_target += 1
            _note(report.no_target_where, example.where)
            picks.setdefault("nothing to learn", (n, example))
        picks.setdefault("first row", (n, example))
        if n > picks.setdefault("longest", (n, example))[0]:
            picks["longest"] = (n, example)
        if n < picks.setdefault("shortest", (n, example))[0]:
            picks["shortest"] = (n, example)
    if lengths:
        ordered = sorted(lengths)
        report.token_stats = {
            "min": ordered[0],
            "median": _percentile(ordered, 0.5),
            "mean": round(sum(ordered) / len(ordered), 1),
            "p95": _percentile(ordered, 0.95),
            "max": ordered[-1],
        }
        report.histogram = _histogram(lengths, cfg.max_length)
        report.lengths = [min(n, cfg.max_length) for n in lengths]
    report.samples = _samples(picks, renderer, cfg.max_length)


SAMPLE_ORDER = ("first row", "longest", "shortest", "truncated", "nothing to learn")


def _samples(picks: dict[str, tuple[int, Example]], renderer, max_length: int) -> list[dict]:
    """Each picked example rendered once, in SAMPLE_ORDER; an example picked twice keeps its first label."""
    samples, seen = [], set()
    for label in SAMPLE_ORDER:
        if label not in picks or picks[label][1].where in seen:
            continue
        example = picks[label][1]
        seen.add(example.where)
        ids = renderer.tokenize(example, max_length)
        samples.append({
            "label": label,
            "where": example.where,
            "segments": [[text, trained] for text, trained in renderer.segments(example, max_length)],
            "tokens": len(ids.input_ids),
            "trained_tokens": sum(1 for x in ids.labels if x != IGNORE),
            "truncated": ids.truncated,
        })
    return samples


def lint_file(path: Path | str, tokenizer, cfg: DataConfig) -> LintReport:
    """The lint report of one data file for a tokenizer (None: skip token findings) and a DataConfig."""
    path = Path(path)
    try:
        scan = scan_file(path, cfg.format, cfg.columns)
    except ColumnsMismatch as err:
        return LintReport(path=str(path), format="unknown", rows=0, usable_rows=0, max_length=cfg.max_length,
                          train_on=cfg.train_on, dedupe=cfg.dedupe, error=str(err), error_hint=err.hint,
                          columns=err.columns, suggested_columns=columns_line(err.suggestion))
    report = LintReport(
        path=str(path),
        format=scan.format,
        rows=scan.rows_read,
        usable_rows=len(scan.examples),
        max_length=token_limit(cfg.max_length),
        train_on=cfg.train_on,
        dedupe=cfg.dedupe,
        auto_max_length=is_auto(cfg.max_length),
        columns=scan.columns,
        column_mapping=columns_line(scan.mapping),
        columns_note=scan.note,
    )
    for err in scan.problems:
        report.broken_rows.append({"where": err.where, "reason": err.reason, "kind": err.kind})
    report.broken_count = scan.problem_count
    report.broken_by_reason = dict(scan.problems_by_kind)
    _content_findings(report, scan.examples)
    if tokenizer is not None and scan.examples:
        _token_findings(report, scan.examples, tokenizer, cfg)
    if not scan.examples and report.error is None:
        report.error = "no row of the file can be used"
        report.error_hint = "fix the broken rows listed above"
    return report
