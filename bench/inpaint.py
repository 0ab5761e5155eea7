"""Inpainting on the glyph set (issue 19): held-out real letters with a region masked out, filled by RePaint
(`inference.py --inpaint`), by the mean image, and by SDEdit of the mean-filled letter (`inference.py --init_image`),
each scored by bench/quality.py's letter classifier and by its seam.

    python bench/inpaint.py --write_training_folder bench_out/inpaint/train    # prints the training command
    python bench/inpaint.py --model_path bench_out/inpaint/run/final_model      # right half, then a centre square

Held out: the tenth of the letters that quality.py's judge holds out (its seed-0 split), so neither the model nor
the judge has seen them; --write_training_folder writes the other nine tenths for the model to be trained on, and the
benchmark model is quality.py's (the 1.0M UNet, batch 64, 3,000 steps) trained on that folder. --per_class letters of
each class are inpainted (4: 208 letters; 0: all 577).
Every method gets the same input: the letter with the hole filled with the training letters' mean image.
  mean:    that input as it is.
  nearest: the hole filled from the training letter whose kept pixels are nearest (L2): no model, only the data; its
           score shows how much the kept pixels say of the letter (a left half shared by several letters caps it).
  ceiling: no fill, a reading of what the kept pixels say: a classifier of the judge's kind trained (same nine tenths)
           on the mean-filled letters gives p(letter | kept pixels). `most likely` is its accuracy, what always
           painting the likeliest letter would read; `posterior draw`, the mean p(true letter | kept), is what an exact
           sampler of the letters that fit would read on average, and so what RePaint can be asked for.
  sdedit:  inference.py --init_image at each --sdedit_strengths (DDIM 50 steps: about 50 x strength evaluations).
  repaint: inference.py --inpaint with the mask (defaults: 250 steps, jumps of 10 drawn 10 times, about 2,400
           evaluations a letter), once per --repaint_args variant (extra inference.py flags, such as "--eta 1").
Scores: `letter`, the share still classified as the original letter (the target: RePaint at least 0.8 on right
halves); `seam`, the mean absolute difference (0-255) between neighbouring kept and painted pixels across the mask's
border, beside the same pixel pairs of the real letters (a fill that does not join its surround is far above them, a
blurry one below); `hole error`, the mean absolute difference to the real letter inside the hole.
Writes OUT/{label}-{mask}.png (a row per method: real, then the methods above, 16 letters across) and appends every
score to OUT/results.jsonl; inference.py's own grids are under OUT/{label}-{mask}/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MASKS = ("right_half", "centre")
SIZE = 16


def sdedit_flags(args) -> list[str]:
    """--sdedit_args as given, or 50 steps of the deterministic sampler the model has (inference.py refuses DDIM for a
    --parameterization edm model). The model is read by the toolkit's own loader, so a bad --model_path is its
    one-line error, before any work."""
    if args.sdedit_args is not None:
        return shlex.split(args.sdedit_args)
    from config import UserError
    from model import load_model
    from sampling import is_edm

    try:
        trained = load_model(args.model_path).schedule
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    return ["--scheduler", "dpmsolver++" if is_edm(trained) else "ddim", "--num_inference_steps", "50"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glyphs16"),
                   help="16x16 greyscale letters, one sub-folder per class (default: ../shared/data/glyphs16)")
    p.add_argument("--write_training_folder", metavar="DIR",
                   help="write the letters without the held-out tenth to DIR (one sub-folder per class) and stop")
    p.add_argument("--model_path", help="a final_model/ trained on the --write_training_folder letters")
    p.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS),
                   help="right_half: the 8 right columns; centre: the 6x6 centre square")
    p.add_argument("--per_class", type=int, default=4, help="held-out letters inpainted per class (0: all of them)")
    p.add_argument("--seed", type=int, default=0, help="every letter's result is drawn from this seed")
    p.add_argument("--repaint_args", nargs="*", default=[""],
                   help="one RePaint run per value: extra inference.py flags ('' for its defaults; none: no RePaint)")
    p.add_argument("--sdedit_strengths", type=float, nargs="*", default=[0.5, 0.8])
    p.add_argument("--sdedit_args", default=None,
                   help="inference.py flags of the SDEdit runs (default: 50 steps of the deterministic sampler the "
                        "model has: DDIM for a DDPM model, DPM-Solver++ for a --parameterization edm one)")
    p.add_argument("--batch_size", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="defaults", help="names this run's outputs")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "inpaint"))
    p.add_argument("--judge_dir", default=str(ROOT / "bench_out" / "quality"),
                   help="where quality.py caches the letter classifier")
    return p.parse_args(argv)


def held_out(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the judge's held-out letters, the first per_class of each class in its split's order (all: 0)."""
    import quality

    chosen, taken = [], {}
    for index in quality.judge_split(len(labels))[0].tolist():
        label = int(labels[index])
        if not per_class or taken.get(label, 0) < per_class:
            chosen.append(index)
            taken[label] = taken.get(label, 0) + 1
    return np.asarray(sorted(chosen))


