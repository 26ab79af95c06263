"""Reading training data files and turning every row into one internal form, `Example`.

Files: JSONL, JSON (a list of rows, or an object with one key holding that list), CSV (a header row, one row per
line; a cell may hold a JSON list for chat columns), Parquet and Arrow, each of the text ones also gzipped
(`.jsonl.gz`, `.json.gz`, `.csv.gz`); and Hugging Face datasets on disk: a `save_to_disk` folder (state.json and
data-*.arrow; a DatasetDict folder gives its `train` split) or a folder of Arrow/Parquet shards such as a cache
snapshot. Row formats, detected from the rows:

    text               {"text": "..."}
    prompt_completion  {"prompt": "...", "completion": "..."}                     (system optional)
    alpaca             {"instruction": "...", "input": "...", "output": "..."}   (input and system optional)
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], "system": "..."}
    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}  (OpenAI, mlx-lm)

Other column names are mapped to these roles by `data.columns` (see trainer/columns.py), or assumed from common
aliases (`ALIASES`: instruction/response, question/answer, input/output, ...) with a one-line note of what was
assumed. Preference data (chosen/rejected) is refused unless the mapping names the chosen side. A file whose
columns match nothing raises `ColumnsMismatch`, which lists the columns found and the `--columns` line that would
map them.

Every chat-like format becomes a tuple of `Message`s; raw text stays text. A row that cannot be used raises
`RowError` (a `DataError`) naming `file:line` - the physical line for JSONL and CSV (also gzipped), `file:#index`
(counting from 0) for JSON, Parquet and Arrow (the shard file for a dataset folder) - and the reason in one
sentence; `kind` is a short code used to count skipped rows. Problems with a whole file (missing, empty, not
UTF-8, unknown extension) are plain `DataError`s: no row of such a file can be read. Stdlib only, plus pyarrow
for Parquet and Arrow (imported when such a file is read).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from ft_desk.trainer.columns import REQUIRED, columns_line, mapping_format, parse_columns
from ft_desk.trainer.columns import ROLES as COLUMN_ROLES
from ft_desk.trainer.config import choices
from ft_desk.trainer.demo import demo_data_path, is_demo_data
from ft_desk.trainer.errors import DataError
from ft_desk.trainer.limits import check_data_file

# The row formats are the config's `data.format` values (one list: the config checks --set against it).
FORMATS = tuple(f for f in choices("data.format") if f != "auto")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".jsonl.gz", ".json.gz", ".csv.gz")
SHARD_EXTENSIONS = (".arrow", ".parquet")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation", "tool_call", "tool_response")
# Note: how many broken rows are kept with their file:line (all are counted).
MAX_PROBLEMS_KEPT = 20


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Example:
    """One training example: a conversation (`messages`) or raw text (`text`); exactly one is set."""

    messages: tuple[Message, ...] | None
    text: str | None
    where: str  # "file:line" (JSONL/CSV) or "file:#index" (JSON/Parquet)

    def key(self) -> tuple:
        """What makes two examples the same (their content, not where they came from)."""
        return (self.messages, self.text)

    def to_row(self) -> dict[str, Any]:
        if self.messages is None:
            return {"text": self.text}
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}

    @property
    def assistant_turns(self) -> int:
        return sum(m.role == "assistant" for m in self.messages or ())

    @property
    def is_multi_turn(self) -> bool:
        return self.assistant_turns > 1 or sum(m.role == "user" for m in self.messages or ()) > 1


class RowError(DataError):
    """One row is unusable. `kind` is a short code (broken_json, wrong_type, missing_field, ...) for counts."""

    def __init__(self, where: str, reason: str, kind: str, hint: str = "") -> None:
        super().__init__(where, reason, hint or _HINTS.get(kind, ""))
        self.kind = kind


_HINTS = {
    "broken_json": "fix the row so it is one complete JSON object per line, or pass --skip-bad-rows",
    "wrong_type": "fix the row, or pass --skip-bad-rows to leave it out",
    "missing_field": "fix the row, or pass --skip-bad-rows to leave it out",
    "empty_assistant": "give the reply some text, or pass --skip-bad-rows to leave the row out",
    "empty_text": "remove the empty row, or pass --skip-bad-rows",
    "unknown_role": "use the roles system, user and assistant (ShareGPT: system, human, gpt)",
    "tool_role": "remove rows with tool calls or tool results, or pass --skip-bad-rows to leave them out",
    "no_assistant": "every conversation needs at least one assistant reply to learn from",
    "format_mismatch": "use one row format per file (split the file, or convert the odd rows)",
    "unknown_format": "map the columns to a format's roles with --columns (e.g. --columns prompt=question,"
                      "completion=answer), or pass --skip-bad-rows to leave the row out",
    "missing_column": "fill that column in every row, map another column with --columns, or pass --skip-bad-rows",
    "bad_order": "put the system message first",
}


@dataclass
class ScanResult:
    """Everything read from one file: usable examples, the format, and the rows that could not be used."""

    examples: list[Example]
    format: str
    rows_read: int
    problems: list[RowError]  # the first MAX_PROBLEMS_KEPT
    problem_count: int
    problems_by_kind: dict[str, int]
    columns: list[dict] = field(default_factory=list)  # the first row's columns: [{"name", "sample", "kind"}]
    mapping: dict[str, str] = field(default_factory=dict)  # role -> column, as given or assumed
    note: str = ""  # what was assumed about the columns, one line ("" when nothing was)


class ColumnsMismatch(DataError):
    """The file's columns fill no format's roles (or only preference pairs): no row can be read as it is.

    `columns` are the first row's columns with a sample value each, `suggestion` the `--columns` value that
    would map them (what the TUI's mapping dialog starts from)."""

    def __init__(self, where: str, reason: str, hint: str, columns: list[dict], suggestion: dict[str, str]) -> None:
        super().__init__(where, reason, hint)
        self.columns = columns
        self.suggestion = suggestion


# Note: folders are searched this deep for Arrow/Parquet shards (datasets' cache keeps them in
# NAME/CONFIG/VERSION/HASH/, a Hub cache snapshot in data/ or CONFIG/SPLIT/).
MAX_SHARD_DEPTH = 4
SPLIT_PREFERENCE = {"train": ("train",), "validation": ("validation", "valid", "val", "test", "eval", "dev")}


def _split_of(relative: Path) -> str | None:
    """The split a shard belongs to, from its folder or file name (train-00000-of-00002.parquet, x-test.arrow)."""
    names = [part.lower() for part in relative.parts[:-1]]
    stem = relative.name.lower().split(".")[0]
    names += stem.replace("_", "-").split("-")
    for split in ("train", "validation", "valid", "val", "test", "eval", "dev"):
        if split in names:
            return split
    return None


def dataset_files(folder: Path, split: str = "train") -> list[Path]:
    """The Arrow/Parquet files of a Hugging Face dataset saved in `folder`, for `split` (train or validation).

    A `save_to_disk` folder names its shards in state.json; a DatasetDict folder (dataset_dict.json) holds one
    such folder per split; any other folder is searched for *.arrow / *.parquet shards, keeping the split's
    files when the names tell the splits apart."""
    wanted = SPLIT_PREFERENCE.get(split, (split,))
    dict_file = folder / "dataset_dict.json"
    if dict_file.is_file():
        try:
            splits = [str(x) for x in json.loads(dict_file.read_text(encoding="utf-8")).get("splits", [])]
        except (OSError, ValueError, AttributeError):
            raise DataError(str(dict_file), "is not a readable dataset_dict.json",
                            "save the dataset again with save_to_disk") from None
        pick = next((s for s in wanted if s in splits), splits[0] if len(splits) == 1 else None)
        if pick is None or not (folder / pick).is_dir():
            raise DataError(
                str(folder),
                f"holds the splits {', '.join(splits) or '(none)'} but no {split} split",
                f"name the split folder instead, e.g. {folder / (splits[0] if splits else 'train')}",
            )
        return dataset_files(folder / pick, split)
    state_file = folder / "state.json"
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            names = [str(item["filename"]) for item in state.get("_data_files", [])]
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            raise DataError(str(state_file), "is not a readable datasets state.json",
                            "save the dataset again with save_to_disk") from None
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(str(folder), f"lacks the data file {missing[0]} that state.json lists",
                            "copy the whole save_to_disk folder, or save the dataset again")
        if files:
            return files
    snapshots = folder / "snapshots"
    if snapshots.is_dir():  # a Hub cache folder (datasets--OWNER--NAME): its newest snapshot
        revisions = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if revisions:
            return dataset_files(revisions[-1], split)
    shards = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if (len(relative.parts) > MAX_SHARD_DEPTH + 1 or any(p.startswith(".") for p in relative.parts)
                or relative.name.startswith("cache-") or path.suffix.lower() not in SHARD_EXTENSIONS):
            continue  # hidden files and datasets' cache-*.arrow (results of .map) are not the data
        if path.is_file():
            shards.append(path)
    if not shards:
        raise DataError(
            str(folder),
            "is a folder with no data in it (no save_to_disk dataset, no .arrow or .parquet files)",
            f"name one {'/'.join(EXTENSIONS)} file, or a folder saved with datasets' save_to_disk",
        )
    by_split: dict[str | None, list[Path]] = {}
    for shard in shards:
        by_split.setdefault(_split_of(shard.relative_to(folder)), []).append(shard)
    picked = next((by_split[name] for name in wanted if name in by_split), None)
    if picked is None and split == "train":
        picked = by_split.get(None) or (shards if len(by_split) == 1 else None)
    if picked is not None:
        folders = sorted({str(p.parent) for p in picked})
        if len(folders) > 1:  # several configs, or several cached versions of one dataset
            raise DataError(
                str(folder),
                f"holds {split} files in {len(folders)} folders ({', '.join(folders[:3])}"
                + (", ..." if len(folders) > 3 else "") + ")",
                "name the folder (or file) to train on",
            )
        return picked
    raise DataError(
        str(folder),
        f"has no {split} files among its shards (it holds {', '.join(sorted(str(k) for k in by_split))})",
        "name the shard file to use instead",
    )


def resolve_data_path(name: str, split: str = "train") -> Path:
    """`demo` -> the bundled sample; anything else must be an existing data file or dataset folder.

    For a DatasetDict folder this is the folder of `split` (train, or validation for data.valid_file)."""
    if is_demo_data(name):
        return demo_data_path()
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(str(path), "no such file", "check the path (data.train_file / data.valid_file)")
    if path.is_dir():
        files = dataset_files(path, split)  # raises when the folder holds no dataset
        if (path / "dataset_dict.json").is_file():
            return files[0].parent
        return path
    return check_data_file(path)  # a regular file of bounded size and line length (trainer/limits.py)


# ---------------------------------------------------------------- reading files: (where, row | RowError)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark is harmless; drop it
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}",
            f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} cannot be decoded)",
            f"convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`",
        ) from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(str(path), f"is not a readable gzip file ({exc})",
                            "check the download, or decompress it and name the plain file") from None
    text = _decode(path, data)
    if not text.strip():
        raise DataError(str(path), "the file is empty", "add rows to it, or point data.train_file at another file")
    return text


