"""Training data: CIFAR-10, MNIST (torchvision), the bundled letters (assets/letters16.npz, no download), a folder or
ZIP of images, or a Hugging Face dataset (a Hub id, a folder written by save_to_disk, or parquet files), decoded and
resized once.

Every dataset is turned into a uint8 tensor cache of shape [N, C, image_size, image_size] under
``data_dir/cache/``: one file per source, image_size and --num_channels, replaced when the source's content
or labels change. Labels, where the data has them (CIFAR-10, MNIST, the letters, a folder's or ZIP's first-level
sub-folders as torchvision's ImageFolder reads them, a Hugging Face ClassLabel column), are cached beside it.
Caches are memory-mapped, so the processes of a machine share one copy; large ones are streamed by loader workers.
Scaling to [-1, 1] and random flips happen on the training device (``to_model_input``), so the loader moves
1 byte per pixel instead of 4.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import urllib.error
import zipfile
import zlib
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, Iterator, Optional

import numpy as np
import psutil
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from tqdm.auto import tqdm

from config import DataConfig, UserError
from files import atomic_file, write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LETTERS_FILE = Path(__file__).resolve().parent / "assets" / "letters16.npz"  # --dataset_name letters (assets/README.md)
CACHE_FORMAT = 3  # bump when the way images are decoded or resized changes, so old caches are rebuilt (3: labels)


# ---------------------------------------------------------------------------------------------------
# Decoding one image
# ---------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16/32-bit greyscale scaled down, transparency composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit, 32-bit or float greyscale
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 1.0 if array.max() <= 1 else 255.0
        image = Image.fromarray((array * (255.0 / peak)).round().clip(0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def resize_and_crop(image_size: int) -> transforms.Compose:
    """Shorter side to image_size (up or down), then the centre square: the README's preprocessing."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(image_size),
    ])


def plain_transform(image_size: int, channels: int) -> transforms.Compose:
    """The per-image torchvision pipeline that the cache reproduces (kept for tests and benchmarks)."""
    return transforms.Compose([
        resize_and_crop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * channels, [0.5] * channels),
    ])


# What PIL raises for a file that is not a whole image.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_file(file: str | IO[bytes], image_size: int, channels: int = 3) -> Optional[np.ndarray]:
    """One image (a path, or its bytes as a file) as uint8 [channels, S, S], or None when it cannot be read
    (truncated, not an image...)."""
    try:
        return to_array(open_upright(file), image_size, channels)
    except UNREADABLE:
        return None


def open_upright(file: str | IO[bytes]) -> Image.Image:
    """The decoded image as it is shown: phone photos are stored sideways with an EXIF orientation. Raises one of
    UNREADABLE for a file that is not a whole image."""
    with Image.open(file) as image:
        upright = ImageOps.exif_transpose(image)
        upright.load()
    return upright


