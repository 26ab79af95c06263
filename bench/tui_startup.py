"""Time from launching `ft-desk` to its first frame on screen, against a bare Textual app measured the same way.

Each program runs in a real pseudo-terminal (100x30, xterm-256color), as a user would start it; the clock stops
when the terminal output contains text only the first frame shows ("Welcome to ft-desk" for the app, a fixed
greeting for the baseline). The app runs against an empty FT_DESK_HOME, i.e. a first launch. Target: under 1.5 s.

    python bench/tui_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]")
TARGET_S = 1.5

BASELINE = """
from textual.app import App
from textual.widgets import Footer, Header, Static

class Bare(App):
    def compose(self):
        yield Header()
        yield Static("baseline first frame")
        yield Footer()

Bare().run()
"""


def time_to_text(argv: list[str], marker: bytes, env: dict[str, str], timeout: float = 30.0) -> float:
    """Seconds from spawning `argv` in a pty until `marker` appears in what it draws."""
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                            close_fds=True)
    os.close(slave)
    seen = b""
    elapsed = float("nan")
    try:
        while time.perf_counter() - start < timeout:
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            seen += chunk
            if marker in ANSI.sub(b"", seen):
                elapsed = time.perf_counter() - start
                break
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        os.close(master)
    if elapsed != elapsed:
        raise RuntimeError(f"{argv[-1][:40]!r} never drew {marker!r}; output tail: {ANSI.sub(b'', seen)[-300:]!r}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="ft-desk-bench-")
    env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor", "FT_DESK_HOME": home}
    programs = [
        ("python -c pass (interpreter only)", [sys.executable, "-c", "print('ready')"], b"ready"),
        ("bare Textual app (baseline)", [sys.executable, "-c", BASELINE], b"baseline first frame"),
        ("ft-desk (first launch)", [sys.executable, "-m", "ft_desk.tui.entry"], b"Welcome to ft-desk"),
    ]
    results: dict[str, list[float]] = {}
    for _ in range(args.runs):  # interleaved, so a busy machine slows every program alike
        for name, argv, marker in programs:
            results.setdefault(name, []).append(time_to_text(argv, marker, env))
    print(f"time to first frame, median of {args.runs} runs (100x30 pty):")
    for name, times in results.items():
        print(f"  {name:<36} {statistics.median(times):6.3f} s   (min {min(times):.3f}, max {max(times):.3f})")
    app = statistics.median(results["ft-desk (first launch)"])
    bare = statistics.median(results["bare Textual app (baseline)"])
    print(f"ft-desk / bare Textual: {app / bare:.2f}x; ft-desk - bare Textual: {app - bare:+.3f} s")
    print(f"target < {TARGET_S} s: {'met' if app < TARGET_S else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