def _json_reason(exc: json.JSONDecodeError) -> str:
    return f"broken JSON: {exc.msg} at column {exc.colno}"


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    # Note: split on "\n" only; str.splitlines() would also break at U+2028 inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, RowError(where, _json_reason(exc), "broken_json")


def _json_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            # One object per line saved with a .json name: read it as JSON Lines.
            yield from _jsonl_rows(path, text)
            return
        raise DataError(f"{path}:{exc.lineno}", _json_reason(exc), "fix the JSON (a list of row objects)") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                str(path),
                "expected a JSON list of rows, or an object with one key holding that list"
                + (f" (found lists under {', '.join(map(repr, lists))})" if lists else ""),
                "save the rows as a JSON list, or as JSON Lines (.jsonl)",
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(str(path), f"expected a JSON list of rows, got {_type_name(data)}")
    if not data:
        raise DataError(str(path), "the file holds no rows", "add rows to it")
    for index, row in enumerate(data):
        yield f"{path}:#{index}", row


_CHAT_COLUMNS = ("messages", "conversations")


def _csv_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as exc:
        raise DataError(f"{path}:1", f"broken CSV header: {exc}") from None
    header = [name.strip() for name in header]
    if len(set(header)) != len(header):
        raise DataError(f"{path}:1", "the CSV header repeats a column name", "give every column its own name")
    start = reader.line_num + 1  # physical line where the next row begins
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            where = f"{path}:{start}"
            yield where, RowError(where, f"broken CSV row: {exc}", "broken_json")
            return
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield where, RowError(
                where, f"row has {len(cells)} fields but the header has {len(header)}", "wrong_type",
                "quote cells that contain commas or line breaks",
            )
            continue
        row: dict[str, Any] = dict(zip(header, cells))
        for column in _CHAT_COLUMNS:
            cell = row.get(column)
            if isinstance(cell, str) and cell.lstrip().startswith("["):
                try:
                    row[column] = json.loads(cell)
                except json.JSONDecodeError as exc:
                    row = RowError(where, f"column {column!r}: {_json_reason(exc)}", "broken_json")
                    break
        yield where, row