def to_array(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """An image as training sees it: in the model's mode, resized and centre-cropped, uint8 [channels, S, S]."""
    array = np.asarray(resize_and_crop(image_size)(as_mode(image, channels)), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def as_mode(image: Image.Image, channels: int) -> Image.Image:
    """RGB for 3 channels; for 1, the luminance of that RGB (exact for greyscale sources: R = G = B)."""
    rgb = to_rgb(image)
    return rgb if channels == 3 else rgb.convert("L")


# PIL modes that hold no colour: a folder of only these trains a 1-channel model.
GREYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def is_greyscale_file(file: str | Path | IO[bytes]) -> bool:
    """Whether the image's mode holds no colour (reads the header only); unreadable files do not count."""
    try:
        with Image.open(file) as image:
            return image.mode in GREYSCALE_MODES
    except UNREADABLE:
        return True


def to_model_input(batch: torch.Tensor, random_flip: bool) -> torch.Tensor:
    """uint8 [B,C,H,W] on the device -> float [-1, 1], flipped left-right at random per image."""
    images = batch.float().div_(127.5).sub_(1.0)  # == ToTensor() then Normalize(0.5, 0.5)
    if random_flip:
        flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
        images = torch.where(flip, images.flip(-1), images)
    return images


# ---------------------------------------------------------------------------------------------------
# Sources: the images before caching
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    """A dataset before caching: its images, how to read one, and a fingerprint that changes with them.

    Plain data (no closures, no open files), so loader workers can receive it under any multiprocessing start
    method: a ZIP is opened again in each process, and a Hugging Face dataset pickles as the paths of its
    memory-mapped Arrow files, which each worker maps again (the library's own way to reach DataLoader workers)."""

    name: str  # its kind: cifar10, mnist, letters, folder, zip or hf
    label: str  # how the user knows it, for messages
    identity: str  # what it is, whatever it holds now: its cache for a new content replaces the old one
    channels: int  # of the images as stored (3 for files, which may mix modes); the cache's may differ
    fingerprint: str  # of what it holds: a new cache is built when this changes
    files: Optional[list[Path]] = None  # a folder's image files
    root: Optional[Path] = None  # the folder they were found in, or the ZIP file
    members: Optional[list[str]] = None  # the ZIP's image members
    pixels: Optional[np.ndarray] = None  # a torchvision dataset's or the letters' images: [N,H,W] or [N,H,W,C] uint8
    labels: Optional[np.ndarray] = None  # each image's class, an index into classes (None: the data has no labels)
    classes: Optional[list[str]] = None  # the class names
    labels_from: Optional[str] = None  # where the labels come from, for the data: line
    table: Optional[object] = None  # a datasets.Dataset of the image column alone, left encoded (decode=False)
    column: Optional[str] = None  # that column's name

    @property
    def label_key(self) -> str:
        """Changes with the labels: part of the cache's content key, so new labels rebuild the cache."""
        if self.labels is None:
            return "unlabelled"
        return hashlib.sha1(np.ascontiguousarray(self.labels, dtype=np.int64).data.tobytes()
                            + "\n".join(self.classes).encode()).hexdigest()

    @property
    def count(self) -> int:
        return len(next(items for items in (self.files, self.members, self.pixels, self.table) if items is not None))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_archive"}  # each process opens the ZIP itself

    def archive(self) -> zipfile.ZipFile:
        """The ZIP, opened once per process: a handle inherited through fork would share its file offset."""
        pid, archive = self.__dict__.get("_archive", (None, None))
        if pid != os.getpid():
            archive = zipfile.ZipFile(self.root)
            self.__dict__["_archive"] = (os.getpid(), archive)
        return archive

    def open(self, index: int) -> Optional[str | IO[bytes]]:
        """Image `index` as a path or as its encoded bytes; None when a ZIP member or a row holds none."""
        if self.files is not None:
            return str(self.files[index])
        if self.members is not None:
            try:
                return io.BytesIO(self.archive().read(self.members[index]))
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError):  # bad CRC or data, encrypted
                return None
        stored = self.table[index][self.column]  # {"bytes": ..., "path": ...}, as the dataset holds it
        if not stored:
            return None
        return io.BytesIO(stored["bytes"]) if stored["bytes"] is not None else stored["path"]

    def read(self, index: int, image_size: int, channels: int) -> Optional[np.ndarray]:
        """Image `index` as uint8 [channels, S, S], or None when it cannot be read."""
        if self.pixels is None:
            file = self.open(index)
            return None if file is None else decode_file(file, image_size, channels)
        image = Image.fromarray(self.pixels[index])
        if channels != self.channels:
            image = as_mode(image, channels)
        array = np.asarray(resize_and_crop(image_size)(image), dtype=np.uint8)
        return array.transpose(2, 0, 1) if array.ndim == 3 else array[None]

    def choose_channels(self, requested: str) -> tuple[int, str]:
        """The cache's channel count and why: as asked, else 1 for greyscale data, 3 for colour."""
        if requested != "auto":
            return int(requested), f"--num_channels {requested}"
        if self.pixels is not None:
            return self.channels, "greyscale data" if self.channels == 1 else "colour data"
        colour = next((i for i in range(self.count) if not self.is_greyscale(i)), None)
        if colour is None:
            return 1, "every image is greyscale; --num_channels 3 keeps RGB"
        return 3, f"colour images such as {self.describe(colour)}"

    def is_greyscale(self, index: int) -> bool:
        file = self.open(index)
        return file is None or is_greyscale_file(file)

    def describe(self, index: int) -> str:
        """Image `index` as the user knows it (its file, member or row), for warnings."""
        if self.files is not None:
            return str(self.files[index].relative_to(self.root))
        if self.members is not None:
            return self.members[index]
        return f"row {index}" if self.table is not None else f"#{index}"


def _download_error(name: str, data_dir: str, error: Exception) -> UserError:
    return UserError(
        f"could not download {name} into {data_dir} ({error.__class__.__name__}: no network?); copy the "
        f"dataset there by hand and pass --data_dir, train on your own images with --dataset_name custom "
        f"--dataset_path DIR, or on the bundled letters with --dataset_name letters (no download; the CPU quickstart: "
        f"python train_ddpm.py --model_preset quickstart)")


def _torchvision_source(name: str, data_dir: str) -> Source:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "mnist": datasets.MNIST}[name]
    try:
        dataset = cls(root=data_dir, train=True, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise _download_error({"cifar10": "CIFAR-10", "mnist": "MNIST"}[name], data_dir, e) from None
    pixels = np.asarray(dataset.data)  # CIFAR-10: [N,32,32,3] uint8, MNIST: [N,28,28] uint8
    fingerprint = hashlib.sha1(np.ascontiguousarray(pixels).data).hexdigest()
    return Source(name, f"{name} in {data_dir}", name, 3 if pixels.ndim == 4 else 1, fingerprint, pixels=pixels,
                  labels=np.asarray(dataset.targets), classes=list(dataset.classes), labels_from=f"{name}'s labels")


def _letters_source(path: Path = LETTERS_FILE) -> Source:
    """The letters that ship with the toolkit (assets/README.md): 5,772 greyscale 16x16 images of the 52 Latin
    letters in 37 typefaces, with their labels; read like a torchvision dataset, and never downloaded."""
    try:
        with np.load(path) as packed:
            pixels, labels, classes = packed["images"], packed["labels"], packed["classes"].tolist()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"the bundled letters {path} cannot be read ({_one_line(e, 120)}); restore the file with "
                        f"git checkout -- assets/letters16.npz") from None
    fingerprint = hashlib.sha1(np.ascontiguousarray(pixels).data).hexdigest()
    return Source("letters", f"letters ({path.parent.name}/{path.name})", "letters", 1, fingerprint, pixels=pixels,
                  labels=labels, classes=classes, labels_from="the letters' labels")


