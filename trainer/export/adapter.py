"""Adapter export: the run's LoRA adapter in peft format (adapter_config.json + adapter_model.safetensors), which
`peft.PeftModel.from_pretrained(base, folder)` loads onto the base model, plus the run's tokenizer and chat template
(always; `tokenizer_changes` in the result says how they differ from the base's own, if they do).

The adapter config names the base by its Hub id when the run used one, so the folder works on another machine;
for a local or demo base it names the folder the run read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ft_desk.trainer.demo import is_demo_model
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.export.source import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunSource
from ft_desk.trainer.hub.gguf_import import read_provenance


def tokenizer_changes(source: RunSource, tokenizer) -> list[str]:
    """How the run's tokenizer differs from the base model's (empty when it is the same)."""
    from transformers import AutoTokenizer  # heavy import

    if source.tokenizer_dir == source.base_dir:
        return []
    try:
        base = AutoTokenizer.from_pretrained(source.base_dir, trust_remote_code=source.cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return ["the base model has no tokenizer of its own"]
    changes = []
    if len(base) != len(tokenizer) or base.get_vocab() != tokenizer.get_vocab():
        changes.append(f"vocabulary {len(base)} -> {len(tokenizer)} tokens")
    if (base.chat_template or None) != (tokenizer.chat_template or None):
        changes.append("chat template")
    if base.special_tokens_map != tokenizer.special_tokens_map:
        changes.append("special tokens")
    return changes


def base_reference(source: RunSource) -> str:
    """What adapter_config.json should name as the base model: the Hub id, else the folder it loads from (a
    GGUF / Ollama base is its imported folder: peft cannot load a GGUF or an Ollama name)."""
    name = source.cfg.model.name
    imported = read_provenance(source.base_dir) is not None
    if not is_demo_model(name) and not Path(name).expanduser().exists() and not imported:
        return name
    return str(source.base_dir)


def export_adapter(source: RunSource, folder: Path, tokenizer) -> dict[str, Any]:
    if source.method == "full":
        raise UserError("this run fine-tuned every weight (method full), so it has no adapter to export",
                        hint="use --format merged (or gguf / ollama)")
    shutil.copyfile(source.weights_dir / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)
    config = json.loads((source.weights_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_reference(source)
    if source.cfg.model.revision:
        config["revision"] = source.cfg.model.revision
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    changes = tokenizer_changes(source, tokenizer)
    # The tokenizer always travels with the adapter (a few MB at most): the folder then loads on its own
    # (AutoTokenizer.from_pretrained(folder)) and keeps the chat template the run trained with.
    tokenizer.save_pretrained(folder)
    return {"base_model": config["base_model_name_or_path"], "tokenizer_changes": changes,
            "use_dora": bool(config.get("use_dora")), "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
            "bytes": (folder / ADAPTER_WEIGHTS).stat().st_size}