def _table_rows(path: Path, batches) -> Iterator[tuple[str, Any]]:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{path}:#{index}", row
            index += 1


def _parquet_rows(path: Path, empty_ok: bool = False) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # only needed for Parquet files

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise DataError(str(path), f"is not a readable Parquet file ({str(exc).splitlines()[0][:200]})",
                        "check that the file was written completely, or save the rows as .jsonl") from None
    if table.num_rows == 0 and not empty_ok:
        raise DataError(str(path), "the file is empty", "add rows to it")
    yield from _table_rows(path, table.to_batches())


def _arrow_table(path: Path):
    """An Arrow IPC file as a table: the stream form `datasets` writes, or the random-access file form."""
    import pyarrow as pa  # only needed for Arrow files

    errors = []
    for open_ipc in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.memory_map(str(path)) as source:
                return open_ipc(source).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            errors.append(exc)
    raise DataError(str(path), f"is not a readable Arrow file ({errors[-1]})",
                    "check the file, or save the dataset again with save_to_disk or to_parquet")


def _arrow_rows(path: Path, empty_ok: bool = False) -> Iterator[tuple[str, Any]]:
    table = _arrow_table(path)
    if table.num_rows == 0 and not empty_ok:
        raise DataError(str(path), "the file is empty", "add rows to it")
    yield from _table_rows(path, table.to_batches())


