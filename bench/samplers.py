"""The same trained model drawn with several samplers, each scored by bench/quality.py's judge.

    python bench/samplers.py --model_path bench_out/quality/ours-final/steps3000-seed0/run/final_model \
        ddim:50 ddim:50:clip_sample=False heun:25 heun:25:use_karras_sigmas=True dpmsolver++:50

With --ema_lengths, the model's weights are each post-hoc EMA rebuilt from the run's snapshots (train_ddpm.py
--ema_snapshots; the folder ema_snapshots/ beside final_model/) instead of final_model's own EMA.

A sampler is NAME:STEPS[:SETTING=VALUE...]: one of inference.py's --scheduler names, its denoising steps, and
diffusers scheduler settings over the toolkit's own (sampling.make_sampler, which picks the EDM
samplers for a --parameterization edm model), such as clip_sample=False,
use_karras_sigmas=True or timestep_spacing=trailing. Each draws --num_samples images from seeds 0, 1, ... (the same
initial noise for every sampler) and prints the distance, confidence and class entropy, and the network evaluations
per image (Heun's second order costs two a step but the last).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def parse_sampler(text: str) -> tuple[str, int, dict]:
    name, steps, *settings = text.split(":")
    extra = {}
    for setting in settings:
        key, value = setting.split("=", 1)
        try:
            extra[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key] = value  # a word, such as trailing
    return name, int(steps), extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("samplers", nargs="+", help="NAME:STEPS[:SETTING=VALUE...]")
    p.add_argument("--model_path", required=True)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glyphs16"))
    p.add_argument("--num_samples", type=int, default=900)
    p.add_argument("--batch_size", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench_out" / "quality"), help="where the judge is cached")
    p.add_argument("--save", help="also write each sampler's uint8 samples to SAVE/NAME.npy")
    p.add_argument("--ema_lengths", type=float, nargs="+", help="post-hoc EMA lengths to rebuild and score")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    import quality
    from ema import reconstruct
    from model import load_model
    from sampling import generate, make_sampler, to_uint8

    torch.set_num_threads(args.threads)
    images, labels, classes = quality.load_labelled(args.data, 16)
    judge, _ = quality.train_classifier(images, labels, len(classes),
                                        Path(args.out) / f"classifier-{quality.fingerprint(images)}.pt")
    real_features, _ = quality.judge(judge, images)
    saved = load_model(args.model_path)
    snapshots = Path(args.model_path).parent / "ema_snapshots"
    rows = []
    for length, text in [(length, text) for length in (args.ema_lengths or [None]) for text in args.samplers]:
        if length is not None:
            saved.unet.load_state_dict(reconstruct(snapshots, length)[0])
        name, steps, extra = parse_sampler(text)
        sampler = make_sampler(name, saved.schedule, **extra)
        started = time.perf_counter()
        calls = []
        forward = saved.unet.forward
        saved.unet.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
        samples = generate(saved.unet, sampler, list(range(args.num_samples)), steps, args.batch_size,
                           progress=False)
        saved.unet.forward = forward
        evaluations = len(calls) * args.batch_size / args.num_samples
        grey = to_uint8(samples)[:, 0].numpy()
        row = {"sampler": text, "ema_length": length, "evaluations": round(evaluations, 1),
               **quality.score(judge, real_features, grey), "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        shown = text if length is None else f"{text} ema {length}"
        print(f"{shown:48s} {row['evaluations']:5.0f} evals  distance {row['distance']:8.1f}  confidence "
              f"{row['confidence']:.3f}  class entropy {row['class_entropy']:.2f}", flush=True)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save) / f"{text.replace(':', '_').replace('=', '-')}.npy", grey)
    with open(Path(args.out) / "samplers.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps({"model_path": args.model_path, **row}) + "\n")
    return 0


if __name__ == "__main__":
    from config import exit_code

    sys.exit(exit_code(main))  # a sampler the model cannot use: one error line, exit 2
