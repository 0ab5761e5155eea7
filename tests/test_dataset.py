"""The uint8 dataset cache: the same images as the plain torchvision pipeline, rebuilt when it must be."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dataset
from conftest import load_cached, make_image_folder, make_mixed_mode_folder
from config import Config


def config_for(folder: Path, data_dir: Path, image_size: int = 16, name: str = "custom") -> Config:
    cfg = Config()
    cfg.training.dataset_name, cfg.training.image_size = name, image_size
    cfg.data.dataset_path, cfg.data.data_dir = str(folder), str(data_dir)
    return cfg


def plain_images(folder: Path, image_size: int) -> torch.Tensor:
    """What a plain per-image torchvision pipeline (the diffusers example's) gives for the same files."""
    transform = dataset.plain_transform(image_size, 3)
    return torch.stack([transform(dataset.to_rgb(Image.open(p))) for p in dataset.find_images(str(folder))])


def test_cached_images_equal_the_plain_pipeline(tmp_path):
    folder = make_mixed_mode_folder(tmp_path / "mixed")
    cache = load_cached(config_for(folder, tmp_path / "data"), progress=False)
    cached = dataset.to_model_input(cache.__getitems__(list(range(len(cache)))), random_flip=False)
    expected = plain_images(folder, 16)
    assert cached.shape == expected.shape == (11, 3, 16, 16)
    torch.testing.assert_close(cached, expected, atol=1e-6, rtol=0)


def test_mnist_cache_equals_the_plain_torchvision_dataset(mnist_dir):
    from torchvision import datasets

    cfg = config_for(Path("unused"), mnist_dir, image_size=32, name="mnist")
    cache = load_cached(cfg, progress=False)
    assert cache.path.parent == mnist_dir / "cache" and cache.path.name.startswith("mnist-32px-")
    plain = datasets.MNIST(str(mnist_dir), train=True, transform=dataset.plain_transform(32, 1))
    expected = torch.stack([plain[i][0] for i in range(len(plain))])
    cached = dataset.to_model_input(cache.__getitems__(list(range(len(cache)))), random_flip=False)
    assert cached.shape == (32, 1, 32, 32)
    torch.testing.assert_close(cached, expected, atol=1e-6, rtol=0)


def test_cache_is_built_once_and_rebuilt_when_the_source_or_size_changes(tmp_path):
    folder = make_image_folder(tmp_path / "images", count=6)
    data = tmp_path / "data"
    first = load_cached(config_for(folder, data), progress=False)
    load_cached(config_for(folder, data), progress=False)
    assert len(list((data / "cache").glob("*.npy"))) == 1
    load_cached(config_for(folder, data, image_size=8), progress=False)
    assert len(list((data / "cache").glob("*.npy"))) == 2
    statistics = first.path.with_name(f"{first.path.stem}-inception-2015-12-05.npz")  # evaluate.py's, of that content
    statistics.write_bytes(b"")
    Image.new("RGB", (20, 20), "red").save(folder / "new.png")
    grown = load_cached(config_for(folder, data), progress=False)
    assert len(grown) == 7 and len(list((data / "cache").glob("*.npy"))) == 2  # the new cache replaced the stale one
    assert not first.path.exists() and len(list((data / "cache").glob("*.json"))) == 2
    assert not statistics.exists(), "reference statistics go with the content they were computed from"
    assert not list((data / "cache").glob("*partial*"))


def test_a_source_reaches_loader_workers_under_any_start_method(tmp_path, mnist_dir):
    folder = make_image_folder(tmp_path / "images", count=3)
    for cfg in (config_for(folder, tmp_path / "data"), config_for(Path("unused"), mnist_dir, name="mnist")):
        source = dataset.open_source(cfg.training.dataset_name, cfg.data)
        source = pickle.loads(pickle.dumps(source))  # "spawn" (macOS, Windows) pickles it
        assert source.read(0, 8, source.channels).shape == (source.channels, 8, 8)


def test_memory_mapped_and_in_memory_caches_agree(tmp_path):
    folder = make_image_folder(tmp_path / "images", count=8)
    cache = load_cached(config_for(folder, tmp_path / "data"), progress=False)
    assert isinstance(cache.images, np.memmap) and not cache.images.flags.writeable  # pages shared by processes
    mapped = dataset.ImageCache(cache.path, cache.count, in_memory=False)
    indices = [5, 0, 7, 2]
    assert torch.equal(mapped.__getitems__(indices), cache.__getitems__(indices))
    assert torch.equal(mapped[3], cache[3])


def test_unreadable_files_are_skipped_and_counted(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", count=4)
    (folder / "truncated.png").write_bytes((folder / "img01.png").read_bytes()[:60])
    (folder / "not_an_image.jpg").write_text("hello")
    cache = load_cached(config_for(folder, tmp_path / "data"), progress=True)
    assert len(cache) == 4
    assert "skipped 2 of 6 images" in capsys.readouterr().out


def test_random_flip_happens_on_the_device_and_only_mirrors():
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    plain = dataset.to_model_input(batch, random_flip=False)
    flipped = dataset.to_model_input(batch, random_flip=True)
    same = [torch.equal(a, b) for a, b in zip(plain, flipped)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 16 < sum(mirrored) < 48
    assert plain.min() >= -1 and plain.max() <= 1


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = dataset.EpochShuffle(20, seed=1, multiple_of=4), dataset.EpochShuffle(20, seed=1, multiple_of=4)
    a.start_epoch(3), b.start_epoch(3)
    assert list(a) == list(b) and len(list(a)) == 20
    b.start_epoch(4)
    assert list(a) != list(b)
    assert len(list(dataset.EpochShuffle(10, seed=1, multiple_of=4))) == 8
