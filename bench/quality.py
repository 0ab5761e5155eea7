"""Image quality at equal budget: our toolkit's CLIs against the plain diffusers training loop, on real data.

    python bench/quality.py                          # 3,000 steps, seed 0 (about 10 min a side on 2 cores)
    python bench/quality.py --steps 1000 --seeds 0 1
    python bench/quality.py --steps 1000 --label lr6e-4 --ours_args "--learning_rate 6e-4 --lr_warmup_steps 100"

Both sides train the same UNet (two levels, 32 and 64 channels, attention at 8x8) with the same batch and number
of optimizer steps on the same folder (default ../shared/data/glyphs16: 5,772 greyscale 16x16 letters, one folder
per letter), then draw --num_samples images with DDIM, 50 steps.
  ours:  the real `train_ddpm.py` and `inference.py` CLIs, given only data, image size, model, batch, steps and
         seed (plus --ours_args when a candidate is tried); every other setting is the default a user gets.
  plain: the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py, written out here:
         AdamW 1e-4 (betas 0.95/0.999, weight decay 1e-6), cosine LR with 500 warm-up steps, clip 1.0, no EMA,
         no flips, images read as 1 channel; sampled with diffusers' DDIMPipeline.
Score: the Frechet distance between generated and real images in the penultimate features of a small CNN trained
once on the folder's labels (cached; its held-out accuracy is printed), plus the mean top-1 confidence and the
entropy of the predicted-class histogram (real data: about ln(classes)). Lower distance is better.
The plain side's samples are cached per (steps, seed, samples, data): they do not depend on our code.
Writes OUT/compare-*.png (plain left, ours right) and appends every score to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glyphs16"),
                   help="a folder of images, one sub-folder per class (default: ../shared/data/glyphs16)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps for each side")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; each gives one run per side")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--num_samples", type=int, default=900)
    p.add_argument("--sides", nargs="+", choices=["ours", "plain"], default=["ours", "plain"])
    p.add_argument("--ours_args", default="", help="extra train_ddpm.py flags for our side (a candidate)")
    p.add_argument("--label", default="defaults", help="names our side's runs (one label per candidate)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per side; both sides of a seed run at the same time")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "quality"))
    p.add_argument("--reuse", action="store_true", help="score our side's existing samples instead of retraining")
    p.add_argument("--score", nargs="+", metavar="DIR",
                   help="only score these folders of generated images (inference.py outputs), e.g. other samplers")
    p.add_argument("--worker", choices=["plain"], help=argparse.SUPPRESS)
    p.add_argument("--worker_dir", help=argparse.SUPPRESS)
    p.add_argument("--worker_seed", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# The real images, by class
# ---------------------------------------------------------------------------------------------------


def load_labelled(folder: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 [N, size, size] greyscale images and int labels from one sub-folder per class."""
    from PIL import Image

    root = Path(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            with Image.open(path) as image:
                grey = image.convert("L")
                if grey.size != (size, size):
                    grey = grey.resize((size, size), Image.BILINEAR)
                images.append(np.asarray(grey, dtype=np.uint8))
                labels.append(label)
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
    """Trained once per dataset (seed 0), then loaded from `path`. Returns the model and its held-out accuracy."""
    import torch
    import torch.nn.functional as F

    model = make_classifier(num_classes, images.shape[-1])
    if path.exists():
        saved = torch.load(path)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["accuracy"]
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=generator)
    held_out, train = order[: len(images) // 10], order[len(images) // 10:]
    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
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


def side_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def start_plain(args, seed: int, run_dir: Path) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker", "plain", "--worker_dir", str(run_dir), "--worker_seed", str(seed),
               "--data", args.data, "--steps", str(args.steps), "--batch_size", str(args.batch_size),
               "--image_size", str(args.image_size), "--num_samples", str(args.num_samples)]
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, env=side_env(args.threads), stdout=open(run_dir / "log.txt", "w"),
                            stderr=subprocess.STDOUT)


def ours_script(args, seed: int, run_dir: Path) -> str:
    """The shell commands of our side: the real CLIs, only data, size, model, batch, steps and seed given."""
    m = MODEL
    train = [sys.executable, str(ROOT / "train_ddpm.py"), "--dataset_name", "custom", "--dataset_path", args.data,
             "--image_size", str(args.image_size), "--block_out_channels", *map(str, m["block_out_channels"]),
             "--down_block_types", *m["down_block_types"], "--up_block_types", *m["up_block_types"],
             "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps), "--seed", str(seed),
             "--output_dir", str(run_dir / "run"), "--data_dir", str(Path(args.out) / "data"),
             "--overwrite_output_dir", *shlex.split(args.ours_args)]
    sample = [sys.executable, str(ROOT / "inference.py"), "--model_path", str(run_dir / "run" / "final_model"),
              "--num_images", str(args.num_samples), "--scheduler", "ddim", "--num_inference_steps",
              str(SAMPLER_STEPS), "--batch_size", "150", "--output_dir", str(run_dir / "samples")]
    return f"{shlex.join(train)} && {shlex.join(sample)}"