def _folder_rows(folder: Path) -> Iterator[tuple[str, Any]]:
    """Every row of a dataset folder's shards, in order; each row names its shard file and index in it."""
    rows = 0
    for shard in dataset_files(folder):
        reader = _arrow_rows if shard.suffix.lower() == ".arrow" else _parquet_rows
        for item in reader(shard, empty_ok=True):
            rows += 1
            yield item
    if rows == 0:
        raise DataError(str(folder), "the dataset has no rows", "save a dataset with rows in it")


def _suffix(path: Path) -> str:
    """The data-file extension, gzip included: `.jsonl.gz` for `train.jsonl.gz`."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        return "".join(suffixes)
    return path.suffix.lower()


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of the file; a row that is not even parseable comes as a RowError."""
    if path.is_dir():
        yield from _folder_rows(path)
        return
    suffix = _suffix(path)
    if suffix not in EXTENSIONS:
        raise DataError(
            str(path),
            f"unsupported file type {suffix or '(no extension)'!r}",
            f"ft-desk reads {', '.join(EXTENSIONS)} and dataset folders; convert the file or rename it if it "
            "already is one of these",
        )
    if suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    if suffix == ".arrow":
        yield from _arrow_rows(path)
        return
    text = _read_text(path)
    if suffix.startswith(".jsonl"):
        yield from _jsonl_rows(path, text)
    elif suffix.startswith(".json"):
        yield from _json_rows(path, text)
    else:
        yield from _csv_rows(path, text)


# ---------------------------------------------------------------- rows -> Example


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "text"
    return type(value).__name__


def detect_row_format(row: dict) -> str | None:
    """The format a row looks like, from its keys; None when it looks like none of them."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def _string(row: dict, field: str, where: str, label: str | None = None, optional: bool = False) -> str:
    label = label or repr(field)
    if field not in row or (row[field] is None and not optional):
        raise RowError(where, f"missing field {label}", "missing_field")
    value = row[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(where, f"{label} is {_type_name(value)}, expected text", "wrong_type")
    return value


def _content(value: Any, where: str, label: str) -> str:
    """Message content: text, or an OpenAI-style list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        parts = [p.get("text") for p in value]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    if isinstance(value, list):
        raise RowError(where, f"{label} holds non-text parts; only text content can be trained", "wrong_type")
    if value is None:
        raise RowError(where, f"{label} has no content", "missing_field")
    raise RowError(where, f"{label} is {_type_name(value)}, expected text", "wrong_type")


def _check_conversation(messages: list[Message], where: str) -> tuple[Message, ...]:
    for number, message in enumerate(messages, start=1):
        if message.role == "system" and number != 1:
            raise RowError(where, f"message {number} is a system message but it is not the first", "bad_order")
        if message.role == "assistant" and not message.content.strip():
            raise RowError(where, f"message {number} is an empty assistant turn", "empty_assistant")
    if not any(m.role == "assistant" for m in messages):
        raise RowError(where, "the conversation has no assistant turn", "no_assistant")
    return tuple(messages)


def _role(value: Any, where: str, label: str, allowed: dict[str, str]) -> str:
    if value is None:
        raise RowError(where, f"{label} has no role", "missing_field")
    if not isinstance(value, str):
        raise RowError(where, f"{label} role is {_type_name(value)}, expected text", "wrong_type")
    if value in allowed:
        return allowed[value]
    if value.lower() in TOOL_ROLES:
        raise RowError(where, f"{label} has role {value!r}: tool calls and results cannot be trained yet", "tool_role")
    names = ", ".join(dict.fromkeys(allowed))
    raise RowError(where, f"{label} has unknown role {value!r}; expected one of {names}", "unknown_role")


def _turn_list(row: dict, field: str, where: str, label: str | None = None) -> list:
    label = label or repr(field)
    if field not in row or row[field] is None:
        raise RowError(where, f"missing field {label}", "missing_field")
    turns = row[field]
    if not isinstance(turns, list):
        raise RowError(where, f"{label} is {_type_name(turns)}, expected a list of messages", "wrong_type")
    if not turns:
        raise RowError(where, f"{label} is an empty list", "no_assistant")
    return turns


Labels = Mapping[str, str]  # role -> how an error names it ("column 'answer' (completion)"); default 'role'


def _label(labels: Labels, role: str) -> str:
    return labels.get(role) or repr(role)


