"""Every dataset a user already has: Hugging Face datasets (a save_to_disk folder, parquet files through
load_dataset, Hub ids), ZIP archives read in place, phone photos upright, and a cache that does not grow.
Offline: every test builds its own data, and the Hub is unreachable. One training run per kind of source, in-process
(train_ddpm.main), and unit tests for the rest."""

from __future__ import annotations

import ast
import io
import json
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import train_ddpm
from config import Config
from conftest import ROOT, TINY_RUN, assert_user_error, call, load_cached, make_image_folder


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No network for the datasets library, in this process and in the CLI runs (which copy os.environ)."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("hf_datasets_cache")
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        for name, value in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(cache),
                                http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                                HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9").items():
            patch.setenv(name, value)
        yield


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


def colour_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((20 + i % 3, 24 + i % 5, 3)) * 255).astype(np.uint8)) for i in range(count)]


def hf_dataset(count: int = 11, grey: bool = False, seed: int = 0) -> datasets.Dataset:
    """`count` PIL images (greyscale or RGB) and, for colour, the sideways phone photo last, with labels."""
    images: list = colour_images(count, seed)
    if grey:
        images = [image.convert("L") for image in images]
    else:
        images.append({"bytes": sideways_jpeg(), "path": None})  # its EXIF kept, as a Hub dataset would keep it
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(len(images))]},
                                      features=features)


def save_parquet(ds: datasets.Dataset, folder: Path) -> Path:
    """The dataset as two parquet shards, as the Hub stores datasets."""
    folder.mkdir(parents=True)
    for i in range(2):
        ds.shard(2, i, contiguous=True).to_parquet(str(folder / f"train-{i:05d}-of-00002.parquet"))
    return folder


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    colour, grey = hf_dataset(), hf_dataset(grey=True, seed=1)
    datasets.DatasetDict({"train": colour, "test": colour.select(range(4))}).save_to_disk(str(root / "saved"))
    return dict(saved=root / "saved", parquet=save_parquet(colour, root / "parquet"),
                grey_parquet=save_parquet(grey, root / "grey_parquet"))


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


def train(tmp_path: Path, capsys, *args) -> tuple[str, Path]:
    """A two-step training run (train_ddpm.main in-process); returns what it printed and its output folder."""
    out = tmp_path / "out"
    result = call(train_ddpm.main, [*TINY_RUN, "--max_train_steps", 2, "--data_dir", tmp_path / "data",
                                    "--output_dir", out, *args], capsys)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (out / "final_model" / "model_index.json").exists()
    return result.stdout + result.stderr, out


# ---------------------------------------------------------------------------------------------------
# One training run per kind of source
# ---------------------------------------------------------------------------------------------------


def test_a_save_to_disk_folder_trains(hf_data, tmp_path, capsys):
    output, _ = train(tmp_path, capsys, "--dataset_name", hf_data["saved"])
    assert data_line(output) == (f"data: {hf_data['saved']} (split train, column image): 12 images at 16px, 3 "
                                 f"channels (colour images such as row 0), 0 skipped; 2 classes in the ClassLabel column "
                                 f"label (labels available: --class_conditional trains on them); random flips off")
    assert "training on 12 images" in output


def test_parquet_files_train_through_load_dataset_and_greyscale_stays_one_channel(hf_data, tmp_path, capsys):
    pattern = f"{hf_data['grey_parquet']}/*.parquet"
    output, out = train(tmp_path, capsys, "--dataset_name", "parquet", "--dataset_path", pattern)
    assert data_line(output).startswith(f"data: parquet files {pattern} (split train, column image): 11 images at "
                                        f"16px, 1 channel (every image is greyscale")
    assert json.loads((out / "final_model" / "unet" / "config.json").read_text())["in_channels"] == 1


def test_a_zip_trains_and_skips_its_corrupt_member(tmp_path, capsys):
    archive = make_zip(tmp_path / "images.zip", make_image_folder(tmp_path / "images", count=8))
    output, _ = train(tmp_path, capsys, "--dataset_name", "custom", "--dataset_path", archive)
    warning = next(line for line in output.splitlines() if line.startswith("warning:"))
    assert f"skipped 1 of 10 images in {archive}" in warning and "sub/broken.png" in warning
    assert data_line(output) == (f"data: {archive}: 9 images at 16px, 3 channels (colour images such as img01.png), "
                                 f"1 skipped; random flips off")
    assert "training on 9 images" in output


# ---------------------------------------------------------------------------------------------------
# The pixels: as the plain pipeline makes them, and upright
# ---------------------------------------------------------------------------------------------------


