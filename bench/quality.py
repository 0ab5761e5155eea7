"""Image quality at equal budget: our toolkit's CLIs against the plain diffusers loop and two strong recipes.

    python bench/quality.py                          # 3,000 steps, seed 0, every side
    python bench/quality.py --steps 1000 --seeds 0 1
    python bench/quality.py --steps 1000 --label lr6e-4 --ours_args "--learning_rate 6e-4 --lr_warmup_steps 100"
    python bench/quality.py --conditional            # class-conditional: ask for each letter, sweep the guidance
    python bench/quality.py --steps 1000 --sides edm --edm_parts sigma=ddpm   # EDM with one of its parts swapped

Every side trains for the same number of optimizer steps at the same batch on the same folder (default
../shared/data/glyphs16: 5,772 greyscale 16x16 letters, one folder per letter), then draws --num_samples images
with about 50 network evaluations each.
  ours:  the real `train_ddpm.py` and `inference.py` CLIs, given only data, image size, model, batch, steps and
         seed (plus --ours_args when a candidate is tried, and --sampler_args); every other setting is the default
         a user gets, the sampler included (inference.py's Heun, 25 steps, 49 evaluations). The UNet: two levels, 32 and 64 channels, attention at 8x8 (1.0M parameters).
  plain: the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py, written out here:
         AdamW 1e-4 (betas 0.95/0.999, weight decay 1e-6), cosine LR with 500 warm-up steps, clip 1.0, no EMA,
         no flips, images read as 1 channel, our UNet; sampled with diffusers' DDIMPipeline, 50 steps.
  lucid: lucidrains' denoising-diffusion-pytorch 2.3.4 with its defaults (its Trainer: Adam 1e-4, EMA 0.995 every
         10 steps; GaussianDiffusion: pred_v, sigmoid schedule), its Unet(dim 32, dim_mults 1,2, 0.83M
         parameters), 1 channel, no flips; its DDIM, 50 steps. A bench-only package, installed by this script
         with pip --no-deps (plus what it imports) into OUT/packages, never into requirements.txt.
  edm:   the EDM recipe of Karras et al. (2022, NVlabs/edm), written out here on our UNet: preconditioning
         (sigma_data 0.5, c_skip, c_out, c_in, c_noise = ln(sigma)/4), log-normal sigma (P_mean -1.2, P_std 1.2),
         its loss weight, Adam 2e-3 ramped up over 5% of the steps, EMA half-life 0.05 x images seen; its Heun
         sampler, 25 steps on the rho-7 schedule from sigma 80 to 0.002 (49 evaluations). --edm_parts swaps its
         parts for ours one at a time (EDM_PARTS), to find which carry its gain.
Score: the Frechet distance between generated and real images in the penultimate features of a small CNN trained
once on the folder's labels (cached; shipped in bench/judges/ for glyphs16 and bench/digits.py's digits, so scores
compare across machines; its held-out accuracy is printed), plus the mean top-1 confidence and the
entropy of the predicted-class histogram (real data: about ln(classes)). Lower distance is better.
The reference sides' samples are cached per (side, steps, seed, samples, batch, data): they do not depend on our
code. At 3,000 steps each reference side's ratio to plain is checked against the figures first measured for it
(REFERENCE_RATIOS): a side far from its ratio is a bug in the side.
Writes OUT/compare-*.png (the sides left to right: plain, lucid, edm, ours) and appends every score to
OUT/results.jsonl.

--conditional: the class-conditional protocol, on the same data, UNet, batch and steps. Ours is trained twice with
the real CLIs: as above (unconditional), and with --class_conditional, which then draws --per_class images of every
class (inference.py --class_label, each letter by name) at each of --guidance_scales (at w 0, which ignores the class,
as many images from seeds of their own, their classes drawn by seed). Scores: the judge's accuracy on
the requested class; the distance over all classes (as above, the same number of images for both models); and the
distance per class, averaged over the classes (the unconditional model's images are given the class the judge sees in
them). Writes OUT/conditional-*-w{W}.png: a row per class, --per_class images each (at most 10).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=2)
SAMPLER_STEPS = 50
REFERENCE_SIDES = ("plain", "lucid", "edm")
SIDES = (*REFERENCE_SIDES, "ours")
# Each reference side's distance over plain's at 3,000 steps, as first measured (with another judge of the same
# kind): a ratio more than REFERENCE_TOLERANCE times off means the side is not the recipe it claims to be.
# The plain loop's distance depends on how the judge spreads unreadable images: on our judges edm / plain has
# read about twice the 0.031 (0.067), while the edm side against our earlier defaults is within 13% of
# the pair (bench/RESULTS.md, "Is the edm side faithful?"): read a failed edm check with that in mind.
REFERENCE_RATIOS = {"lucid": 0.135, "edm": 0.031}
REFERENCE_TOLERANCE = 1.6
# The judges every table in bench/RESULTS.md from 2026-12-02 (third stop) on was scored with, one per dataset
# fingerprint: a judge retrained on another machine came out different (held-out accuracy 0.993 to 0.998) and its
# distances differed by up to 10%, so every session had to rerun the reference sides. train_classifier takes the
# shipped one when the data's fingerprint matches; another dataset trains its own.
SHIPPED_JUDGES = ROOT / "bench" / "judges"
LUCID_PACKAGES = ("denoising-diffusion-pytorch==2.3.4", "ema-pytorch==0.8.3", "einops==0.8.2", "pytorch-fid==0.3.0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glyphs16"),
                   help="a folder of images, one sub-folder per class (default: ../shared/data/glyphs16)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps for each side")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; each gives one run per side")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--num_samples", type=int, default=900)
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--ours_args", default="", help="extra train_ddpm.py flags for our side (a candidate)")
    p.add_argument("--sampler_args", default="",
                   help="inference.py flags of our side's sampler; default: none, so inference.py's default sampler "
                        "(Heun, 25 steps on the Karras noise levels: 49 network evaluations a sample)")
    p.add_argument("--edm_parts", nargs="+", default=[], metavar="PART=VALUE",
                   help="swap parts of the edm side's recipe for ours, to find which carry its gain: "
                        + ", ".join(f"{k}={'|'.join(v)}" for k, v in EDM_PARTS.items()) + ", sigma_data=NUMBER "
                        "(the first of each is EDM's own)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at the same time (each on --threads threads)")
    p.add_argument("--label", default="defaults", help="names our side's runs (one label per candidate)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per side; both sides of a seed run at the same time")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "quality"))
    p.add_argument("--reuse", action="store_true", help="score our side's existing samples instead of retraining")
    p.add_argument("--score", nargs="+", metavar="DIR",
                   help="only score these folders of generated images (inference.py outputs), e.g. other samplers")
    p.add_argument("--conditional", action="store_true",
                   help="the class-conditional protocol: ours with --class_conditional against ours unconditional")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=[0, 1, 2, 3, 5],
                   help="conditional: the guidance scales w to sample at (0: unconditional, 1: no guidance)")
    p.add_argument("--per_class", type=int, default=20, help="conditional: images asked of each class")
    p.add_argument("--worker", choices=REFERENCE_SIDES, help=argparse.SUPPRESS)
    p.add_argument("--worker_dir", help=argparse.SUPPRESS)
    p.add_argument("--worker_seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.edm_parts = parse_edm_parts(args.edm_parts)
    return args


# ---------------------------------------------------------------------------------------------------
# The real images, by class
# ---------------------------------------------------------------------------------------------------


def labelled_files(folder: str) -> tuple[list[Path], list[int], list[str]]:
    """The image files of one sub-folder per class, in load_labelled's order, their labels and the class names."""
    root = Path(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(path, label) for label, name in enumerate(classes) for path in sorted((root / name).iterdir())]
    return [path for path, _ in files], [label for _, label in files], classes


