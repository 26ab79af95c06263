"""`ft-desk runs`: the runs on this machine, newest first (also the data behind the app's Home screen)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ft_desk.trainer import run_folder
from ft_desk.trainer.paths import runs_home


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.add_argument("--runs-dir", help="folder holding the runs (default: the per-user data folder)")


def list_runs(runs_dir: str | None = None) -> list[dict[str, Any]]:
    """The rows of `ft-desk runs --json`, newest first (run_folder.list_runs under the runs folder)."""
    return run_folder.list_runs(runs_home(runs_dir))


def run(args: argparse.Namespace) -> int:
    runs = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps({"runs": runs}, indent=1))
        return 0
    if not runs:
        print("no runs yet - start one with: ft-desk demo")
        return 0
    print(f"{'status':<10} {'steps':>9} {'best val':>9}  {'model':<28} run")
    for r in runs:
        steps = f"{r['step'] or 0}/{r['total_steps'] or '?'}"
        best = f"{r['best_val_loss']:.4f}" if r["best_val_loss"] is not None else "-"
        print(f"{r['status']:<10} {steps:>9} {best:>9}  {str(r['model_name'])[:28]:<28} {Path(r['run_dir']).name}")
    return 0
