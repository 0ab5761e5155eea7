"""The training step never waits for the GPU. On a CPU nothing waits, so the proof counts the calls that would: a few
hundred real training steps with every tensor method that forces a host sync patched to count its callers. None may
come from the step itself or the loop around it; the loss read at log steps and the saves are where syncs belong."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import train_ddpm
from conftest import ROOT, TINY_RUN, call, make_bars_folder

# Tensor methods that copy a value to the host (and so wait for the GPU to get there).
SYNCING = ("item", "__bool__", "tolist", "cpu", "numpy", "nonzero", "__int__", "__float__", "__index__", "__array__")
# Where the hot path runs: the loop in train() itself, the step and everything it calls (libraries and the toolkit's
# helpers included), the log window's add.
HOT = {"train", "train_step", "add", "to_model_input", "seed_micro_step"}
STEP = "train_step"  # wholly hot: every toolkit function below it counts too (train() also calls log and save code)
PROJECT = {str(path) for path in ROOT.glob("*.py")}


def hot_caller() -> str | None:
    """The innermost function of the toolkit's own modules on the stack, if it is on the hot path: named in HOT, or
    called (at any depth) from the training step. Calls made by torch's DataLoader do not count: its seeds and indices
    are CPU tensors by design (a new iterator draws its base seed with .item() each epoch), so they never wait for a
    GPU."""
    frame, innermost = sys._getframe(2), None
    while frame is not None:
        if "/torch/utils/data/" in frame.f_code.co_filename:
            return None
        if frame.f_code.co_filename in PROJECT:
            name = frame.f_code.co_name
            first = innermost is None
            innermost = innermost or f"{Path(frame.f_code.co_filename).name}:{name}:{frame.f_lineno}"
            if name == STEP or (first and name in HOT):
                return innermost
            if name == "train":  # the loop: what it calls outside the step (logs, saves) is not hot
                return None
        frame = frame.f_back
    return None


@pytest.fixture
def sync_calls(monkeypatch):
    """Counts hot-path calls of SYNCING methods by caller, once the training loop has started."""
    calls, looping = Counter(), []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            where = hot_caller() if looping else None
            if where:
                calls[f"{name} in {where}"] += 1
            return original(self, *args, **kwargs)
        return method

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    class LoopStart(train_ddpm.StopSignal):  # built just before the loop's first step
        def __init__(self):
            super().__init__()
            looping.append(True)

    monkeypatch.setattr(train_ddpm, "StopSignal", LoopStart)
    return calls


@pytest.mark.parametrize("accumulation, conditional", [(1, False), (2, True)])
def test_no_host_sync_in_training_steps(image_folder, tmp_path, capsys, sync_calls, accumulation, conditional):
    """The second case also trains class-conditionally: the labels' copy and the class dropout stay on the device."""
    steps = 300 // accumulation
    data = make_bars_folder(tmp_path / "bars") if conditional else image_folder
    result = call(train_ddpm.main, [*TINY_RUN, "--dataset_name", "custom", "--dataset_path", data,
                                    "--data_dir", tmp_path / "data", "--output_dir", tmp_path / "out",
                                    "--train_batch_size", 2, "--gradient_accumulation_steps", accumulation,
                                    "--max_train_steps", steps, "--logging_steps", 50, "--checkpointing_steps", 100,
                                    "--save_image_epochs", 1000, "--save_model_epochs", 1000,
                                    *(["--class_conditional"] if conditional else [])], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: {steps} steps" in result.stdout
    assert ("class-conditional" in result.stdout) == conditional
    assert not sync_calls, f"host syncs in {steps} training steps: {dict(sync_calls)}"