def test_hf_sources_cache_the_plain_pipelines_pixels_upright(hf_data, tmp_path):
    saved = load_cached(config_for(hf_data["saved"], tmp_path / "data"), progress=False)
    parquet = load_cached(config_for("parquet", tmp_path / "data", dataset_path=str(hf_data["parquet"])),
                                   progress=False)
    assert torch.equal(cached(saved), cached(parquet)) and len(saved) == 12
    plain = torch.stack([dataset.plain_transform(16, 3)(image) for image in colour_images(11)])
    torch.testing.assert_close(dataset.to_model_input(cached(saved)[:11], random_flip=False), plain, atol=1e-6, rtol=0)
    assert_upright(saved[11])
    test_split = load_cached(config_for(hf_data["saved"], tmp_path / "data", dataset_split="test"),
                                      progress=False)
    assert torch.equal(cached(test_split), cached(saved)[:4])


def test_zip_members_cache_as_the_same_files_in_a_folder_do(tmp_path):
    folder = make_image_folder(tmp_path / "images", count=6)
    for deflate in (True, False):
        archive = make_zip(tmp_path / f"images-{deflate}.zip", folder, deflate=deflate)
        cache = load_cached(config_for("custom", tmp_path / "data", dataset_path=str(archive)), progress=False)
        source = dataset.open_source("custom", config_for("custom", tmp_path / "data", dataset_path=str(archive)).data)
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
    cache = load_cached(config_for("custom", tmp_path / "data", dataset_path=str(tmp_path / "photos")),
                                 progress=False)
    assert_upright(cache[0])


def test_channels_for_hf_data_auto_and_as_asked(hf_data, tmp_path):
    grey = config_for("parquet", tmp_path / "data", dataset_path=str(hf_data["grey_parquet"]))
    assert load_cached(grey, progress=False)[0].shape == (1, 16, 16)
    grey.data.num_channels = "3"
    as_rgb = load_cached(grey, progress=False)[0]
    assert as_rgb.shape == (3, 16, 16) and torch.equal(as_rgb[0], as_rgb[1])
    colour = config_for(hf_data["saved"], tmp_path / "data", num_channels="1")
    assert load_cached(colour, progress=False)[0].shape == (1, 16, 16)


def test_zip_and_hf_sources_reach_loader_workers_as_small_pickles(hf_data, tmp_path):
    archive = make_zip(tmp_path / "images.zip", make_image_folder(tmp_path / "images", count=3))
    for cfg in (config_for("custom", tmp_path, dataset_path=str(archive)), config_for(hf_data["saved"], tmp_path)):
        source = dataset.open_source(cfg.training.dataset_name, cfg.data)
        source.read(0, 8, 3)  # the ZIP is open in this process now; a worker opens its own
        data = pickle.dumps(source)
        assert len(data) < 20_000  # paths of memory-mapped files, not the images
        assert np.array_equal(pickle.loads(data).read(1, 8, 3), source.read(1, 8, 3))


# ---------------------------------------------------------------------------------------------------
# The cache does not grow without end
# ---------------------------------------------------------------------------------------------------


def test_a_changed_source_replaces_its_cache(hf_data, tmp_path):
    saved, data = tmp_path / "saved", tmp_path / "data"
    hf_dataset(count=5).save_to_disk(str(saved))
    archive = make_zip(tmp_path / "images.zip", make_image_folder(tmp_path / "images", count=4))
    first = load_cached(config_for(saved, data), progress=False)
    zipped = load_cached(config_for("custom", data, dataset_path=str(archive)), progress=False)
    load_cached(config_for(saved, data, num_channels="1"), progress=False)  # another slot: kept
    assert (len(first), len(zipped)) == (6, 5) and len(cached_images(data)) == 3

    shutil.rmtree(saved)
    hf_dataset(count=7, seed=3).save_to_disk(str(saved))  # a new fingerprint
    with zipfile.ZipFile(archive, "a") as zip_file:
        zip_file.writestr("more/extra.png", (tmp_path / "images" / "img01.png").read_bytes())
    assert len(load_cached(config_for(saved, data), progress=False)) == 8
    assert len(load_cached(config_for("custom", data, dataset_path=str(archive)), progress=False)) == 6
    assert not first.path.exists() and not first.path.with_suffix(".json").exists() and not zipped.path.exists()
    assert len(cached_images(data)) == len(list((data / "cache").glob("*.json"))) == 3
    assert not list((data / "cache").glob("*partial*"))


def cached_images(data: Path) -> list[Path]:
    """The image caches under data/cache, each checked to leave no labels file behind that lacks its images."""
    files = list((data / "cache").glob("*.npy"))
    images = {p.name for p in files if not p.name.endswith("-labels.npy")}
    assert {p.name.replace("-labels.npy", ".npy") for p in files} <= images, sorted(p.name for p in files)
    return sorted(p for p in files if p.name in images)


