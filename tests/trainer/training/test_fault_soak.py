"""The short version of bench/fault_soak.py: a few SIGKILLs of real training and export child processes at random
moments, each run resumed (or exported again) to the end, compared with an uninterrupted run bit for bit."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[3] / "bench" / "fault_soak.py"


def _bench():
    spec = importlib.util.spec_from_file_location("fault_soak", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_few_kills_anywhere_resume_bit_exact_and_lose_no_file(tmp_path):
    bench = _bench()
    lines: list[str] = []
    figures = bench.soak(tmp_path, kills=3, export_kills=1, seed=7, threads=1, say=lines.append)
    summary = bench.report(figures) + "\n" + "\n".join(lines)
    assert figures.kills == 3, summary
    assert figures.trials >= 1 and figures.bit_exact == figures.trials, summary
    assert figures.files_lost == 0 and not figures.problems, summary
    assert figures.export_kills == 1 and figures.exports_completed_after_kill == 1, summary