def _system(row: dict, where: str, labels: Labels) -> list[Message]:
    """The row's system prompt as a message list (empty when there is none)."""
    system = row.get("system")
    if system is None:
        return []
    if not isinstance(system, str):
        raise RowError(where, f"{_label(labels, 'system')} is {_type_name(system)}, expected text", "wrong_type")
    return [Message("system", system)] if system.strip() else []


def _from_messages(row: dict, where: str, labels: Labels) -> tuple[Message, ...]:
    out = []
    for number, turn in enumerate(_turn_list(row, "messages", where, labels.get("messages")), start=1):
        label = f"message {number}"
        if not isinstance(turn, dict):
            raise RowError(where, f"{label} is {_type_name(turn)}, expected an object with role and content",
                           "wrong_type")
        role = _role(turn.get("role"), where, label, {r: r for r in ROLES})
        if role == "assistant" and turn.get("tool_calls"):
            raise RowError(where, f"{label} makes tool calls, which cannot be trained yet", "tool_role")
        if "content" not in turn:
            raise RowError(where, f"{label} has no content", "missing_field")
        out.append(Message(role, _content(turn["content"], where, label)))
    if not (out and out[0].role == "system"):
        out = _system(row, where, labels) + out  # a system column fills in where the conversation has none
    return _check_conversation(out, where)


def _from_sharegpt(row: dict, where: str, labels: Labels) -> tuple[Message, ...]:
    out = _system(row, where, labels)
    for number, turn in enumerate(_turn_list(row, "conversations", where, labels.get("conversations")), start=1):
        label = f"turn {number}"
        if not isinstance(turn, dict):
            raise RowError(where, f"{label} is {_type_name(turn)}, expected an object with from and value",
                           "wrong_type")
        speaker, text_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        role = _role(turn.get(speaker), where, label, SHAREGPT_ROLES)
        if text_key not in turn:
            raise RowError(where, f"{label} has no {text_key!r}", "missing_field")
        out.append(Message(role, _content(turn[text_key], where, label)))
    return _check_conversation(out, where)


def _from_alpaca(row: dict, where: str, labels: Labels) -> tuple[Message, ...]:
    instruction = _string(row, "instruction", where, labels.get("instruction"))
    extra = _string(row, "input", where, labels.get("input"), optional=True) if "input" in row else ""
    output = _string(row, "output", where, labels.get("output"))
    if not output.strip():
        raise RowError(where, f"{_label(labels, 'output')} is empty", "empty_assistant")
    prompt = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else instruction + extra
    return tuple(_system(row, where, labels) + [Message("user", prompt), Message("assistant", output)])


def _from_prompt_completion(row: dict, where: str, labels: Labels) -> tuple[Message, ...]:
    prompt = _string(row, "prompt", where, labels.get("prompt"))
    completion = _string(row, "completion", where, labels.get("completion"))
    if not completion.strip():
        raise RowError(where, f"{_label(labels, 'completion')} is empty", "empty_assistant")
    return tuple(_system(row, where, labels) + [Message("user", prompt), Message("assistant", completion)])


def _renamed(row: dict, mapping: Mapping[str, str], where: str, fmt: str) -> dict:
    """The row with its mapped columns under their roles' names; a required column missing is a RowError."""
    out = {key: value for key, value in row.items() if key not in mapping}
    required = REQUIRED.get(fmt, ())
    for role, column in mapping.items():
        value = row.get(column)
        if value is None:
            if role in required:
                what = "has no" if column not in row else "has an empty (null)"
                raise RowError(where, f"the row {what} {column!r} column, which fills the {role} role",
                               "missing_column")
            continue
        if role in ("messages", "conversations") and isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)  # a CSV cell holding the turns as JSON
            except json.JSONDecodeError as exc:
                raise RowError(where, f"column {column!r}: {_json_reason(exc)}", "broken_json") from None
        out[role] = value
    return out


