"""Choosing a base model: the curated list, Hub search, model details, and whether a model fits this device.

`search_models` and `model_details` return plain dicts (the `--json` output of `ft-desk models search/info`, which the
TUI renders). With no query, and whenever the Hub is off limits (offline mode) or unreachable, the curated list from
presets/models.yaml comes first, with cached models marked; in offline mode nothing touches the network. The fit
verdict comes from ft_desk.trainer.planning.plan_run on config.json - read from the cache, or fetched alone (a few KB,
in memory, never written to the cache) - and the run config of the chosen presets (a FitCheck).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ft_desk.quant.device import DeviceFacts, probe_facts, resolve_device
from ft_desk.trainer.config import RunConfig
from ft_desk.trainer.errors import ModelError, UserError
from ft_desk.trainer.hub.cache import cached_ids, find_snapshot, folder_status
from ft_desk.trainer.hub.credentials import redact
from ft_desk.trainer.hub.download import is_training_file, unsafe_name
from ft_desk.trainer.hub.folder_check import pick_weight_files, remote_code_reason
from ft_desk.trainer.hub.names import COMMIT_RE, check_repo_id, model_page_url
from ft_desk.trainer.hub.remote import api, endpoint, fetch_repo_json, get_json, hub_error, is_unreachable, offline
from ft_desk.trainer.planning import local_model_config, plan_run
from ft_desk.trainer.presets import load_config

SORTS = {"downloads": "downloads", "likes": "likes", "updated": "lastModified"}
SEARCH_EXPAND = ("downloads", "likes", "lastModified", "gated", "safetensors", "tags", "library_name", "pipeline_tag")
# Note: bytes per element of each safetensors dtype, to turn the Hub's parameter counts into a size on disk.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_PARAMS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMB])\s*$", re.IGNORECASE)
FIT_WORKERS = 8


# ---------------------------------------------------------------------------------------------------------------
# curated list

@dataclass(frozen=True)
class CatalogEntry:
    id: str
    params: int
    params_label: str
    family: str
    chat_template: str
    license: str
    gated: bool
    lora_target_modules: tuple[str, ...]
    max_length: int
    note: str

    def row(self) -> dict[str, Any]:
        # Until the Hub or the cache says better: bf16 weights, 2 bytes per nominal parameter.
        return {"id": self.id, "params": self.params, "size_bytes": self.params * 2, "size_estimated": True,
                "license": self.license,
                "gated": self.gated, "last_modified": None, "downloads": None, "likes": None, "curated": True,
                "family": self.family, "chat_template": self.chat_template,
                "lora_target_modules": list(self.lora_target_modules), "max_length": self.max_length,
                "note": self.note, "weights": None}


def parse_params(label: str) -> int:
    match = _PARAMS_RE.match(str(label))
    if not match:
        raise ValueError(f"params must look like 135M or 1.5B, got {label!r}")
    return int(round(float(match.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9}[match.group(2).upper()]))


def catalog_path() -> Path:
    return Path(str(resources.files("ft_desk.presets") / "models.yaml"))


def load_catalog(path: Path | None = None) -> list[CatalogEntry]:
    """The curated models, validated; a broken entry is a UserError naming it."""
    import yaml  # PyYAML: small, already needed by presets

    path = path or catalog_path()
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out = []
    required = ("id", "params", "family", "chat_template", "license", "gated", "lora_target_modules",
                "max_length", "note")
    for i, item in enumerate(data.get("models") or []):
        where = f"{path.name} entry {i + 1}"
        missing = [k for k in required if not isinstance(item, dict) or k not in item]
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}")
        try:
            out.append(CatalogEntry(
                id=str(item["id"]), params=parse_params(item["params"]), params_label=str(item["params"]),
                family=str(item["family"]), chat_template=str(item["chat_template"]), license=str(item["license"]),
                gated=bool(item["gated"]), lora_target_modules=tuple(str(m) for m in item["lora_target_modules"]),
                max_length=int(item["max_length"]), note=str(item["note"]),
            ))
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where} ({item.get('id')}): {exc}") from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# fit verdict

@dataclass(frozen=True)
class FitCheck:
    """What the fit column's verdicts are computed against: the run config (presets + --set) and this device."""

    run: RunConfig
    """The run as `ft-desk train` would resolve it with the same presets and overrides."""
    device: DeviceFacts | None
    """This machine's device for that run, or None when it could not be probed (verdict "unknown device")."""

    @classmethod
    def from_presets(cls, presets: list[str] | None, overrides: list[str] | None) -> "FitCheck":
        run = load_config(presets or ["qlora"], overrides or [])
        try:
            device = probe_facts(resolve_device(run.train.device))  # imports torch
        except UserError:
            raise
        except Exception:  # no usable device probe: the planner answers "unknown device"
            device = None
        return cls(run, device)

    def plan(self, config: dict | None, model_name: str | None = None) -> dict | None:
        """The planner's answer for one config.json, or a dict with verdict "unknown" saying why not."""
        if config is None:
            return {"verdict": "unknown", "reason": "config.json is not available"}
        try:
            return plan_run(config, self.run, self.device, model_name=model_name).to_dict()
        except UserError as err:
            return {"verdict": "unknown", "reason": err.message}
        except Exception as exc:  # an odd config must not sink a whole search
            return {"verdict": "unknown", "reason": f"cannot estimate: {redact(exc)}"}


