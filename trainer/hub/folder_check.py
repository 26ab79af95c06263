"""Whether a model folder on disk is safe and complete enough to train on (`check_model_folder`):
  - remote code: a config (or tokenizer config) whose `auto_map` names classes transformers does not ship needs Python
    code from the repo; refused unless `model.trust_remote_code` is set, and for a Hub model only together with
    `model.revision` pinned to a 40-hex commit (the one that was reviewed). Code from another repo is always refused.
  - pickle: weights only in *.bin / *.pt form (which can run code when unpickled) are refused unless
    `model.allow_pickle`.
  - completeness: config.json, a tokenizer, and every weight shard present; each safetensors file is exactly as long
    as its own header says (a cut-off download is caught before transformers reads garbage).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ft_desk.trainer.errors import ModelError
from ft_desk.trainer.hub.names import COMMIT_RE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "tokenizer_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: the model folder is incomplete",
                         hint="download the model again: ft-desk models download <id>") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON ({exc.__class__.__name__}), so the {what} cannot be used",
                         hint="download the model again, or fix the file") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object, so the {what} cannot be used")
    return data


# ---------------------------------------------------------------------------------------------------------------
# remote code

def _native_model_types() -> set[str]:
    # Heavy (~2 s, pulls in torch): only called when a config actually has an auto_map.
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def _native_tokenizer(name: str) -> bool:
    # Heavy, like _native_model_types: only for a tokenizer config that has an auto_map.
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        return tokenizer_class_from_name(name) is not None
    except Exception:
        return False


def _auto_map_refs(auto_map: object) -> list[str]:
    refs: list[str] = []
    if isinstance(auto_map, dict):
        for value in auto_map.values():
            refs.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str))
    return refs


def remote_code_reason(config: dict, tokenizer_config: dict | None = None,
                       native_types: set[str] | None = None) -> str | None:
    """Why loading this model would run code shipped with it, or None when transformers has it built in.

    transformers ignores `auto_map` when it ships the architecture itself (e.g. Phi-3 repos still carry their old
    modeling files), so only an unknown model_type or tokenizer class counts.
    """
    model_type = config.get("model_type")
    refs = _auto_map_refs(config.get("auto_map"))
    if refs:
        native = native_types if native_types is not None else _native_model_types()
        if model_type not in native:
            return f"its config maps {model_type or 'the model'} to code in the repo ({refs[0]})"
    tok_refs = _auto_map_refs((tokenizer_config or {}).get("auto_map"))
    tok_class = (tokenizer_config or {}).get("tokenizer_class")
    if tok_refs and (not tok_class or not _native_tokenizer(tok_class)):
        return f"its tokenizer {tok_class or ''} is code in the repo ({tok_refs[0]})".replace("  ", " ")
    return None


def foreign_code_refs(config: dict, tokenizer_config: dict | None = None) -> list[str]:
    """auto_map entries that point at code in another repo (`other/repo--module.Class`): never pinned, never run."""
    refs = _auto_map_refs(config.get("auto_map")) + _auto_map_refs((tokenizer_config or {}).get("auto_map"))
    return [r for r in refs if "--" in r]


def code_files_for(config: dict, tokenizer_config: dict | None = None) -> list[str]:
    """The .py files (repo-relative) that `auto_map` entries need."""
    files = []
    for ref in _auto_map_refs(config.get("auto_map")) + _auto_map_refs((tokenizer_config or {}).get("auto_map")):
        module = ref.rsplit(".", 1)[0]
        name = module.replace(".", "/") + ".py"
        if name not in files:
            files.append(name)
    return files


# ---------------------------------------------------------------------------------------------------------------
# weights and completeness

def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (missing, cut off, bad header), or None when it is whole."""
    try:
        size = path.stat().st_size  # follows the cache's symlink to the blob; a dangling link is missing
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "is empty or cut off"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100_000_000):
                return "is cut off inside its header (an interrupted download, or not safetensors)"
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError, UnicodeDecodeError):
        return "has an unreadable header"
    if not isinstance(header, dict):
        return "has an unreadable header"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return "has an unreadable header"
        end = max(end, int(offsets[1]))
    expected = 8 + header_len + end
    if size != expected:
        return f"is cut off: {size} bytes where its header describes {expected} (an interrupted download)"
    return None


