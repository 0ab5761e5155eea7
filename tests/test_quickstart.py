"""The first run works offline: the bundled letters (assets/letters16.npz) are read like every other dataset, and the
README's CPU quickstart runs exactly as written (shortened with --max_train_steps), then its inference command."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
import inference
import train_ddpm
from config import DataConfig
from conftest import ROOT, call, cli_env

GLYPHS = ROOT.parent / "shared" / "data" / "glyphs16"  # the folder the bundled file was packed from


def test_the_bundled_letters_are_small_labelled_and_cached_like_any_dataset(tmp_path):
    assert dataset.LETTERS_FILE.stat().st_size < 1024 * 1024
    source = dataset.open_source("letters", DataConfig(data_dir=str(tmp_path)))
    assert source.pixels.shape == (5772, 16, 16) and source.pixels.dtype == np.uint8 and source.channels == 1
    assert len(source.classes) == 52 and source.classes == sorted(source.classes)
    assert source.classes[0] == "lower_a" and source.classes[-1] == "upper_Z"
    assert np.bincount(source.labels).tolist() == [111] * 52  # 37 typefaces x 3 copies of each letter
    assert source.pixels.mean() < 100, "white letters on black"
    cache = dataset.load_dataset("letters", 16, DataConfig(data_dir=str(tmp_path)), progress=False)
    assert cache.path.parent == tmp_path / "cache" and cache.path.name.startswith("letters-16px-")
    assert np.array_equal(cache.images[:, 0], source.pixels)
    assert cache.describe(random_flip=False).startswith("data: letters (assets/letters16.npz): 5772 images at 16px, "
                                                        "1 channel (greyscale data)")


def greyscale_classes(root: Path) -> Path:
    """Two class folders of greyscale PNGs, one of them not 16 px (packing resizes it as a custom folder would)."""
    rng = np.random.default_rng(3)
    for name, count, size in (("b", 2, 16), ("a", 3, 20)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_pack_letters_writes_what_a_custom_folder_of_the_same_images_reads(tmp_path):
    folder = greyscale_classes(tmp_path / "classes")
    packed = np.load(dataset.pack_letters(folder, tmp_path / "packed.npz"))
    assert packed["classes"].tolist() == ["a", "b"] and packed["labels"].tolist() == [0, 0, 0, 1, 1]
    data = DataConfig(dataset_path=str(folder), data_dir=str(tmp_path / "data"))
    as_folder = dataset.load_dataset("custom", 16, data, progress=False)  # 1 channel: every image is greyscale
    assert np.array_equal(packed["images"], as_folder.images[:, 0])


@pytest.mark.skipif(not GLYPHS.is_dir(), reason=f"{GLYPHS} is not here")
def test_the_bundled_file_is_the_packing_of_the_glyph_folder():
    """Its order, labels and (one image per class) pixels; packing it all again takes seconds (assets/README.md)."""
    files = dataset.find_images(str(GLYPHS))
    source = dataset.open_source("letters", DataConfig())
    assert [source.classes[label] for label in source.labels] == [file.parent.name for file in files]
    for index in np.searchsorted(source.labels, np.arange(52)) + 7:
        assert np.array_equal(source.pixels[index], dataset.decode_file(str(files[index]), 16, channels=1)[0])


def readme_quickstart() -> list[list[str]]:
    """The README's CPU quickstart line (train, then sample) as its two commands, each split into words."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("python train_ddpm.py --model_preset quickstart && python inference.py")]
    assert len(lines) == 1, lines
    return [shlex.split(command) for command in lines[0].split("&&")]


def test_the_readme_quickstart_runs_offline_as_written(tmp_path, monkeypatch, capsys):
    train, sample = readme_quickstart()
    assert train[:2] == ["python", "train_ddpm.py"] and sample[:2] == ["python", "inference.py"]
    monkeypatch.chdir(tmp_path)  # the README's relative paths: ./data, ./results, ./quick_samples
    for name, value in cli_env().items():  # no network: a download would fail at once
        if "proxy" in name.lower():
            monkeypatch.setenv(name, value)
    result = call(train_ddpm.main, train[2:] + ["--max_train_steps", "2"], capsys)
    assert result.returncode == 0, result.stderr
    assert "data: letters" in result.stdout and "1 channel" in result.stdout and "random flips off" in result.stdout
    assert "1.0M parameters" in result.stdout
    record = json.loads((tmp_path / "results" / "final_model" / "config.json").read_text())
    assert record["training"]["dataset_name"] == "letters" and record["training"]["max_train_steps"] == 2
    result = call(inference.main, sample[2:], capsys)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "quick_samples" / "manifest.json").read_text())
    assert len(manifest["files"]) == 16 and manifest["scheduler"] == "heun" and manifest["num_inference_steps"] == 25
    assert Image.open(tmp_path / "quick_samples" / "grid.png").mode == "L"  # a greyscale model draws grey


def test_mnist_is_one_flag_away_from_the_quickstart(capsys):
    command = "python train_ddpm.py --model_preset quickstart --dataset_name mnist"
    assert command in (ROOT / "README.md").read_text()
    assert train_ddpm.main(shlex.split(command)[2:] + ["--dry_run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["training"]["dataset_name"] == "mnist"
    assert resolved["model"]["block_out_channels"] == [32, 64] and resolved["training"]["max_train_steps"] == 1000
