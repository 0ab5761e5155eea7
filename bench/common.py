"""Helpers shared by the benchmarks (and the tests): the model presets, generated data, a random-weights Inception,
device name, FLOP count, the timed training loop."""

from __future__ import annotations

import platform
import time
from pathlib import Path

# The tests' and benchmarks' tiny model, a UNet of about 0.2M parameters at 16x16: a training step takes milliseconds
# on a CPU. Kept here, not in tests/: torch-fidelity installs a top-level `tests` package that shadows ours.
TINY_MODEL = ["--image_size", "16", "--block_out_channels", "16", "32", "--norm_num_groups", "8",
              "--layers_per_block", "1", "--down_block_types", "DownBlock2D", "AttnDownBlock2D",
              "--up_block_types", "AttnUpBlock2D", "UpBlock2D", "--attention_head_dim", "8"]
# Flags of train_ddpm.py that select each benchmark model.
MODEL_FLAGS = {"ddpm-cifar10": ["--model_preset", "ddpm-cifar10"], "readme": ["--image_size", "64"]}


def model_flags(model: str) -> list[str]:
    """train_ddpm.py flags for: tiny (the tests' TINY_MODEL, 16x16), ddpm-cifar10 (config.PRESETS, 32x32) or
    readme (config.py's defaults, 64x64)."""
    if model == "tiny":
        return list(TINY_MODEL)
    return list(MODEL_FLAGS[model])


def make_image_folder(root: Path, count: int = 12, size: tuple[int, int] = (24, 20)) -> Path:
    """A folder (with a sub-folder) of RGB PNG and JPEG images of varied sizes (tests and benchmarks)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = size[0] + i % 5, size[1] + (i * 3) % 7
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        folder = root / "sub" if i % 3 == 0 else root
        Image.fromarray(pixels).save(folder / (f"img{i:02d}.png" if i % 2 else f"img{i:02d}.jpg"), quality=95)
    return root


def make_random_inception_weights(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved as its real weights file is: the real
    loading path runs offline on it. He-initialised convolutions keep the features of order 1 through 90+ layers
    (the default init shrinks them to ~1e-8), so different images give different features."""
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    torch.manual_seed(0)
    with mock.patch.object(torch.nn.Module, "load_state_dict", lambda *args, **kwargs: None), \
            mock.patch.object(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: {}):
        model = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


def resolved_run(model: str, *extra: str, channels: int = 3, device_type: str = "cpu"):
    """The resolved training run (config.Resolved) of a benchmark model and flags, as train_ddpm.train resolves it
    for RGB data (learning rate and warm-up from --max_train_steps when given)."""
    import config
    import train_ddpm
    from model import count_parameters

    cfg, _ = train_ddpm.parse_config(model_flags(model) + list(extra))
    return config.resolve(cfg, count_parameters, channels=channels, device_type=device_type,
                          native_bf16=device_type == "cuda")


def model_config(model: str, *extra: str):
    """The resolved train_ddpm Config of a benchmark model."""
    return resolved_run(model, *extra).cfg


def synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"{name} ({torch.get_num_threads()} threads)"


def flops_per_image(cfg, training: bool) -> float:
    """FLOPs of one image through the UNet (torch's FlopCounterMode, batch 1 on the CPU): one forward pass, or
    forward + backward for a training step: 12.1 / 36.3 GFLOP for ddpm-cifar10."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model import build_unet
    size = cfg.training.image_size
    unet = build_unet(cfg.model, size, 3)
    sample, timestep = torch.randn(1, 3, size, size), torch.tensor([10])
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(training):
        out = unet(sample, timestep).sample
        if training:
            out.sum().backward()
    return float(counter.get_total_flops())


def new_accelerator(cpu: bool, **kwargs):
    """A fresh Accelerator: accelerate allows one per process (one mixed precision, one dynamo setting) unless
    its state is reset; an earlier Accelerator keeps working (checked with bf16 autocast on both)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    return Accelerator(cpu=cpu, **kwargs)


class Loop:
    """One training loop's step function, run `steps` at a time between synchronizations; keeps the times."""

    def __init__(self, name, step, device, tf32):
        self.name, self.step, self.device, self.tf32 = name, step, device, tf32
        self.i, self.seconds, self.resident, self.peak = 0, [], 0, 0

    def run(self, steps: int) -> None:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = self.tf32  # train_ddpm.train turns it on; the example does not
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step(self.i)
            self.i += 1
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)


def pick_device(choice: str, threads=None):
    """The benchmark's device. On a CPU, one thread unless told: two swing tenfold on 2 shared cores."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    torch.set_num_threads(threads or (torch.get_num_threads() if cuda else 1))
    return torch.device("cuda" if cuda else "cpu")