def start_ours(args, seed: int, run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    script = ours_script(args, seed, run_dir)
    (run_dir / "command.sh").write_text(script + "\n")
    return subprocess.Popen(["bash", "-c", script], env=side_env(args.threads), cwd=ROOT,
                            stdout=open(run_dir / "log.txt", "w"), stderr=subprocess.STDOUT)


def read_samples(folder: Path, count: int) -> np.ndarray:
    """The images inference.py wrote to `folder`, as uint8 [N, S, S] greyscale."""
    from PIL import Image

    manifest = json.loads((folder / "manifest.json").read_text())
    files = [folder / f["file"] for f in manifest["files"]][:count]
    return np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.uint8) for f in files])


# ---------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------


def grid(samples: np.ndarray, columns: int = 10, scale: int = 4) -> np.ndarray:
    shown = samples[: columns * columns]
    rows = math.ceil(len(shown) / columns)
    size = samples.shape[-1]
    canvas = np.full((rows * (size + 1) + 1, columns * (size + 1) + 1), 96, dtype=np.uint8)
    for k, image in enumerate(shown):
        r, c = divmod(k, columns)
        canvas[1 + r * (size + 1): 1 + r * (size + 1) + size, 1 + c * (size + 1): 1 + c * (size + 1) + size] = image
    return canvas.repeat(scale, 0).repeat(scale, 1)


def save_side_by_side(plain: np.ndarray | None, ours: np.ndarray | None, path: Path) -> None:
    from PIL import Image

    panels = [grid(s) for s in (plain, ours) if s is not None]
    gap = np.full((panels[0].shape[0], 24), 255, dtype=np.uint8)
    picture = np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=1)
    Image.fromarray(picture).save(path)


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "plain":
        plain_worker(args.data, args.image_size, args.batch_size, args.steps, args.worker_seed, args.num_samples,
                     Path(args.worker_dir))
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

    if args.score:
        for folder in args.score:
            r = score(classifier, real_features, read_samples(Path(folder), args.num_samples))
            print(f"{folder}: distance {r['distance']:.1f}, confidence {r['confidence']:.3f}, class entropy "
                  f"{r['class_entropy']:.2f}")
        return 0
    rows = []
    for seed in args.seeds:
        tag = f"steps{args.steps}-seed{seed}"
        plain_dir = out / "plain" / f"{tag}-n{args.num_samples}-b{args.batch_size}-{data_key}"
        ours_dir = out / f"ours-{args.label}" / tag
        started = time.time()
        jobs = {}
        if "plain" in args.sides and not (plain_dir / "samples.npy").exists():
            jobs["plain"] = start_plain(args, seed, plain_dir)
        if "ours" in args.sides and not (args.reuse and (ours_dir / "samples" / "manifest.json").exists()):
            jobs["ours"] = start_ours(args, seed, ours_dir)
        for side, job in jobs.items():
            if job.wait() != 0:
                where = plain_dir if side == "plain" else ours_dir
                print(f"error: the {side} side failed (seed {seed}); see {where / 'log.txt'}", file=sys.stderr)
                return 1
        minutes = (time.time() - started) / 60
        samples = {}
        if "plain" in args.sides:
            samples["plain"] = np.load(plain_dir / "samples.npy")
        if "ours" in args.sides:
            samples["ours"] = read_samples(ours_dir / "samples", args.num_samples)
        row = {"seed": seed, "steps": args.steps, "label": args.label, "ours_args": args.ours_args,
               "minutes": round(minutes, 1)}
        for side, s in samples.items():
            row[side] = score(classifier, real_features, s)
        save_side_by_side(samples.get("plain"), samples.get("ours"), out / f"compare-{args.label}-{tag}.png")
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        shown = "  ".join(f"{side}: distance {r['distance']:.1f}, confidence {r['confidence']:.3f}, class entropy "
                          f"{r['class_entropy']:.2f}" for side, r in ((s, row[s]) for s in samples))
        print(f"seed {seed}, {args.steps} steps ({minutes:.1f} min): {shown}")
    if "plain" in args.sides and "ours" in args.sides:
        plain = float(np.mean([r["plain"]["distance"] for r in rows]))
        ours = float(np.mean([r["ours"]["distance"] for r in rows]))
        per_seed = ", ".join(f"{r['ours']['distance'] / r['plain']['distance']:.3f}" for r in rows)
        print(f"ratio ours/plain at {args.steps} steps ({args.label}): {ours / plain:.3f} "
              f"(mean distance {ours:.1f} vs {plain:.1f}; per seed {per_seed})")
    print(f"side-by-side grids (plain left, ours right): {out}/compare-{args.label}-steps{args.steps}-seed*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