def safetensors_param_count(path: Path) -> int:
    """Number of parameters in a safetensors file, read from its header (no tensor data is loaded)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry.get("shape", []):
                count *= int(dim)
            total += count
    return total


@dataclass
class WeightFiles:
    format: str  # "safetensors" | "pickle" | "none"
    files: list[str] = field(default_factory=list)
    index: str | None = None


def pick_weight_files(names: set[str], read_index) -> WeightFiles:
    """Choose the weight files transformers would load from a file list (repo listing or folder).

    `read_index(name) -> dict` returns a parsed *.index.json. Sharded safetensors win over a single file; a single
    `model.safetensors` wins over other root safetensors (e.g. Mistral's duplicate `consolidated.safetensors`).
    """
    for fmt, index_name, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("pickle", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if index_name in names:
            index = read_index(index_name)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelError(f"{index_name} has no weight_map, so the weight shards are unknown")
            return WeightFiles(fmt, sorted(set(map(str, weight_map.values()))), index_name)
        if single in names:
            return WeightFiles(fmt, [single])
    root_safetensors = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    if root_safetensors:
        return WeightFiles("safetensors", root_safetensors)
    pickles = sorted(n for n in names if "/" not in n and n.endswith(PICKLE_SUFFIXES) and n != "training_args.bin")
    if pickles:
        return WeightFiles("pickle", pickles)
    return WeightFiles("none")


@dataclass
class FolderReport:
    """What `check_model_folder` found in a folder that is safe and complete enough to load."""

    path: Path
    model_type: str | None
    weights_format: str
    weight_files: list[str]
    params: int | None
    remote_code: str | None  # reason, when the model runs repo code (only with trust_remote_code)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "model_type": self.model_type, "weights_format": self.weights_format,
            "weight_files": self.weight_files, "params": self.params, "remote_code": self.remote_code,
        }


def check_model_folder(path: Path, *, name: str | None = None, trust_remote_code: bool = False,
                       allow_pickle: bool = False, pinned_revision: str | None = None,
                       hub_model: bool = False) -> FolderReport:
    """Refuse a folder that would run repo code or unpickle weights without consent, or that is incomplete.

    `hub_model`: the folder is a Hub snapshot, so trusting its code also needs `pinned_revision` (a commit).
    """
    label = name or str(path)
    download_hint = f"download it again: ft-desk models download {name}" if hub_model and name else \
        "copy the missing files into the folder"
    if not hub_model and not (path / "config.json").is_file():
        raise ModelError(f"{label} has no config.json, so it is not a Hugging Face model folder",
                         hint="name the folder that holds config.json, the weights and the tokenizer files, "
                              "or a .gguf file")
    config = _read_json(path / "config.json", "model config")
    tok_path = path / "tokenizer_config.json"
    tokenizer_config = _read_json(tok_path, "tokenizer config") if tok_path.is_file() else None

    foreign = foreign_code_refs(config, tokenizer_config)
    if foreign:
        raise ModelError(
            f"{label} loads code from another repo ({foreign[0]}), which cannot be pinned to a reviewed commit",
            hint="pick a model that transformers supports natively",
        )
    reason = remote_code_reason(config, tokenizer_config)
    if reason:
        if not trust_remote_code:
            pin = f" --set model.revision={path.name}" if hub_model and COMMIT_RE.match(path.name) else ""
            raise ModelError(
                f"{label} needs to run Python code shipped with the model: {reason}",
                hint="read that code first; to run it anyway, train with "
                     f"--set model.trust_remote_code=true{pin} (a Hub model must be pinned to the reviewed commit)",
            )
        if hub_model and not (pinned_revision and COMMIT_RE.match(pinned_revision)):
            pin = path.name if COMMIT_RE.match(path.name) else "<commit>"
            raise ModelError(
                f"{label} runs code from the repo, so model.revision must pin the commit you reviewed "
                f"(got {pinned_revision or 'none'})",
                hint=f"add --set model.revision={pin}",
            )
        missing_code = [f for f in code_files_for(config, tokenizer_config) if not (path / f).is_file()]
        if missing_code:
            raise ModelError(f"{label} needs {missing_code[0]}, which is not in {path}", hint=download_hint)

    names = {str(p.relative_to(path)).replace("\\", "/") for p in path.rglob("*") if p.is_file() or p.is_symlink()}
    weights = pick_weight_files(names, lambda n: _read_json(path / n, "weight index"))
    if weights.format == "none":
        raise ModelError(f"{label} has no weights (no *.safetensors or pytorch_model*.bin in {path})",
                         hint=download_hint)
    if weights.format == "pickle" and not allow_pickle:
        raise ModelError(
            f"{label} has only pickle weights ({weights.files[0]}), which can run code when they are loaded",
            hint="pick a model with safetensors weights, or pass --allow-pickle "
                 "(--set model.allow_pickle=true) if you trust its author",
        )
    params = 0
    for weight in weights.files:
        target = path / weight
        if weights.format == "safetensors":
            problem = safetensors_problem(target)
            if problem:
                raise ModelError(f"{label}: {weight} {problem}", hint=download_hint)
            params += safetensors_param_count(target)
        elif not target.is_file() or target.stat().st_size == 0:
            raise ModelError(f"{label}: {weight} is missing or empty", hint=download_hint)
    if not any((path / t).is_file() for t in TOKENIZER_FILES):
        raise ModelError(f"{label} has no tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)",
                         hint=download_hint)
    return FolderReport(path, config.get("model_type"), weights.format, weights.files,
                        params if weights.format == "safetensors" else None, reason)