def short_fit(plan: dict | None) -> dict | None:
    if plan is None:
        return None
    return {"verdict": plan.get("verdict"), "total_bytes": plan.get("total_bytes"), "reason": plan.get("reason")}


def _config_for(repo_id: str, use_network: bool) -> dict | None:
    config = local_model_config(repo_id)
    if config is not None or not use_network:
        return config
    try:
        return fetch_repo_json(repo_id, "config.json")
    except Exception:  # gated, missing, network: the row says "unknown"
        return None


def _add_fits(rows: list[dict], fit: FitCheck | None, use_network: bool) -> None:
    if fit is None or not rows:
        return
    with ThreadPoolExecutor(max_workers=min(FIT_WORKERS, len(rows))) as pool:
        configs = list(pool.map(lambda r: _config_for(r["id"], use_network), rows))
    for row, config in zip(rows, configs):
        plan = fit.plan(config, row["id"])
        if config is None and row.get("gated"):
            plan = {"verdict": "unknown", "reason": "gated: config.json needs access"}
        row["fit"] = short_fit(plan)


# ---------------------------------------------------------------------------------------------------------------
# search

def _iso(value) -> str | None:
    """A Hub timestamp (string or datetime) as ISO 8601 UTC, e.g. 2024-03-01T00:00:00Z."""
    if not value:
        return None
    if isinstance(value, str):
        from huggingface_hub.utils import parse_datetime

        try:
            value = parse_datetime(value)
        except ValueError:
            return value
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _license(item: dict) -> str | None:
    for tag in item.get("tags") or []:
        if isinstance(tag, str) and tag.startswith("license:"):
            return tag.split(":", 1)[1]
    card = item.get("cardData") or {}
    return card.get("license") if isinstance(card, dict) else None


def _hub_row(item: dict) -> dict[str, Any]:
    st = item.get("safetensors") or {}
    by_dtype = st.get("parameters") or {}
    size = sum(int(n) * DTYPE_BYTES.get(dtype, 2) for dtype, n in by_dtype.items()) if by_dtype else None
    return {
        "id": item.get("id") or item.get("modelId"), "params": st.get("total"), "size_bytes": size,
        "license": _license(item), "gated": bool(item.get("gated")), "last_modified": _iso(item.get("lastModified")),
        "downloads": item.get("downloads"), "likes": item.get("likes"), "curated": False,
        "weights": "safetensors" if st else "unknown", "note": None,
    }


