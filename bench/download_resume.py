"""Resumable downloads: what a cancelled `ft-desk models download` costs the next run, and the fetch speed, each
against huggingface_hub's hf_hub_download (which restarts the file in flight) measured in the same run.

Both talk to the tests' hub-compatible server on 127.0.0.1 (tests/trainer/hub/fake_hub.py), run in its own process:
  1. cancel (SIGTERM, as the TUI does) after 25%, 50% and 90% of a 16 MiB weight file has been sent, run the
     download again, and report how many bytes the second run asked for;
  2. fetch a 256 MiB file into a fresh cache, best of 3, and print the time ratio ft-desk / hf_hub_download
     (ft-desk also hashes every byte it receives).

    python bench/download_resume.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "trainer" / "hub"))

REPO, FILE = "acme/big", "model.safetensors"


def _repo_files(work: Path, weight_mib: int) -> dict[str, bytes]:
    import numpy as np
    from safetensors.numpy import save

    from ft_desk.trainer.demo import TinyShape, build_tiny_model

    tiny = build_tiny_model(work / f"tiny-{weight_mib}", TinyShape(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256))
    files = {p.name: p.read_bytes() for p in tiny.iterdir() if p.is_file()}
    weights = np.random.default_rng(0).standard_normal(weight_mib << 18).astype(np.float32)
    files[FILE] = save({"w": weights})
    return files


def _env(url: str, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=url, HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf-home"),
               HF_HUB_DISABLE_XET="1")
    return env


HF_CANCELLABLE = ("import signal\n"
                  "def stop(*_): raise KeyboardInterrupt\n"
                  "signal.signal(signal.SIGTERM, stop)\n"
                  "from huggingface_hub import hf_hub_download\n"
                  f"hf_hub_download({REPO!r}, {FILE!r})")
COMMANDS = {
    "hf_hub_download": ["-c", HF_CANCELLABLE],
    "ft-desk": ["-m", "ft_desk.trainer.cli.main", "models", "download", REPO, "--json"],
}


def resume_cost(work: Path) -> None:
    from fake_hub import FakeHub, Repo

    files = _repo_files(work, 16)
    size = len(files[FILE])
    server = FakeHub().start()
    server.add(Repo(REPO, files))
    key = (REPO, FILE)
    print(f"1. cancel a {size / 2**20:.0f} MiB weight file part-way, then download again: bytes asked for again")
    try:
        for fraction in (0.25, 0.5, 0.9):
            again = {}
            for name, argv in COMMANDS.items():
                cache = work / f"{name}-{fraction}" / "hub"
                cache.mkdir(parents=True)
                server.slow[key] = 0.004  # 16 KB per 4 ms, ~4 MB/s
                server.trickled.pop(key, None)
                child = subprocess.Popen([sys.executable, *argv], env=_env(server.url, cache),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                while server.trickled.get(key, 0) < fraction * size:
                    time.sleep(0.01)
                child.send_signal(signal.SIGTERM)
                child.wait()
                del server.slow[key]
                before = len(server.requests)
                subprocess.run([sys.executable, *argv], env=_env(server.url, cache), check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                gets = [r for r in server.requests[before:] if r.method == "GET" and r.path.endswith("/" + FILE)]
                start = int(gets[-1].headers.get("range", "bytes=0-")[len("bytes="):].rstrip("-"))
                again[name] = (size - start) / size
            print(f"   cancelled at {fraction:4.0%}: hf_hub_download {again['hf_hub_download']:6.1%}   "
                  f"ft-desk {again['ft-desk']:6.1%}")
    finally:
        server.stop()


def _serve(queue, files) -> None:
    from fake_hub import FakeHub, Repo

    server = FakeHub()
    server.add(Repo(REPO, files))
    server.start()
    queue.put(server.url)
    while True:
        time.sleep(3600)


def fetch_speed(work: Path) -> None:
    files = _repo_files(work, 256)
    queue = mp.Queue()
    proc = mp.Process(target=_serve, args=(queue, files), daemon=True)
    proc.start()
    url = queue.get()
    code = ("import sys, time\n"
            "from huggingface_hub import hf_hub_download\n"
            "from ft_desk.trainer.hub.download import DownloadProgress, _Fetch, plan_download\n"
            "plan = plan_download(%r)\n"
            "[weights] = [f for f in plan.files if f.path == %r]\n"
            "cache = sys.argv[2]\n"
            "t = time.perf_counter()\n"
            "if sys.argv[1] == 'hf':\n"
            "    hf_hub_download(%r, %r, revision=plan.commit, cache_dir=cache)\n"
            "else:\n"
            "    from pathlib import Path\n"
            "    folder = Path(cache) / 'models--acme--big'\n"
            "    _Fetch(%r, None, plan.commit, weights, folder, DownloadProgress(None, %r, weights.size, 1)).run()\n"
            "print(time.perf_counter() - t)\n") % (REPO, FILE, REPO, FILE, REPO, REPO)
    best = {}
    try:
        for name in ("hf", "ft-desk"):
            times = []
            for attempt in range(3):
                cache = work / f"speed-{name}-{attempt}" / "hub"
                out = subprocess.run([sys.executable, "-c", code, name, str(cache)], env=_env(url, cache),
                                     check=True, capture_output=True, text=True).stdout
                times.append(float(out.split()[-1]))
            best[name] = min(times)
    finally:
        proc.terminate()
    mib = len(files[FILE]) / 2**20
    print(f"2. fetch one {mib:.0f} MiB file, best of 3: hf_hub_download {best['hf']:.2f} s, "
          f"ft-desk {best['ft-desk']:.2f} s; ft-desk / hf_hub_download time = {best['ft-desk'] / best['hf']:.2f}x")


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        resume_cost(work)
        fetch_speed(work)


if __name__ == "__main__":
    main()
