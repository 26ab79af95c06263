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


def test_quant_imports_nothing_of_trainer_but_its_errors():
    # quant/ is the arithmetic below trainer/: RunConfig, presets, the Hub and files reach it as plain data.
    for path, module in _imported_modules(ROOT / "quant"):
        if module.startswith("ft_desk.trainer"):
            assert module == "ft_desk.trainer.errors", f"{path} imports {module}: quant/ sits below trainer/"
        assert not module.startswith("ft_desk.tui"), f"{path} imports {module}: quant/ sits below tui/ too"


def test_tui_reaches_quant_only_through_the_trainer():
    for path, module in _imported_modules(ROOT / "tui"):
        assert not module.startswith("ft_desk.quant"), f"{path} imports {module}: imports flow tui -> trainer -> quant"


HUB_LAYERS = ("names", "gguf_file", "ollama_store", "credentials", "remote", "folder_check", "cache", "gguf_import",
              "resolve", "download", "search")


def test_hub_modules_import_only_the_layers_below_them():
    hub = ROOT / "trainer" / "hub"
    assert sorted(HUB_LAYERS) == sorted(p.stem for p in hub.glob("*.py") if p.stem != "__init__")
    for path, module in _imported_modules(hub):
        if module.startswith("ft_desk.trainer.hub."):
            used = module.rsplit(".", 1)[1]
            assert HUB_LAYERS.index(used) < HUB_LAYERS.index(path.stem), f"{path} imports {module}: a cycle in hub/"
