"""The app must never load the training stack: importing it and building the app leaves torch, transformers,
bitsandbytes and peft out of sys.modules (checked in a fresh interpreter)."""

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "bitsandbytes", "peft")

PROBE = """
import json, sys
import ft_desk.tui
import ft_desk.tui.app
from ft_desk.tui.entry import main
from ft_desk.tui.app import FtDeskApp
from ft_desk.tui.screens import data, evaluate, export, home, model, recipe, train
app = FtDeskApp()
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))
""" % (HEAVY,)


def test_importing_and_building_the_app_loads_no_training_library():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == []


def test_the_app_modules_do_not_import_the_training_stack_anywhere():
    # Not even inside a function: the UI only renders what the trainer's child process says.
    from pathlib import Path

    import ft_desk.tui

    root = Path(ft_desk.tui.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            words = line.strip().split()
            if len(words) >= 2 and words[0] in ("import", "from") and words[1].split(".")[0] in HEAVY:
                offenders.append(f"{path.name}:{number}")
    assert offenders == []
