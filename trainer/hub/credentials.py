"""The Hugging Face token, only ever to blank it out: `redact(text)` removes the active token and anything shaped
like one (`hf_...`) from text meant for screens, logs and files. huggingface_hub itself sends the token; ft-desk
never stores it. Stdlib only at import time.
"""

from __future__ import annotations

# The token shapes (hf_ and the other common ones) live in the stdlib-only trainer/redaction.py, which the
# event sinks and the run folder use too.
from ft_desk.trainer.redaction import REDACTED, TOKEN_RE, redact_tokens

__all__ = ["REDACTED", "TOKEN_RE", "active_token", "redact"]


def redact(text: object) -> str:
    """`text` with the active Hugging Face token, and anything shaped like a token, replaced by `hf_***`."""
    out = str(text)
    token = active_token()
    if token and len(token) >= 8:
        out = out.replace(token, REDACTED)
    return redact_tokens(out)


def active_token() -> str | None:
    """The token huggingface_hub would send (HF_TOKEN, then its token file), or None. Only for redaction."""
    try:
        from huggingface_hub import get_token  # light: huggingface_hub's top level is lazy

        return get_token()
    except Exception:  # a broken token store must not break error reporting
        return None