def hub_search(query: str | None, sort: str = "downloads", limit: int = 20) -> list[dict[str, Any]]:
    """Text-generation models transformers can load, from the Hub's model listing (follows Link pagination)."""
    params: list[tuple[str, Any]] = []
    if query:
        params.append(("search", query))
    params += [("pipeline_tag", "text-generation"), ("filter", "transformers"), ("sort", SORTS[sort]),
               ("limit", str(limit))]
    params += [("expand", e) for e in SEARCH_EXPAND]
    url: str | None = f"{endpoint()}/api/models"
    rows: list[dict[str, Any]] = []
    while url and len(rows) < limit:
        items, response = get_json(url, params)
        rows.extend(_hub_row(item) for item in items if isinstance(item, dict))
        url = response.links.get("next", {}).get("url")
        params = None  # the next link carries the query
    return rows[:limit]


def _matches(text: str, query: str | None) -> bool:
    return not query or query.lower() in text.lower()


def search_models(query: str | None = None, sort: str = "downloads", limit: int = 20,
                  fit: FitCheck | None = None) -> dict[str, Any]:
    """Rows for the model picker: curated first without a query or without the Hub, then Hub results."""
    if sort not in SORTS:
        raise UserError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if limit < 1:
        raise UserError(f"limit must be a positive int, got {limit}")
    catalog = load_catalog()
    curated_ids = {e.id for e in catalog}
    cached = cached_ids()
    curated_rows = [e.row() for e in catalog if _matches(e.id, query)]
    note = None
    hub_rows: list[dict[str, Any]] = []
    is_offline = offline()
    if is_offline:
        note = "offline mode (HF_HUB_OFFLINE=1): curated list and cached models only"
    else:
        try:
            hub_rows = hub_search(query, sort, limit)
        except Exception as exc:
            if not is_unreachable(exc):
                raise hub_error(exc, "the model search") from None
            is_offline = True
            note = f"cannot reach the Hub at {endpoint()}: curated list and cached models only"
    if is_offline:
        extra = [_cached_row(repo) for repo in sorted(cached - curated_ids) if _matches(repo, query)]
        rows, source = curated_rows + extra, "curated"
    elif query:
        rows, source = hub_rows, "hub"
        for row in rows:
            row["curated"] = row["id"] in curated_ids
    else:
        live = {r["id"]: r for r in hub_rows}
        for row in curated_rows:  # live numbers for curated models that the listing happened to include
            for key in ("params", "size_bytes", "last_modified", "downloads", "likes", "weights"):
                if live.get(row["id"], {}).get(key) is not None:
                    row[key] = live[row["id"]][key]
                    row["size_estimated"] = row["size_estimated"] and key != "size_bytes"
        rows = curated_rows + [r for r in hub_rows if r["id"] not in curated_ids]
        source = "curated+hub"
    for row in rows:
        row["cached"] = row["id"] in cached
        row.setdefault("fit", None)
    _add_fits(rows, fit, use_network=not is_offline)
    return {"query": query or "", "sort": sort, "source": source, "offline": is_offline, "note": note,
            "models": rows}


def _cached_row(repo_id: str) -> dict[str, Any]:
    snapshot = find_snapshot(repo_id)
    status = folder_status(snapshot) if snapshot else {"complete": False, "params": None, "weights_format": None}
    size = sum(f.stat().st_size for f in snapshot.rglob("*") if f.is_file()) if snapshot else None
    return {"id": repo_id, "params": status.get("params"), "size_bytes": size, "license": None, "gated": None,
            "last_modified": None, "downloads": None, "likes": None, "curated": False,
            "weights": status.get("weights_format"), "note": None if status["complete"] else "incomplete in cache"}


# ---------------------------------------------------------------------------------------------------------------
# details of one model