def convert_row(row: Any, where: str, fmt: str, mapping: Mapping[str, str] | None = None) -> Example:
    """One parsed row in format `fmt` -> Example, or RowError. `mapping` (role -> column) renames columns first."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(where, f"the row is {_type_name(row)}, expected a JSON object", "wrong_type")
    labels: dict[str, str] = {}
    if mapping:
        row = _renamed(row, mapping, where, fmt)
        labels = {role: f"column {column!r} ({role})" for role, column in mapping.items()}
    for name in REQUIRED[fmt]:
        if name not in row:
            raise RowError(where, f"missing field {name!r} (the file is in {fmt} format)", "missing_field")
    if fmt == "text":
        text = _string(row, "text", where, labels.get("text"))
        if not text.strip():
            raise RowError(where, f"{_label(labels, 'text')} is empty", "empty_text")
        return Example(None, text, where)
    convert = {
        "prompt_completion": _from_prompt_completion,
        "alpaca": _from_alpaca,
        "sharegpt": _from_sharegpt,
        "messages": _from_messages,
    }[fmt]
    return Example(convert(row, where, labels), None, where)


# ---------------------------------------------------------------- column names: aliases, preference, suggestions

# Common exports whose columns are not one of the five formats' names: the columns (lower case) a row must have,
# the format and the mapping assumed (role -> column). Checked in order, the most specific first.
ALIASES: tuple[tuple[tuple[str, ...], str, dict[str, str]], ...] = (
    (("instruction", "context", "response"), "alpaca",
     {"instruction": "instruction", "input": "context", "output": "response"}),  # Dolly
    (("instruction", "input", "response"), "alpaca", {"instruction": "instruction", "input": "input",
                                                      "output": "response"}),
    (("instruction", "response"), "alpaca", {"instruction": "instruction", "output": "response"}),
    (("instruction", "input", "output"), "alpaca", {"instruction": "instruction", "input": "input",
                                                    "output": "output"}),
    (("instruction", "output"), "alpaca", {"instruction": "instruction", "output": "output"}),
    (("context", "question", "answer"), "alpaca", {"instruction": "question", "input": "context",
                                                   "output": "answer"}),
    (("question", "answer"), "prompt_completion", {"prompt": "question", "completion": "answer"}),
    (("input", "output"), "prompt_completion", {"prompt": "input", "completion": "output"}),
    (("query", "response"), "prompt_completion", {"prompt": "query", "completion": "response"}),
    (("prompt", "response"), "prompt_completion", {"prompt": "prompt", "completion": "response"}),
    (("prompt", "completion"), "prompt_completion", {"prompt": "prompt", "completion": "completion"}),
    (("human", "assistant"), "prompt_completion", {"prompt": "human", "completion": "assistant"}),
    (("messages",), "messages", {"messages": "messages"}),
    (("conversations",), "sharegpt", {"conversations": "conversations"}),
    (("text",), "text", {"text": "text"}),
)
SYSTEM_ALIASES = ("system", "system_prompt")
PROMPT_HINTS = ("prompt", "question", "query", "instruction", "input", "human", "user", "source", "context")
REPLY_HINTS = ("completion", "answer", "response", "output", "assistant", "reply", "target", "label", "summary")
# Note: how much of a value the column list shows (the TUI dialog and error messages).
SAMPLE_CHARS = 60


def _by_lower(row: dict) -> dict[str, str]:
    """lower-cased, stripped column name -> the column's real name (the first one wins)."""
    out: dict[str, str] = {}
    for key in row:
        out.setdefault(str(key).strip().lower(), key)
    return out


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _turns_kind(value: Any) -> str | None:
    """messages / conversations when a value is a list of turns in that shape."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        return "conversations" if "from" in value[0] or "value" in value[0] else "messages"
    return None


def _alias(row: dict, fmt: str) -> tuple[str, dict[str, str]] | None:
    """(format, mapping) assumed from the row's column names, or None."""
    lower = _by_lower(row)
    for needed, alias_format, roles in ALIASES:
        if fmt not in ("auto", alias_format) or not all(name in lower for name in needed):
            continue
        mapping = {role: lower[column] for role, column in roles.items()}
        if alias_format != "text":
            system = next((lower[name] for name in SYSTEM_ALIASES if name in lower), None)
            if system is not None:
                mapping["system"] = system
        return alias_format, mapping
    return None


def _is_preference(row: dict) -> bool:
    lower = _by_lower(row)
    return "chosen" in lower and "rejected" in lower


def suggest_columns(row: dict) -> dict[str, str]:
    """A mapping that would read this row: its turn lists, else its text columns as prompt and reply."""
    lower = _by_lower(row)
    if _is_preference(row):
        chosen = lower["chosen"]
        turns = _turns_kind(row[chosen])
        if turns:
            return {turns: chosen}
        prompt = next((lower[h] for h in PROMPT_HINTS if h in lower and _is_text(row[lower[h]])), None)
        return {"prompt": prompt, "completion": chosen} if prompt else {"text": chosen}
    for key, value in row.items():
        turns = _turns_kind(value)
        if turns:
            return {turns: key}
    texts = [key for key, value in row.items() if _is_text(value)] or list(row)
    system = next((lower[name] for name in SYSTEM_ALIASES if name in lower), None)
    texts = [key for key in texts if key != system]
    if not texts:
        return {}
    if len(texts) == 1:
        return {"text": texts[0]}
    reply = next((k for k in texts if any(h in str(k).lower() for h in REPLY_HINTS)), texts[-1])
    prompt = next((k for k in texts if k != reply and any(h in str(k).lower() for h in PROMPT_HINTS)),
                  next(k for k in texts if k != reply))
    mapping = {"prompt": prompt, "completion": reply}
    if system is not None:
        mapping["system"] = system
    return mapping


