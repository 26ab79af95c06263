"""Import rules from STYLE.md: the CLI's --help loads no torch; trainer/ and quant/ never import textual."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "bitsandbytes", "peft")


def test_cli_help_imports_no_heavy_library():
    code = (
        "import sys, contextlib, io\n"
        "from ft_desk.tui.entry import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imported_modules(folder: Path):
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module


def test_trainer_and_quant_never_import_textual():
    for folder in ("trainer", "quant"):
        for path, module in _imported_modules(ROOT / folder):
            assert not module.startswith("textual"), f"{path} imports {module}"
            assert not module.startswith("ft_desk.tui"), f"{path} imports {module}: imports flow tui -> trainer"


def test_quant_does_not_import_trainer_internals():
    allowed = {"ft_desk.trainer.errors", "ft_desk.trainer.config", "ft_desk.trainer.paths",
               "ft_desk.trainer.demo", "ft_desk.trainer.hub.folder_check", "ft_desk.trainer.presets"}
    for path, module in _imported_modules(ROOT / "quant"):
        if module.startswith("ft_desk.trainer"):
            assert module in allowed, f"{path} imports {module}: quant/ sits below trainer/"
