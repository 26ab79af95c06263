"""Reading training data files and turning every row into one internal form, `Example`.

Files: JSONL, JSON (a list of rows, or an object with one key holding that list), CSV (a header row, one row per
line; a cell may hold a JSON list for chat columns) and Parquet. Row formats, detected from the rows:

    text               {"text": "..."}
    prompt_completion  {"prompt": "...", "completion": "..."}
    alpaca             {"instruction": "...", "input": "...", "output": "..."}   (input and system optional)
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], "system": "..."}
    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}  (OpenAI, mlx-lm)

Every chat-like format becomes a tuple of `Message`s; raw text stays text. A row that cannot be used raises
`RowError` (a `DataError`) naming `file:line` - the physical line for JSONL and CSV, `file:#index` (counting from
0) for JSON and Parquet - and the reason in one sentence; `kind` is a short code used to count skipped rows.
Problems with a whole file (missing, empty, not UTF-8, unknown extension) are plain `DataError`s: no row of such a
file can be read. Stdlib only, plus pyarrow for Parquet (imported when a Parquet file is read).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ft_desk.trainer.config import choices
from ft_desk.trainer.demo import demo_data_path, is_demo_data
from ft_desk.trainer.errors import DataError
from ft_desk.trainer.limits import check_data_file

# The row formats are the config's `data.format` values (one list: the config checks --set against it).
FORMATS = tuple(f for f in choices("data.format") if f != "auto")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
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
    "unknown_format": "see `ft-desk data check --help` for the formats ft-desk reads",
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


def resolve_data_path(name: str) -> Path:
    """`demo` -> the bundled sample; anything else must be an existing data file."""
    if is_demo_data(name):
        return demo_data_path()
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(str(path), "no such file", "check the path (data.train_file / data.valid_file)")
    if path.is_dir():
        raise DataError(str(path), "is a folder, not a data file", f"name one {'/'.join(EXTENSIONS)} file in it")
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


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # only needed for Parquet files

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        raise DataError(str(path), f"is not a readable Parquet file ({str(exc).splitlines()[0][:200]})",
                        "check that the file was written completely, or save the rows as .jsonl") from None
    if table.num_rows == 0:
        raise DataError(str(path), "the file is empty", "add rows to it")
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}:#{index}", row


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of the file; a row that is not even parseable comes as a RowError."""
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(
            str(path),
            f"unsupported file type {suffix or '(no extension)'!r}",
            f"ft-desk reads {', '.join(EXTENSIONS)}; convert the file or rename it if it already is one of these",
        )
    if suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    text = _read_text(path)
    if suffix == ".jsonl":
        yield from _jsonl_rows(path, text)
    elif suffix == ".json":
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


def _turn_list(row: dict, field: str, where: str) -> list:
    if field not in row or row[field] is None:
        raise RowError(where, f"missing field {field!r}", "missing_field")
    turns = row[field]
    if not isinstance(turns, list):
        raise RowError(where, f"{field!r} is {_type_name(turns)}, expected a list of messages", "wrong_type")
    if not turns:
        raise RowError(where, f"{field!r} is an empty list", "no_assistant")
    return turns


def _from_messages(row: dict, where: str) -> tuple[Message, ...]:
    out = []
    for number, turn in enumerate(_turn_list(row, "messages", where), start=1):
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
    return _check_conversation(out, where)


def _from_sharegpt(row: dict, where: str) -> tuple[Message, ...]:
    out = []
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise RowError(where, f"'system' is {_type_name(system)}, expected text", "wrong_type")
        if system.strip():
            out.append(Message("system", system))
    for number, turn in enumerate(_turn_list(row, "conversations", where), start=1):
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


def _from_alpaca(row: dict, where: str) -> tuple[Message, ...]:
    instruction = _string(row, "instruction", where)
    extra = _string(row, "input", where, optional=True) if "input" in row else ""
    output = _string(row, "output", where)
    if not output.strip():
        raise RowError(where, "'output' is empty", "empty_assistant")
    prompt = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else instruction + extra
    out = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.append(Message("system", row["system"]))
    return tuple(out + [Message("user", prompt), Message("assistant", output)])


def _from_prompt_completion(row: dict, where: str) -> tuple[Message, ...]:
    prompt = _string(row, "prompt", where)
    completion = _string(row, "completion", where)
    if not completion.strip():
        raise RowError(where, "'completion' is empty", "empty_assistant")
    return (Message("user", prompt), Message("assistant", completion))


_REQUIRED = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
}


def convert_row(row: Any, where: str, fmt: str) -> Example:
    """One parsed row in format `fmt` -> Example, or RowError."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(where, f"the row is {_type_name(row)}, expected a JSON object", "wrong_type")
    for field in _REQUIRED[fmt]:
        if field not in row:
            raise RowError(where, f"missing field {field!r} (the file is in {fmt} format)", "missing_field")
    if fmt == "text":
        text = _string(row, "text", where)
        if not text.strip():
            raise RowError(where, "'text' is empty", "empty_text")
        return Example(None, text, where)
    convert = {
        "prompt_completion": _from_prompt_completion,
        "alpaca": _from_alpaca,
        "sharegpt": _from_sharegpt,
        "messages": _from_messages,
    }[fmt]
    return Example(convert(row, where), None, where)


def _unknown_format(row: dict, where: str) -> RowError:
    keys = ", ".join(map(repr, list(row)[:8])) or "none"
    return RowError(
        where,
        f"the row matches no known format (its keys: {keys}); expected text, prompt+completion, "
        "instruction+output (Alpaca), conversations (ShareGPT) or messages",
        "unknown_format",
    )


def scan_file(path: Path, fmt: str = "auto") -> ScanResult:
    """Read every row of `path`, collecting usable examples and (counted, the first few kept) row problems."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(str(path), f"unknown data format {fmt!r}", f"use auto or one of {', '.join(FORMATS)}")
    examples: list[Example] = []
    problems: list[RowError] = []
    by_kind: dict[str, int] = {}
    count = rows = 0
    chosen, chosen_where = (None if fmt == "auto" else fmt), ""
    for where, row in read_rows(path):
        rows += 1
        try:
            if isinstance(row, dict) and chosen is None:
                chosen, chosen_where = detect_row_format(row), where
                if chosen is None:
                    raise _unknown_format(row, where)
            elif isinstance(row, dict) and fmt == "auto":
                mine = detect_row_format(row)
                # A row matching no format is read as the file's format, so it fails naming the missing field.
                if mine is not None and mine != chosen:
                    raise RowError(
                        where,
                        f"the row is in {mine} format but the file is in {chosen} format "
                        f"(detected from {chosen_where})",
                        "format_mismatch",
                    )
            examples.append(convert_row(row, where, chosen or "text"))
        except RowError as err:
            count += 1
            by_kind[err.kind] = by_kind.get(err.kind, 0) + 1
            if len(problems) < MAX_PROBLEMS_KEPT:
                problems.append(err)
    if rows == 0:
        raise DataError(str(path), "the file is empty", "add rows to it")
    return ScanResult(examples, chosen or "unknown", rows, problems, count, by_kind)


def load_examples(path: Path | str, fmt: str = "auto", skip_bad_rows: bool = False) -> tuple[list[Example], str, dict]:
    """Examples of one file, its format, and counts {rows, examples, skipped_rows, skipped_by_reason}.

    Without skip_bad_rows the first bad row raises its RowError (file:line and reason); with it, bad rows are
    left out and counted by reason. A file with no usable row at all is an error either way.
    """
    path = Path(path)
    scan = scan_file(path, fmt)
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
    }
    return scan.examples, scan.format, counts