def _suggest_for(row: dict, fmt: str) -> dict[str, str]:
    """suggest_columns, in the roles of `fmt` when the format is given (prompt/completion -> instruction/output)."""
    suggestion = suggest_columns(row)
    if fmt in ("auto", mapping_format(suggestion)) or not suggestion:
        return suggestion
    system = {"system": suggestion["system"]} if "system" in suggestion and fmt != "text" else {}
    columns = [c for r, c in suggestion.items() if r != "system"]
    if fmt == "text":
        return {"text": columns[-1]}
    if fmt in ("messages", "conversations", "sharegpt"):
        return {**system, ("messages" if fmt == "messages" else "conversations"): columns[-1]}
    first, last = columns[0], columns[-1]
    roles = ("prompt", "completion") if fmt == "prompt_completion" else ("instruction", "output")
    return {**system, roles[0]: first, roles[1]: last} if first != last else {**system, roles[1]: last}


def _sample(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 1] + "…"


def _kind(value: Any) -> str:
    turns = _turns_kind(value)
    if turns:
        return "turns"
    return {"text": "text", "a list": "list", "an object": "object", "a number": "number", "null": "empty",
            "a boolean": "boolean"}.get(_type_name(value), "other")


def describe_columns(row: dict) -> list[dict]:
    """The row's columns with a short sample value and kind (text, turns, list, number...), in file order."""
    return [{"name": str(key), "sample": _sample(value), "kind": _kind(value)} for key, value in row.items()]


def _keys_text(row: dict) -> str:
    keys = list(row)
    shown = ", ".join(map(repr, keys[:12])) or "none"
    return shown + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")


def _unknown_format(row: dict, where: str) -> RowError:
    line = columns_line(suggest_columns(row))
    return RowError(
        where,
        f"the row matches no known format (its keys: {_keys_text(row)})",
        "unknown_format",
        f"map its columns, e.g. --columns {line}, or pass --skip-bad-rows to leave the row out" if line else "",
    )


def _no_format(path: Path, row: dict, where: str) -> ColumnsMismatch:
    suggestion = suggest_columns(row)
    line = columns_line(suggestion)
    return ColumnsMismatch(
        where,
        f"the rows' columns ({_keys_text(row)}) fill no format's roles (text, prompt+completion, "
        "instruction+output, conversations or messages)",
        f"map them with --columns {line} (roles: {', '.join(COLUMN_ROLES)})" if line else
        f"map them with --columns ROLE=COLUMN (roles: {', '.join(COLUMN_ROLES)})",
        describe_columns(row),
        suggestion,
    )


def _preference(row: dict, where: str) -> ColumnsMismatch:
    suggestion = suggest_columns(row)
    return ColumnsMismatch(
        where,
        "the rows are preference pairs (chosen and rejected replies), which train a preference method such as "
        "DPO, not supervised fine-tuning",
        f"to fine-tune on the chosen replies, pass --columns {columns_line(suggestion)} (the rejected ones are "
        "left out)",
        describe_columns(row),
        suggestion,
    )


def _settle(row: dict, where: str, fmt: str, mapping: dict[str, str]) -> tuple[str, dict[str, str], str]:
    """(format, mapping, note) for a file from its first readable row; raises when the columns fit nothing."""
    implied = mapping_format(mapping)
    if implied is not None:
        note = ""
        if _is_preference(row) and _by_lower(row)["chosen"] in mapping.values():
            note = "preference data: training on the chosen side; the rejected replies are left out"
        return implied, mapping, note
    renamed = _renamed(row, mapping, where, "")
    canonical = detect_row_format(renamed)
    if fmt != "auto" and all(role in renamed for role in REQUIRED[fmt]):
        return fmt, mapping, ""
    if fmt == "auto" and canonical is not None:
        return canonical, mapping, ""
    if _is_preference(renamed):
        raise _preference(row, where)
    assumed = _alias(renamed, fmt)
    if assumed is None:
        if fmt != "auto":
            return fmt, mapping, ""  # rows fail naming the field the format needs
        raise _unknown_format(row, where)
    alias_format, alias_mapping = assumed
    alias_mapping = parse_columns({**alias_mapping, **mapping})  # what the user mapped (system) wins
    note = (f"assumed --columns {columns_line(alias_mapping)} from the column names "
            "(pass --columns to map them otherwise)")
    return alias_format, alias_mapping, note


