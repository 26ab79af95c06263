"""The Hugging Face token, only ever to blank it out: `redact(text)` removes the active token and anything shaped
like one (`hf_...`) from text meant for screens, logs and files. huggingface_hub itself sends the token; ft-desk
never stores it. Stdlib only at import time.
"""

from __future__ import annotations

import re

# Note: user access tokens are `hf_` + 34 letters/digits; 16+ avoids matching identifiers like `hf_hub_download`.
TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{16,}")
REDACTED = "hf_***"


def redact(text: object) -> str:
    """`text` with the active Hugging Face token, and anything shaped like a token, replaced by `hf_***`."""
    out = str(text)
    token = active_token()
    if token and len(token) >= 8:
        out = out.replace(token, REDACTED)
    return TOKEN_RE.sub(REDACTED, out)


def active_token() -> str | None:
    """The token huggingface_hub would send (HF_TOKEN, then its token file), or None. Only for redaction."""
    try:
        from huggingface_hub import get_token  # light: huggingface_hub's top level is lazy

        return get_token()
    except Exception:  # a broken token store must not break error reporting
        return None