def pack_letters(folder: str | Path, path: str | Path = LETTERS_FILE, image_size: int = 16) -> Path:
    """Rebuild the bundled letters file from a folder of images with one sub-folder per class (assets/README.md):
    images uint8 [N, S, S] read as a custom folder of them is read (1 channel), in the same order (sorted paths);
    labels int64 [N], indices into classes, the sub-folder names sorted."""
    root = Path(folder).expanduser()
    files = find_images(str(root))
    if any(file.parent == root for file in files):
        raise UserError(f"{root} holds images outside class sub-folders; put each image in its class's folder")
    names = [file.relative_to(root).parts[0] for file in files]
    classes = sorted(set(names))
    images = [decode_file(str(file), image_size, channels=1) for file in files]
    unreadable = [str(file) for file, image in zip(files, images) if image is None]
    if unreadable:
        raise UserError(f"{len(unreadable)} images cannot be read, such as {unreadable[0]}; fix or remove them")
    images = np.concatenate(images)
    labels = np.asarray([classes.index(name) for name in names], dtype=np.int64)
    with atomic_file(Path(path)) as tmp:
        with open(tmp, "wb") as f:  # a file object: savez_compressed would append .npz to a path without it
            np.savez_compressed(f, images=images, labels=labels, classes=np.asarray(classes))
    return Path(path)


