"""Training throughput: the diffusers example's plain step against our train_ddpm.train_step, in one process.

    python bench/train_throughput.py --model tiny --device cpu
    python bench/train_throughput.py --model ddpm-cifar10 --batch_size 128 --mixed_precision bf16 --json out.json
    python bench/train_throughput.py --model tiny --device cpu --ablate --full_run

All loops train the same UNet (model.build_unet) on the same synthetic batch, on the same device, with the
same mixed precision (each gets a fresh Accelerator: the accelerate state is reset in between). Their timed runs
alternate (plain, ours, ours, plain, ...) so drifting load on a shared machine hits them alike; each run is
synchronized before the clock is read; img/s is the median over runs.
  plain: the step of diffusers' examples/unconditional_image_generation/train_unconditional.py, written out.
  ours:  train_ddpm.train_step with train_ddpm.train's set-up (fused AdamW, foreach EMA, channels_last on CUDA,
         uint8 batches through dataset.to_model_input, no host sync but the loss read every --logging_steps).
--ablate adds the plain loop with one technique switched on at a time. --full_run also runs train_ddpm.py as a
subprocess fed by the real dataset code and reports its TensorBoard train/img_per_s beside the two loops.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import (Loop, device_name, flops_per_image, model_flags, new_accelerator, pick_device,  # noqa: E402
                    resolved_run)
from full_run import full_run  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "ddpm-cifar10", "readme"], default="tiny")
    p.add_argument("--batch_size", type=int, help="default: the model's train_batch_size (16, 128, 16)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--mixed_precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="resolved as train_ddpm does (auto: bf16 on GPU, fp32 on CPU); the same for every loop")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (train_ddpm --compile)")
    p.add_argument("--threads", type=int, help="CPU threads; default 1 on CPU (2 swing tenfold on 2 shared cores)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed run")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per loop (the median is reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per loop first")
    p.add_argument("--logging_steps", type=int, default=10, help="our loop's loss read-back interval (train_ddpm's)")
    p.add_argument("--ablate", action="store_true", help="also the plain loop with one technique switched on")
    p.add_argument("--full_run", action="store_true", help="also time a real train_ddpm.py run (subprocess)")
    p.add_argument("--full_steps", type=int, default=150, help="optimizer steps of the --full_run")
    p.add_argument("--data_dir", help="real data for --full_run: a torchvision CIFAR-10 root or an image folder")
    p.add_argument("--json", metavar="OUT", help="write the results here")
    return p.parse_args(argv)


def setup_plain(cfg, cpu, images, precision, fused=False, foreach_ema=False, item=True, channels_last=False):
    """The step of the diffusers train_unconditional.py example (progress bar and checkpoints left out), with the
    learning rate and warm-up our run resolves (the example's own are fixed numbers)."""
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from model import build_noise_scheduler, build_unet

    t = cfg.training
    accelerator = new_accelerator(cpu, mixed_precision=precision)
    model = build_unet(cfg.model, t.image_size, images.shape[1])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema_model = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                         foreach=foreach_ema)  # the example's --ema_max_decay, --ema_inv_gamma, --ema_power
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    noise_scheduler = build_noise_scheduler(cfg.scheduler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon, fused=fused or None)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=10**7)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema_model.to(accelerator.device)
    batch = images.to(accelerator.device).float().div(127.5).sub(1)  # float images, already scaled to [-1, 1]

    def step(i):
        clean_images = batch.to(weight_dtype)
        noise = torch.randn(clean_images.shape, dtype=weight_dtype, device=clean_images.device)
        bsz = clean_images.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                  device=clean_images.device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        with accelerator.accumulate(model):
            model_output = model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema_model.step(model.parameters())
        logs = {"loss": loss.detach().item() if item else loss.detach(), "lr": lr_scheduler.get_last_lr()[0],
                "step": i, "ema_decay": ema_model.cur_decay_value}
        accelerator.log(logs, step=i)

    return accelerator.device, step


