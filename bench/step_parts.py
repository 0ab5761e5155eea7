"""What each part of a training step costs, timed alone, with and without each technique (both on one model).

    python bench/step_parts.py --model tiny --device cpu
    python bench/step_parts.py --model ddpm-cifar10 --device cuda

The whole-loop toggles of train_throughput.py --ablate are the real measure, but on a loaded, shared CPU their
run-to-run noise (about 5-10 %) hides effects of a few per cent; these isolated timings (median of many calls,
synchronized after each) show each technique's own saving in milliseconds per optimizer step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import device_name, model_config, pick_device, synchronize  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "ddpm-cifar10", "readme"], default="tiny")
    p.add_argument("--batch_size", type=int, default=16, help="for the batch conversion and the forward/backward")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="CPU threads; default 1 on CPU (see train_throughput.py)")
    p.add_argument("--calls", type=int, default=100, help="timed calls of each part (median reported)")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    import torch
    from diffusers.training_utils import EMAModel

    import train_ddpm
    from config import library_versions
    from dataset import to_model_input
    from ema import PowerEMA
    from model import build_unet

    device = pick_device(args.device, args.threads)
    cfg = model_config(args.model)
    model = build_unet(cfg.model, cfg.training.image_size, 3).to(device)
    params = list(model.parameters())
    for param in params:
        param.grad = torch.randn_like(param)
    size = cfg.training.image_size
    batch = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    noisy = torch.randn(batch.shape, device=device)
    timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)

    def fwd_bwd():
        model(noisy, timesteps).sample.square().mean().backward()

    adamw = dict(lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    parts = {  # name: (what the plain loop runs, what ours runs)
        "AdamW step": (torch.optim.AdamW(params, **adamw).step, torch.optim.AdamW(params, **adamw, fused=True).step),
        "EMA step": ((lambda ema: lambda: ema.step(params))(EMAModel(params, use_ema_warmup=True)),
                     (lambda ema: lambda: ema.step(params, args.batch_size))(PowerEMA(params, (0.10,)))),
        "batch to model input": ((lambda: batch.float().div(127.5).sub(1)), (lambda: to_model_input(batch, True))),
        "per-step seeding": ((lambda: None), (lambda: train_ddpm.seed_micro_step(12345, device))),
        "clip_grad_norm_ (both)": ((lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)),) * 2,
        "forward+backward (both)": (fwd_bwd,) * 2,
    }
    result = {"model": args.model, "batch_size": args.batch_size, "device": device_name(device),
              "params": len(params), "versions": library_versions(), "parts_ms": {}}
    print(f"{result['device']}, model {args.model} ({len(params)} parameter tensors, "
          f"{sum(x.numel() for x in params) / 1e6:.2f}M), batch {args.batch_size}: median ms of {args.calls} calls")
    print(f"  {'part':26s} {'plain':>9s} {'ours':>9s} {'saved':>9s}")
    for name, fns in parts.items():
        calls = max(5, args.calls // 10) if name.startswith("forward") else args.calls
        times = []
        for fn in fns:
            for _ in range(3):
                fn()
            samples = []
            for _ in range(calls):
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                samples.append(time.perf_counter() - start)
            times.append(1e3 * statistics.median(samples))
        result["parts_ms"][name] = {"plain": times[0], "ours": times[-1]}
        print(f"  {name:26s} {times[0]:9.3f} {times[-1]:9.3f} {times[0] - times[-1]:9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