def find_images(folder: str, flag: str = "dataset_path") -> list[Path]:
    """The image files under a folder (searched recursively), sorted; `flag` names the folder in errors."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {folder} is not a folder; pass --{flag} pointing at your images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{flag} {folder} holds no images (read recursively: "
                        f"{', '.join(IMAGE_EXTENSIONS)}); add some or point --{flag} elsewhere")
    return files


def subfolder_labels(paths: list[PurePath]) -> tuple[Optional[np.ndarray], Optional[list[str]]]:
    """As torchvision's ImageFolder: each image's class is its first-level sub-folder (paths relative to the root),
    classes sorted by name; no labels when an image lies outside every sub-folder."""
    if not paths or any(len(p.parts) < 2 for p in paths):
        return None, None
    names = [p.parts[0] for p in paths]
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return np.asarray([index[name] for name in names], dtype=np.int64), classes


def _folder_source(folder: str) -> Source:
    files = find_images(folder)
    listing = "\n".join(f"{p}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in files)
    fingerprint = hashlib.sha1(listing.encode()).hexdigest()
    root = Path(folder).expanduser()
    labels, classes = subfolder_labels([p.relative_to(root) for p in files])
    return Source("folder", str(folder), f"folder|{root.resolve()}", 3, fingerprint, files=files, root=root,
                  labels=labels, classes=classes, labels_from=f"the sub-folders of {folder}")


def _zip_source(path: Path) -> Source:
    """The images inside a ZIP, read in place (as NVlabs EDM's dataset_tool does), sub-folders included."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                       and Path(m.filename).suffix.lower() in IMAGE_EXTENSIONS]  # __MACOSX/: Finder metadata
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"dataset_path {path} is not a readable ZIP archive ({e}); pass a folder or a .zip of "
                        f"images") from None
    if not members:
        raise UserError(f"dataset_path {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}, in any folder of the "
                        f"ZIP); add some or point --dataset_path elsewhere")
    members.sort(key=lambda m: m.filename)
    listing = "\n".join(f"{m.filename}\t{m.file_size}\t{m.CRC}" for m in members)
    inside = [PurePosixPath(m.filename) for m in members]
    # A ZIP of a folder holds it as one top folder: its sub-folders are the classes.
    while all(len(p.parts) > 2 for p in inside) and len({p.parts[0] for p in inside}) == 1:
        inside = [PurePosixPath(*p.parts[1:]) for p in inside]
    labels, classes = subfolder_labels(inside)
    return Source("zip", str(path), f"zip|{path.resolve()}", 3, hashlib.sha1(listing.encode()).hexdigest(),
                  root=path, members=[m.filename for m in members], labels=labels, classes=classes,
                  labels_from=f"the sub-folders in {path}")


def _custom_source(dataset_path: Optional[str]) -> Source:
    if not dataset_path:
        raise UserError("dataset_name custom needs images: pass --dataset_path DIR (a folder, or a .zip of images)")
    path = Path(dataset_path).expanduser()
    return _zip_source(path) if path.is_file() and zipfile.is_zipfile(path) else _folder_source(dataset_path)


# --dataset_name values with a meaning of their own; anything else is a save_to_disk folder or a Hub dataset id.
BUILTIN_DATASETS = ("cifar10", "mnist", "letters", "custom", "parquet")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def source_kind(name: str) -> str:
    """What --dataset_name names: one of BUILTIN_DATASETS, "disk" (an existing path: a folder written by
    save_to_disk) or "hub" (a Hugging Face Hub dataset id)."""
    if name in BUILTIN_DATASETS:
        return name
    if Path(name).expanduser().exists():
        return "disk"
    if HUB_ID.fullmatch(name) and ".." not in name:
        return "hub"
    raise UserError(f"--dataset_name {name} is not cifar10, mnist, letters, custom or parquet, nor an existing folder "
                    f"written by save_to_disk, nor a Hugging Face Hub dataset id (user/name)")


def _one_line(error: Exception, limit: int = 240) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _import_datasets():
    try:
        import datasets  # only for these sources: it takes a second and a half to import
    except ImportError:
        raise UserError("Hugging Face datasets need the datasets package: pip install datasets (it is in "
                        "requirements.txt)") from None
    return datasets


