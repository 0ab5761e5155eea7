"""End to end: train_ddpm.py on a tiny UNet writes everything the README lists; inference.py uses it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import inference
import train_ddpm
from conftest import EPOCHS, STEPS_PER_EPOCH, TINY_RUN, call, run_cli


def test_training_writes_every_output_the_readme_lists(trained_run):
    out, proc = trained_run
    for name in ("logs", "sample_training_data.png", "samples_epoch_1.png", "samples_epoch_2.png",
                 "checkpoint-epoch-2", "final_model", "final_samples.png", "config.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint-epoch-1").exists()  # save_model_epochs 2
    assert not list(out.rglob("*.partial")), "no temporary files may be left behind"
    assert "done: 6 steps" in proc.stdout  # the grids' sizes: test_display


def test_final_model_is_a_diffusers_pipeline_with_the_resolved_config(trained_run):
    from diffusers import DDPMPipeline

    out, _ = trained_run
    pipeline = DDPMPipeline.from_pretrained(out / "final_model")
    assert pipeline.unet.config.sample_size == 16
    assert list(pipeline.unet.config.block_out_channels) == [16, 32]
    assert pipeline.scheduler.config.num_train_timesteps == 1000
    # The defaults' noise levels, evenly spaced in ln(sigma) from EDM's 0.002 to 80, and a time MLP that reads only
    # the timestep sinusoids of at most 3.2 radians (the 16-channel UNet's 3 slowest of 8): stock diffusers classes.
    alpha_bar = pipeline.scheduler.alphas_cumprod
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    assert sigma[0] == pytest.approx(0.002, rel=2e-3) and sigma[-1] == pytest.approx(80, rel=1e-3)
    read = pipeline.unet.time_embedding.linear_1.weight.ne(0).any(dim=0).tolist()
    assert read == [False] * 5 + [True] * 3 + [False] * 5 + [True] * 3
    record = json.loads((out / "final_model" / "config.json").read_text())
    assert record["training"]["seed"] == 7
    assert record["training"]["dataset_name"] == "custom"
    assert record["_provenance"]["versions"]["diffusers"]
    assert json.loads((out / "config.json").read_text()) == record


def test_tensorboard_log_holds_loss_lr_and_images(trained_run):
    out, _ = trained_run
    (event_dir,) = {p.parent for p in (out / "logs").rglob("events.out.tfevents.*")
                    if EventAccumulator(str(p)).Reload().Tags()["scalars"]}
    events = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "images": 0}).Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert all(0 < e.value < 10 for e in losses)
    assert len(events.Scalars("train/lr")) == len(losses)
    assert set(events.Tags()["images"]) >= {"samples", "final_samples", "training_data"}
    assert len(events.Images("samples")) == EPOCHS
    assert events.Tags()["graph"], "the model graph is logged"
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config as text
    hparams = [p for p in (out / "logs").rglob("events.out.tfevents.*") if p.parent != event_dir]
    assert hparams, "the hyper-parameters are logged (TensorBoard writes them to a run of their own)"


def test_inference_generates_images_addressed_by_seed(trained_run, tmp_path):
    out, _ = trained_run
    dest = tmp_path / "gen"  # a checkpoint folder holds the EMA pipeline too, as final_model/ does
    ran = run_cli("inference.py", "--model_path", out / "checkpoint-epoch-2", "--num_images", 5,
                  "--num_inference_steps", 5, "--seed", 42, "--grid_size", 3, "--batch_size", 2, "--output_dir", dest)
    assert "kept in float32" not in ran.stderr  # diffusers' spurious warning on a dtype cast is not passed on
    manifest = json.loads((dest / "manifest.json").read_text())
    assert [f["seed"] for f in manifest["files"]] == [42, 43, 44, 45, 46]
    assert manifest["scheduler"] == "heun" and manifest["num_inference_steps"] == 5
    assert manifest["num_inference_steps_default"] is False
    for entry in manifest["files"]:
        assert Image.open(dest / entry["file"]).size == (16, 16)  # data: native size
    assert Image.open(dest / "grid.png").size == (2 + 3 * 258, 2 + 2 * 258)  # 3 per row, 2 rows, shown at 16x


def test_interpolation_is_smooth_on_a_briefly_trained_model(image_folder, tmp_path, capsys):
    out = tmp_path / "run"  # in-process: a new process would add only its imports
    trained = call(train_ddpm.main, [*TINY_RUN, "--dataset_name", "custom", "--dataset_path", image_folder,
                                     "--data_dir", tmp_path / "data", "--output_dir", out, "--max_train_steps", 60,
                                     "--learning_rate", "2e-3", "--lr_scheduler", "constant", "--logging_steps", 20,
                                     "--save_image_epochs", 100], capsys)
    assert trained.returncode == 0, trained.stderr[-3000:]
    dest = tmp_path / "interp"
    assert inference.main([str(a) for a in ("--model_path", out / "final_model", "--interpolate", "--interp_steps",
                                            6, "--num_inference_steps", 10, "--output_dir", dest)]) == 0
    pixels = [np.asarray(Image.open(f), dtype=np.float64) for f in sorted(dest.glob("frame_*.png"))]
    neighbours = [np.abs(a - b).mean() for a, b in zip(pixels, pixels[1:])]
    # A straight path would give 1/5 of the endpoint distance; independent images would give about 1.
    assert np.mean(neighbours) < 0.5 * np.abs(pixels[0] - pixels[-1]).mean()
    assert min(neighbours) > 0, "no frame is a copy of its neighbour"


def test_dry_run_prints_the_resolved_config_and_does_nothing(image_folder, tmp_path, capsys):
    # In-process: a subprocess would add only its ~5 s of imports.
    code = train_ddpm.main(["--dataset_name", "custom", "--dataset_path", str(image_folder), "--output_dir",
                            str(tmp_path / "out"), "--model_preset", "ddpm-cifar10", "--learning_rate", "3e-4",
                            "--dry_run"])
    assert code == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model"]["block_out_channels"] == [128, 256, 256, 256]  # from the preset
    assert resolved["training"]["learning_rate"] == 3e-4  # a flag beats the preset
    assert not (tmp_path / "out").exists()
