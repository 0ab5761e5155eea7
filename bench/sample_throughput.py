"""Sampling throughput: our sampler (sampling.generate) against diffusers' DDPMPipeline, in one process.

    python bench/sample_throughput.py --model tiny --device cpu
    python bench/sample_throughput.py --model ddpm-cifar10 --scheduler ddpm --steps 1000 --batch_size 256
    python bench/sample_throughput.py --model ddpm-cifar10 --scheduler dpmsolver++ --steps 20 --compile

Both draw --num_images images from the same UNet (random weights: speed does not depend on them), the same
scheduler (sampling.make_sampler from the trained DDPM schedule, a fresh instance for each) and steps, on the
same device in the same dtype. Ours is set up as inference.py does it (weights in dtype, channels_last on
CUDA, torch.compile with --compile); the pipeline gets the plain UNet in the same dtype and a generator on the
device, and returns numpy images (output_type="np"), as the diffusers training example calls it. Timed runs
alternate between the two, are synchronized before the clock is read, and img/s is the median over runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import device_name, flops_per_image, model_config, pick_device, synchronize  # noqa: E402

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpmsolver++": 20}
DEFAULT_BATCH = {"tiny": 8, "ddpm-cifar10": 256, "readme": 64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "ddpm-cifar10", "readme"], default="tiny")
    p.add_argument("--scheduler", choices=list(DEFAULT_STEPS), default="ddpm",
                   help="samplers that DDPMPipeline runs correctly (no scale_model_input, step takes a generator)")
    p.add_argument("--steps", type=int, help="denoising steps (default: ddpm 1000, ddim 50, dpmsolver++ 20)")
    p.add_argument("--batch_size", type=int, help="images per forward pass (default: tiny 8, ddpm-cifar10 256, "
                   "readme 64)")
    p.add_argument("--num_images", type=int, help="images per timed run (default: one batch)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="as inference.py: auto is fp16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet (GPU only, as inference.py)")
    p.add_argument("--threads", type=int, help="CPU threads; default 1 on CPU (see train_throughput.py)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (the median is reported)")
    p.add_argument("--warmup_steps", type=int, default=5, help="steps of the untimed warm-up generation")
    p.add_argument("--json", metavar="OUT", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from diffusers import DDPMPipeline

    from config import library_versions
    from model import build_noise_scheduler, build_unet
    from sampling import generate, make_sampler

    device = pick_device(args.device, args.threads)
    cuda = device.type == "cuda"
    dtype_name = args.dtype if args.dtype != "auto" else ("fp16" if cuda else "fp32")
    if dtype_name != "fp32" and not cuda:
        print(f"notice: --dtype {dtype_name} needs a GPU (as in inference.py); sampling in fp32 on the CPU")
        dtype_name = "fp32"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    steps = args.steps or DEFAULT_STEPS[args.scheduler]
    batch_size = args.batch_size or DEFAULT_BATCH[args.model]
    num_images = args.num_images or batch_size

    cfg = model_config(args.model)
    torch.manual_seed(0)
    unet = build_unet(cfg.model, cfg.training.image_size, 3).eval()
    schedule = build_noise_scheduler(cfg.scheduler).config
    theirs = copy.deepcopy(unet).to(device, dtype)
    ours = unet.to(device, dtype)
    if cuda:  # inference.py's set-up
        ours = ours.to(memory_format=torch.channels_last)
    if args.compile:
        ours = torch.compile(ours) if cuda else ours
    pipeline = DDPMPipeline(unet=theirs, scheduler=make_sampler(args.scheduler, schedule))
    pipeline.set_progress_bar_config(disable=True)

    def run_ours(n_steps):
        sampler = make_sampler(args.scheduler, schedule)
        return generate(ours, sampler, list(range(num_images)), n_steps, batch_size, dtype, progress=False)

    def run_pipeline(n_steps):
        generator = torch.Generator(device).manual_seed(0)
        for start in range(0, num_images, batch_size):
            pipeline(batch_size=min(batch_size, num_images - start), generator=generator,
                     num_inference_steps=n_steps, output_type="np")

    sides = [("pipeline", run_pipeline), ("ours", run_ours)]
    for name, fn in sides:
        start = time.perf_counter()
        fn(min(args.warmup_steps, steps))
        synchronize(device)
        print(f"{name}: warmed up in {time.perf_counter() - start:.1f} s", flush=True)
    seconds = {name: [] for name, _ in sides}
    peak = {name: 0 for name, _ in sides}
    for r in range(args.repeats):
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            start = time.perf_counter()
            fn(steps)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())

    gflop = flops_per_image(cfg, training=False) / 1e9
    result = {"model": args.model, "image_size": cfg.training.image_size, "scheduler": args.scheduler,
              "steps": steps, "batch_size": batch_size, "num_images": num_images, "dtype": dtype_name,
              "compile": bool(args.compile and cuda), "device": device_name(device),
              "versions": library_versions(), "repeats": args.repeats,
              "gflop_per_forward_image": round(gflop, 3), "sides": {}}
    for name, _ in sides:
        runs = [num_images / s for s in seconds[name]]
        img_s = statistics.median(runs)
        row = result["sides"][name] = {
            "img_per_s": img_s, "runs": [round(x, 3) for x in runs],
            "ms_per_step": 1e3 * statistics.median(seconds[name]) / (steps * math.ceil(num_images / batch_size)),
            "tflop_per_s": round(img_s * steps * gflop / 1e3, 3)}
        if cuda:
            row["peak_gpu_mem_GiB"] = round(peak[name] / 2**30, 2)  # both UNets' weights included
    result["ratio"] = result["sides"]["ours"]["img_per_s"] / result["sides"]["pipeline"]["img_per_s"]

    print(f"\n{result['device']} | " + " | ".join(f"{k} {v}" for k, v in result["versions"].items()))
    print(f"model {args.model} ({cfg.training.image_size}px, {gflop:.3f} GFLOP a forward image), {args.scheduler} "
          f"{steps} steps, {num_images} images in batches of {batch_size}, {dtype_name}, compile "
          f"{result['compile']}: median of {args.repeats} runs")
    for name, row in result["sides"].items():
        mem = f"  peak {row['peak_gpu_mem_GiB']:.2f} GiB" if cuda else ""
        print(f"  {name:9s} {row['img_per_s']:9.2f} img/s  {row['ms_per_step']:8.2f} ms/step  "
              f"{row['tflop_per_s']:8.3g} TFLOP/s{mem}")
    print(f"  ratio ours/pipeline: {result['ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
