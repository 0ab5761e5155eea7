"""Shared test fixtures: data the tests make themselves, tiny models, and the real CLIs run as subprocesses."""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One thread, as in every CLI run of the tests (OMP_NUM_THREADS=1): on a loaded 2-core machine two OpenMP threads
# spin against each other (an interpolation ran 20x slower), and in-process runs compute as the CLI ones do.
torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config) -> int:
    """-n auto (pytest.ini): one worker more than the cores. Many tests spend seconds waiting, on a subprocess's
    imports, a torchrun rendezvous or the shared tiny run another worker is making, and the extra worker computes
    meanwhile (2 cores: 284 s for the suite with 3 workers)."""
    return (os.cpu_count() or 1) + 1

# Shared with the benchmarks, so kept in bench/ (torch-fidelity installs a top-level `tests` package that shadows ours).
from bench.common import TINY_MODEL, make_image_folder, make_random_inception_weights  # noqa: E402,F401

# Fast previews and frequent logging for short runs.
TINY_RUN = TINY_MODEL + ["--train_batch_size", "4", "--sample_num_inference_steps", "4", "--num_preview_images", "4",
                         "--logging_steps", "1", "--dataloader_num_workers", "0", "--seed", "7"]


def load_cached(cfg, progress: bool = False):
    """dataset.load_dataset for the dataset a training Config names."""
    import dataset

    return dataset.load_dataset(cfg.training.dataset_name, cfg.training.image_size, cfg.data, progress=progress)


def cli_env() -> dict[str, str]:
    """The environment of every CLI run in the tests: offline, no GPU, quiet."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1", OMP_NUM_THREADS="1", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    return env


def run_cli(script: str, *args: str, timeout: float = 300, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, and return what it printed."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=popen.pop("cwd", ROOT), **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected exactly one 'error:' line on stderr, got:\n{stderr}"
    return lines[0]


def assert_user_error(result, *words: str) -> str:
    """Exit code 2, no traceback, one error line that contains every word."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    line = error_line(result.stderr)
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


def call(main, argv: list, capsys) -> types.SimpleNamespace:
    """A script's main() in-process, as the CLI would see it (argparse errors exit via SystemExit): what a new
    process would cost only in imports, a few seconds each. Each call starts with a fresh accelerate state (one
    Accelerator per process otherwise) and leaves the signal handlers as it found them (training installs its own)."""
    from accelerate.state import AcceleratorState, GradientState

    capsys.readouterr()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    handlers_before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    # Libraries' log handlers hold the stderr of the moment they were made (maybe an earlier test's, now
    # closed; diffusers and huggingface_hub pin its flush too): point them at this call's stderr meanwhile.
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    handlers = [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]
    saved = [(h.stream, vars(h).get("flush")) for h in handlers]
    for handler in handlers:
        handler.stream = sys.stderr  # not setStream(): that flushes the old stream
        if "flush" in vars(handler):
            handler.flush = sys.stderr.flush
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    finally:
        for handler, (stream, flush) in zip(handlers, saved):
            handler.stream = stream
            if flush is not None:
                handler.flush = flush
        for signum, handler in handlers_before.items():
            signal.signal(signum, handler)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def make_mixed_mode_folder(root: Path) -> Path:
    """One image in each awkward mode and format a user's folder may hold."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(rgb).convert("L").save(root / "grey.png")
    Image.fromarray(rgb).convert("LA").save(root / "grey_alpha.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.gif".replace(".gif", ".png"))
    Image.fromarray(rgb).convert("RGBA").save(root / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((rng.random((30, 40)) * 65535).astype(np.uint16)).save(root / "sixteen_bit.png")
    Image.fromarray(rgb).save(root / "bitmap.bmp")
    Image.fromarray(rgb).save(root / "web.webp")
    Image.fromarray(rgb).save(root / "scan.tiff")
    Image.fromarray(rgb[:6, :5]).save(root / "tiny.png")  # smaller than image_size
    return root


def make_bars_folder(root: Path) -> Path:
    """A labelled folder as bench/quality.py reads glyphs16: one sub-folder per class of 16x16 greyscale images, a white
    bar on black at a height of its own per class, shifted a pixel at random. Simple enough to learn in a minute."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("bar_top", "bar_middle", "bar_bottom")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            image = np.zeros((16, 16), dtype=np.uint8)
            row = 2 + 5 * label + rng.integers(0, 2)
            image[row:row + 3, 2:14] = 255
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def write_mnist(data_dir: Path, count: int = 32) -> Path:
    """MNIST in its real IDX format where torchvision looks for it, so the real loader runs offline."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    images = (rng.random((count, 28, 28)) * 255).astype(np.uint8)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    for split, n in (("train", count), ("t10k", count // 4)):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images[:n].tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels[:n].tobytes())
    return data_dir


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist_data"))


EPOCHS, STEPS_PER_EPOCH = 2, 3  # of trained_run: 12 images in batches of 4


def once_per_session(tmp_path_factory, name: str, make):
    """make(folder) once per test session, even when pytest-xdist (pytest.ini: -n auto) runs the tests in several
    worker processes: pytest-xdist's own recipe, a file lock in the temporary folder that the workers share, and the
    value kept there as a pickle for the workers that come second."""
    import pickle

    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{folder}.lock"):
        saved = folder / "value.pickle"
        if saved.exists():
            return pickle.loads(saved.read_bytes())
        folder.mkdir(exist_ok=True)
        value = make(folder)
        saved.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, image_folder) -> tuple[Path, subprocess.CompletedProcess]:
    """One tiny training run shared by the tests that inspect its outputs or sample from it (they only read it)."""
    def train(folder: Path) -> tuple[Path, subprocess.CompletedProcess]:
        out = folder / "results"
        proc = run_cli("train_ddpm.py", *TINY_RUN, "--dataset_name", "custom", "--dataset_path", image_folder,
                       "--data_dir", folder / "data", "--output_dir", out, "--num_epochs", EPOCHS,
                       "--save_image_epochs", 1, "--save_model_epochs", 2)
        return out, proc

    return once_per_session(tmp_path_factory, "run", train)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """The random-weights Inception file (about 96 MB), made once per test session."""
    return once_per_session(tmp_path_factory, "inception",
                            lambda folder: make_random_inception_weights(folder / "random-inception.pth"))


def save_tiny_pipeline(path: Path, size: int = 8, channels: int = 3, edm: bool = False) -> Path:
    """An untrained DDPMPipeline of a UNet with 8 and 16 channels: sampling costs milliseconds. edm: saved as a
    --parameterization edm run saves it, a ConsistencyModelPipeline with an EDMEulerScheduler."""
    import torch
    from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DModel

    from model import pipeline_class

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    scheduler = EDMEulerScheduler(sigma_data=0.5) if edm else DDPMScheduler()
    pipeline_class(scheduler)(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path
