"""What a person sees: pictures scaled up to look at (data files kept native), the training start line and its
time estimate, and the denoising steps each sampler takes by default."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import inference
import sampling
import train_ddpm
from config import UserError


def as_uint8(image: torch.Tensor) -> np.ndarray:
    return (image * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------
# Scaling up for display
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side, factor", [(16, 16), (32, 8), (64, 4), (100, 3), (256, 1), (300, 1), (5000, 1)])
def test_display_factor_is_the_integer_that_reaches_display_size_and_never_shrinks(side, factor):
    assert sampling.display_factor(side, 256) == factor
    assert sampling.display_factor(side, 0) == 1, "display_size 0 keeps the native size"


def test_for_display_repeats_each_pixel_and_keeps_greyscale():
    images = torch.rand(2, 1, 5, 5)
    big = sampling.for_display(images, 20)
    assert big.shape == (2, 1, 20, 20)
    assert torch.equal(big, F.interpolate(images, scale_factor=4, mode="nearest"))
    assert sampling.for_display(images, 0) is images


def test_grid_cells_are_scaled_up_and_a_greyscale_grid_stays_grey(tmp_path):
    images = torch.rand(16, 1, 32, 32)
    sampling.save_grid(images, tmp_path / "grid.png", display_size=256)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.mode == "L"
    assert grid.size == (2 + 4 * (256 + 2), 2 + 4 * (256 + 2))  # 4x4 cells of 32 px shown at 8x
    cell = np.asarray(grid)[2:258, 2 + 258:2 + 258 + 256]  # the second image of the first row
    assert np.array_equal(cell, np.kron(as_uint8(images[1, 0]), np.ones((8, 8), dtype=np.uint8)))


def test_a_grid_of_many_images_is_scaled_up_less_to_stay_within_4096_px(tmp_path):
    # 900 images of 32 px in 30 columns: 8x would make a 7742 px square, so the factor drops to 4.
    assert sampling.display_factor(32, 256, cells_across=30) == 4
    images = torch.linspace(0, 1, 900).view(900, 1, 1, 1).expand(900, 3, 32, 32)
    sampling.save_grid(images, tmp_path / "many.png", display_size=256)
    width, height = Image.open(tmp_path / "many.png").size
    assert width == height == 2 + 30 * (4 * 32 + 2) <= sampling.MAX_DISPLAY_SIDE


def test_the_gif_shows_big_greyscale_frames_and_loops(tmp_path):
    frames = torch.rand(3, 1, 16, 16)
    sampling.save_gif(frames, tmp_path / "a.gif", fps=4, display_size=256)
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (256, 256) and gif.info["loop"] == 0 and gif.info["duration"] == 250
        rgb = np.asarray(gif.convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all(), "grey stays grey"


def test_training_grids_are_scaled_up(trained_run):
    out, _ = trained_run
    for name in ("sample_training_data.png", "samples_epoch_1.png", "final_samples.png"):
        assert Image.open(out / name).size == (2 + 2 * (256 + 2),) * 2, name  # 4 images of 16 px at 16x


def test_display_size_is_a_checked_flag_of_both_scripts():
    assert train_ddpm.parse_config(["--display_size", "0"])[0].training.display_size == 0
    assert inference.parse_config(["--model_path", "some/final_model", "--display_size", "0"]).display_size == 0
    for parse, argv in ((train_ddpm.parse_config, []), (inference.parse_config, ["--model_path", "some/final_model"])):
        with pytest.raises(UserError, match="--display_size must be at least 0"):
            parse([*argv, "--display_size", "-1"])


# ---------------------------------------------------------------------------------------------------
# Denoising steps: the sampler's default unless given
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, trained, steps", [
    ([], 1000, 25),  # heun: 25 steps, 49 network evaluations
    (["--scheduler", "ddpm"], 500, 500),  # ddpm takes every training timestep the model has
    (["--scheduler", "ddim"], 1000, 50),
    (["--scheduler", "dpmsolver++"], 1000, 50),
    (["--scheduler", "heun"], 20, 20),
    (["--interpolate"], 1000, 25),  # interp_scheduler heun
    (["--interpolate", "--interp_scheduler", "ddpm"], 1000, 1000),
    (["--scheduler", "ddim", "--num_inference_steps", "7"], 1000, 7),
    (["--interpolate", "--num_inference_steps", "1000"], 1000, 1000),
    (["--num_inference_steps", "none", "--scheduler", "unipc"], 1000, 50),
])
def test_inference_steps_are_the_samplers_default_unless_given(flags, trained, steps):
    cfg = inference.parse_config(["--model_path", "some/final_model", *flags])
    assert inference.sampler_and_steps(cfg, trained)[1] == steps


def test_interpolation_defaults_to_25_heun_steps_and_only_the_pictures_are_scaled(trained_run, tmp_path):
    out, _ = trained_run
    dest = tmp_path / "interp"
    assert inference.main(["--model_path", str(out / "final_model"), "--interpolate", "--interp_steps", "3",
                           "--output_dir", str(dest)]) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["scheduler"] == "heun"
    assert manifest["num_inference_steps"] == 25 and manifest["num_inference_steps_default"] is True
    for entry in manifest["files"]:
        assert Image.open(dest / entry["file"]).size == (16, 16), "frame PNGs are data: native size"
    with Image.open(dest / "interpolation.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (256, 256) and gif.info["loop"] == 0
        first = np.asarray(gif.convert("RGB"))
    assert np.array_equal(first, np.kron(first[::16, ::16], np.ones((16, 16, 1), dtype=np.uint8))), \
        "every model pixel is a 16x16 block"
    assert Image.open(dest / "interpolation_strip.png").size == (2 + 3 * (256 + 2), 256 + 4)


# ---------------------------------------------------------------------------------------------------
# The training start line and the time estimate on a CPU
# ---------------------------------------------------------------------------------------------------


def test_the_start_line_names_the_precision_and_a_short_run_gets_no_estimate(trained_run):
    _, proc = trained_run
    assert re.search(r"^training on 12 images, 1 process\(es\) on cpu, fp32: 6 optimizer steps ", proc.stdout, re.M)
    assert "quickstart" not in proc.stdout
    assert [train_ddpm.precision_name(p) for p in ("no", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_a_long_cpu_run_gets_one_estimate_line_with_a_hint(capsys):
    cpu = torch.device("cpu")
    train_ddpm.warn_if_long_on_cpu(cpu, steps_left=7200, seconds_per_step=1.0)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("notice:") and "about 2.0 hours" in lines[0]
    assert lines[0].endswith("for a quick look on a CPU try: python train_ddpm.py --model_preset quickstart")
    train_ddpm.warn_if_long_on_cpu(cpu, steps_left=100_000, seconds_per_step=10.0)
    assert "about 12 days" in capsys.readouterr().out
    train_ddpm.warn_if_long_on_cpu(cpu, steps_left=3000, seconds_per_step=1.0)  # under an hour
    train_ddpm.warn_if_long_on_cpu(torch.device("cuda"), steps_left=10**7, seconds_per_step=1.0)  # not on a GPU
    assert capsys.readouterr().out == ""
