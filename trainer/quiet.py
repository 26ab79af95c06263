"""Library noise stays off the user's screen: progress bars, advisory warnings and log lines of the ML libraries.

Every command calls `quiet_libraries()` before it imports torch or transformers. Then:
- transformers' and huggingface_hub's tqdm bars ("Loading weights", "Writing model shards") are off: ft-desk
  reports its own progress as events, and a bar written into a piped event stream is garbage;
- transformers logs errors only (its own stderr handler prints every advisory warning otherwise);
- Python warnings (FutureWarning, UserWarning, DeprecationWarning from torch, transformers, peft) go to logging,
  and logging without a handler of ours goes nowhere instead of to stderr. A training run attaches its run.log
  handler to the root logger, so there they are kept in the run's log, e.g. bitsandbytes' "Failed to load CPU
  gemm_4bit_forward from kernels-community" (it is harmless: bitsandbytes falls back to its own kernel).
Stdlib only; environment variables are only set where the user did not set them.
"""

from __future__ import annotations

import logging
import os
import sys

ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # read by huggingface_hub, and by transformers for its own bars
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_libraries() -> None:
    """Keep library progress bars, warnings and log lines off stderr (see the module docstring)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())  # no "last resort" printing of other libraries' warnings
    logging.captureWarnings(True)
    if "transformers" in sys.modules:  # imported before us: the environment came too late for it
        from transformers.utils import logging as hf_logging  # already imported, costs nothing

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
