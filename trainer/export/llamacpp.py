"""llama.cpp through llama-cpp-python, when it happens to be installed: optional, never required.

It adds two things to a GGUF export:
- the q4_k_m type, which only llama.cpp's own quantizer makes (it chooses Q4_K / Q6_K per tensor): ft-desk writes
  the F16 file itself into the work folder and has llama.cpp quantize it into the export;
- a check that llama.cpp itself runs the exported file like the trained model (same numbers and checks as the
  transformers reload, plus whether llama.cpp's own end-of-generation tokens stop the reply).

Both run llamacpp_check.py in a child process (see there why). Without llama-cpp-python, q4_k_m is refused with
the command that installs it, and the llama.cpp check is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ft_desk.quant.gguf_tensors import LLAMA_CPP_TYPES, TENSOR_TYPES
from ft_desk.trainer.errors import UserError
from ft_desk.trainer.export.verify import judge as judge_reload

INSTALL = "pip install llama-cpp-python"


def installed_version() -> str | None:
    """llama-cpp-python's version when it imports here (its llama.cpp library loads), else None."""
    try:
        import llama_cpp  # optional dependency: loads the compiled llama.cpp library (~0.1 s)
    except (ImportError, OSError):
        return None
    return str(getattr(llama_cpp, "__version__", "unknown"))


def capabilities() -> dict[str, Any]:
    """What this installation can export, for `ft-desk doctor --json` and the app: the GGUF types it can write and
    the llama-cpp-python version (None when it is not installed)."""
    version = installed_version()
    return {"gguf_types": list(TENSOR_TYPES) + (list(LLAMA_CPP_TYPES) if version else []), "llama_cpp": version}


def require(gguf_type: str) -> None:
    """Refuse a llama.cpp-made type up front (before any work) when llama-cpp-python is missing."""
    if gguf_type in LLAMA_CPP_TYPES and installed_version() is None:
        raise UserError(
            f"--gguf-type {gguf_type} is made by llama.cpp's own quantizer, so it needs llama-cpp-python: run "
            f"`{INSTALL}` (it compiles llama.cpp, which takes several minutes) or choose q4_0, q5_0 or q8_0, "
            "which ft-desk writes without it",
            hint=INSTALL)


def _run(args: dict[str, Any], workdir: Path, label: str) -> tuple[dict[str, Any] | None, str]:
    """(result, log tail) of one llamacpp_check.py child; result is None when it failed."""
    args = dict(args, result=str(workdir / f"result-{label}.json"))
    args_path = workdir / f"args-{label}.json"
    args_path.write_text(json.dumps(args), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    script = Path(__file__).with_name("llamacpp_check.py")
    proc = subprocess.run([sys.executable, str(script), str(args_path)], env=env, capture_output=True, text=True)
    tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
    if proc.returncode != 0 or not Path(args["result"]).is_file():
        return None, tail
    return json.loads(Path(args["result"]).read_text(encoding="utf-8")), tail


def quantize(src: Path, dst: Path, gguf_type: str, workdir: Path) -> dict[str, Any]:
    """Quantize the F16 GGUF `src` into `dst` with llama.cpp; facts about the written file."""
    result, tail = _run({"mode": "quantize", "src": str(src), "dst": str(dst), "ftype": LLAMA_CPP_TYPES[gguf_type]},
                        workdir, f"quantize-{gguf_type}")
    if result is None:
        raise UserError(f"llama.cpp could not quantize the model to {gguf_type}:\n{tail}",
                        hint="choose --gguf-type q4_0, q5_0 or q8_0, which ft-desk writes itself")
    return result


def stored_types(path: Path) -> dict[str, int]:
    """How many tensors the GGUF file stores in each type, read from the file itself."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        name = tensor.tensor_type.name.lower()
        counts[name] = counts.get(name, 0) + 1
    return counts


def score(path: Path, reference, workdir: Path) -> dict[str, Any]:
    """llama.cpp's numbers on the reference rows, in reload_check.py's layout (llama-cpp-python must be installed).

    When llama.cpp cannot load or run the file, the result says so (error) instead of numbers.
    """
    result, tail = _run({"mode": "score", "model": str(path), "reference_dir": str(reference.folder)}, workdir,
                        "llama-cpp")
    if result is None:
        return {"error": tail or "llama.cpp exited without a result"}
    return result


def judge(result: dict[str, Any], reference, thresholds) -> dict[str, Any]:
    """The fidelity report for llama.cpp, with the checks of the transformers reload (verify.judge)."""
    if "error" in result:
        detail = f"llama.cpp ({installed_version()}) could not run the GGUF file: {result['error']}"
        return {"passed": False, "compared_with": "reference", "checks": [{"name": "llama_cpp_load", "ok": False,
                                                                          "detail": detail}],
                "generations": []}
    report = judge_reload(result, reference, thresholds)
    report["llama_cpp_version"] = result.get("llama_cpp_version")
    tok = result["tokenizer"]
    if tok["mismatched"] and tok.get("sentencepiece"):
        # llama.cpp prepends the sentencepiece space to every text run after a special token (and before text that
        # already starts with a space); Hugging Face's Metaspace does so only at the start of the input. The model
        # is compared on the trained ids either way; only text tokenized by llama.cpp itself differs.
        for check in report["checks"]:
            if check["name"] == "tokenizer":
                check["ok"] = None
                check["detail"] += (" (llama.cpp adds a space after special tokens in sentencepiece vocabularies, "
                                    "which Hugging Face's tokenizer does not: a known difference between the two)")
        report["passed"] = all(c["ok"] is not False for c in report["checks"])
    return report
