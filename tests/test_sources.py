"""Every dataset a user already has: ZIP archives read in place, phone photos upright, and a cache that does not
grow. Every test builds its own data. One CLI training run per kind of source; the rest in-process."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import train_ddpm
from config import Config
from conftest import TINY_RUN, make_image_folder, run_cli
from test_bad_input import assert_user_error, call


# ---------------------------------------------------------------------------------------------------
# Data the tests build
# ---------------------------------------------------------------------------------------------------


def sideways_jpeg() -> bytes:
    """A phone photo: stored 32x16 with red on top and blue below, and EXIF orientation 6 (turn 90 degrees
    clockwise to show it). Shown upright it is 16x32, blue on the left and red on the right."""
    stored = Image.new("RGB", (32, 16), "red")
    stored.paste((0, 0, 255), (0, 8, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def assert_upright(image: torch.Tensor) -> None:
    """uint8 [3,16,16] of sideways_jpeg() as cached: blue left half, red right half (not red top, blue bottom)."""
    left, right = image[:, :, :6].float().mean((1, 2)), image[:, :, 10:].float().mean((1, 2))
    assert left[2] > 200 and left[0] < 60 and right[0] > 200 and right[2] < 60, (left, right)


def make_zip(path: Path, folder: Path, *, deflate: bool = True) -> Path:
    """The folder's images in a ZIP, plus a sub-folder holding the phone photo and a corrupt PNG, a text file
    and the Finder's __MACOSX metadata (neither an image)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(file, file.relative_to(folder).as_posix())
        archive.writestr("sub/deeper/phone.jpg", sideways_jpeg())
        archive.writestr("sub/broken.png", (folder / "img01.png").read_bytes()[:60])
        archive.writestr("notes.txt", "not an image")
        archive.writestr("__MACOSX/sub/deeper/._phone.jpg", b"\x00\x05\x16\x07 resource fork")
    return path


def config_for(name: str, data_dir: Path, **data) -> Config:
    cfg = Config()
    cfg.training.dataset_name, cfg.training.image_size = str(name), 16
    cfg.data.data_dir = str(data_dir)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def cached(cache: dataset.ImageCache) -> torch.Tensor:
    return cache.__getitems__(list(range(len(cache))))


def cache_meta(cache: dataset.ImageCache) -> dict:
    return json.loads(cache.path.with_suffix(".json").read_text())


def data_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("data: "))


def train(tmp_path: Path, *args) -> tuple[str, Path]:
    """A two-step CLI training run; returns what it printed and its output folder."""
    out = tmp_path / "out"
    proc = run_cli("train_ddpm.py", *TINY_RUN, "--max_train_steps", 2, "--data_dir", tmp_path / "data",
                   "--output_dir", out, *args)
    assert "Traceback" not in proc.stderr
    assert (out / "final_model" / "model_index.json").exists()
    return proc.stdout + proc.stderr, out


# ---------------------------------------------------------------------------------------------------
# One training run per kind of source, through the CLI
# ---------------------------------------------------------------------------------------------------


def test_a_zip_trains_and_skips_its_corrupt_member(tmp_path):
    archive = make_zip(tmp_path / "images.zip", make_image_folder(tmp_path / "images", count=8))
    output, _ = train(tmp_path, "--dataset_name", "custom", "--dataset_path", archive)
    warning = next(line for line in output.splitlines() if line.startswith("warning:"))
    assert f"skipped 1 of 10 images in {archive}" in warning and "sub/broken.png" in warning
    assert data_line(output) == (f"data: {archive}: 9 images at 16px, 3 channels (colour images such as img01.png), "
                                 f"1 skipped; random flips off")
    assert "training on 9 images" in output


# ---------------------------------------------------------------------------------------------------
# The pixels: as the plain pipeline makes them, and upright
# ---------------------------------------------------------------------------------------------------