def load_labelled(folder: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 [N, size, size] greyscale images and int labels from one sub-folder per class."""
    from PIL import Image

    paths, labels, classes = labelled_files(folder)
    images = []
    for path in paths:
        with Image.open(path) as image:
            grey = image.convert("L")
            if grey.size != (size, size):
                grey = grey.resize((size, size), Image.BILINEAR)
            images.append(np.asarray(grey, dtype=np.uint8))
    return np.stack(images), np.asarray(labels), classes


def fingerprint(images: np.ndarray) -> str:
    return hashlib.sha1(images.tobytes()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# The judge: a small CNN trained on the labels; its penultimate layer gives the features
# ---------------------------------------------------------------------------------------------------


def make_classifier(num_classes: int, size: int):
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU(),  # features: this layer's output
        nn.Dropout(0.3), nn.Linear(128, num_classes))


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, path: Path):
    """Trained once per dataset (seed 0), then loaded from `path`, or from SHIPPED_JUDGES where one of the same name
    (the data's fingerprint) is there, which comes first. Returns the model and its held-out accuracy."""
    import torch
    import torch.nn.functional as F

    shipped = SHIPPED_JUDGES / path.name
    if shipped.exists() or path.exists():
        model = make_classifier(num_classes, images.shape[-1])
        saved = torch.load(shipped if shipped.exists() else path)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["accuracy"]
    torch.manual_seed(0)  # before the weights are drawn: the same data gives the same judge in any process
    model = make_classifier(num_classes, images.shape[-1])
    generator = torch.Generator().manual_seed(0)
    held_out, train = judge_split(len(images), generator)
    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    y = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    epochs = 20
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * math.ceil(len(train) / 128))
    for _ in range(epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(128):
            shifted = torch.roll(x[batch], shifts=tuple(torch.randint(-1, 2, (2,), generator=generator).tolist()),
                                 dims=(2, 3))  # one-pixel jitter: features that do not hinge on exact placement
            loss = F.cross_entropy(model(shifted), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[held_out]).argmax(1) == y[held_out]).float().mean().item()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "accuracy": accuracy}, path)
    return model, accuracy


