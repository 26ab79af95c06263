"""Secrets out of everything ft-desk writes or prints. Stdlib only (events, run_folder and the CLI use it).

`redact_tokens(text)` replaces anything shaped like an access token with its prefix and `***`: Hugging Face user
tokens (`hf_...`), and the other tokens people paste by mistake where a model name or a path goes - OpenAI and
Anthropic keys (`sk-...`), GitHub tokens (`ghp_`, `gho_`, `ghs_`, `github_pat_...`), GitLab (`glpat-`), Slack
(`xox?-`), AWS access key ids (`AKIA...`) and Google API keys (`AIza...`). The shapes are long enough that names
like `hf_hub_download` or `sk-learn` never match. `hub/credentials.redact` adds the active token on top.
"""

from __future__ import annotations

import json
import re
from typing import Any

REDACTED = "hf_***"
# Note: each shape is a fixed prefix plus a run of token characters long enough (16+) that identifiers and model
# names never match; the prefix is kept so a reader still sees what kind of secret was removed.
_SHAPES = (
    r"hf_[A-Za-z0-9]{16,}",
    r"sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}",
    r"gh[pousr]_[A-Za-z0-9]{20,}",
    r"github_pat_[A-Za-z0-9_]{20,}",
    r"glpat-[A-Za-z0-9_-]{20,}",
    r"xox[abprs]-[A-Za-z0-9-]{10,}",
    r"AKIA[0-9A-Z]{16}",
    r"AIza[0-9A-Za-z_-]{35}",
)
TOKEN_RE = re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(_SHAPES) + r")")
_PREFIX = re.compile(r"^(hf_|sk-|gh[pousr]_|github_pat_|glpat-|xox[abprs]-|AKIA|AIza)")


def _mask(match: re.Match) -> str:
    prefix = _PREFIX.match(match.group(0))
    return (prefix.group(1) if prefix else "") + "***"


def redact_tokens(text: object) -> str:
    """`text` with every token-shaped string replaced by its prefix and `***` (`hf_abc...` -> `hf_***`)."""
    return TOKEN_RE.sub(_mask, str(text))


def has_token(text: object) -> bool:
    return TOKEN_RE.search(str(text)) is not None


def redact_data(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings) with every string redacted; other values as they are."""
    if isinstance(value, str):
        return redact_tokens(value) if has_token(value) else value
    if isinstance(value, dict):
        return {k: redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    return value


def dumps_redacted(value: Any, **kwargs: Any) -> str:
    """json.dumps of `value`, with token-shaped strings masked (checked on the text, so it costs one regex scan)."""
    text = json.dumps(value, **kwargs)
    return redact_tokens(text) if has_token(text) else text
