"""The import-linter contracts in pyproject.toml hold on the real tree, and each one can fail.

A contract that cannot fail guards nothing (a typo in a module name makes import-linter check an empty set), so
for every contract a copy of the source gets one wrong import and lint-imports must name that import. The copy is
put under a temporary `ft_desk/` folder and lint-imports runs with `python -S`, so neither the editable install
nor any .pth file can point import-linter back at the real tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
SOURCE_ROOTS = ("trainer", "quant", "tui", "presets")
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"

# contract id -> (file of the copy, the wrong import added to it, the line lint-imports must report)
WRONG_IMPORTS = {
    "layers": ("quant/policy.py", "from ft_desk.trainer.config import RunConfig",
               "ft_desk.quant.policy -> ft_desk.trainer.config"),
    "tui-no-torch": ("tui/app.py", "import torch", "ft_desk.tui.app -> torch"),
    "tui-public-surface": ("tui/app.py", "import ft_desk.trainer.evaluate.metrics",
                           "ft_desk.tui.app -> ft_desk.trainer.evaluate.metrics"),
    "trainer-no-textual": ("trainer/config.py", "import textual", "ft_desk.trainer.config -> textual"),
    "hub-layers": ("trainer/hub/names.py", "import ft_desk.trainer.hub.search",
                   "ft_desk.trainer.hub.names -> ft_desk.trainer.hub.search"),
}


def _site_dirs() -> list[str]:
    """The site-packages folders of this interpreter (import-linter and its dependencies live there)."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]


def _lint(package_parent: Path, contract: str, cwd: Path) -> subprocess.CompletedProcess:
    """lint-imports for one contract, with `ft_desk` found only under package_parent."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_parent), *_site_dirs()])}
    return subprocess.run(
        [sys.executable, "-S", "-c", LINT_IMPORTS, str(PYPROJECT), "--contract", contract, "--no-cache", "--no-logo"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def _copy_tree(dest: Path) -> Path:
    """The source folders as the `ft_desk` namespace under dest; returns dest (what goes on PYTHONPATH)."""
    for name in SOURCE_ROOTS:
        shutil.copytree(ROOT / name, dest / "ft_desk" / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _link_tree(dest: Path) -> Path:
    for name in SOURCE_ROOTS:
        (dest / "ft_desk").mkdir(parents=True, exist_ok=True)
        (dest / "ft_desk" / name).symlink_to(ROOT / name, target_is_directory=True)
    return dest


def _add_line(path: Path, line: str) -> None:
    text = path.read_text(encoding="utf-8")
    path.write_text(text + ("" if text.endswith("\n") else "\n") + line + "\n", encoding="utf-8")


def test_every_contract_has_a_wrong_import_that_breaks_it():
    ids = re.findall(r'^id = "([^"]+)"', PYPROJECT.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert sorted(ids) == sorted(WRONG_IMPORTS)


@pytest.mark.parametrize("contract", sorted(WRONG_IMPORTS))
def test_real_tree_keeps_contract(contract, tmp_path):
    result = _lint(_link_tree(tmp_path / "src"), contract, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("contract", sorted(WRONG_IMPORTS))
def test_wrong_import_breaks_contract(contract, tmp_path):
    relative, wrong_import, reported = WRONG_IMPORTS[contract]
    src = _copy_tree(tmp_path / "src")
    _add_line(src / "ft_desk" / relative, wrong_import)
    result = _lint(src, contract, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 kept, 1 broken" in result.stdout
    assert reported in result.stdout


def test_hub_module_outside_the_layers_breaks_hub_layers(tmp_path):
    """`exhaustive`: a new hub module must be given its place in the layers."""
    src = _copy_tree(tmp_path / "src")
    (src / "ft_desk" / "trainer" / "hub" / "mirror.py").write_text('"""A hub module in no layer."""\n')
    result = _lint(src, "hub-layers", tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ft_desk.trainer.hub.mirror" in result.stdout