def setup_ours(run, cpu, images):
    """train_ddpm.train's set-up (build_training) and loop body (train_step), minus data loading and checkpoints."""
    from train_ddpm import LogWindow, build_training, step_seed, train_step

    cfg, t, precision = run.cfg, run.cfg.training, run.precision
    # train() also passes log_with="tensorboard" and a project_config: trackers start only in init_trackers.
    accelerator = new_accelerator(cpu, mixed_precision=precision, step_scheduler_with_optimizer=False,
                                  gradient_accumulation_steps=t.gradient_accumulation_steps,
                                  dynamo_backend="inductor" if run.compile else "no")
    parts = build_training(run, accelerator)
    window = LogWindow(accelerator)
    batch = images.to(accelerator.device)  # uint8, as the prepared loader delivers it

    def step(i):
        loss, skipped, nonfinite = train_step(batch, parts, accelerator, cfg,
                                              step_seed(t.seed, 0, i, accelerator.process_index))
        window.add(loss, skipped, nonfinite)
        if skipped is not None and (i + 1) % t.logging_steps == 0:
            stats = window.read(None, t.train_batch_size)  # the loop's only host sync
            accelerator.log({"train/loss": stats["loss"], "train/lr": parts.lr_schedule.get_last_lr()[0],
                             "train/img_per_s": stats["img_per_s"]}, step=i)

    return accelerator.device, step


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from config import library_versions
    from model import count_parameters

    device = pick_device(args.device, args.threads)
    cuda, threads = device.type == "cuda", torch.get_num_threads()
    flags = model_flags(args.model)
    run = resolved_run(args.model, "--mixed_precision", args.mixed_precision, "--seed", "0", "--logging_steps",
                       str(args.logging_steps), "--max_train_steps", str(10 ** 7),
                       *(["--train_batch_size", str(args.batch_size)] if args.batch_size else []),
                       *(["--compile"] if args.compile else []), device_type=device.type)
    cfg, t, precision = run.cfg, run.cfg.training, run.precision
    for line in run.notices:
        print(line)
    images = torch.randint(0, 256, (t.train_batch_size, 3, t.image_size, t.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    variants = [("plain", {}), ("ours", None)]
    if args.ablate:
        variants += [("plain+fused_adamw", dict(fused=True)), ("plain+foreach_ema", dict(foreach_ema=True)),
                     ("plain-item", dict(item=False))] + ([("plain+channels_last", dict(channels_last=True))] * cuda)
    loops = []
    for name, options in variants:
        before, start = torch.cuda.memory_allocated() if cuda else 0, time.perf_counter()
        torch.manual_seed(0)
        dev, step = setup_ours(run, not cuda, images) if options is None else \
            setup_plain(cfg, not cuda, images, precision, **options)
        loop = Loop(name, step, dev, tf32=options is None and cuda)
        loop.run(args.warmup)
        loop.seconds = []
        loop.resident = torch.cuda.memory_allocated() - before if cuda else 0
        print(f"{name}: set up and warmed up in {time.perf_counter() - start:.1f} s", flush=True)
        loops.append(loop)
    resident = sum(loop.resident for loop in loops)
    for r in range(args.repeats):
        for loop in loops if r % 2 == 0 else loops[::-1]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            loop.run(args.steps)
            if cuda:  # this loop's own peak: the other loops' resident state taken out
                loop.peak = max(loop.peak, torch.cuda.max_memory_allocated() - (resident - loop.resident))

    images_per_run = args.steps * t.train_batch_size
    result = {"model": args.model, "params_M": round(count_parameters(cfg.model, t.image_size, 3) / 1e6, 2),
              "image_size": t.image_size, "batch_size": t.train_batch_size, "mixed_precision": precision,
              "compile": run.compile, "device": device_name(device), "versions": library_versions(),
              "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
              "gflop_per_image": round(flops_per_image(cfg, training=True) / 1e9, 3), "loops": {}}
    for loop in loops:
        runs = [images_per_run / s for s in loop.seconds]
        row = result["loops"][loop.name] = {"img_per_s": statistics.median(runs), "best": max(runs),
                                            "runs": [round(x, 1) for x in runs]}
        row["tflop_per_s"] = round(row["img_per_s"] * result["gflop_per_image"] / 1e3, 3)
        if cuda:
            row["peak_gpu_mem_GiB"] = round(loop.peak / 2**30, 2)
    for row in result["loops"].values():
        row["vs_plain"] = round(row["img_per_s"] / result["loops"]["plain"]["img_per_s"], 3)
    result["ratio"] = result["loops"]["ours"]["vs_plain"]
    if args.full_run:
        loops.clear()  # free this process's GPU memory for the subprocess
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        result["full_run"] = full_run(flags, cfg, precision, args.full_steps, args.logging_steps,
                                      threads if device.type == "cpu" else None, args.data_dir)
    report(result, cuda)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def report(result: dict, cuda: bool) -> None:
    print(f"\n{result['device']} | " + " | ".join(f"{k} {v}" for k, v in result["versions"].items()))
    print(f"model {result['model']} ({result['params_M']}M params, {result['image_size']}px), batch "
          f"{result['batch_size']}, precision {result['mixed_precision']}, compile {result['compile']}, "
          f"{result['gflop_per_image']} GFLOP per training image: median of "
          f"{result['repeats']} runs of {result['steps']} steps after {result['warmup']} warm-up steps")
    for name, row in result["loops"].items():
        print(f"  {name:20s} {row['img_per_s']:9.1f} img/s  x{row['vs_plain']:.3f}  {row['tflop_per_s']:8.3g} TFLOP/s  "
              f"(best run {row['best']:.1f})" + (f"  peak {row['peak_gpu_mem_GiB']:.2f} GiB" if cuda else ""))
    print(f"  ratio ours/plain: {result['ratio']:.3f}")
    if "full_run" in result:
        f = result["full_run"]
        print(f"  full train_ddpm.py run ({f['data']} through dataset.py): {f['img_per_s']:.1f} img/s (median "
              f"TensorBoard train/img_per_s of {f['windows']} windows, first dropped); "
              f"{f['img_per_s_wall']:.1f} img/s over the whole {f['wall_s']} s run incl. start-up")


if __name__ == "__main__":
    main()