def write_training_folder(data: str, folder: Path) -> int:
    """The letters without the judge's held-out tenth, as one sub-folder per class; returns the count written."""
    import quality

    paths, labels, _ = quality.labelled_files(data)
    hidden = set(quality.judge_split(len(paths))[0].tolist())
    if folder.exists():
        shutil.rmtree(folder)
    for index, path in enumerate(paths):
        if index not in hidden:
            (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / path.parent.name / path.name)
    return len(paths) - len(hidden)


def painted_region(kind: str) -> np.ndarray:
    """bool [SIZE, SIZE]: True where the model paints."""
    painted = np.zeros((SIZE, SIZE), dtype=bool)
    if kind == "right_half":
        painted[:, SIZE // 2:] = True
    else:  # 6x6: an 8x8 square would leave little of most letters (about 8 px tall) to go on
        painted[SIZE // 2 - 3: SIZE // 2 + 3, SIZE // 2 - 3: SIZE // 2 + 3] = True
    return painted


def seam(images: np.ndarray, painted: np.ndarray) -> float:
    """Mean |kept - painted| (0-255) over the neighbouring pixel pairs (across and down) that the mask's border cuts."""
    x = images.astype(np.float64)
    across = np.abs(x[:, :, 1:] - x[:, :, :-1])[:, painted[:, 1:] != painted[:, :-1]]
    down = np.abs(x[:, 1:, :] - x[:, :-1, :])[:, painted[1:, :] != painted[:-1, :]]
    return float(np.concatenate([across, down], axis=1).mean())


def nearest_fill(letters: np.ndarray, painted: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Each letter's hole filled with the pixels of the pool letter whose kept pixels are nearest (L2)."""
    a, b = letters[:, ~painted].astype(np.float64), pool[:, ~painted].astype(np.float64)
    distance = (a ** 2).sum(1)[:, None] - 2 * a @ b.T + (b ** 2).sum(1)[None]
    return np.where(painted, pool[distance.argmin(1)], letters)


def kept_pixels_reading(probabilities: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """From p(letter | kept pixels) [N, classes]: the share whose likeliest letter is the true one, and the mean
    probability of the true letter (the expected score of drawing each letter from that distribution)."""
    return (float((probabilities.argmax(1) == truth).mean()),
            float(probabilities[np.arange(len(truth)), truth].mean()))


def kept_pixels_ceiling(labels: np.ndarray, num_classes: int, filled_all: np.ndarray, test: np.ndarray,
                        path: Path) -> tuple[float, float]:
    """kept_pixels_reading of the held-out `test` letters by a classifier trained on `filled_all` (every letter with
    the hole mean-filled; train_classifier holds out the same tenth as the judge, so `test` is unseen)."""
    import torch

    import quality

    classifier, _ = quality.train_classifier(filled_all, labels, num_classes, path)
    with torch.no_grad():
        x = torch.from_numpy(filled_all[test]).float().div(127.5).sub(1).unsqueeze(1)
        probabilities = torch.softmax(classifier(x), 1).numpy()
    return kept_pixels_reading(probabilities, labels[test])


def run_inference(argv: list) -> Path:
    """inference.py in this process; returns its output folder."""
    import inference

    if inference.main([str(a) for a in argv]) != 0:
        raise SystemExit(f"inference.py failed: {shlex.join(map(str, argv))}")
    return Path(argv[argv.index("--output_dir") + 1])


def read_results(folder: Path) -> np.ndarray:
    """uint8 [N, SIZE, SIZE]: the results inference.py wrote, in its manifest's order (the inputs' order)."""
    from PIL import Image

    manifest = json.loads((folder / "manifest.json").read_text())
    return np.stack([np.asarray(Image.open(folder / f["file"]).convert("L")) for f in manifest["files"]])


def save_rows(rows: list[np.ndarray], path: Path, letters: int = 16) -> None:
    """A picture with a row per method, `letters` letters spread over the classes across, scaled for display."""
    import torch

    from sampling import save_grid

    pick = np.linspace(0, len(rows[0]) - 1, min(letters, len(rows[0]))).round().astype(int)
    cells = torch.from_numpy(np.concatenate([row[pick] for row in rows])).float().div(255).unsqueeze(1)
    save_grid(cells, path, columns=len(pick), display_size=64)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_training_folder:
        import quality

        folder = Path(args.write_training_folder)
        count = write_training_folder(args.data, folder)
        run = folder.parent / "run"
        command = ["python", "train_ddpm.py",  # as run from the repository's root
                   *quality.train_command(str(folder), SIZE, 64, 3000, 0, run, folder.parent / "data")[2:]]
        print(f"wrote {count} letters (all but the judge's held-out tenth) to {folder}; train the benchmark model "
              f"with\n  {shlex.join(command)}\nthen run\n  python {Path(__file__).relative_to(ROOT)} --model_path "
              f"{run / 'final_model'}")
        return 0
    if not args.model_path:
        raise SystemExit("pass --model_path (a model trained on --write_training_folder's letters)")
    sdedit = sdedit_flags(args)
    import torch
    from PIL import Image

    import quality

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    images, labels, classes = quality.load_labelled(args.data, SIZE)
    classifier, accuracy = quality.train_classifier(
        images, labels, len(classes), Path(args.judge_dir) / f"classifier-{quality.fingerprint(images)}.pt")
    test = held_out(labels, args.per_class)
    training = np.setdiff1d(np.arange(len(images)), quality.judge_split(len(images))[0].numpy())
    mean_image = images[training].astype(np.float64).mean(0).round().astype(np.uint8)
    real, truth = images[test], labels[test]
    print(f"judge: held-out accuracy {accuracy:.3f}; {len(test)} held-out letters ({args.per_class or 'all'} per "
          f"class) of {len(classes)} classes; model {args.model_path}")

    for kind in args.masks:
        painted = painted_region(kind)
        work = out / f"{args.label}-{kind}"
        inputs = work / "inputs"
        if work.exists():
            shutil.rmtree(work)
        inputs.mkdir(parents=True)
        filled = np.where(painted, mean_image, real)  # the hole holds the mean image: nothing of the letter is left
        for k, image in enumerate(filled):
            Image.fromarray(image).save(inputs / f"{k:04d}_{classes[truth[k]]}.png")
        Image.fromarray(painted.astype(np.uint8) * 255).save(work / "mask.png")
        common = ["--model_path", args.model_path, "--num_images", 1, "--seed", args.seed, "--batch_size",
                  args.batch_size]
        methods = {"mean": filled, "nearest": nearest_fill(real, painted, images[training])}
        seconds = {"mean": 0.0, "nearest": 0.0}
        for strength in args.sdedit_strengths:
            name = f"sdedit {strength:g}"
            started = time.time()
            folder = run_inference([*common, "--init_image", inputs, "--strength", strength,
                                    *sdedit, "--output_dir", work / name.replace(" ", "_")])
            methods[name], seconds[name] = read_results(folder), time.time() - started
        for variant in args.repaint_args:
            name = f"repaint {variant}".strip()
            started = time.time()
            folder = run_inference([*common, "--inpaint", inputs, "--mask", work / "mask.png", *shlex.split(variant),
                                    "--output_dir", work / "_".join(name.replace("-", "").split())])
            methods[name], seconds[name] = read_results(folder), time.time() - started

        real_seam = seam(real, painted)
        likeliest, posterior = kept_pixels_ceiling(
            labels, len(classes), np.where(painted, mean_image, images), test,
            Path(args.judge_dir) / f"kept-{kind}-{quality.fingerprint(images)}.pt")
        print(f"\n{kind} ({int(painted.sum())} pixels painted), {len(test)} letters; real letters: letter "
              f"{(quality.judge(classifier, real)[1].argmax(1) == truth).mean():.3f}, seam {real_seam:.1f}")
        print(f"  ceiling, what the kept pixels say (a classifier of them alone): most likely letter {likeliest:.3f}, "
              f"posterior draw {posterior:.3f} (an exact sampler's expected letter score)")
        width = max(map(len, methods))
        print(f"  {'method':{width}s} {'letter':>6s} {'seam':>6s} {'hole error':>10s} {'minutes':>8s}")
        for name, result in methods.items():
            row = {"label": args.label, "mask": kind, "method": name, "letters": len(test),
                   "model_path": args.model_path, "seed": args.seed,
                   "letter": float((quality.judge(classifier, result)[1].argmax(1) == truth).mean()),
                   "seam": seam(result, painted), "real_seam": real_seam,
                   "hole_error": float(np.abs(result.astype(np.float64) - real)[:, painted].mean()),
                   "ceiling_likeliest": likeliest, "ceiling_posterior": posterior,
                   "minutes": round(seconds[name] / 60, 1)}
            print(f"  {name:{width}s} {row['letter']:6.3f} {row['seam']:6.1f} {row['hole_error']:10.1f} "
                  f"{row['minutes']:8.1f}")
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        save_rows([real, *methods.values()], out / f"{args.label}-{kind}.png")
        print(f"  rows of {out / f'{args.label}-{kind}.png'}: real, {', '.join(methods)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
