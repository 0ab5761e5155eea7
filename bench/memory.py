"""Memory of 1 against 2 training processes on one machine: is the dataset held once per machine?

    python bench/memory.py                       # this checkout
    python bench/memory.py --code /tmp/old_tree  # another checkout of the repository (before/after a change)

Makes an MNIST of --images random images in the real IDX format (so the real loader runs offline), caches it at
--image_size, then for 1 and 2 processes (torchrun, CPU) runs:
- `touch`: each process opens the dataset as train_ddpm.py does and reads every image once (what one epoch does
  to the data's memory), then holds it for a moment;
- `train`: a 3-step train_ddpm.py run of the tests' tiny UNet on that data.
Every 50 ms it reads /proc/PID/smaps_rollup of each worker process and reports the peaks: RSS per process, the
sum of RSS, and the sum of PSS (shared pages divided among the processes sharing them: the machine's real cost).
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import TINY_MODEL  # noqa: E402  (its --image_size is overridden below)

TOUCH = """
import sys, time
sys.path.insert(0, sys.argv[1])
import train_ddpm
from dataset import load_dataset
cfg, _ = train_ddpm.parse_config(sys.argv[2:])
data = load_dataset(cfg.training.dataset_name, cfg.training.image_size, cfg.data, progress=False)
for start in range(0, len(data), 1000):
    data.__getitems__(list(range(start, min(start + 1000, len(data)))))
time.sleep(1.0)
"""


def write_mnist(data_dir: Path, count: int) -> None:
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    images = (np.random.default_rng(0).random((count, 28, 28)) * 255).astype(np.uint8)
    for split, n in (("train", count), ("t10k", 16)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images[:n].tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(n))


def rollup(pid: int) -> dict[str, int]:
    """kB values of /proc/PID/smaps_rollup (Rss, Pss, ...)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0])
    return values


def workers(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (the workers, not the torchrun launcher)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(marker.encode() in part for part in cmdline) and b"torch.distributed.run" not in cmdline:
                found.append(int(entry.name))
    return found


def measure(command: list[str], marker: str, env: dict) -> dict[str, float]:
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_rss, peak_sum_rss, peak_sum_pss, peak_count = 0, 0, 0, 0
    while proc.poll() is None:
        rss, pss = [], []
        for pid in workers(marker):
            try:
                values = rollup(pid)
            except (OSError, ValueError):
                continue
            rss.append(values.get("Rss", 0))
            pss.append(values.get("Pss", 0))
        if rss:
            peak_rss, peak_count = max(peak_rss, max(rss)), max(peak_count, len(rss))
            peak_sum_rss, peak_sum_pss = max(peak_sum_rss, sum(rss)), max(peak_sum_pss, sum(pss))
        time.sleep(0.05)
    output = proc.communicate()[0]
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    mb = 1 / 1024
    return {"processes_seen": peak_count, "peak_rss_per_process_mb": peak_rss * mb,
            "peak_sum_rss_mb": peak_sum_rss * mb, "peak_sum_pss_mb": peak_sum_pss * mb}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose train_ddpm.py is measured")
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--runs", nargs="+", choices=["touch", "train"], default=["touch", "train"], help="what to run")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ddpm-memory-bench")
    args = parser.parse_args(argv)
    data_dir = args.work / "data"
    if not (data_dir / "MNIST").exists():
        write_mnist(data_dir, args.images)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    data = ["--dataset_name", "mnist", "--data_dir", str(data_dir), "--image_size", str(args.image_size), "--seed", "0"]
    # Build the cache once, outside the measured runs.
    subprocess.run([sys.executable, "-c", TOUCH, str(args.code), *TINY_MODEL, *data], env=env, check=True)
    cache = max((data_dir / "cache").glob("*.npy"), key=lambda p: p.stat().st_mtime)
    print(f"code {args.code}; cache {cache.name}: {cache.stat().st_size / 2**20:.0f} MB")
    script = args.work / "touch_dataset.py"
    script.write_text(TOUCH)
    for processes in args.processes:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        out = args.work / f"run-{processes}"
        commands = {
            "touch": ([*launcher, str(script), str(args.code), *TINY_MODEL, *data], str(script)),
            "train": ([*launcher, str(args.code / "train_ddpm.py"), *TINY_MODEL, *data, "--output_dir", str(out),
                       "--overwrite_output_dir", "--max_train_steps", "3", "--train_batch_size", "4",
                       "--num_preview_images", "4", "--sample_num_inference_steps", "2", "--logging_steps", "1",
                       "--dataloader_num_workers", "0"], str(args.code / "train_ddpm.py"))}
        for name in args.runs:
            result = measure(*commands[name], env)
            print(f"{processes} process(es), {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