def parquet_files(pattern: Optional[str]) -> list[str]:
    """--dataset_path for parquet: a file, a folder (searched recursively) or a glob such as 'data/*.parquet'."""
    if not pattern:
        raise UserError("dataset_name parquet needs --dataset_path: a .parquet file, a folder of them or a glob "
                        "such as 'data/*.parquet'")
    path = Path(pattern).expanduser()
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else sorted(glob.glob(str(path), recursive=True))
    files = [str(f) for f in files if Path(f).is_file()]
    if not files:
        raise UserError(f"dataset_path {pattern} matches no parquet files; pass a .parquet file, a folder of them "
                        f"or a glob such as 'data/*.parquet' (quoted)")
    return files


def _split_error(split: str, where: str, splits) -> UserError:
    splits = ", ".join(map(str, splits))
    return UserError(f"--dataset_split {split}: {where} has no such split; its splits: {splits}")


def _load_hf_split(name: str, data: DataConfig, kind: str, datasets):
    """The split asked for, loaded as the datasets library loads it (memory-mapped Arrow)."""
    split = data.dataset_split
    if kind == "disk":
        if data.dataset_config_name:
            raise UserError(f"--dataset_config_name is for Hub datasets; {name} is a folder written by "
                            f"save_to_disk, which holds one configuration")
        try:
            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
        except FileNotFoundError:
            raise UserError(f"--dataset_name {name} is a path but not a dataset written by save_to_disk; for a "
                            f"folder or .zip of images pass --dataset_name custom --dataset_path {name}") from None
        if not isinstance(loaded, datasets.DatasetDict):
            return loaded  # a single split was saved
        if split not in loaded:
            raise _split_error(split, name, loaded)
        return loaded[split]
    where = f"parquet files {data.dataset_path}" if kind == "parquet" else name
    files = parquet_files(data.dataset_path) if kind == "parquet" else None
    try:
        if files:
            return datasets.load_dataset("parquet", data_files=files, split=split)
        return datasets.load_dataset(name, data.dataset_config_name, split=split)
    except (ConnectionError, FileNotFoundError) as e:  # offline, unreachable, or no such dataset
        if files:
            raise UserError(f"cannot load {where}: {_one_line(e)}") from None
        raise UserError(
            f"cannot load the Hub dataset {name} ({_one_line(e)}); check the id, or on a machine with internet run "
            f"datasets.load_dataset('{name}').save_to_disk('DIR'), copy DIR here and pass --dataset_name DIR, or "
            f"train on a local folder with --dataset_name custom --dataset_path DIR") from None
    except ValueError as e:
        splits = re.search(r'Unknown split "[^"]*"\. Should be one of \[(.*)\]', str(e))
        if splits:
            raise _split_error(split, where, [s.strip(" '\"") for s in splits.group(1).split(",")]) from None
        hint = "; pick one with --dataset_config_name" if "config" in str(e).lower() else ""
        raise UserError(f"cannot load {where}: {_one_line(e)}{hint}") from None  # also a damaged parquet file
    except datasets.exceptions.DatasetsError as e:
        raise UserError(f"cannot load {where}: {_one_line(e)}") from None


def _image_column(ds, wanted: Optional[str], where: str, datasets) -> tuple[str, object]:
    """The column of images and the dataset reduced to it, left encoded: named, else the first of type Image."""
    columns = ", ".join(f"{c} ({type(f).__name__})" for c, f in ds.features.items())
    if wanted is None:
        wanted = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
        if wanted is None:
            raise UserError(f"{where} has no image column (its columns: {columns}); name the column that holds "
                            f"images or their paths with --image_column")
    elif wanted not in ds.column_names:
        raise UserError(f"--image_column {wanted}: {where} has no such column; its columns: {columns}")
    try:  # an Image column as it is; a column of paths or bytes becomes one
        return wanted, ds.select_columns([wanted]).cast_column(wanted, datasets.Image(decode=False))
    except (TypeError, ValueError, NotImplementedError) as e:
        raise UserError(f"--image_column {wanted} does not hold images ({_one_line(e, 120)}); its columns: "
                        f"{columns}") from None


