"""Editing a user's images with inference.py, in-process on untrained tiny models: inpainting (RePaint) keeps the
kept pixels exactly, in greyscale and RGB, for DDPM and --parameterization edm models; each result is addressed by (image, seed) whatever the batch; SDEdit at
strength 1 is plain generation. (The bad inputs are in test_bad_input.py; what it draws, in bench/inpaint.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
import inference
from conftest import call, save_tiny_pipeline

# Cheap RePaint: 6 steps, one jump back of 3 steps drawn twice (9 network evaluations an image).
QUICK_REPAINT = ["--num_inference_steps", "6", "--jump_length", "3", "--jump_n_sample", "2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Untrained 16px pipelines by channel count, and "edm": an RGB one saved as a --parameterization edm run."""
    root = tmp_path_factory.mktemp("models")
    return {**{channels: save_tiny_pipeline(root / f"c{channels}", size=16, channels=channels) for channels in (1, 3)},
            "edm": save_tiny_pipeline(root / "edm", size=16, channels=3, edm=True)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of two images, an RGB one at the model's size and a greyscale one of another shape (resized and
    cropped), and a folder of their masks under the same names."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "in" / "sub").mkdir(parents=True)
    (root / "masks" / "sub").mkdir(parents=True)
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / "in" / "rgb.png")
    Image.fromarray((rng.random((20, 26)) * 255).astype(np.uint8)).save(root / "in" / "sub" / "grey.jpg", quality=95)
    right_half = np.zeros((16, 16), np.uint8)
    right_half[:, 8:] = 255
    Image.fromarray(right_half).save(root / "masks" / "rgb.png")
    centre = np.zeros((20, 26), np.uint8)
    centre[6:14, 9:17] = 255
    Image.fromarray(centre).save(root / "masks" / "sub" / "grey.png")
    return root / "in", root / "masks"


def results(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest and each result's pixels [H, W, C] by file name."""
    manifest = json.loads((out / "manifest.json").read_text())
    pixels = {}
    for entry in manifest["files"]:
        array = np.asarray(Image.open(out / entry["file"]), dtype=np.int16)
        pixels[entry["file"]] = array[..., None] if array.ndim == 2 else array
    return manifest, pixels


@pytest.mark.parametrize("model", [1, 3, "edm"])
def test_inpainting_keeps_the_kept_pixels_exactly(model, models, photos, capsys, tmp_path):
    images, masks = photos
    channels = 3 if model == "edm" else model
    out = tmp_path / "out"
    result = call(inference.main, ["--model_path", models[model], "--inpaint", images, "--mask", masks,
                                   "--num_images", 2, *QUICK_REPAINT, "--output_dir", out], capsys)
    assert result.returncode == 0, result.stderr
    manifest, pixels = results(out)
    assert manifest["mode"] == "inpaint" and manifest["scheduler"] == "repaint" and manifest["seeds"] == [0, 1]
    assert [e["file"] for e in manifest["files"]] == ["rgb_seed000000.png", "rgb_seed000001.png",
                                                      "sub_grey_seed000000.png", "sub_grey_seed000001.png"]
    for entry in manifest["files"]:
        expected = dataset.decode_file(entry["image"], 16, channels).transpose(1, 2, 0)  # as training reads it
        painted = dataset.to_array(Image.open(entry["mask"]), 16, 1)[0] >= 128
        got = pixels[entry["file"]]
        assert got.shape == (16, 16, channels)
        # Kept pixels: exactly the image (the issue allows 1/255; RePaint's last step puts the image back as it is).
        assert np.array_equal(got[~painted], expected[~painted]), entry["file"]
        assert np.abs(got[painted] - expected[painted]).mean() > 10, "the masked region is painted anew"
    first, second = (pixels[f"rgb_seed00000{seed}.png"] for seed in (0, 1))
    assert not np.array_equal(first, second), "two seeds give two alternatives"
    grid = Image.open(out / "inpaint_grid.png")  # per image: the image, its mask and 2 results, each shown at 16x
    assert grid.size == (2 + 4 * 258, 2 + 2 * 258) and grid.mode == ("L" if channels == 1 else "RGB")


@pytest.mark.parametrize("model, mode", [(3, ["--inpaint", "{images}", "--mask", "{masks}", *QUICK_REPAINT]),
                                         ("edm", ["--inpaint", "{images}", "--mask", "{masks}", *QUICK_REPAINT]),
                                         (3, ["--init_image", "{images}", "--strength", "0.5", "--scheduler", "ddpm",
                                              "--num_inference_steps", "10"])],
                         ids=["repaint", "repaint_edm", "sdedit_ddpm"])
def test_a_result_depends_on_its_image_and_seed_not_on_the_batch(model, mode, models, photos, capsys, tmp_path):
    """Both samplers draw noise at every step (RePaint also when it jumps back), from each result's own generator."""
    images, masks = photos
    args = [str(a).replace("{images}", str(images)).replace("{masks}", str(masks)) for a in mode]
    runs = {}
    for name, extra in {"one_by_one": ["--num_images", 3, "--batch_size", 1],
                        "mixed_batches": ["--num_images", 3, "--batch_size", 4],  # a batch spans both images
                        "seed_1_alone": ["--num_images", 1, "--seed", 1, "--batch_size", 8]}.items():
        result = call(inference.main, ["--model_path", models[model], *args, *extra, "--output_dir", tmp_path / name],
                      capsys)
        assert result.returncode == 0, result.stderr
        runs[name] = results(tmp_path / name)[1]
    assert sorted(runs["seed_1_alone"]) == ["rgb_seed000001.png", "sub_grey_seed000001.png"]
    for name, files in runs.items():
        for file, pixels in files.items():
            # Equal up to float rounding of convolutions batched differently: at most one level, rarely.
            difference = np.abs(pixels - runs["one_by_one"][file])
            assert difference.max() <= 1 and difference.mean() < 0.01, (name, file)
    one = runs["one_by_one"]
    assert not np.array_equal(one["rgb_seed000000.png"], one["rgb_seed000001.png"])


def test_strength_one_is_plain_generation_and_less_runs_that_share_of_the_steps(models, photos, capsys, tmp_path):
    images, _ = photos
    common = ["--model_path", models[1], "--scheduler", "ddim", "--num_inference_steps", 10, "--seed", 3,
              "--num_images", 2, "--batch_size", 2]
    runs = {}
    for name, extra in {"plain": [], "full": ["--init_image", images / "rgb.png", "--strength", 1.0],
                        "half": ["--init_image", images / "rgb.png", "--strength", 0.5]}.items():
        assert call(inference.main, [*common, *extra, "--output_dir", tmp_path / name], capsys).returncode == 0
        runs[name] = tmp_path / name
    plain = {s: np.asarray(Image.open(runs["plain"] / f"seed00000{s}.png")) for s in (3, 4)}
    full_manifest, full = results(runs["full"])
    half_manifest, half = results(runs["half"])
    assert full_manifest["steps_run"] == 10 and half_manifest["steps_run"] == 5  # int(10 x 0.5), as diffusers
    for seed in (3, 4):
        assert np.array_equal(full[f"rgb_seed00000{seed}.png"][..., 0], plain[seed])
        assert not np.array_equal(half[f"rgb_seed00000{seed}.png"][..., 0], plain[seed])
    assert Image.open(runs["half"] / "edit_grid.png").size == (2 + 3 * 258, 2 + 258)  # the image and 2 results
