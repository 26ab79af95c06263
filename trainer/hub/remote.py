"""Talking to the Hugging Face Hub: one place that knows the endpoint, offline mode and how Hub failures read.

Every request goes through huggingface_hub's shared HTTP session, which refuses to send anything when offline mode
is on (HF_HUB_OFFLINE=1); ft-desk also checks `offline()` first and answers from the cache, so in offline mode no
request is even attempted. Endpoint and offline flag are read from `huggingface_hub.constants` at call time.
Failures become `ModelError`s that name the model and the fix; their text is passed through `redact`.
"""

from __future__ import annotations

from typing import Any

from ft_desk.trainer.errors import ModelError, UserError
from ft_desk.trainer.hub.credentials import active_token, redact
from ft_desk.trainer.hub.names import model_page_url

# Note: seconds to wait for the Hub to answer a metadata call; downloads use huggingface_hub's own timeouts.
METADATA_TIMEOUT_S = 10.0
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def offline() -> bool:
    from huggingface_hub import constants  # read at call time

    return bool(constants.is_offline_mode())


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def api():
    """An HfApi bound to the current endpoint (HfApi copies the endpoint when it is created)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def offline_error(what: str) -> ModelError:
    return ModelError(
        f"offline mode is on (HF_HUB_OFFLINE=1), so ft-desk cannot {what}",
        hint="unset HF_HUB_OFFLINE to use the Hub; cached models still work: ft-desk models list",
    )


def is_unreachable(exc: BaseException) -> bool:
    """The Hub could not be reached at all (no network, DNS, refused, timeout, offline mode)."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, LocalEntryNotFoundError) and "connection" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def hub_error(exc: BaseException, repo_id: str | None = None, revision: str | None = None) -> UserError:
    """A readable, token-free UserError for any failure of a Hub call about `repo_id`."""
    from huggingface_hub import errors as hf

    if isinstance(exc, UserError):
        return exc
    name = repo_id or "the model"
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return offline_error(f"reach the Hub for {name}")
    if isinstance(exc, hf.GatedRepoError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 403:
            why = "your token does not have access to it yet"
        else:
            why = "you are not logged in" if not _has_token() else "your token was not accepted"
        return ModelError(
            f"{name} is a gated model and {why}",
            hint=f"request access on {model_page_url(name)}, then {LOGIN_HINT}",
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return ModelError(f"{name} has no revision {revision!r} on the Hub",
                          hint=f"see its branches and commits on {model_page_url(name)}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ModelError(
            f"{name} was not found on the Hub (it may be private, or the id is misspelled)",
            hint=f"check the id with: ft-desk models search {name.split('/')[-1]}; for a private model, {LOGIN_HINT}",
        )
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return ModelError(f"a file of {name} is missing on the Hub: {redact(_first_line(exc))}")
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        if status == 401:
            return ModelError(f"the Hub refused access to {name} (401)", hint=LOGIN_HINT)
        return ModelError(f"the Hub answered {status} for {name}: {redact(_first_line(exc))}",
                          hint="try again in a minute; status: https://status.huggingface.co")
    if is_unreachable(exc):
        return ModelError(
            f"cannot reach the Hugging Face Hub at {endpoint()} ({exc.__class__.__name__})",
            hint="check the network connection; cached models work offline: ft-desk models list",
        )
    if isinstance(exc, OSError):
        detail = exc.strerror or _first_line(exc)
        return ModelError(f"could not write the download of {name}: {redact(detail)}",
                          hint="check free disk space and permissions of the Hugging Face cache folder")
    return ModelError(f"the Hub call for {name} failed: {redact(_first_line(exc))}")


def _has_token() -> bool:
    return bool(active_token())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return next((line for line in text.splitlines() if line.strip()), text)


def get_json(url: str, params: list[tuple[str, Any]] | None = None):
    """(parsed JSON, response) from a GET on the Hub; errors are raised as huggingface_hub raises them."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    response = get_session().get(url, params=params, headers=build_hf_headers(), timeout=METADATA_TIMEOUT_S)
    hf_raise_for_status(response)
    return response.json(), response


def fetch_repo_json(repo_id: str, filename: str, revision: str | None = None) -> dict:
    """A small JSON file of a repo (config.json, an index) read into memory, never written to the cache."""
    from huggingface_hub import hf_hub_url

    data, _ = get_json(hf_hub_url(repo_id, filename, revision=revision or "main"))
    if not isinstance(data, dict):
        raise ModelError(f"{filename} of {repo_id} is not a JSON object")
    return data
