"""Training that survives: exact resume, preemption, SIGKILL, NaN steps, overwrite protection, fine-tuning."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_RUN, cli_env, run_cli

# 12 images in batches of 4: 3 optimizer steps an epoch, so step 4 is in the middle of epoch 2.
# A warm-up schedule makes the LR change across the resume point without depending on the run's length.
EXACT = TINY_RUN + ["--random_flip", "--dropout", "0.1", "--lr_scheduler", "constant_with_warmup",
                    "--lr_warmup_steps", "6", "--checkpointing_steps", "4", "--save_image_epochs", "100"]


def train_args(image_folder: Path, out: Path, *extra) -> list:
    return [*EXACT, "--dataset_name", "custom", "--dataset_path", image_folder, "--data_dir", out.parent / "data",
            "--output_dir", out, *extra]


def load_checkpoint_state(path: Path) -> dict[str, object]:
    return {
        "model": load_file(path / "model.safetensors"),
        "ema": torch.load(path / "custom_checkpoint_0.pkl", weights_only=False),
        "optimizer": torch.load(path / "optimizer.bin", weights_only=False),
        "progress": json.loads((path / "progress.json").read_text()),
    }


def assert_identical(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_mid_epoch_is_bit_identical(image_folder, tmp_path, accumulation):
    steps = 8
    straight = tmp_path / "straight"
    run_cli("train_ddpm.py", *train_args(image_folder, straight, "--max_train_steps", steps,
                                         "--gradient_accumulation_steps", accumulation, "--train_batch_size", 2))
    halves = tmp_path / "halves"
    run_cli("train_ddpm.py", *train_args(image_folder, halves, "--max_train_steps", steps // 2,
                                         "--gradient_accumulation_steps", accumulation, "--train_batch_size", 2))
    resumed = run_cli("train_ddpm.py", "--output_dir", halves, "--resume_from_checkpoint", "latest",
                      "--max_train_steps", steps)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    a = load_checkpoint_state(straight / f"checkpoint-step-{steps}")
    b = load_checkpoint_state(halves / f"checkpoint-step-{steps}")
    assert a["progress"]["batches_in_epoch"] % accumulation == 0
    assert_identical(a["model"], b["model"], "model")
    assert_identical(a["ema"], b["ema"], "ema")
    assert_identical(a["optimizer"], b["optimizer"], "optimizer")
    assert_identical(a["progress"], b["progress"], "progress")
    # The EMA weights differ from the training weights, and final_model/ holds the EMA ones.
    final = load_file(halves / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    name = "conv_in.weight"
    assert not torch.equal(final[name], b["model"][name])


def start_training(image_folder: Path, out: Path, *extra) -> subprocess.Popen:
    args = train_args(image_folder, out, "--max_train_steps", 10_000_000, *extra)  # far longer than an hour
    return subprocess.Popen([sys.executable, str(ROOT / "train_ddpm.py"), *map(str, args)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for training to get going")
        time.sleep(0.2)


def progress_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "progress.json").read_text())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_checkpoints_and_the_run_resumes_to_the_end(image_folder, tmp_path, signum):
    out = tmp_path / "run"
    proc = start_training(image_folder, out)
    wait_for(lambda: (out / "checkpoint-step-4" / "progress.json").exists(), proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "--resume_from_checkpoint latest" in stderr
    assert "Traceback" not in stderr
    assert "--model_preset quickstart" in stdout, "a CPU run this long is told its time and a quicker start"
    latest = max((p for p in out.glob("checkpoint-step-*")), key=lambda p: progress_of(p)["global_step"])
    stopped_at = progress_of(latest)["global_step"]
    assert stopped_at >= 4
    resumed = run_cli("train_ddpm.py", "--output_dir", out, "--resume_from_checkpoint", "latest",
                      "--max_train_steps", stopped_at + 2)
    assert f"done: {stopped_at + 2} steps" in resumed.stdout
    assert (out / "final_model" / "model_index.json").exists()


def test_sigkill_resumes_from_the_last_complete_checkpoint(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = start_training(image_folder, out, "--checkpointing_steps", 2)
    wait_for(lambda: (out / "checkpoint-step-6" / "progress.json").exists(), proc)
    proc.kill()
    proc.communicate()
    # What a crash during a save leaves behind must never be picked up.
    (out / "checkpoint-step-99999.partial").mkdir()
    (out / "checkpoint-step-99998").mkdir()  # no progress.json: incomplete
    complete = max(progress_of(p)["global_step"] for p in out.glob("checkpoint-step-*") if (p / "progress.json").exists())
    resumed = run_cli("train_ddpm.py", "--output_dir", out, "--resume_from_checkpoint", "latest",
                      "--max_train_steps", complete + 3)
    assert f"at step {complete}" in resumed.stdout
    assert f"done: {complete + 3} steps" in resumed.stdout


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_advice(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train_ddpm.py", *train_args(image_folder, out, "--learning_rate", "1e30", "--lr_scheduler",
                                                "constant", "--max_nonfinite_steps", 3, "--max_train_steps", 50),
                   check=False)
    assert proc.returncode == 3, proc.stderr
    assert "NaN/inf" in proc.stderr and "--learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    (checkpoint,) = out.glob("checkpoint-step-*")
    state = load_checkpoint_state(checkpoint)
    assert state["progress"]["nonfinite_steps"] >= 3
    assert all(torch.isfinite(w).all() for w in state["model"].values()), "skipped steps leave the weights finite"
    assert not (out / "final_model").exists()


def test_overwrite_output_dir_starts_afresh(image_folder, tmp_path):
    out = tmp_path / "run"
    run_cli("train_ddpm.py", *train_args(image_folder, out, "--max_train_steps", 4))
    assert (out / "checkpoint-step-4").exists()  # refused without the flag: test_existing_run_is_not_overwritten
    run_cli("train_ddpm.py", *train_args(image_folder, out, "--max_train_steps", 2, "--overwrite_output_dir"))
    assert not (out / "checkpoint-step-4").exists()
    assert json.loads((out / "config.json").read_text())["training"]["max_train_steps"] == 2


def test_seed_is_drawn_and_recorded_and_old_checkpoints_rotate(image_folder, tmp_path):
    out = tmp_path / "run"
    run_cli("train_ddpm.py", *train_args(image_folder, out, "--max_train_steps", 4, "--seed", "none",
                                         "--checkpointing_steps", 1, "--checkpoints_total_limit", 2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-step-3", "checkpoint-step-4"]
    seed = json.loads((out / "config.json").read_text())["training"]["seed"]
    assert isinstance(seed, int)
    assert json.loads((out / "final_model" / "config.json").read_text())["training"]["seed"] == seed


def test_fine_tuning_from_final_model_with_frozen_encoder(image_folder, tmp_path):
    base = tmp_path / "base"
    run_cli("train_ddpm.py", *train_args(image_folder, base, "--max_train_steps", 2))
    tuned = tmp_path / "tuned"
    run_cli("train_ddpm.py", *train_args(image_folder, tuned, "--max_train_steps", 3, "--pretrained_model_path",
                                         base / "final_model", "--freeze_down_blocks", "--no_use_ema",
                                         "--learning_rate", "1e-2", "--lr_scheduler", "constant"))
    before = load_file(base / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(tuned / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in before if k.startswith(("down_blocks.", "conv_in."))]
    trained = [k for k in before if k.startswith("up_blocks.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    mismatch = run_cli("train_ddpm.py", *train_args(image_folder, tmp_path / "bad", "--max_train_steps", 1,
                                                    "--pretrained_model_path", base / "final_model",
                                                    "--image_size", 32), check=False)
    assert mismatch.returncode == 2 and "--image_size 16" in mismatch.stderr
