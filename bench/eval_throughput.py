"""evaluate.py throughput: images per second of generation and of Inception feature extraction, separately.

    python bench/eval_throughput.py                       # CPU, one thread, the tiny model, 64 images, DDIM 50 steps
    python bench/eval_throughput.py --device cuda --model ddpm-cifar10 --num_images 2048 --batch_size 256

Runs the real evaluate.py (in this process) on an untrained UNet of the chosen size (speed does not depend on the
weights) against a generated folder of reference images, with a random-weights Inception of the real architecture
unless --inception_weights names the real file (again the same speed). The times come from metrics.json: the
reference statistics (computed once, then cached), generation and feature extraction of the scored images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import (device_name, make_image_folder, make_random_inception_weights, model_config,  # noqa: E402
                    pick_device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "ddpm-cifar10", "readme"], default="tiny")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on a CPU)")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--reference_images", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--inception_weights", default=None, help="the real weights file (default: random weights)")
    args = p.parse_args(argv)

    import torch
    from diffusers import DDPMPipeline

    import evaluate
    from model import build_noise_scheduler, build_unet

    device = pick_device(args.device, args.threads)
    cfg = model_config(args.model)
    size = cfg.training.image_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        DDPMPipeline(unet=build_unet(cfg.model, size, 3), scheduler=build_noise_scheduler(cfg.scheduler)) \
            .save_pretrained(tmp / "model")
        weights = args.inception_weights or make_random_inception_weights(tmp / "inception.pth")
        folder = make_image_folder(tmp / "reference", count=args.reference_images, size=(size + 8, size + 4))
        evaluate.main(["--model_path", str(tmp / "model"), "--reference", "custom", "--dataset_path", str(folder),
                       "--data_dir", str(tmp / "data"), "--num_images", str(args.num_images), "--batch_size",
                       str(args.batch_size), "--scheduler", args.scheduler, "--num_inference_steps", str(args.steps),
                       "--inception_weights", str(weights), "--output_dir", str(tmp / "out")])
        record = json.loads((tmp / "out" / "metrics.json").read_text())
    t = record["time"]
    result = {"device": device_name(device), "model": args.model, "image_size": size,
              "parameters": record["model"]["parameters"], "sampler": f"{args.scheduler} {args.steps} steps",
              "batch_size": args.batch_size, "num_images": args.num_images,
              "generation_img_per_s": round(args.num_images / t["generation_s"], 2),
              "features_img_per_s": round(args.num_images / t["features_s"], 2),
              "reference_features_img_per_s": round(args.reference_images / t["reference_s"], 2),
              "metrics_s": t["metrics_s"], "total_s": t["total_s"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