def _label_column(ds, wanted: Optional[str], where: str, datasets) -> tuple[Optional[str], object]:
    """The column of classes and the dataset with it as a ClassLabel: named (a column of ints or strings is encoded
    as one, classes sorted), else the first of type ClassLabel, else none."""
    if wanted is None:
        wanted = next((c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
        if wanted is None:
            return None, ds
    elif wanted not in ds.column_names:
        columns = ", ".join(f"{c} ({type(f).__name__})" for c, f in ds.features.items())
        raise UserError(f"--label_column {wanted}: {where} has no such column; its columns: {columns}")
    if not isinstance(ds.features[wanted], datasets.ClassLabel):
        try:
            ds = ds.class_encode_column(wanted)
        except (TypeError, ValueError) as e:
            raise UserError(f"--label_column {wanted} does not hold classes ({_one_line(e, 120)}); name a column of "
                            f"class names or numbers") from None
    return wanted, ds


def _hf_source(name: str, data: DataConfig, kind: str) -> Source:
    datasets = _import_datasets()
    ds = _load_hf_split(name, data, kind, datasets)
    if kind == "parquet":
        where, identity = f"parquet files {data.dataset_path}", str(Path(data.dataset_path).expanduser().absolute())
    elif kind == "disk":
        where, identity = name, str(Path(name).expanduser().resolve())
    else:
        where, identity = name, f"{name}|{data.dataset_config_name}"
    label_column, ds = _label_column(ds, data.label_column, f"{where} (split {data.dataset_split})", datasets)
    column, table = _image_column(ds, data.image_column, f"{where} (split {data.dataset_split})", datasets)
    labels = classes = None
    if label_column is not None:
        labels = np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column], dtype=np.int64)
        classes = list(ds.features[label_column].names)
        if (labels < 0).any():  # ClassLabel's -1: a row without a class
            labels = classes = None
    return Source("hf", f"{where} (split {data.dataset_split}, column {column})",
                  f"hf|{kind}|{identity}|{data.dataset_split}|{column}", 3, ds._fingerprint, table=table,
                  column=column, labels=labels, classes=classes, labels_from=f"the ClassLabel column {label_column}")


def open_source(name: str, data: DataConfig) -> Source:
    kind = source_kind(name)
    if kind == "custom":
        return _custom_source(data.dataset_path)
    if kind in ("cifar10", "mnist"):
        return _torchvision_source(kind, data.data_dir)
    if kind == "letters":
        return _letters_source()
    return _hf_source(name, data, kind)


def check_source(name: str, data: DataConfig) -> None:
    """The mistakes in naming a dataset that can be caught before any work (nothing is read or downloaded)."""
    kind = source_kind(name)
    if kind in ("custom", "parquet") and not data.dataset_path:
        what = "a folder or .zip of images" if kind == "custom" else "a .parquet file, a folder of them or a glob"
        raise UserError(f"--dataset_name {kind} needs --dataset_path: {what}")
    images = Path(data.dataset_path or "").expanduser()
    if kind == "custom" and not (images.is_dir() or images.is_file() and zipfile.is_zipfile(images)):
        raise UserError(f"dataset_path {data.dataset_path} is not a folder or a ZIP archive; pass --dataset_path "
                        f"pointing at your images")


# ---------------------------------------------------------------------------------------------------
# The uint8 cache
# ---------------------------------------------------------------------------------------------------


class _Reader(Dataset):
    """Decodes source images in loader workers while the cache is built."""

    def __init__(self, source: Source, image_size: int, channels: int):
        self.source, self.image_size, self.channels = source, image_size, channels

    def __len__(self) -> int:
        return self.source.count

    def __getitem__(self, index: int):
        return self.source.read(index, self.image_size, self.channels)


def _first(batch):
    return batch[0]


