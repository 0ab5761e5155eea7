"""Fine-tuning: does `--learning_rate auto` give a fine-tune a good learning rate? Pretrain on the lowercase letters,
fine-tune on the uppercase ones, and score auto against fixed learning rates with bench/quality.py's judge.

    python bench/fine_tune.py                                     # pretrain 3,000 steps, fine-tune 1,000, seed 0
    python bench/fine_tune.py --seeds 0 1 --scratch               # two seeds, and a from-scratch run beside them
    python bench/fine_tune.py --pretrain_steps 50 --fine_tune_steps 50 --num_samples 100   # a quick look

The data: --data (default ../shared/data/glyphs16) split by its class folders into lower_* and upper_* (copied
into OUT/data once). Every run is the real `train_ddpm.py` with the quality benchmark's UNet (1.0M parameters),
batch and seed, and every other setting a user gets by default:
  pretrain:  on the lowercase half for --pretrain_steps (kept in OUT and reused per steps and seed);
  fine-tune: --pretrained_model_path pretrain/final_model on the uppercase half for --fine_tune_steps, once with
             --learning_rate auto and once with each of --fixed_lrs;
  scratch:   (with --scratch) the uppercase half from scratch for --fine_tune_steps, LR auto: what pretraining buys.
Then `inference.py` draws --num_samples images of each (inference.py's default sampler, as the quality benchmark). Score: quality.py's
judge, a small CNN trained once on the uppercase letters only (its held-out accuracy is printed): the Frechet distance
in its features (lower is better), the mean top-1 confidence and the entropy of the predicted-class histogram.
Appends every score to OUT/results.jsonl and writes OUT/compare-*.png (the runs left to right, in table order).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402

HALVES = {"lower": "lower_", "upper": "upper_"}  # the two halves, by their class folders' prefix


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glyphs16"),
                   help="a folder of images, one sub-folder per class named lower_* or upper_*")
    p.add_argument("--pretrain_steps", type=int, default=3000, help="optimizer steps on the lowercase half")
    p.add_argument("--fine_tune_steps", type=int, default=1000, help="optimizer steps of each run on the uppercase half")
    p.add_argument("--fixed_lrs", type=float, nargs="*", default=[1.7e-3, 5e-4, 5e-5],
                   help="the fixed learning rates auto is compared with (1.7e-3: the from-scratch rule's, for this UNet)")
    p.add_argument("--scratch", action="store_true", help="also train the uppercase half from scratch")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; each gives one set of runs")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--num_samples", type=int, default=900)
    p.add_argument("--train_args", default="",
                   help="extra train_ddpm.py flags for every run (pretraining and fine-tunes), e.g. a candidate")
    p.add_argument("--sampler_args", default="",
                   help="inference.py flags (about 50 network evaluations a sample, as bench/quality.py)")
    p.add_argument("--jobs", type=int, default=2, help="runs at the same time (each on --threads threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="score the runs' existing samples instead of retraining")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "fine_tune"))
    return p.parse_args(argv)


def split(data: str, out: Path) -> dict[str, Path]:
    """The lowercase and uppercase class folders of `data`, copied into OUT/data/lower and OUT/data/upper."""
    halves = {}
    for half, prefix in HALVES.items():
        target = out / "data" / half
        for folder in sorted(p for p in Path(data).iterdir() if p.is_dir() and p.name.startswith(prefix)):
            if not (target / folder.name).is_dir():
                shutil.copytree(folder, target / folder.name)
        if not target.is_dir():
            raise SystemExit(f"error: {data} has no class folders named {prefix}*")
        halves[half] = target
    return halves


def train_command(args, data: Path, steps: int, seed: int, run: Path, *extra: str) -> list[str]:
    """quality.py's own train_ddpm.py command (data, size, model, batch, steps and seed), plus `extra`."""
    return [*quality.train_command(str(data), args.image_size, args.batch_size, steps, seed, run / "run",
                                   Path(args.out) / "cache"), *shlex.split(args.train_args), *extra]


def sample_command(args, run: Path) -> list[str]:
    return [sys.executable, str(ROOT / "inference.py"), "--model_path", str(run / "run" / "final_model"),
            "--num_images", str(args.num_samples), *shlex.split(args.sampler_args), "--batch_size", "150",
            "--output_dir", str(run / "samples")]


