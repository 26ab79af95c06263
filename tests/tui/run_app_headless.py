"""Runs the app headless with the fake backend and starts the demo run, until it is killed (test helper).

    python run_app_headless.py RUNS_DIR
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import FIXED_NOW, FakeBackend  # noqa: E402

from ft_desk.tui.app import FtDeskApp  # noqa: E402


async def start_demo(pilot) -> None:
    await pilot.pause(0.5)
    await pilot.press("d")
    while True:  # keep the app running until the test kills it
        await asyncio.sleep(1)


def main() -> None:
    runs_dir = Path(sys.argv[1])
    backend = FakeBackend(runs_dir, hold_after=2)
    app = FtDeskApp(backend=backend, clock=lambda: FIXED_NOW, settings=runs_dir.parent / "settings.json")
    app.run(headless=True, size=(100, 30), auto_pilot=start_demo)


if __name__ == "__main__":
    main()