def build_cache(source: Source, image_size: int, channels: int, path: Path, workers: int, progress: bool) -> dict:
    """Decode every image once into a .npy file (written beside, then renamed into place)."""
    shape = (source.count, channels, image_size, image_size)
    loader = DataLoader(_Reader(source, image_size, channels), batch_size=1, num_workers=workers, collate_fn=_first)
    count, skipped = 0, []
    with atomic_file(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for index, image in enumerate(tqdm(loader, desc=f"caching {source.label} at {image_size}px",
                                           unit="img", disable=not progress)):
            if image is None:
                skipped.append(index)
                continue
            array[count] = image
            count += 1
        array.flush()
        del array
    meta = {"format": CACHE_FORMAT, "count": count, "skipped": skipped, "source": source.label, "channels": channels}
    if source.labels is not None:  # the labels of the images kept, beside the images
        with atomic_file(labels_path(path)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.delete(np.asarray(source.labels, dtype=np.int64), skipped))
        meta.update(classes=list(source.classes), labels_from=source.labels_from)
    return meta


def labels_path(cache: Path) -> Path:
    return cache.with_name(f"{cache.stem}-labels.npy")


class ImageCache(Dataset):
    """uint8 [C,S,S] images from a cache file, always memory-mapped (read-only): the processes of one machine share
    the operating system's pages of it, so the data is held once per machine, not once per process. `in_memory`
    (small enough to stay paged in) only means the loader needs no worker processes."""

    def __init__(self, path: Path, count: int, in_memory: bool, meta: Optional[dict] = None):
        self.path, self.count, self.in_memory = path, count, in_memory
        self.meta = meta or {}  # what build_cache recorded: source, channels and why, skipped images, classes
        self._images: Optional[np.ndarray] = None
        self.labels: Optional[np.ndarray] = None  # int64 [count], an index into classes; None: no labels
        if "classes" in self.meta:
            self.labels = np.load(labels_path(path))[:count]

    @property
    def classes(self) -> Optional[list[str]]:
        return self.meta.get("classes")

    def class_counts(self) -> list[int]:
        """Images of each class, in label order."""
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()

    @property
    def images(self) -> np.ndarray:
        if self._images is None:  # opened lazily, so each loader worker maps the file itself
            self._images = np.load(self.path, mmap_mode="r")[: self.count]
        return self._images

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def describe(self, random_flip: bool, class_conditional: bool = False) -> str:
        """The run's `data:` line: source, count, size, channels and why, skipped images, classes, flips."""
        m, channels, size = self.meta, self.channels, self.images.shape[-1]
        return (f"data: {m.get('source')}: {self.count} images at {size}px, {channels} channel"
                f"{'s' if channels > 1 else ''} ({m.get('channels_reason')}), {len(m.get('skipped', []))} skipped; "
                f"{self.describe_classes(class_conditional)}random flips {'on' if random_flip else 'off'}")

    def describe_classes(self, class_conditional: bool) -> str:
        if self.classes is None:
            return ""
        count, where = len(self.classes), self.meta.get("labels_from")
        if class_conditional:
            return f"{count} class{'es' if count > 1 else ''} from {where}, class-conditional; "
        if count < 2:
            return ""
        return f"{count} classes in {where} (labels available: --class_conditional trains on them); "

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[index]))

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        order = np.argsort(indices)  # read the memory map in file order, return in the asked order
        rows = self.images[np.asarray(indices)[order]]
        return torch.from_numpy(rows[np.argsort(order)])


class Labelled(Dataset):
    """An ImageCache whose batches carry their labels, for a class-conditional run: (uint8 [B,C,S,S], int64 [B])."""

    def __init__(self, cache: ImageCache):
        self.cache, self.in_memory = cache, cache.in_memory

    def __len__(self) -> int:
        return len(self.cache)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.__getitems__(indices), torch.from_numpy(self.cache.labels[np.asarray(indices)])


def cache_path(folder: Path, source: Source, size: int, requested: str) -> Path:
    """{kind}-{size}px-{slot}-{content}.npy: one slot per source, size and channel request; the content part
    changes with the source's fingerprint and labels (or CACHE_FORMAT), so a changed source gets a new file in its
    slot."""
    slot = hashlib.sha1(f"{source.identity}|{size}|{requested}".encode()).hexdigest()[:12]
    content = hashlib.sha1(f"{CACHE_FORMAT}|{source.fingerprint}|{source.label_key}".encode()).hexdigest()[:12]
    return folder / f"{source.name}-{size}px-{slot}-{content}.npy"