def run_jobs(args, jobs: list[tuple[str, Path]]) -> bool:
    """Run the (shell script, folder) jobs, at most --jobs at a time, each logging to its folder's log.txt; False
    (with a message) as soon as one fails."""
    running, pending = [], list(jobs)
    while pending or running:
        while pending and len(running) < args.jobs:
            script, folder = pending.pop(0)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "command.sh").write_text(script + "\n")
            log = open(folder / "log.txt", "w")
            running.append((subprocess.Popen(["bash", "-c", script], env=quality.side_env(args.threads), cwd=ROOT,
                                             stdout=log, stderr=subprocess.STDOUT), folder))
        time.sleep(1)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            if job[0].returncode != 0:
                for other, _ in running:
                    other.kill()
                print(f"error: a run failed; see {job[1] / 'log.txt'}", file=sys.stderr)
                return False
    return True


def label(lr) -> str:
    return lr if isinstance(lr, str) else f"{lr:.1e}"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    halves = split(args.data, out)
    images, labels, classes = quality.load_labelled(str(halves["upper"]), args.image_size)
    classifier, accuracy = quality.train_classifier(images, labels, len(classes),
                                                    out / f"classifier-{quality.fingerprint(images)}.pt")
    real_features, real_probs = quality.judge(classifier, images)
    print(f"judge: CNN on the {len(classes)} uppercase classes of {len(images)} images, held-out accuracy "
          f"{accuracy:.3f}; real data: confidence {real_probs.max(1).mean():.3f}")

    lrs = ["auto", *args.fixed_lrs]
    started = time.time()
    rows = []
    for seed in args.seeds:
        pretrain = out / f"pretrain-steps{args.pretrain_steps}-seed{seed}"
        if not (pretrain / "run" / "final_model" / "model_index.json").exists():
            script = shlex.join(train_command(args, halves["lower"], args.pretrain_steps, seed, pretrain))
            if not run_jobs(args, [(script, pretrain)]):
                return 1
        tag = f"pre{args.pretrain_steps}-steps{args.fine_tune_steps}-seed{seed}"
        runs = {f"fine-tune LR {label(lr)}": (out / f"fine_tune-{tag}" / f"lr-{label(lr)}",
                                              ["--pretrained_model_path", str(pretrain / "run" / "final_model"),
                                               "--learning_rate", str(lr)]) for lr in lrs}
        if args.scratch:
            runs["scratch, LR auto"] = (out / f"scratch-steps{args.fine_tune_steps}-seed{seed}", [])
        jobs = [(f"{shlex.join(train_command(args, halves['upper'], args.fine_tune_steps, seed, folder, *extra))} && "
                 f"{shlex.join(sample_command(args, folder))}", folder) for folder, extra in runs.values()
                if not (args.reuse and (folder / "samples" / "manifest.json").exists())]
        if not run_jobs(args, jobs):
            return 1
        scores, samples = {}, []
        for name, (folder, _) in runs.items():
            samples.append(quality.read_samples(folder / "samples", args.num_samples))
            resolved = json.loads((folder / "run" / "config.json").read_text())["training"]["learning_rate"]
            scores[name] = {**quality.score(classifier, real_features, samples[-1]), "learning_rate": resolved}
        quality.save_side_by_side(samples, out / f"compare-{tag}.png")
        row = {"seed": seed, "pretrain_steps": args.pretrain_steps, "fine_tune_steps": args.fine_tune_steps,
               "batch_size": args.batch_size, "num_samples": args.num_samples, "sampler_args": args.sampler_args,
               "minutes": round((time.time() - started) / 60, 1), "runs": scores}
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        auto = scores["fine-tune LR auto"]["distance"]
        print(f"seed {seed}: {args.fine_tune_steps} steps on the uppercase letters after {args.pretrain_steps} on the "
              f"lowercase ones")
        for name, r in scores.items():
            print(f"  {name:22s} (LR {r['learning_rate']:.1e})  distance {r['distance']:8.1f}  confidence "
                  f"{r['confidence']:.3f}  class entropy {r['class_entropy']:.2f}  / auto {r['distance'] / auto:.3f}")
    names = list(rows[0]["runs"])
    mean = {name: float(np.mean([r["runs"][name]["distance"] for r in rows])) for name in names}
    best = min(mean, key=mean.get)
    print(f"mean distance over seeds {args.seeds}: " + ", ".join(f"{name} {mean[name]:.1f}" for name in names)
          + f"; best: {best}")
    print(f"side-by-side grids ({', '.join(names)}, left to right): {out}/compare-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
