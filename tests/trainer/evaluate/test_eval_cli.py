"""`ft-desk eval` as the TUI runs it: a child process whose stdout is JSON Lines events ending in the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "ft_desk.trainer.cli.main", "eval"]


def _run(args, home: Path, tmp_path: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FT_DESK_HOME=str(home), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONUNBUFFERED="1")
    env.pop("FT_DESK_EMBEDDING_MODEL", None)
    env.update(extra_env)
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=900)


def test_json_mode_streams_events_and_ends_with_the_result(memorized_run, eval_files, session_home, tmp_path,
                                                          tiny_encoder):
    proc = _run([str(memorized_run), "--data", str(eval_files["train"]), "--limit", "3", "--metrics",
                 "exact,stop,semantic", "--json"], session_home, tmp_path, FT_DESK_EMBEDDING_MODEL=str(tiny_encoder))
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is events and nothing else
    types = [e["type"] for e in events]
    assert types[0] == "eval_started" and types[-2:] == ["eval_report", "eval_finished"]
    assert "eval_progress" in types
    result = events[-1]
    assert result["status"] == "completed" and result["exit_code"] == 0 and result["examples"] == 3
    names = {m["name"] for m in result["metrics"]}
    assert names == {"exact_match", "normalized_exact_match", "stop_rate", "semantic_similarity"}
    assert result["timings"]["semantic"]["model"].startswith("FT_DESK_EMBEDDING_MODEL=")
    saved = json.loads(Path(result["report_json"]).read_text(encoding="utf-8"))
    assert saved["metrics"] == result["metrics"] and len(saved["rows"]) == 3
    assert Path(result["report_md"]).is_file()


def test_bad_input_is_one_sentence_and_a_failed_event(memorized_run, session_home, tmp_path):
    proc = _run([str(memorized_run), "--metrics", "exact,bogus", "--json"], session_home, tmp_path)
    assert proc.returncode == 2
    last = json.loads(proc.stdout.splitlines()[-1])
    assert last["type"] == "eval_finished" and last["status"] == "failed" and "bogus" in last["error"]
    assert "ft-desk: --metrics: unknown metric 'bogus'" in proc.stderr and "Traceback" not in proc.stderr

    proc = _run([str(memorized_run.parent / "no-such-run")], session_home, tmp_path)
    assert proc.returncode == 2 and "no run folder or run named" in proc.stderr and "Traceback" not in proc.stderr
