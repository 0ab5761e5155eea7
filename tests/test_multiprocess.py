"""Two real processes on the CPU (gloo): sharded data, outputs written once, previews, checkpoints that do not
depend on the process count (as a pretrained model, for inference, resumed by one process)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.data_loader import prepare_data_loader
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_ddpm
from conftest import ROOT, TINY_RUN, call, cli_env
from dataset import ImageCache, make_dataloader
from model import load_model


def launch(launcher: list[str], *args, script: Path = ROOT / "train_ddpm.py", env: dict = {}
           ) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *launcher, str(script), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**cli_env(), **env}, cwd=ROOT)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc


def loss_steps(event_file: Path) -> list[int]:
    events = EventAccumulator(str(event_file)).Reload()
    return [e.step for e in events.Scalars("train/loss")] if "train/loss" in events.Tags()["scalars"] else []


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port, not 29500


def test_two_processes_train_write_once_and_resume_in_one(image_folder, tmp_path, capsys):
    """Class-conditional, so that the labels are sharded with their images and the class names saved once."""
    out, labelled = tmp_path / "run", tmp_path / "labelled"
    for i, image in enumerate(sorted(p for p in image_folder.rglob("*") if p.is_file())):  # 12 images, 2 classes
        (labelled / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, labelled / "ab"[i % 2] / image.name)
    # 12 images, 2 per process: a global batch of 4, so 3 optimizer steps an epoch.
    args = [*TINY_RUN, "--train_batch_size", 2, "--dataset_name", "custom", "--dataset_path", labelled,
            "--data_dir", tmp_path / "data", "--output_dir", out, "--save_image_epochs", 1, "--save_model_epochs", 1,
            "--class_conditional"]
    first = launch(TORCHRUN, *args, "--max_train_steps", 4)
    assert first.stdout.count("training on 12 images, 2 process(es)") == 1
    assert first.stdout.count("2 classes from the sub-folders of") == 1
    assert first.stdout.count("done: 4 steps") == 1
    assert first.stdout.count("data: ") == 1, "the data is read and reported by the machine's main process"
    record = json.loads((out / "config.json").read_text())
    assert record["_provenance"]["num_processes"] == 2
    assert (out / "samples_epoch_1.png").exists() and (out / "checkpoint-epoch-1").exists()
    checkpoint = out / "checkpoint-epoch-1"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                            "random_states_1.pkl"]
    assert json.loads((checkpoint / "progress.json").read_text())["global_step"] == 3
    weights = load_file(checkpoint / "model.safetensors")
    assert not [k for k in weights if k.startswith("module.")], "weights are stored under the UNet's own names"

    # The checkpoint of a 2-process run as a model (--pretrained_model_path, --model_path): its EMA pipeline.
    saved = load_model(str(checkpoint))
    ema_unet = saved.unet.state_dict()
    pipeline_weights = load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(ema_unet["conv_in.weight"], weights["conv_in.weight"])  # EMA, not training
    assert torch.equal(ema_unet["conv_in.weight"], pipeline_weights["conv_in.weight"])
    assert saved.schedule["num_train_timesteps"] == 1000 and saved.record["_provenance"]["num_processes"] == 2
    assert saved.classes == ["a", "b"] and saved.unet.config.num_class_embeds == 3
    assert pipeline_weights.keys() == weights.keys()
    # A checkpoint written before checkpoints held a pipeline: training weights stored with DDP's prefix.
    old = tmp_path / "old-checkpoint"
    old.mkdir()
    shutil.copy(checkpoint / "config.json", old / "config.json")
    save_file({f"module.{k}": v for k, v in weights.items()}, old / "model.safetensors")
    assert torch.equal(load_model(str(old)).unet.state_dict()["conv_in.weight"], weights["conv_in.weight"])

    # The final checkpoint made to look as before checkpoint.py (weights under DDP's names, no pipeline, no
    # skipped_steps, lr_segment or save sequence), then resumed by one process in the middle of epoch 2: another data
    # layout, so it goes on at the start of epoch 3 and says so.
    final = out / "checkpoint-step-4"
    final_weights = load_file(final / "model.safetensors")
    save_file({f"module.{k}": v for k, v in final_weights.items()}, final / "model.safetensors")
    shutil.rmtree(final / "unet"), shutil.rmtree(final / "scheduler"), (final / "model_index.json").unlink()
    for progress_file in out.glob("checkpoint-*/progress.json"):
        progress = json.loads(progress_file.read_text())
        progress_file.write_text(json.dumps({k: v for k, v in progress.items()
                                             if k not in ("skipped_steps", "lr_segment", "sequence")}))
    resumed = call(train_ddpm.main, ["--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps",
                                     6], capsys)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert "processes 2 -> 1" in resumed.stdout and "start of epoch 3" in resumed.stdout
    assert "curve had reached 0 at step 4" in resumed.stdout  # the old run's LR curve, ended at its 4 steps
    assert resumed.stdout.count("done: 6 steps") == 1
    assert json.loads((out / "checkpoint-step-6" / "progress.json").read_text())["epoch"] == 2
    assert (out / "final_model" / "model_index.json").exists() and load_model(str(out / "final_model")).classes == [
        "a", "b"]
    event_files = list((out / "logs").rglob("events.out.tfevents.*"))
    steps = sorted(step for f in event_files for step in loss_steps(f))
    assert steps == [1, 2, 3, 4, 5, 6]  # written by one process only, and resumed from where the run ended


def test_resumed_by_more_processes_with_another_accumulation_while_the_cache_builds_slowly(image_folder, tmp_path,
                                                                                          capsys):
    """One process stops in the middle of an epoch, after 3 micro-steps (accelerate saves that count in
    random_states_0.pkl); two processes resume it with --gradient_accumulation_steps 2, 2 micro-steps an epoch each.
    Process 0 would restore count 3 and process 1, new, start at 0: in the first epoch process 0 would step its
    optimizer at count 4 and at the epoch's end, process 1 only at the end, so their gradients would be averaged
    across different steps and every later epoch would end at another step on each (on the previous code process 1
    saved checkpoint-epoch-2 at step 4 while process 0 trained on, and their next collectives timed out). Every process
    saves every checkpoint at the same step.

    The resumed run reads its images from a new --data_dir, whose cache takes 10 s to build (tests/train_with_hooks.py)
    while --ddp_timeout is 5 s: a barrier held by the second process for the whole build would time out (gloo honours
    the timeout as NCCL does; on the previous code this run failed so)."""
    out = tmp_path / "run"
    args = [*TINY_RUN, "--train_batch_size", 3, "--dataset_name", "custom", "--dataset_path", image_folder,
            "--output_dir", out]
    first = call(train_ddpm.main, [*args, "--data_dir", tmp_path / "data", "--max_train_steps", 3], capsys)
    assert first.returncode == 0 and "done: 3 steps" in first.stdout
    assert json.loads((out / "checkpoint-step-3" / "progress.json").read_text())["batches_in_epoch"] == 3

    started = time.monotonic()
    resumed = launch(TORCHRUN, *args, "--data_dir", tmp_path / "new_data", "--resume_from_checkpoint", "latest",
                     "--max_train_steps", 6, "--gradient_accumulation_steps", 2, "--save_model_epochs", 1,
                     "--ddp_timeout", 5, script=ROOT / "tests" / "train_with_hooks.py", env={"SLOW_CACHE_S": "10"})
    assert time.monotonic() - started > 10 and list((tmp_path / "new_data" / "cache").glob("*.npy"))
    assert "processes 1 -> 2, gradient_accumulation_steps 1 -> 2" in resumed.stdout
    saves = re.findall(r"process (\d) saves (\S+) at global step (\d+)", resumed.stdout)
    by_process = {p: [(name, int(step)) for q, name, step in saves if q == p] for p in ("0", "1")}
    # 2 micro-steps a process an epoch: one optimizer step an epoch, epochs 2, 3 and 4 (1-based) after the resume.
    assert by_process["0"] == by_process["1"] == [("checkpoint-epoch-2", 4), ("checkpoint-epoch-3", 5),
                                                  ("checkpoint-epoch-4", 6)], resumed.stdout
    assert resumed.stdout.count("done: 6 steps") == 1


def test_each_image_is_seen_once_per_epoch_across_processes(tmp_path):
    count, batch, processes = 10, 2, 2
    labels = np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1).repeat(2, axis=2).repeat(2, axis=3)
    np.save(tmp_path / "images.npy", labels)
    dataset = ImageCache(tmp_path / "images.npy", count, in_memory=True)
    orders = []
    for epoch in range(2):
        seen = []
        for rank in range(processes):
            loader, order = make_dataloader(dataset, batch, processes, seed=3, workers=0, pin_memory=False)
            order.start_epoch(epoch)
            shard = prepare_data_loader(loader, num_processes=processes, process_index=rank, put_on_device=False)
            batches = [b[:, 0, 0, 0].tolist() for b in shard]
            assert all(len(b) == batch for b in batches)  # every batch full
            seen += [i for b in batches for i in b]
        # The global batch is 4: 8 of the 10 images this epoch, none twice.
        assert len(seen) == len(set(seen)) == count // (batch * processes) * batch * processes
        orders.append(seen)
    assert orders[0] != orders[1], "a new order every epoch"
    assert torch.equal(dataset.__getitems__([3, 1])[:, 0, 0, 0], torch.tensor([3, 1], dtype=torch.uint8))
