"""The headless command line: one module per command, each with `add_arguments(parser)` and `run(args) -> int`.
Argument parsing and printing only; the work is done by the rooms. `main.py` dispatches."""
