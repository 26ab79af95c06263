"""The `ft-desk` console script: no arguments opens the terminal app, anything else is the headless CLI.

Kept tiny and import-light: the CLI path never imports textual, the app path never imports torch.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        from ft_desk.tui.app import run_app  # textual is imported only when the app opens

        return run_app()
    from ft_desk.trainer.cli.main import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