def judge_split(count: int, generator=None):
    """The indices the judge holds out (a tenth) and trains on: the first draw of a seed-0 generator (`generator`,
    which train_classifier goes on drawing from), so bench/inpaint.py can hold out the same letters."""
    import torch

    order = torch.randperm(count, generator=generator or torch.Generator().manual_seed(0))
    return order[: count // 10], order[count // 10:]


def judge(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features [N, 128] and class probabilities [N, classes] of uint8 [N, S, S] images."""
    import torch

    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    features, probs = [], []
    with torch.no_grad():
        for batch in x.split(512):
            f = model[:-2](batch)
            features.append(f)
            probs.append(model[-2:](f).softmax(1))
    return torch.cat(features).double().numpy(), torch.cat(probs).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), with symmetric square roots (exact, stable)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ s_b @ root_a).clip(0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def score(model, real_features: np.ndarray, samples: np.ndarray) -> dict:
    features, probs = judge(model, samples)
    histogram = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
    entropy = float(-(histogram[histogram > 0] * np.log(histogram[histogram > 0])).sum())
    return {"distance": frechet_distance(features, real_features), "confidence": float(probs.max(1).mean()),
            "class_entropy": entropy}


# ---------------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------------


def plain_worker(data: str, size: int, batch_size: int, steps: int, seed: int, num_samples: int, out: Path) -> None:
    """diffusers' train_unconditional.py loop, as a user runs it with the settings above; writes samples.npy."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    images, _, _ = load_labelled(data, size)
    torch.manual_seed(seed)
    model = UNet2DModel(sample_size=size, in_channels=1, out_channels=1, **MODEL)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=steps)
    data_tensor = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)  # ToTensor + Normalize(0.5, 0.5)
    loader = torch.utils.data.DataLoader(data_tensor, batch_size=batch_size, shuffle=True, drop_last=True)
    step, bar = 0, tqdm(total=steps, desc=f"plain seed {seed}", mininterval=10)
    model.train()
    while step < steps:
        for clean in loader:
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],)).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            loss = F.mse_loss(model(noisy, timesteps).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            step += 1
            bar.update(1)
            if step == steps:
                break
    bar.close()
    model.eval()
    pipeline = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, num_samples, 150):
        count = min(150, num_samples - start)
        batch = pipeline(batch_size=count, generator=generator, num_inference_steps=SAMPLER_STEPS, eta=0.0,
                         output_type="np").images  # [B, S, S, 1] in [0, 1]
        samples.append((batch[..., 0] * 255).round().astype(np.uint8))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", np.concatenate(samples))