# ---------------------------------------------------------------------------------------------------
# A user's mistakes: one `error:` line each, exit code 2 (in-process)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_images(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text_only"
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]},
                               features=datasets.Features({"text": datasets.Value("string"),
                                                           "label": datasets.ClassLabel(names=["x", "y"])})
                               ).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("case, words", [
    ("hub_offline", ["huggan/smithsonian_butterflies_subset", "save_to_disk", "--dataset_name custom"]),
    ("no_split", ["--dataset_split validation", "no such split", "its splits: train, test"]),
    ("parquet_no_split", ["--dataset_split validation", "no such split", "its splits: train"]),
    ("no_image_column", ["no image column", "text (Value), label (ClassLabel)", "--image_column"]),
    ("unknown_column", ["--image_column picture", "no such column", "image (Image), label (ClassLabel)"]),
    ("not_an_image_column", ["--image_column label", "does not hold images"]),
    ("not_saved_by_datasets", ["not a dataset written by save_to_disk", "--dataset_name custom --dataset_path"]),
    ("config_for_a_folder", ["--dataset_config_name", "save_to_disk"]),
    ("no_parquet_files", ["matches no parquet files"]),
    ("not_parquet", ["cannot load parquet files", "Parquet magic bytes not found"]),
    ("datasets_missing", ["pip install datasets"]),
    ("zip_without_images", ["holds no images", "ZIP"]),
])
def test_hf_and_zip_mistakes_are_one_line(case, words, hf_data, no_images, tmp_path, capsys, monkeypatch):
    images = make_image_folder(tmp_path / "images", count=2)
    argv = {
        "hub_offline": ["--dataset_name", "huggan/smithsonian_butterflies_subset"],
        "no_split": ["--dataset_name", hf_data["saved"], "--dataset_split", "validation"],
        "parquet_no_split": ["--dataset_name", "parquet", "--dataset_path", hf_data["parquet"],
                             "--dataset_split", "validation"],
        "no_image_column": ["--dataset_name", no_images],
        "unknown_column": ["--dataset_name", hf_data["saved"], "--image_column", "picture"],
        "not_an_image_column": ["--dataset_name", hf_data["saved"], "--image_column", "label"],
        "not_saved_by_datasets": ["--dataset_name", images],
        "config_for_a_folder": ["--dataset_name", hf_data["saved"], "--dataset_config_name", "small"],
        "no_parquet_files": ["--dataset_name", "parquet", "--dataset_path", tmp_path / "nothing" / "*.parquet"],
        "not_parquet": ["--dataset_name", "parquet", "--dataset_path", tmp_path / "notes.parquet"],
        "datasets_missing": ["--dataset_name", hf_data["saved"]],
        "zip_without_images": ["--dataset_name", "custom", "--dataset_path", tmp_path / "empty.zip"],
    }[case]
    if case == "datasets_missing":
        monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    (tmp_path / "notes.parquet").write_text("not a parquet file")
    if case == "zip_without_images":
        with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
            archive.writestr("readme.txt", "no images here")
    result = call(train_ddpm.main, [*TINY_RUN, *argv, "--data_dir", tmp_path / "data", "--output_dir",
                                    tmp_path / "out"], capsys)
    assert_user_error(result, *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv, words", [
    (["--dataset_name", "./no/such/folder"], ["--dataset_name ./no/such/folder", "save_to_disk", "Hub dataset id"]),
    (["--dataset_name", "custom", "--dataset_path", "not_a.zip"], ["not_a.zip", "not a folder or a ZIP archive"]),
    (["--dataset_name", "parquet"], ["--dataset_name parquet needs --dataset_path"]),
])
def test_source_mistakes_caught_before_any_work(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("not_a.zip").write_text("plain text")
    result = call(train_ddpm.main, [*argv, "--output_dir", tmp_path / "out", "--dry_run"], capsys)
    assert_user_error(result, *words)


def test_hub_ids_and_paths_are_told_apart(hf_data):
    names = ("cifar10", "custom", "parquet", str(hf_data["saved"]), "huggan/smithsonian_butterflies_subset", "mnist_png")
    assert [dataset.source_kind(n) for n in names] == ["cifar10", "custom", "parquet", "disk", "hub", "hub"]


def test_datasets_is_imported_only_for_its_sources():
    for script in ("dataset.py", "train_ddpm.py", "config.py", "inference.py", "sampling.py"):
        tree = ast.parse((ROOT / script).read_text())
        top = [alias.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names] + [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
        assert "datasets" not in top, script
