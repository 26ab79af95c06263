"""The wheel is what users install, and the editable install the tests use hides what it lacks: a subpackage left
out of the wheel, or a YAML preset not declared as package data, still imports from the repo. So this builds the
wheel, installs it into a fresh venv where the editable install is not active, and imports every module from there.

The fresh venv reuses the dependencies already installed (a .pth file lists this interpreter's site-packages),
so nothing is downloaded but the build backend (build isolation fetches setuptools>=77 from the package index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("trainer", "quant", "tui", "presets")
BUILD_FILES = ("setup.py", "pyproject.toml", "README.md")

# Imports each module named on stdin's JSON list; prints {module: file} or {module: "ERROR ..."}.
IMPORT_ALL = """
import importlib, json, sys, traceback
found = {}
for name in json.load(sys.stdin):
    try:
        found[name] = importlib.import_module(name).__file__
    except BaseException:
        found[name] = "ERROR " + traceback.format_exc(limit=3)
print(json.dumps(found))
"""


def _site_dirs() -> list[str]:
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source so the build leaves no build/ or egg-info in the repo."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    for name in SOURCE_ROOTS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(src)],
         cwd=work, timeout=600)
    (built,) = (work / "dist").glob("ft_desk-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """(python, site-packages) of a new venv with only the wheel installed; dependencies come through a .pth."""
    home = tmp_path_factory.mktemp("fresh-venv")
    venv.EnvBuilder(with_pip=False).create(home)
    python = home / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=home).stdout.strip())
    # Plain path lines: the folders join sys.path, but their own .pth files (the editable finder) are not run.
    (purelib / "zz_shared_dependencies.pth").write_text("\n".join(_site_dirs()) + "\n", encoding="utf-8")
    # --ignore-installed: pip sees the editable ft-desk through the .pth and must not try to replace it.
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
         cwd=home, timeout=600)
    return python, purelib


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _source_files(folder: str, pattern: str) -> list[str]:
    """Repo files as wheel paths (`ft_desk/<folder>/...`)."""
    return sorted(f"ft_desk/{folder}/{p.relative_to(ROOT / folder).as_posix()}"
                  for p in (ROOT / folder).rglob(pattern) if "__pycache__" not in p.parts)


@pytest.mark.slow
def test_wheel_has_every_module_and_data_file(wheel):
    names = _wheel_names(wheel)
    expected = [name for root in SOURCE_ROOTS for name in _source_files(root, "*.py")]
    data = (_source_files("presets", "*.yaml") + _source_files("trainer/assets", "*.jsonl")
            + _source_files("trainer/assets", "*.txt") + _source_files("tui", "*.tcss"))
    # The data the app cannot start or train the demo without, named so an empty glob cannot pass.
    for must in ("ft_desk/presets/qlora.yaml", "ft_desk/presets/hardware/cpu.yaml",
                 "ft_desk/trainer/assets/support_desk.jsonl", "ft_desk/tui/app.tcss"):
        assert must in data
    missing = [name for name in expected + data if name not in names]
    assert not missing, f"not in {wheel.name}: {missing}"


@pytest.mark.slow
def test_every_module_imports_from_the_installed_wheel(wheel, fresh_venv):
    python, purelib = fresh_venv
    modules = sorted(
        name[: -len(".py")].removesuffix("/__init__").replace("/", ".")
        for name in _wheel_names(wheel)
        if name.startswith("ft_desk/") and name.endswith(".py") and not name.endswith("/__main__.py")
    )
    assert "ft_desk.trainer.cli.main" in modules and "ft_desk.tui.app" in modules
    out = _run([str(python), "-c", IMPORT_ALL], input=json.dumps(modules), cwd=purelib.parent, timeout=600).stdout
    found = json.loads(out)
    errors = {name: file for name, file in found.items() if file is None or file.startswith("ERROR")}
    assert not errors, errors
    elsewhere = {name: file for name, file in found.items()
                 if not Path(file).resolve().is_relative_to(purelib.resolve())}
    assert not elsewhere, f"loaded from outside the fresh venv ({purelib}): {elsewhere}"
