"""The training-data pipeline: files -> examples -> deduplicated, split, tokenized and masked training rows.

`prepare_data(cfg, tokenizer)` is what a run calls: it reads data.train_file (and data.valid_file, a dataset
folder's validation split), both with the data.columns mapping (or the column names assumed, said in the stats'
columns_note), drops exact
duplicates, holds out a deterministic validation split (from data.seed) when there is no validation file,
renders every example (chat template or plain, see data_render), masks the loss (data.train_on), truncates to
data.max_length and counts what it changed. Bad rows stop it with a `DataError` naming file:line, or with
data.skip_bad_rows are left out and counted. Reading and format detection live in data_formats, rendering and
masking in data_render, the lint report of `ft-desk data check` in data_lint; this module re-exports the types.
No heavy imports: the tokenizer is passed in.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ft_desk.trainer.atomic import write_lines
from ft_desk.trainer.config import DataConfig
from ft_desk.trainer.data.formats import FORMATS, Example, Message, RowError, load_examples, resolve_data_path
from ft_desk.trainer.data.render import IGNORE, Renderer, TokenizedExample, example_renderer
from ft_desk.trainer.errors import DataError
from ft_desk.trainer.recipe_sizing import token_limit

__all__ = [
    "FORMATS", "IGNORE", "Example", "Message", "PreparedData", "RowError", "TokenizedExample", "dedupe_examples",
    "generation_prompt", "load_examples", "prepare_data", "resolve_data_path", "split_examples",
    "write_examples_jsonl",
]


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    val: list[TokenizedExample]
    val_examples: list[Example]  # untokenized, aligned with `val`: for samples, eval and export checks
    format: str  # detected format of the training file
    stats: dict = field(default_factory=dict)
    # train_rows, val_rows, train_tokens, val_tokens, train_target_tokens, truncated, duplicates_dropped,
    # skipped_rows, skipped_by_reason, dropped_no_target, rendering, columns (the mapping applied, as a
    # --columns value), columns_note (what was assumed about the columns), train_file, valid_file


def dedupe_examples(examples: list[Example]) -> tuple[list[Example], int]:
    """Examples with exact repeats (same content after conversion) removed, keeping the first; and how many."""
    seen: set = set()
    kept = []
    for example in examples:
        key = example.key()
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept, len(examples) - len(kept)


def split_examples(
    examples: list[Example], val_fraction: float, max_val_rows: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic train/val split: round(val_fraction * n) rows (at most max_val_rows, at least 1 when
    val_fraction > 0 and n >= 2, never all of them) drawn with `seed`; both parts keep file order."""
    n = len(examples)
    k = min(round(val_fraction * n), max_val_rows)
    if val_fraction > 0 and n >= 2:
        k = max(k, 1)
    k = max(0, min(k, n - 1))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


def _tokenize_all(
    renderer: Renderer, examples: list[Example], cfg: DataConfig, counts: dict
) -> tuple[list[TokenizedExample], list[Example]]:
    """Tokenized examples (and the examples kept), counting truncation, rows with no target, template errors."""
    out: list[TokenizedExample] = []
    kept: list[Example] = []
    for example in examples:
        try:
            tokenized = renderer.tokenize(example, cfg.max_length)
        except RowError as err:
            if not cfg.skip_bad_rows:
                raise
            counts["skipped_rows"] += 1
            counts["skipped_by_reason"][err.kind] = counts["skipped_by_reason"].get(err.kind, 0) + 1
            continue
        counts["truncated"] += tokenized.truncated
        # Targets are labels shifted by one: a row needs a trained token after its first to teach anything.
        if all(label == IGNORE for label in tokenized.labels[1:]):
            counts["dropped_no_target"] += 1
            continue
        out.append(tokenized)
        kept.append(example)
    return out, kept


def prepare_data(cfg: DataConfig, tokenizer) -> PreparedData:
    """Read, check, deduplicate, split, render, mask and truncate the run's data (see the module docstring).
    data.max_length auto truncates at the cap; the run then sizes its rows from these lengths."""
    cfg = dataclasses.replace(cfg, max_length=token_limit(cfg.max_length))
    train_path = resolve_data_path(cfg.train_file)
    train_examples, fmt, read = load_examples(train_path, cfg.format, cfg.skip_bad_rows, cfg.columns)
    counts = {
        "skipped_rows": read["skipped_rows"],
        "skipped_by_reason": dict(read["skipped_by_reason"]),
        "duplicates_dropped": 0,
        "truncated": 0,
        "dropped_no_target": 0,
    }
    if cfg.dedupe:
        train_examples, dropped = dedupe_examples(train_examples)
        counts["duplicates_dropped"] += dropped
    valid_path = None
    if cfg.valid_file:
        valid_path = resolve_data_path(cfg.valid_file, split="validation")
        val_examples, _, vread = load_examples(valid_path, cfg.format, cfg.skip_bad_rows, cfg.columns)
        counts["skipped_rows"] += vread["skipped_rows"]
        for kind, n in vread["skipped_by_reason"].items():
            counts["skipped_by_reason"][kind] = counts["skipped_by_reason"].get(kind, 0) + n
        if cfg.dedupe:
            val_examples, dropped = dedupe_examples(val_examples)
            # A training row that is also a validation row would make validation loss lie.
            held = {e.key() for e in val_examples}
            before = len(train_examples)
            train_examples = [e for e in train_examples if e.key() not in held]
            counts["duplicates_dropped"] += dropped + before - len(train_examples)
    else:
        train_examples, val_examples = split_examples(train_examples, cfg.val_fraction, cfg.max_val_rows, cfg.seed)

    renderer = example_renderer(tokenizer, cfg, train_examples + val_examples, str(train_path))
    train, _ = _tokenize_all(renderer, train_examples, cfg, counts)
    val, val_kept = _tokenize_all(renderer, val_examples, cfg, counts)
    if not train:
        raise DataError(
            str(train_path),
            "no training rows are left after removing duplicates, the validation split and rows with nothing to learn",
            "add rows, lower data.val_fraction, or raise data.max_length",
        )
    stats = {
        "train_rows": len(train),
        "val_rows": len(val),
        "train_tokens": sum(len(t.input_ids) for t in train),
        "val_tokens": sum(len(t.input_ids) for t in val),
        "train_target_tokens": sum(sum(1 for x in t.labels[1:] if x != IGNORE) for t in train),
        **counts,
        "rendering": "chat_template" if renderer.use_template else "plain",
        "columns": read["columns"],
        "columns_note": read["columns_note"],
        "train_file": str(train_path),
        "valid_file": str(valid_path) if valid_path else None,
    }
    return PreparedData(train, val, val_kept, fmt, stats)


def generation_prompt(example: Example, tokenizer, cfg: DataConfig) -> tuple[list[int], str]:
    """Token ids of everything before the example's last reply, rendered as in training with the generation
    prompt added (text rows: the first half of the text), and the reference text that follows."""
    cfg = dataclasses.replace(cfg, max_length=token_limit(cfg.max_length))
    renderer = example_renderer(tokenizer, cfg, [example], example.where)
    return renderer.generation_prompt(example, cfg.max_length)


def write_examples_jsonl(examples: Iterable[Example], path: Path | str) -> Path:
    """Write examples as {"messages": [...]} / {"text": ...} JSON Lines, atomically (atomic.py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_lines(path, (json.dumps(example.to_row(), ensure_ascii=False) + "\n" for example in examples))