def model_details(repo_id: str, revision: str | None = None, fit: FitCheck | None = None) -> dict[str, Any]:
    """Everything the picker's details pane shows about one model, from the Hub or (offline) from the cache."""
    check_repo_id(repo_id)
    entry = next((e for e in load_catalog() if e.id == repo_id), None)
    snapshot = find_snapshot(repo_id, revision)
    note = None
    details: dict[str, Any] | None = None
    if not offline():
        try:
            details = _hub_details(repo_id, revision)
        except Exception as exc:
            if not (is_unreachable(exc) and snapshot is not None):
                raise hub_error(exc, repo_id, revision) from None
            note = f"cannot reach the Hub at {endpoint()}: details from the local cache"
    else:
        note = "offline mode: details from the local cache"
    if details is None:
        if snapshot is None:
            raise ModelError(f"{repo_id} is not in the local cache and the Hub is not available",
                             hint="see cached models with: ft-desk models list")
        details = _cache_details(repo_id, snapshot)
    if snapshot is not None:
        status = folder_status(snapshot)
        details["cached"] = {"path": str(snapshot), "commit": snapshot.name, **status}
    else:
        details["cached"] = None
    if entry is not None:
        details["curated"] = entry.row()
        details["license"] = details.get("license") or entry.license
    else:
        details["curated"] = None
    details["note"] = note
    details["model_page"] = model_page_url(repo_id)
    if fit is not None:
        config = details.pop("_config", None)
        if config is None:
            config = local_model_config(repo_id, revision)
        details["fit"] = fit.plan(config, repo_id)
        if config is None and details.get("gated"):
            details["fit"] = {"verdict": "unknown", "reason": "gated: config.json needs access"}
    details.pop("_config", None)
    details.setdefault("fit", None)
    return details


def _hub_details(repo_id: str, revision: str | None) -> dict[str, Any]:
    info = api().model_info(repo_id, revision=revision, files_metadata=True)
    commit = info.sha if info.sha and COMMIT_RE.match(info.sha) else None
    sizes = {s.rfilename: (s.size or 0) for s in info.siblings or []}
    unsafe = sorted(n for n in sizes if unsafe_name(n))
    names = set(sizes) - set(unsafe)

    def read(name: str) -> dict:
        return fetch_repo_json(repo_id, name, commit or revision)

    config = tokenizer_config = None
    reachable_files = True
    try:
        config = read("config.json") if "config.json" in names else None
        tokenizer_config = read("tokenizer_config.json") if "tokenizer_config.json" in names else None
    except Exception as exc:
        if is_unreachable(exc):
            raise
        reachable_files = False
    try:
        weights = pick_weight_files(names, read)
    except Exception:  # index unreadable (gated): count every root safetensors file instead
        weights = pick_weight_files({n for n in names if not n.endswith(".index.json")}, read)
    wanted = {n for n in names if is_training_file(n)} | set(weights.files)
    if weights.index:
        wanted.add(weights.index)
    params = info.safetensors.total if info.safetensors else None
    card = info.card_data
    license_ = getattr(card, "license", None) if card is not None else None
    license_ = license_ or next((t.split(":", 1)[1] for t in info.tags or [] if t.startswith("license:")), None)
    return {
        "id": info.id, "revision": revision, "commit": commit, "params": params,
        "size_bytes": sum(sizes.get(n, 0) for n in wanted), "repo_size_bytes": sum(sizes.values()),
        "license": license_, "gated": bool(info.gated), "gated_mode": info.gated or None,
        "last_modified": _iso(info.last_modified),
        "downloads": info.downloads, "likes": info.likes, "pipeline_tag": info.pipeline_tag,
        "weights_format": weights.format, "weight_files": len(weights.files),
        "remote_code": remote_code_reason(config, tokenizer_config) if config else None,
        "unsafe_file_names": unsafe, "files_to_download": len(wanted),
        "files_readable": reachable_files, "source": "hub", "_config": config,
    }


def _cache_details(repo_id: str, snapshot: Path) -> dict[str, Any]:
    status = folder_status(snapshot)
    size = sum(f.stat().st_size for f in snapshot.rglob("*") if f.is_file())
    return {
        "id": repo_id, "revision": None, "commit": snapshot.name, "params": status["params"], "size_bytes": size,
        "repo_size_bytes": None, "license": None, "gated": None, "gated_mode": None, "last_modified": None,
        "downloads": None, "likes": None, "pipeline_tag": None, "weights_format": status["weights_format"],
        "weight_files": None, "remote_code": status["remote_code"], "unsafe_file_names": [],
        "files_to_download": None, "files_readable": True, "source": "cache",
    }
