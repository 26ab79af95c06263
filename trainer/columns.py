"""Column mapping: which column of a data file plays which role of a row format (`data.columns`, `--columns`).

A mapping is a list of `role=column` pairs, e.g. ``prompt=question,completion=answer``. The roles are the fields
of ft-desk's five row formats (`ROLES`), plus `system`, which any chat format accepts. Every pair a mapping names
must agree with the others: one column per role, one role per column, and the roles of one format only - a
conflict is a `ConfigError` naming both sides. Columns a mapping leaves out keep their own names, so
``system=sys_prompt`` alone on a `messages` file is fine. Stdlib only: the config, the data room and the TUI's
mapping dialog all read this one vocabulary.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ft_desk.trainer.errors import UserError


class ColumnsError(UserError, ValueError):
    """A column mapping is malformed or contradicts itself; the message names the pair and the fix."""


# role -> (the format it belongs to, None for every chat format; what it holds, in the user's words)
ROLES: dict[str, tuple[str | None, str]] = {
    "prompt": ("prompt_completion", "the prompt (the user's turn)"),
    "completion": ("prompt_completion", "the reply the model learns"),
    "instruction": ("alpaca", "the instruction (the user's turn)"),
    "input": ("alpaca", "extra input added under the instruction (optional)"),
    "output": ("alpaca", "the reply the model learns"),
    "messages": ("messages", "a list of turns with role and content"),
    "conversations": ("sharegpt", "a list of turns with from and value"),
    "text": ("text", "raw text, every token trained"),
    "system": (None, "a system prompt put before the conversation (optional)"),
}
# Roles a row of each format must fill (the others may be missing or empty).
REQUIRED = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
}
CHAT_FORMATS = ("prompt_completion", "alpaca", "sharegpt", "messages")
FORMAT_LABELS = {
    "text": "text",
    "prompt_completion": "prompt/completion",
    "alpaca": "Alpaca",
    "sharegpt": "ShareGPT",
    "messages": "messages",
}
EXAMPLE = "prompt=question,completion=answer"


def _pairs(value: Any) -> list[tuple[str, str, str]]:
    """(role, column, the pair as written) from a string, a list of strings or a mapping."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [(str(k).strip(), "" if v is None else str(v).strip(), f"{k}={v}") for k, v in value.items()]
    if isinstance(value, str):
        items: Iterable[Any] = [p for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ColumnsError(f"data.columns must be role=column pairs such as {EXAMPLE}, got {value!r}")
    out = []
    for item in items:
        if isinstance(item, Mapping):
            out += _pairs(item)
            continue
        text = str(item).strip()
        if "=" not in text:
            raise ColumnsError(
                f"data.columns takes role=column pairs such as {EXAMPLE}, got {text!r} (which role does it fill?)"
            )
        role, _, column = text.partition("=")
        out.append((role.strip(), column.strip(), text))
    return out


def parse_columns(value: Any) -> dict[str, str]:
    """role -> column from `prompt=q,completion=a`, a list of such pairs, or a mapping; ColumnsError on conflict."""
    mapping: dict[str, str] = {}
    owner: dict[str, str] = {}  # column -> role
    for role, column, written in _pairs(value):
        if role not in ROLES:
            if column in ROLES and role not in ROLES:
                raise ColumnsError(
                    f"data.columns names the role first: {column}={role}, not {written}"
                )
            raise ColumnsError(
                f"data.columns: {role!r} in {written!r} is not a role; the roles are {', '.join(ROLES)}"
            )
        if not column:
            raise ColumnsError(f"data.columns: {written!r} names no column for {role}")
        if role in mapping and mapping[role] != column:
            raise ColumnsError(
                f"data.columns maps {role} twice, to {mapping[role]!r} and to {column!r}; give each role one column"
            )
        if column in owner and owner[column] != role:
            raise ColumnsError(
                f"data.columns maps the column {column!r} to both {owner[column]} and {role}; "
                "give each column one role"
            )
        mapping[role] = column
        owner[column] = role
    mapping_format(mapping)  # roles of two formats at once are a conflict too
    return mapping


def mapping_format(mapping: Mapping[str, str]) -> str | None:
    """The row format a mapping's roles belong to; None when it only maps `system`."""
    formats = {ROLES[role][0] for role in mapping} - {None}
    if len(formats) > 1:
        by_format = {f: [r for r in mapping if ROLES[r][0] == f] for f in formats}
        described = " and ".join(
            f"{'/'.join(roles)} ({FORMAT_LABELS[f]})" for f, roles in sorted(by_format.items())
        )
        raise ColumnsError(
            f"data.columns mixes the roles of two formats, {described}; map the roles of one format only"
        )
    if "system" in mapping and "text" in mapping:
        raise ColumnsError("data.columns maps system with text, but raw text has no system prompt; drop one of them")
    return next(iter(formats), None)


def columns_line(mapping: Mapping[str, str]) -> str:
    """The mapping as `--columns` takes it, roles in a stable order: `prompt=question,completion=answer`."""
    order = {role: i for i, role in enumerate(ROLES)}
    return ",".join(f"{role}={mapping[role]}" for role in sorted(mapping, key=lambda r: order.get(r, 99)))


def columns_setting(value: Any) -> tuple[str, ...]:
    """`data.columns` as the config stores it: checked `role=column` strings (a YAML mapping is accepted too)."""
    mapping = parse_columns(value)
    return tuple(f"{role}={column}" for role, column in mapping.items())
