"""A real train_ddpm.py run, fed by the real dataset code, timed from its TensorBoard train/img_per_s scalars.

Used by train_throughput.py --full_run. The data is a generated folder of images (bench/common.py's
make_image_folder, 8 batches' worth) unless data_dir holds CIFAR-10 (cifar-10-batches-py) or real images.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def full_run(flags: list[str], cfg, precision: str, steps: int, logging_steps: int, cpu_threads: Optional[int],
             data_dir: Optional[str] = None) -> dict:
    """img/s of a real train_ddpm.py run: median of its TensorBoard train/img_per_s windows after the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from common import make_image_folder

    t = cfg.training
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if data_dir and (Path(data_dir) / "cifar-10-batches-py").is_dir():
            data = ["--dataset_name", "cifar10", "--data_dir", data_dir]
        else:
            folder = data_dir or make_image_folder(tmp / "images", count=max(8 * t.train_batch_size, 64),
                                                   size=(t.image_size + 8, t.image_size + 4))
            data = ["--dataset_name", "custom", "--dataset_path", str(folder), "--data_dir", str(tmp / "data")]
        cmd = [sys.executable, str(ROOT / "train_ddpm.py"), *flags, *data, "--output_dir", str(tmp / "run"),
               "--train_batch_size", str(t.train_batch_size), "--max_train_steps", str(steps),
               "--logging_steps", str(logging_steps), "--mixed_precision", precision, "--seed", "0",
               "--save_image_epochs", "1000000", "--save_model_epochs", "1000000", "--num_preview_images", "4",
               "--sample_num_inference_steps", "2"] + (["--compile"] if t.compile else [])
        env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
        if cpu_threads:  # a CPU run
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(cpu_threads))
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"train_ddpm.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        events = EventAccumulator(str(next((tmp / "run" / "logs").rglob("events.out.tfevents.*")).parent))
        events.Reload()
        windows = [s.value for s in events.Scalars("train/img_per_s")]
    return {"img_per_s": statistics.median(windows[1:] or windows), "windows": len(windows),
            "wall_s": round(wall, 1), "img_per_s_wall": steps * t.train_batch_size / wall, "data": data[1]}