def scan_file(path: Path, fmt: str = "auto", columns: Any = ()) -> ScanResult:
    """Read every row of `path`, collecting usable examples and (counted, the first few kept) row problems.

    `columns` is a data.columns value (role=column pairs); without one, common column names are assumed
    (`ALIASES`) and the result's `note` says so. Raises `ColumnsMismatch` when no row fits any format."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(str(path), f"unknown data format {fmt!r}", f"use auto or one of {', '.join(FORMATS)}")
    given = parse_columns(columns)
    implied = mapping_format(given)
    if fmt != "auto" and implied is not None and implied != fmt:
        raise DataError(
            str(path),
            f"data.format is {fmt} but data.columns maps roles of the {implied} format ({columns_line(given)})",
            f"drop data.format (the mapping decides it), or map the roles of {fmt}: {', '.join(REQUIRED[fmt])}",
        )
    examples: list[Example] = []
    problems: list[RowError] = []
    by_kind: dict[str, int] = {}
    count = rows = 0
    chosen, chosen_where = None, ""
    mapping, note = dict(given), ""
    first: tuple[dict, str] | None = None  # the first row that is an object, and where
    seen: set = set()  # every column name of every row
    for where, row in read_rows(path):
        rows += 1
        try:
            if isinstance(row, dict):
                seen.update(row)
                if first is None:
                    first = (row, where)
            if isinstance(row, dict) and chosen is None:
                chosen, mapping, note = _settle(row, where, fmt, dict(given))
                chosen_where = where
            elif isinstance(row, dict) and fmt == "auto" and not mapping:
                mine = detect_row_format(row)
                # A row matching no format is read as the file's format, so it fails naming the missing field.
                if mine is not None and mine != chosen:
                    raise RowError(
                        where,
                        f"the row is in {mine} format but the file is in {chosen} format "
                        f"(detected from {chosen_where})",
                        "format_mismatch",
                    )
            examples.append(convert_row(row, where, chosen or implied or (fmt if fmt != "auto" else "text"),
                                        mapping))
        except RowError as err:
            count += 1
            by_kind[err.kind] = by_kind.get(err.kind, 0) + 1
            if len(problems) < MAX_PROBLEMS_KEPT:
                problems.append(err)
    if rows == 0:
        raise DataError(str(path), "the file is empty", "add rows to it")
    if first is not None and chosen is None:
        raise _no_format(path, *first)
    if (first is not None and not examples and fmt != "auto" and set(by_kind) == {"missing_field"}
            and not all(role in first[0] or role in mapping for role in REQUIRED[fmt])):
        suggestion = _suggest_for(first[0], fmt)
        needed = [role for role in REQUIRED[fmt] if role not in first[0] and role not in mapping]
        raise ColumnsMismatch(
            first[1],
            f"the file is read as {fmt} (data.format), but its rows have no {' or '.join(map(repr, needed))} "
            f"column (their keys: {_keys_text(first[0])})",
            f"map them with --columns {columns_line(suggestion)}, or set data.format=auto" if suggestion else
            "set data.format=auto, or map the columns with --columns ROLE=COLUMN",
            describe_columns(first[0]),
            suggestion,
        )
    missing = [(role, column) for role, column in mapping.items() if column not in seen]
    if first is not None and not examples and set(by_kind) == {"missing_column"} and missing:
        suggestion = suggest_columns(first[0])
        raise ColumnsMismatch(
            first[1],
            f"no row has the column {missing[0][1]!r} that fills the {missing[0][0]} role "
            f"(the rows' keys: {_keys_text(first[0])})",
            f"map the columns the file has, e.g. --columns {columns_line(suggestion)}",
            describe_columns(first[0]),
            suggestion,
        )
    return ScanResult(examples, chosen or "unknown", rows, problems, count, by_kind,
                      describe_columns(first[0]) if first else [], mapping if chosen else {}, note)


def load_examples(
    path: Path | str, fmt: str = "auto", skip_bad_rows: bool = False, columns: Any = ()
) -> tuple[list[Example], str, dict]:
    """Examples of one file, its format, and counts {rows, examples, skipped_rows, skipped_by_reason, columns,
    columns_note} (`columns`: the mapping applied as a --columns value, "" for none; `columns_note`: what was
    assumed about the columns, "" for nothing).

    Without skip_bad_rows the first bad row raises its RowError (file:line and reason); with it, bad rows are
    left out and counted by reason. A file with no usable row at all is an error either way.
    """
    path = Path(path)
    scan = scan_file(path, fmt, columns)
    if scan.problems and not skip_bad_rows:
        raise scan.problems[0]
    if not scan.examples:
        first = scan.problems[0] if scan.problems else None
        raise DataError(
            str(path),
            f"no usable rows ({scan.problem_count} bad" + (f"; the first: {first}" if first else "") + ")",
            "fix the rows; `ft-desk data check FILE` lists the broken ones",
        )
    counts = {
        "rows": scan.rows_read,
        "examples": len(scan.examples),
        "skipped_rows": scan.problem_count,
        "skipped_by_reason": dict(scan.problems_by_kind),
        "columns": columns_line(scan.mapping),
        "columns_note": scan.note,
    }
    return scan.examples, scan.format, counts
