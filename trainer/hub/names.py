"""What a Hub model id and a commit look like, and where a model's page is. Stdlib only at import time."""

from __future__ import annotations

import re

from ft_desk.trainer.errors import ModelError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# owner/name (or a legacy single name); the Hub's own rules: letters, digits, '-', '_', '.', at most 96 chars.
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID_RE.match(name)) and ".." not in name and not name.endswith((".", "-"))


def check_repo_id(name: str) -> str:
    """`name` if it is a valid Hub model id, else a ModelError saying what one looks like."""
    if not is_repo_id(name):
        raise ModelError(f"{name!r} is not a Hub model id",
                         hint="a Hub id looks like owner/name, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    return name


def model_page_url(repo_id: str) -> str:
    from huggingface_hub import constants  # read at call time: tests point it at a local server

    return f"{constants.ENDPOINT}/{repo_id}"
