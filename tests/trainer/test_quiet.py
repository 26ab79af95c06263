"""Library noise never reaches the user's screen: a command that loads a 4-bit model prints nothing on stderr."""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = """
import warnings
from ft_desk.trainer.quiet import quiet_libraries
quiet_libraries()
warnings.warn("a library's advice", FutureWarning)
from ft_desk.trainer.presets import load_config
from ft_desk.trainer.training.model import load_base
cfg = load_config(["qlora"], ["model.name={model}", "train.device=cpu"])
model, tokenizer, info = load_base(cfg, "cpu")
assert info.quantized
print("loaded")
"""


def test_loading_a_4bit_model_prints_no_bars_warnings_or_library_log_lines(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FT_DESK_HOME": str(tmp_path)}
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        env.pop(key, None)  # what a user's shell has: none of them
    done = subprocess.run([sys.executable, "-c", CHILD.format(model=tiny_model_dir)], env=env, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "loaded"
    assert done.stderr == ""  # no "Loading weights" bar, no FutureWarning, no bitsandbytes kernels-community line
