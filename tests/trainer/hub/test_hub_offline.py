"""Offline use: with HF_HUB_OFFLINE=1 nothing is attempted on the network; with the Hub unreachable, the cache works."""

from __future__ import annotations

import json

import pytest

from ft_desk.trainer.config import ModelConfig
from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.hub.resolve import resolve_model_dir
from ft_desk.trainer.hub.search import load_catalog


def test_offline_mode_uses_the_cache_and_makes_no_request(hub, cli, go_offline, block_network):
    assert cli("models", "download", "acme/tiny-chat", "--json")[0] == 0
    hub.server.stop()
    served = hub.server.count()
    go_offline()
    attempts = block_network()

    code, out, _ = cli("models", "list", "--json")
    assert code == 0 and [m["repo_id"] for m in json.loads(out)["models"]] == ["acme/tiny-chat"]

    code, out, _ = cli("models", "search", "--no-fit", "--json")
    result = json.loads(out)
    assert code == 0 and result["offline"] is True and "offline mode" in result["note"]
    ids = [m["id"] for m in result["models"]]
    assert ids[: len(load_catalog())] == [e.id for e in load_catalog()] and ids[-1] == "acme/tiny-chat"
    assert next(m for m in result["models"] if m["id"] == "acme/tiny-chat")["cached"] is True

    code, out, _ = cli("models", "search", "chat", "--no-fit", "--json")
    assert "acme/tiny-chat" in [m["id"] for m in json.loads(out)["models"]]

    code, out, _ = cli("models", "info", "acme/tiny-chat", "--no-fit", "--json")
    info = json.loads(out)
    assert code == 0 and info["source"] == "cache" and info["params"] > 0 and info["cached"]["complete"]

    code, out, _ = cli("models", "download", "acme/tiny-chat", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["already_cached"] is True
    assert resolve_model_dir(ModelConfig(name="acme/tiny-chat")).is_dir()

    code, _, err = cli("models", "download", "acme/tiny-coder")
    assert code == 2 and "offline mode is on" in err
    code, _, err = cli("models", "info", "acme/tiny-coder", "--no-fit")
    assert code == 2 and "not in the local cache" in err
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve_model_dir(ModelConfig(name="acme/tiny-coder"))

    assert attempts == []  # no connection to any host was even attempted
    assert hub.server.count() == served


def test_unreachable_hub_falls_back_to_curated_and_cache(hub, cli):
    assert cli("models", "download", "acme/tiny-chat", "--json")[0] == 0
    hub.server.stop()  # offline mode stays off: the Hub just cannot be reached

    code, out, _ = cli("models", "search", "tiny", "--no-fit", "--json")
    result = json.loads(out)
    assert code == 0 and result["offline"] is True and "cannot reach the Hub" in result["note"]
    assert [m["id"] for m in result["models"]] == ["acme/tiny-chat"]

    code, out, _ = cli("models", "info", "acme/tiny-chat", "--no-fit", "--json")
    assert code == 0 and json.loads(out)["source"] == "cache"
    code, _, err = cli("models", "info", "acme/tiny-coder", "--no-fit")
    assert code == 2 and "cannot reach the Hugging Face Hub" in err