def remove_stale_caches(path: Path) -> None:
    """Delete the caches the new one at `path` replaces (same slot, older content), so data_dir/cache holds at
    most one file per source, size and channel request. A run still reading one keeps its open memory map."""
    slot = path.stem.rsplit("-", 1)[0]
    for stale in path.parent.glob(f"{slot}-*"):  # .npz: evaluate.py's reference statistics of that content
        if stale.suffix in (".npy", ".json", ".npz") and not stale.name.startswith(path.stem):
            stale.unlink(missing_ok=True)


def load_dataset(name: str, image_size: int, data: DataConfig, progress: bool = True) -> ImageCache:
    """Open (building on first use) the uint8 cache of dataset `name` (--dataset_name) at image_size.

    In several processes call it on each machine's main process first (accelerator.local_main_process_first()).
    """
    source = open_source(name, data)
    path = cache_path(Path(data.data_dir).expanduser() / "cache", source, image_size, data.num_channels)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write the dataset cache under --data_dir {data.data_dir} ({e.strerror}); "
                            f"pass a writable --data_dir") from None
        channels, why = source.choose_channels(data.num_channels)
        workers = min(4, os.cpu_count() or 1) if source.pixels is None else 0  # files to decode: in parallel
        meta = {**build_cache(source, image_size, channels, path, workers, progress), "channels_reason": why}
        write_json(meta_path, meta)
        remove_stale_caches(path)
    if meta["skipped"] and progress:
        skipped = meta["skipped"]
        names = ", ".join(source.describe(i) for i in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"warning: skipped {len(skipped)} of {source.count} images in {source.label} that could not be read "
              f"(truncated or not images): {names}")
    if meta["count"] == 0:
        raise UserError(f"none of the {source.count} images in {source.label} could be read; check the files")
    nbytes = meta["count"] * meta["channels"] * image_size * image_size
    in_memory = nbytes <= psutil.virtual_memory().total // 4
    return ImageCache(path, meta["count"], in_memory, meta)


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------


class EpochShuffle(Sampler[int]):
    """A new order each epoch that is a pure function of (seed, epoch), so a resumed run sees the same
    batches. Yields a multiple of `multiple_of` indices (the global batch), so every batch on every process
    is full, no image repeats within an epoch, and a compiled model never sees a smaller last batch."""

    def __init__(self, count: int, seed: int, multiple_of: int):
        self.count, self.seed, self.epoch = count, seed, 0
        self.length = count // multiple_of * multiple_of

    def start_epoch(self, epoch: int) -> None:
        # Not named set_epoch: accelerate calls set_epoch(times iterated) on every new iterator, which after a
        # resume (or on skip_first_batches' fresh loader) is not the training epoch.
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.count, generator=generator)[: self.length].tolist()


def _as_batch(batch: torch.Tensor) -> torch.Tensor:
    return batch  # ImageCache.__getitems__ already returns the stacked batch


def batches_per_epoch(count: int, batch_size: int, num_processes: int) -> int:
    """Full batches each process loads in one pass over `count` images (see EpochShuffle)."""
    global_batch = batch_size * num_processes
    if count < global_batch:
        raise UserError(f"the dataset has {count} images, fewer than one batch of train_batch_size x "
                        f"processes = {global_batch}; lower --train_batch_size or add images")
    return count // global_batch


def make_dataloader(dataset: ImageCache | Labelled, batch_size: int, num_processes: int, seed: int, workers: int,
                    pin_memory: bool) -> tuple[DataLoader, EpochShuffle]:
    batches_per_epoch(len(dataset), batch_size, num_processes)  # at least one batch on every process
    global_batch = batch_size * num_processes
    if workers < 0:
        workers = 0 if dataset.in_memory else min(4, os.cpu_count() or 1)
    sampler = EpochShuffle(len(dataset), seed, global_batch)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=_as_batch,
                        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
    return loader, sampler