def scaled_images(data: str, size: int):
    """The folder's images as float [N, 1, S, S] in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    import torch

    images, _, _ = load_labelled(data, size)
    return torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)


# --edm_parts: each of the EDM recipe's parts can be swapped for ours, one at a time, to find which carry its gain.
# The first value of each is EDM's own (the default); sigma_data is a number (EDM's 0.5).
EDM_PARTS = {
    "sigma": ("lognormal", "ddpm"),  # training noise levels: ln(sigma) ~ N(-1.2, 1.2), or uniform DDPM timesteps
    "weight": ("edm", "minsnr"),  # loss weight on D's error: EDM's lambda, or min-SNR-5 (min(1 / sigma^2, 5))
    "precond": ("edm", "eps"),  # EDM's c_skip/c_out/c_in, or epsilon prediction (D = x - sigma F)
    "cnoise": ("edm", "ddpm"),  # the UNet's noise input: ln(sigma) / 4, or the (fractional) DDPM timestep
    "opt": ("edm", "ours"),  # Adam 2e-3, constant after the ramp; or ours: AdamW 1.7e-3 (betas 0.95/0.999,
    #                           weight decay 1e-6), warm-up then cosine to 0, gradient norm clipped to 1
    "ema": ("edm", "power"),  # half-life 0.05 x images seen, or our power-function EMA of length 0.10
}


def parse_edm_parts(items: list[str]) -> dict:
    """["sigma=ddpm", "sigma_data=1"] -> {"sigma": "ddpm", "sigma_data": 1.0}; a SystemExit naming the problem."""
    parts = {}
    for item in items:
        key, _, value = item.partition("=")
        if key == "sigma_data":
            parts[key] = float(value)
        elif key in EDM_PARTS and value in EDM_PARTS[key]:
            parts[key] = value
        else:
            choices = ", ".join(f"{k}={'|'.join(v)}" for k, v in EDM_PARTS.items())
            raise SystemExit(f"error: --edm_parts {item}: expected one of {choices}, sigma_data=NUMBER")
    return parts


def edm_parts_tag(parts: dict) -> str:
    return "".join(f"-{key}={value:g}" if isinstance(value, float) else f"-{key}={value}"
                   for key, value in sorted(parts.items()))


def edm_worker(data: str, size: int, batch_size: int, steps: int, seed: int, num_samples: int, out: Path,
               parts: dict | None = None) -> None:
    """The EDM recipe (Karras et al. 2022; NVlabs/edm training/loss.py, training_loop.py, generate.py) on our UNet,
    written out, with any of its parts swapped for ours (EDM_PARTS); writes samples.npy."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    from ema import length_to_exponent

    part = {key: values[0] for key, values in EDM_PARTS.items()} | {"sigma_data": 0.5} | (parts or {})
    sigma_data, p_mean, p_std = part["sigma_data"], -1.2, 1.2
    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=size, in_channels=1, out_channels=1, **MODEL)
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()  # our default schedule
    ddpm_sigmas = ((1 - alphas) / alphas).sqrt()

    def denoise(model, x, sigma):
        """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): EDM's preconditioning (its Table 1, EDMPrecond)."""
        s = sigma.reshape(-1, 1, 1, 1)
        if part["precond"] == "edm":
            c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
            c_out = s * sigma_data / (s ** 2 + sigma_data ** 2).sqrt()
            c_in = 1 / (sigma_data ** 2 + s ** 2).sqrt()
        else:  # epsilon prediction, as the VP column of EDM's Table 1
            c_skip, c_out, c_in = torch.ones_like(s), -s, 1 / (1 + s ** 2).sqrt()
        if part["cnoise"] == "edm":
            c_noise = sigma.log() / 4
        else:  # the DDPM timestep of this sigma, interpolated in ln(sigma) as diffusers' Heun and Euler do
            grid = ddpm_sigmas.log().numpy()
            c_noise = torch.from_numpy(np.interp(sigma.double().log().cpu().numpy(), grid, np.arange(len(grid))))
        return c_skip * x + c_out * model((c_in * x).float(), c_noise.float().flatten()).sample.to(x.dtype)

    ema = copy.deepcopy(net).eval().requires_grad_(False)
    if part["opt"] == "edm":
        lr, optimizer = 2e-3, torch.optim.Adam(net.parameters(), lr=2e-3, betas=(0.9, 0.999), eps=1e-8)
    else:
        lr = 1.7e-3
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-6)
    rampup_images = 0.05 * steps * batch_size  # lr_rampup_kimg: 5% of the run
    power = length_to_exponent(0.10)
    loader = torch.utils.data.DataLoader(scaled_images(data, size), batch_size=batch_size, shuffle=True,
                                         drop_last=True)
    step, seen, bar = 0, 0, tqdm(total=steps, desc=f"edm seed {seed}", mininterval=10)
    net.train()
    while step < steps:
        for y in loader:
            if part["sigma"] == "lognormal":  # EDMLoss: log-normal noise levels
                sigma = (torch.randn(len(y)) * p_std + p_mean).exp()
            else:
                sigma = ddpm_sigmas[torch.randint(0, len(ddpm_sigmas), (len(y),))].float()
            if part["weight"] == "edm":
                weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
            else:  # min-SNR-5 on epsilon, min(1, 5 sigma^2), is this on D's error
                weight = (1 / sigma ** 2).clamp(max=5.0)
            noisy = y + torch.randn_like(y) * sigma.reshape(-1, 1, 1, 1)
            loss = (weight.reshape(-1, 1, 1, 1) * (denoise(net, noisy, sigma) - y) ** 2).sum() / batch_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if part["opt"] == "edm":  # linear LR ramp-up in images seen
                factor = min(seen / max(rampup_images, 1e-8), 1)
            else:  # linear warm-up over 5% of the steps, then cosine to 0 (diffusers' cosine schedule)
                warm = 0.05 * steps
                factor = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            for param in net.parameters():
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            if part["opt"] == "ours":
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            if part["ema"] == "edm":
                half_life = min(500_000, seen * 0.05)  # ema_halflife_kimg 500, ema_rampup_ratio 0.05
                beta = 0.5 ** (batch_size / max(half_life, 1e-8))
            else:  # the power-function profile of length 0.10 (ema.PowerEMA)
                beta = (1 - batch_size / (seen + batch_size)) ** (power + 1)
            with torch.no_grad():
                for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                    p_ema.copy_(p_net.detach().lerp(p_ema, beta))
            seen += batch_size
            step += 1
            bar.update(1)
            if step == steps:
                break
    bar.close()

    @torch.no_grad()
    def heun(latents, num_steps=25, sigma_min=0.002, sigma_max=80.0, rho=7.0):
        """EDM's deterministic sampler (its Algorithm 2 with S_churn 0): 2 * num_steps - 1 evaluations."""
        i = torch.arange(num_steps, dtype=torch.float64)
        t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
        x = latents.double() * t[0]
        for k, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
            d_cur = (x - denoise(ema, x, t_cur.expand(len(x)))) / t_cur
            x_next = x + (t_next - t_cur) * d_cur
            if k < num_steps - 1:
                d_prime = (x_next - denoise(ema, x_next, t_next.expand(len(x)))) / t_next
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            x = x_next
        return x

    generator = torch.Generator().manual_seed(seed)
    samples = []
    for start in range(0, num_samples, 150):
        latents = torch.randn(min(150, num_samples - start), 1, size, size, generator=generator)
        images = heun(latents)[:, 0]
        samples.append((images * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy())  # as EDM's generate.py
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", np.concatenate(samples))


def lucid_worker(data: str, size: int, batch_size: int, steps: int, seed: int, num_samples: int, out: Path) -> None:
    """lucidrains' denoising-diffusion-pytorch as its README trains a folder, with its defaults; writes
    samples.npy. Imports the package from OUT/packages (see install_lucid)."""
    import torch
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    torch.manual_seed(seed)
    model = Unet(dim=32, dim_mults=(1, 2), channels=1)
    diffusion = GaussianDiffusion(model, image_size=size, timesteps=1000, sampling_timesteps=SAMPLER_STEPS)
    trainer = Trainer(diffusion, data, train_batch_size=batch_size, train_num_steps=steps,
                      augment_horizontal_flip=False, calculate_fid=False, save_and_sample_every=10 ** 9,
                      results_folder=str(out / "trainer"))
    trainer.train()
    sampler = trainer.ema.ema_model.eval()
    torch.manual_seed(seed)
    samples = []
    with torch.inference_mode():
        for start in range(0, num_samples, 150):
            images = sampler.sample(batch_size=min(150, num_samples - start))[:, 0]  # [B, S, S] in [0, 1]
            samples.append((images * 255).round().clamp(0, 255).to(torch.uint8).numpy())
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", np.concatenate(samples))


WORKERS = {"plain": plain_worker, "lucid": lucid_worker, "edm": edm_worker}


def install_lucid(out: Path) -> Path:
    """denoising-diffusion-pytorch and what it imports (but torch, accelerate, numpy, scipy, ..., which the toolkit
    has), with pip --no-deps into OUT/packages: a bench-only dependency, kept out of the toolkit's environment."""
    target = out / "packages"
    if not (target / "denoising_diffusion_pytorch").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        *LUCID_PACKAGES], check=True)
    return target


