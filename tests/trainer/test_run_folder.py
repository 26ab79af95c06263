"""A run whose state.json says `running` is only treated as live while an ft-desk process really owns the pid."""

from __future__ import annotations

import subprocess
import sys
import time

from ft_desk.trainer.training.run import pid_alive


def test_only_a_live_ft_desk_process_counts_as_the_runs_owner():
    ft_desk_like = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "ft_desk"])
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    finished = subprocess.Popen([sys.executable, "-c", "pass", "ft_desk"])
    try:
        deadline = time.monotonic() + 30
        while not _is_zombie(finished.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # exited but not yet reaped: a zombie that still holds its pid
        assert pid_alive(ft_desk_like.pid)
        assert not pid_alive(stranger.pid)  # a pid reused by an unrelated program
        assert not pid_alive(finished.pid)
    finally:
        for proc in (ft_desk_like, stranger, finished):
            proc.kill()
            proc.wait()
    assert not pid_alive(finished.pid)  # reaped and gone
    assert not pid_alive(None) and not pid_alive("1234")


def _is_zombie(pid: int) -> bool:
    import psutil

    return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