def test_zip_members_cache_as_the_same_files_in_a_folder_do(tmp_path):
    folder = make_image_folder(tmp_path / "images", count=6)
    for deflate in (True, False):
        archive = make_zip(tmp_path / f"images-{deflate}.zip", folder, deflate=deflate)
        cache = dataset.load_dataset(config_for("custom", tmp_path / "data", dataset_path=str(archive)), progress=False)
        source = dataset.open_source(config_for("custom", tmp_path / "data", dataset_path=str(archive)))
        read = [m for i, m in enumerate(source.members) if i not in cache_meta(cache)["skipped"]]
        assert len(source.members) == 8 and len(read) == len(cache) == 7 and "sub/broken.png" not in read
        images = dict(zip(read, cached(cache)))
        assert_upright(images.pop("sub/deeper/phone.jpg"))
        for member, image in images.items():
            assert torch.equal(image, torch.tensor(dataset.decode_file(str(folder / member), 16))), member


def test_a_phone_photo_in_a_folder_is_upright(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "phone.jpg").write_bytes(sideways_jpeg())
    assert Image.open(tmp_path / "photos" / "phone.jpg").size == (32, 16)  # stored sideways
    cache = dataset.load_dataset(config_for("custom", tmp_path / "data", dataset_path=str(tmp_path / "photos")),
                                 progress=False)
    assert_upright(cache[0])


def test_a_zip_source_reaches_loader_workers_as_a_small_pickle(tmp_path):
    archive = make_zip(tmp_path / "images.zip", make_image_folder(tmp_path / "images", count=3))
    source = dataset.open_source(config_for("custom", tmp_path, dataset_path=str(archive)))
    source.read(0, 8, 3)  # the ZIP is open in this process now; a worker opens its own
    data = pickle.dumps(source)
    assert len(data) < 20_000  # the path and member names, not the images
    assert np.array_equal(pickle.loads(data).read(1, 8, 3), source.read(1, 8, 3))


# ---------------------------------------------------------------------------------------------------
# The cache does not grow without end
# ---------------------------------------------------------------------------------------------------


def test_a_changed_zip_replaces_its_cache(tmp_path):
    data = tmp_path / "data"
    archive = make_zip(tmp_path / "images.zip", make_image_folder(tmp_path / "images", count=4))
    zipped = dataset.load_dataset(config_for("custom", data, dataset_path=str(archive)), progress=False)
    dataset.load_dataset(config_for("custom", data, dataset_path=str(archive), num_channels="1"), progress=False)
    assert len(zipped) == 5 and len(list((data / "cache").glob("*.npy"))) == 2  # another slot: kept
    with zipfile.ZipFile(archive, "a") as zip_file:
        zip_file.writestr("more/extra.png", (tmp_path / "images" / "img01.png").read_bytes())
    assert len(dataset.load_dataset(config_for("custom", data, dataset_path=str(archive)), progress=False)) == 6
    assert not zipped.path.exists() and not zipped.path.with_suffix(".json").exists()
    assert len(list((data / "cache").glob("*.npy"))) == len(list((data / "cache").glob("*.json"))) == 2


# ---------------------------------------------------------------------------------------------------
# A user's mistakes: one `error:` line each, exit code 2 (in-process)
# ---------------------------------------------------------------------------------------------------


def test_a_zip_without_images_is_one_line(tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("readme.txt", "no images here")
    result = call(train_ddpm.main, [*TINY_RUN, "--dataset_name", "custom", "--dataset_path", tmp_path / "empty.zip",
                                    "--data_dir", tmp_path / "data", "--output_dir", tmp_path / "out"], capsys)
    assert_user_error(result, "holds no images", "ZIP")
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_a_file_that_is_not_a_zip_is_caught_before_any_work(tmp_path, capsys):
    (tmp_path / "not_a.zip").write_text("plain text")
    result = call(train_ddpm.main, ["--dataset_name", "custom", "--dataset_path", tmp_path / "not_a.zip",
                                    "--output_dir", tmp_path / "out", "--dry_run"], capsys)
    assert_user_error(result, "not_a.zip", "not a folder or a ZIP archive")