def side_env(threads: int, extra_path: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return env


def reference_command(args, side: str, seed: int, run_dir: Path) -> list[str]:
    return [sys.executable, __file__, "--worker", side, "--worker_dir", str(run_dir), "--worker_seed", str(seed),
            "--data", args.data, "--steps", str(args.steps), "--batch_size", str(args.batch_size),
            "--image_size", str(args.image_size), "--num_samples", str(args.num_samples),
            *(["--edm_parts", *(f"{k}={v}" for k, v in args.edm_parts.items())] if side == "edm" and args.edm_parts
              else [])]


def train_command(data: str, image_size: int, batch_size: int, steps: int, seed: int, output_dir: Path,
                  data_dir: Path) -> list[str]:
    """Our side's train_ddpm.py command: only data, size, model, batch, steps and seed given."""
    m = MODEL
    return [sys.executable, str(ROOT / "train_ddpm.py"), "--dataset_name", "custom", "--dataset_path", data,
            "--image_size", str(image_size), "--block_out_channels", *map(str, m["block_out_channels"]),
            "--down_block_types", *m["down_block_types"], "--up_block_types", *m["up_block_types"],
            "--train_batch_size", str(batch_size), "--max_train_steps", str(steps), "--seed", str(seed),
            "--output_dir", str(output_dir), "--data_dir", str(data_dir), "--overwrite_output_dir"]


def ours_script(args, seed: int, run_dir: Path) -> str:
    """The shell commands of our side: the real CLIs, only data, size, model, batch, steps and seed given."""
    train = [*train_command(args.data, args.image_size, args.batch_size, args.steps, seed, run_dir / "run",
                            Path(args.out) / "data"), *shlex.split(args.ours_args)]
    sample = [sys.executable, str(ROOT / "inference.py"), "--model_path", str(run_dir / "run" / "final_model"),
              "--num_images", str(args.num_samples), *shlex.split(args.sampler_args), "--batch_size", "150",
              "--output_dir", str(run_dir / "samples")]
    return f"{shlex.join(train)} && {shlex.join(sample)}"


def conditional_script(args, seed: int, run_dir: Path) -> str:
    """Our class-conditional side: train_ddpm.py --class_conditional (else as ours_script), then inference.py asking
    for --per_class images of every class at each guidance scale, into run_dir/samples-w{W}."""
    train = [*train_command(args.data, args.image_size, args.batch_size, args.steps, seed, run_dir / "run",
                            Path(args.out) / "data"), "--class_conditional", *shlex.split(args.ours_args)]
    classes = labelled_files(args.data)[2]
    # w 0 ignores the class: asked with the same seeds for every class it would draw the same images 52 times, so it
    # draws as many images from seeds of their own (their classes drawn by seed, as inference.py does without a class).
    asked = {w: ["--class_label", *classes, "--num_images", str(args.per_class)] if w != 0 else
             ["--num_images", str(args.per_class * len(classes))] for w in args.guidance_scales}
    sample = [[sys.executable, str(ROOT / "inference.py"), "--model_path", str(run_dir / "run" / "final_model"),
               *asked[w], *shlex.split(args.sampler_args), "--guidance_scale", f"{w:g}", "--batch_size", "150",
               "--output_dir", str(run_dir / f"samples-w{w:g}")] for w in args.guidance_scales]
    return " && ".join(shlex.join(command) for command in [train, *sample])


def start_side(args, side: str, seed: int, run_dir: Path) -> subprocess.Popen:
    """One side's training and sampling, in a subprocess of its own that logs to run_dir/log.txt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    extra_path = install_lucid(Path(args.out)) if side == "lucid" else None
    if side in ("ours", "conditional"):
        script = (ours_script if side == "ours" else conditional_script)(args, seed, run_dir)
        (run_dir / "command.sh").write_text(script + "\n")
        command = ["bash", "-c", script]
    else:
        command = reference_command(args, side, seed, run_dir)
    return subprocess.Popen(command, env=side_env(args.threads, extra_path), cwd=ROOT,
                            stdout=open(run_dir / "log.txt", "w"), stderr=subprocess.STDOUT)


def run_all(args, jobs: list[tuple[str, int, Path]]) -> bool:
    """Run the (side, seed, folder) jobs, at most --jobs at a time; False (with a message) if one fails."""
    running: list[tuple[subprocess.Popen, str, int, Path]] = []
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < args.jobs:
            side, seed, run_dir = pending.pop(0)
            running.append((start_side(args, side, seed, run_dir), side, seed, run_dir))
        time.sleep(2)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            proc, side, seed, run_dir = job
            if proc.returncode != 0:
                for other in running:
                    other[0].kill()
                print(f"error: the {side} side failed (seed {seed}); see {run_dir / 'log.txt'}", file=sys.stderr)
                return False
    return True


def read_samples(folder: Path, count: int) -> np.ndarray:
    """The images inference.py wrote to `folder`, as uint8 [N, S, S] greyscale."""
    from PIL import Image

    manifest = json.loads((folder / "manifest.json").read_text())
    files = [folder / f["file"] for f in manifest["files"]][:count]
    return np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.uint8) for f in files])


def read_requested(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The images inference.py wrote for --class_label (uint8 [N, S, S]) and the class each was asked for, as an
    index into the judge's classes (matched by name)."""
    from PIL import Image

    files = json.loads((folder / "manifest.json").read_text())["files"]
    images = np.stack([np.asarray(Image.open(folder / f["file"]).convert("L"), dtype=np.uint8) for f in files])
    return images, np.asarray([classes.index(f["class"]) for f in files])


def per_class_distance(features: np.ndarray, classes_of: np.ndarray, real_features: np.ndarray,
                       real_labels: np.ndarray) -> dict[int, float]:
    """The distance of each class's images to the real images of that class (classes with at least 2 images)."""
    return {int(c): frechet_distance(features[classes_of == c], real_features[real_labels == c])
            for c in np.unique(classes_of) if (classes_of == c).sum() >= 2}


def conditional_scores(model, real_features: np.ndarray, real_labels: np.ndarray, samples: np.ndarray,
                       requested: np.ndarray | None) -> dict:
    """Accuracy on the requested classes, the distance over all classes, the mean distance per class. Without
    requested classes (an unconditional model) each image counts as the class the judge sees in it."""
    features, probs = judge(model, samples)
    seen = probs.argmax(1)
    classes_of = seen if requested is None else requested
    per_class = per_class_distance(features, classes_of, real_features, real_labels)
    result = {"distance": frechet_distance(features, real_features),
              "per_class_distance": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
              "classes_scored": len(per_class), "per_class": {str(c): d for c, d in per_class.items()}}
    if requested is not None:
        result["accuracy"] = float((seen == requested).mean())
    return result


def conditional_main(args, classifier, real_features: np.ndarray, real_labels: np.ndarray, classes: list[str],
                     out: Path) -> int:
    """--conditional: ours unconditional and class-conditional at each guidance scale; the table, grids and
    results.jsonl rows."""
    args.num_samples = args.per_class * len(classes)  # the unconditional model draws as many images in all
    started = time.time()

    def run_dir(side: str, seed: int) -> Path:
        tag = f"steps{args.steps}-seed{seed}"
        return out / f"ours-{args.label}" / tag if side == "ours" else out / f"ours-{args.label}-conditional" / tag

    def done(side: str, seed: int) -> bool:
        last = "samples" if side == "ours" else f"samples-w{args.guidance_scales[-1]:g}"
        return args.reuse and (run_dir(side, seed) / last / "manifest.json").exists()

    todo = [(side, seed, run_dir(side, seed)) for seed in args.seeds for side in ("ours", "conditional")
            if not done(side, seed)]
    if not run_all(args, todo):
        return 1
    minutes = round((time.time() - started) / 60, 1)
    for seed in args.seeds:
        tag = f"steps{args.steps}-seed{seed}"
        base = conditional_scores(classifier, real_features, real_labels,
                                  read_samples(run_dir("ours", seed) / "samples", args.num_samples), None)
        print(f"seed {seed}, {args.steps} steps, {args.per_class} images of each of {len(classes)} classes:")
        print(f"  unconditional       distance {base['distance']:8.1f}  per class {base['per_class_distance']:8.1f} "
              f"({base['classes_scored']} classes seen)")
        rows = []
        for w in args.guidance_scales:
            samples, requested = read_requested(run_dir("conditional", seed) / f"samples-w{w:g}", classes)
            r = conditional_scores(classifier, real_features, real_labels, samples, requested)
            rows.append({"protocol": "conditional", "seed": seed, "steps": args.steps, "label": args.label,
                         "ours_args": args.ours_args, "sampler_args": args.sampler_args, "guidance_scale": w,
                         "per_class_images": args.per_class, "minutes": minutes, "conditional": r,
                         "unconditional": base})
            save_class_grid(samples, requested, out / f"conditional-{args.label}-{tag}-w{w:g}.png")
            print(f"  conditional w {w:<4g} distance {r['distance']:8.1f}  per class {r['per_class_distance']:8.1f}  "
                  f"accuracy {r['accuracy']:.3f}  all classes vs unconditional {r['distance'] / base['distance']:.3f}")
        with open(out / "results.jsonl", "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        best = min(rows, key=lambda row: row["conditional"]["distance"])
        print(f"  lowest distance at w {best['guidance_scale']:g}; accuracy target 0.95, distance target at most "
              f"the unconditional {base['distance']:.1f}")
    print(f"per-class grids (a row per class): {out}/conditional-{args.label}-steps{args.steps}-seed*-w*.png")
    return 0


# ---------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------


def grid(samples: np.ndarray, columns: int = 10, scale: int = 4, rows: int | None = None) -> np.ndarray:
    shown = samples[: columns * (rows or columns)]
    rows = math.ceil(len(shown) / columns)
    size = samples.shape[-1]
    canvas = np.full((rows * (size + 1) + 1, columns * (size + 1) + 1), 96, dtype=np.uint8)
    for k, image in enumerate(shown):
        r, c = divmod(k, columns)
        canvas[1 + r * (size + 1): 1 + r * (size + 1) + size, 1 + c * (size + 1): 1 + c * (size + 1) + size] = image
    return canvas.repeat(scale, 0).repeat(scale, 1)


def save_class_grid(samples: np.ndarray, classes_of: np.ndarray, path: Path, columns: int = 10) -> None:
    """A row per class, its first `columns` images."""
    from PIL import Image

    rows = [samples[classes_of == c][:columns] for c in np.unique(classes_of)]
    blank = np.zeros_like(samples[0])
    cells = [cell for row in rows for cell in [*row, *[blank] * (columns - len(row))]]
    Image.fromarray(grid(np.stack(cells), columns, rows=len(rows))).save(path)


def save_side_by_side(samples: list[np.ndarray], path: Path) -> None:
    from PIL import Image

    panels = [grid(s) for s in samples]
    gap = np.full((panels[0].shape[0], 24), 255, dtype=np.uint8)
    picture = np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=1)
    Image.fromarray(picture).save(path)


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args.data, args.image_size, args.batch_size, args.steps, args.worker_seed,
                             args.num_samples, Path(args.worker_dir),
                             **({"parts": args.edm_parts} if args.worker == "edm" else {}))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels, classes = load_labelled(args.data, args.image_size)
    data_key = fingerprint(images)
    classifier, accuracy = train_classifier(images, labels, len(classes), out / f"classifier-{data_key}.pt")
    real_features, real_probs = judge(classifier, images)
    print(f"judge: CNN on {len(classes)} classes of {len(images)} images, held-out accuracy {accuracy:.3f}; "
          f"real data: confidence {real_probs.max(1).mean():.3f}")

    if args.conditional:
        return conditional_main(args, classifier, real_features, labels, classes, out)
    if args.score:
        for folder in args.score:
            r = score(classifier, real_features, read_samples(Path(folder), args.num_samples))
            print(f"{folder}: distance {r['distance']:.1f}, confidence {r['confidence']:.3f}, class entropy "
                  f"{r['class_entropy']:.2f}")
        return 0
    sides = [side for side in SIDES if side in args.sides]

    def run_dir(side: str, seed: int) -> Path:
        tag = f"steps{args.steps}-seed{seed}"
        if side == "ours":
            return out / f"ours-{args.label}" / tag
        parts = edm_parts_tag(args.edm_parts) if side == "edm" else ""
        return out / side / f"{tag}-n{args.num_samples}-b{args.batch_size}-{data_key}{parts}"

    def done(side: str, seed: int) -> bool:
        if side == "ours":
            return args.reuse and (run_dir(side, seed) / "samples" / "manifest.json").exists()
        return (run_dir(side, seed) / "samples.npy").exists()

    started = time.time()
    todo = [(side, seed, run_dir(side, seed)) for seed in args.seeds for side in sides if not done(side, seed)]
    if not run_all(args, todo):
        return 1
    minutes = (time.time() - started) / 60
    rows = []
    for seed in args.seeds:
        tag = f"steps{args.steps}-seed{seed}"
        samples = {side: read_samples(run_dir(side, seed) / "samples", args.num_samples) if side == "ours"
                   else np.load(run_dir(side, seed) / "samples.npy") for side in sides}
        row = {"seed": seed, "steps": args.steps, "label": args.label, "ours_args": args.ours_args,
               "sampler_args": args.sampler_args, "minutes": round(minutes, 1)}
        for side, s in samples.items():
            row[side] = score(classifier, real_features, s)
        save_side_by_side(list(samples.values()), out / f"compare-{args.label}-{tag}.png")
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(f"seed {seed}, {args.steps} steps:")
        for side in sides:
            r = row[side]
            versus = f"  ours/{side} {row['ours']['distance'] / r['distance']:.3f}" if "ours" in row and side != "ours" \
                else ""
            print(f"  {side:6s} distance {r['distance']:8.1f}  confidence {r['confidence']:.3f}  class entropy "
                  f"{r['class_entropy']:.2f}{versus}")
    mean = {side: float(np.mean([r[side]["distance"] for r in rows])) for side in sides}
    if "ours" in sides:
        for side in (s for s in sides if s != "ours"):
            per_seed = ", ".join(f"{r['ours']['distance'] / r[side]['distance']:.3f}" for r in rows)
            print(f"ratio ours/{side} at {args.steps} steps ({args.label}): {mean['ours'] / mean[side]:.3f} "
                  f"(mean distance {mean['ours']:.1f} vs {mean[side]:.1f}; per seed {per_seed})")
    if "plain" in sides:
        for side, expected in REFERENCE_RATIOS.items():
            if side not in sides or (side == "edm" and args.edm_parts):
                continue
            ratio = mean[side] / mean["plain"]
            faithful = args.steps != 3000 or 1 / REFERENCE_TOLERANCE <= ratio / expected <= REFERENCE_TOLERANCE
            verdict = ("first measured at 3,000 steps" if args.steps != 3000 else
                       "faithful" if faithful else "NOT FAITHFUL: a bug in the side?")
            print(f"reference check: {side}/plain {ratio:.3f} (expected {expected} at 3,000 steps; {verdict})")
    print(f"side-by-side grids ({', '.join(sides)}, left to right): {out}/compare-{args.label}-steps{args.steps}-seed*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
