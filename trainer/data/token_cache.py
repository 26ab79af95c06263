"""Tokenized training data kept between runs, so a second run on the same data skips reading and tokenizing.

`prepare_data_cached(cfg, tokenizer)` returns what `prepare_data` returns, plus whether it came from the cache and
how long preparing took. The cache entry is keyed by everything that changes the tokens:
- the bytes of data.train_file and data.valid_file (a sha256 of each; a path that now holds other data misses);
- the tokenizer (its full serialized form: vocabulary, merges, normalizer, added tokens; its chat template and
  special tokens);
- every data.* setting except the file names (max length, format, train_on, chat template choice, split, ...);
- the source of the data pipeline itself (trainer/data and the chat-format rules), so a changed renderer never
  reuses tokens the old one made.
Entries are JSON files under ft-desk's cache folder (`cache_home()/tokenized`), written atomically; the newest
KEEP_ENTRIES are kept. A broken or unreadable entry is prepared again, never an error. Errors in the data
(DataError) still come from preparing, so a run on bad data fails the same way the first time and every time.
No heavy imports: the tokenizer is passed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ft_desk.trainer.atomic import write_text
from ft_desk.trainer.config import DataConfig
from ft_desk.trainer.data.formats import Example, Message, resolve_data_path
from ft_desk.trainer.data.prepare import PreparedData, prepare_data
from ft_desk.trainer.data.render import TokenizedExample
from ft_desk.trainer.paths import cache_home

log = logging.getLogger("ft_desk.data")

# Note: entries kept in the cache folder (a large dataset's entry is roughly 10 bytes per token).
KEEP_ENTRIES = 8
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Prepared:
    data: PreparedData
    cached: bool  # the tokens came from the cache
    seconds: float  # time spent reading and tokenizing (or reading the cache entry)


def cache_dir() -> Path:
    return cache_home() / "tokenized"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A sha256 of everything about the tokenizer that decides the ids a text gets."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow (Python) tokenizer: its vocabulary
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()},
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "side": [getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None)],
        "add_bos": getattr(tokenizer, "add_bos_token", None), "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _pipeline_digest() -> str:
    """The data pipeline's own source: a changed renderer or reader must not reuse old tokens."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(here.glob("*.py")) + [here.parent / "chat_format.py"]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(cfg: DataConfig, tokenizer) -> str:
    """The entry name for these data files, this tokenizer and these settings."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("train_file", "valid_file")}
    parts = {
        "format": FORMAT_VERSION,
        "train": _file_digest(resolve_data_path(cfg.train_file)),
        "valid": _file_digest(resolve_data_path(cfg.valid_file)) if cfg.valid_file else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
        "pipeline": _pipeline_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _example_row(example: Example) -> dict:
    messages = None if example.messages is None else [[m.role, m.content] for m in example.messages]
    return {"m": messages, "t": example.text, "w": example.where}


def _example(row: dict) -> Example:
    messages = None if row["m"] is None else tuple(Message(role, content) for role, content in row["m"])
    return Example(messages=messages, text=row["t"], where=row["w"])


def _tokenized_row(t: TokenizedExample) -> list:
    return [t.input_ids, t.labels, t.where, t.truncated]


def _tokenized(row: list) -> TokenizedExample:
    return TokenizedExample(input_ids=row[0], labels=row[1], where=row[2], truncated=row[3])


def _encode(data: PreparedData) -> str:
    return json.dumps({
        "train": [_tokenized_row(t) for t in data.train], "val": [_tokenized_row(t) for t in data.val],
        "val_examples": [_example_row(e) for e in data.val_examples], "format": data.format, "stats": data.stats,
    }, ensure_ascii=False, separators=(",", ":"))


def _decode(text: str, cfg: DataConfig) -> PreparedData:
    raw = json.loads(text)
    stats = dict(raw["stats"])
    # The same bytes may sit under another name now: report the files of this run.
    stats["train_file"] = str(resolve_data_path(cfg.train_file))
    stats["valid_file"] = str(resolve_data_path(cfg.valid_file)) if cfg.valid_file else None
    return PreparedData(train=[_tokenized(r) for r in raw["train"]], val=[_tokenized(r) for r in raw["val"]],
                        val_examples=[_example(r) for r in raw["val_examples"]], format=raw["format"], stats=stats)


def prepare_data_cached(cfg: DataConfig, tokenizer, folder: Path | None = None) -> Prepared:
    """`prepare_data(cfg, tokenizer)`, from the cache when these files, tokenizer and settings were seen before."""
    started = time.perf_counter()
    folder = folder or cache_dir()
    key = cache_key(cfg, tokenizer)
    entry = folder / f"{key}.json"
    if entry.is_file():
        try:
            data = _decode(entry.read_text(encoding="utf-8"), cfg)
            entry.touch()  # recently used: kept longest
            return Prepared(data, cached=True, seconds=time.perf_counter() - started)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            log.warning("tokenized data cache entry %s is unreadable (%s); preparing the data again", entry, exc)
    data = prepare_data(cfg, tokenizer)
    seconds = time.perf_counter() - started
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(entry, _encode(data))
        _prune(folder)
    except OSError as exc:  # a full or read-only cache folder costs the next run time, nothing else
        log.warning("could not keep the tokenized data in %s (%s)", folder, exc)
    return Prepared(data, cached=False, seconds=seconds)


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_ENTRIES:]:
        old.unlink(missing_ok=True)
