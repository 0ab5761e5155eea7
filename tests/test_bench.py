"""Every benchmark script runs end to end on tiny settings and prints its table: a benchmark that no longer runs would
waste the first GPU anyone gets. In-process where the script allows it (a new process costs only imports)."""

from __future__ import annotations

import json
import re
import shlex
import sys
import types

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_bars_folder, save_tiny_pipeline

sys.path.insert(0, str(ROOT / "bench"))

import digits  # noqa: E402
import eval_throughput  # noqa: E402
import fine_tune  # noqa: E402
import inpaint  # noqa: E402
import memory  # noqa: E402
import quality  # noqa: E402
import sample_throughput  # noqa: E402
import samplers  # noqa: E402
import step_parts  # noqa: E402
import train_throughput  # noqa: E402

SCRIPTS = {"train_throughput": train_throughput, "sample_throughput": sample_throughput}
# The training previews of the benchmarks' 1.0M UNet (16 images, 49 network evaluations each) would take longer than
# the rest of a smoke run.
LIGHT_PREVIEWS = "--num_preview_images 1 --sample_num_inference_steps 2"


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    return make_bars_folder(tmp_path_factory.mktemp("letters") / "bars")


def test_train_throughput_and_a_full_run(capsys):
    result = train_throughput.main(["--model", "tiny", "--device", "cpu", "--batch_size", "2", "--steps", "1",
                                    "--repeats", "1", "--warmup", "1", "--full_run", "--full_steps", "2",
                                    "--logging_steps", "1"])
    out = capsys.readouterr().out
    assert "ratio ours/plain" in out and "full train_ddpm.py run" in out
    assert result["loops"]["ours"]["img_per_s"] > 0 and result["full_run"]["img_per_s"] > 0


def test_sample_throughput(capsys):
    result = sample_throughput.main(["--model", "tiny", "--device", "cpu", "--scheduler", "ddim", "--steps", "2",
                                     "--batch_size", "2", "--repeats", "1", "--warmup_steps", "1"])
    assert "ours" in capsys.readouterr().out and result["sides"]["ours"]["img_per_s"] > 0


def test_step_parts(capsys):
    result = step_parts.main(["--model", "tiny", "--device", "cpu", "--batch_size", "2", "--calls", "2"])
    assert "forward+backward" in capsys.readouterr().out and result["parts_ms"]["AdamW step"]["ours"] > 0


def test_eval_throughput(capsys, inception_weights):
    eval_throughput.main(["--num_images", "2", "--reference_images", "2", "--batch_size", "2", "--steps", "2",
                          "--inception_weights", str(inception_weights)])
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["generation_img_per_s"] > 0 and result["features_img_per_s"] > 0


def test_memory(capsys, tmp_path):
    memory.main(["--images", "64", "--image_size", "16", "--processes", "1", "--runs", "touch", "--work",
                 str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"1 process\(es\), touch: processes_seen 1, peak_rss_per_process_mb \d+", out), out


def test_quality_and_samplers(letters, tmp_path, capsys):
    out = tmp_path / "quality"
    assert quality.main(["--data", str(letters), "--steps", "2", "--num_samples", "6", "--batch_size", "4",
                         "--sides", "plain", "edm", "ours", "--jobs", "3", "--out", str(out), "--ours_args",
                         LIGHT_PREVIEWS,
                         "--sampler_args", "--scheduler ddim --num_inference_steps 2"]) == 0
    printed = capsys.readouterr().out
    for side in ("plain", "edm", "ours"):
        assert re.search(rf"^  {side} +distance +\d", printed, re.M), printed
    assert "ratio ours/plain at 2 steps" in printed and "reference check: edm/plain" in printed
    assert (out / "compare-defaults-steps2-seed0.png").exists()
    # The conditional protocol, against the unconditional run above (--reuse: 2 images x 3 classes = its 6 samples).
    assert quality.main(["--data", str(letters), "--steps", "2", "--conditional", "--per_class", "2",
                         "--guidance_scales", "2", "--reuse", "--batch_size", "4", "--out", str(out), "--ours_args",
                         LIGHT_PREVIEWS,
                         "--sampler_args", "--scheduler ddim --num_inference_steps 2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^  unconditional +distance +\d+\.\d +per class", printed, re.M), printed
    assert re.search(r"^  conditional w 2 +distance +\d+\.\d +per class +\d+\.\d +accuracy [01]\.\d{3}", printed,
                     re.M), printed
    row = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert row["guidance_scale"] == 2 and row["conditional"]["classes_scored"] == 3
    assert (out / "conditional-defaults-steps2-seed0-w2.png").exists()
    # w 0 ignores the class, so it is drawn from seeds of its own, as many images as the classes get in all.
    settings = dict(data=str(letters), image_size=16, batch_size=4, steps=2, out=str(out), ours_args="", per_class=2,
                    sampler_args="", guidance_scales=[0, 2])
    _, w0, w2 = quality.conditional_script(types.SimpleNamespace(**settings), 0, tmp_path / "c").split(" && ")
    assert "--class_label" not in w0 and "--num_images 6 --guidance_scale 0 " in w0
    assert "--class_label bar_bottom bar_middle bar_top --num_images 2 --guidance_scale 2 " in w2
    model = save_tiny_pipeline(tmp_path / "model", size=16, channels=1)
    assert samplers.main(["ddim:2", "heun:2:use_karras_sigmas=True", "--model_path", str(model), "--data",
                          str(letters), "--num_samples", "4", "--batch_size", "4", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ddim:2 ") and " 2 evals " in lines[0] and "distance" in lines[0]
    assert lines[1].startswith("heun:2:use_karras_sigmas=True ") and " 3 evals " in lines[1]


def test_the_shipped_judge_is_used_for_its_data_and_no_other(tmp_path, monkeypatch):
    """A judge in bench/judges/ named for the data's fingerprint is loaded, not retrained (so distances compare across
    machines); data of another fingerprint trains its own. And the shipped files load into the judge's network."""
    import torch

    for shipped in sorted((ROOT / "bench" / "judges").glob("classifier-*.pt")):
        state = torch.load(shipped)["state"]
        classes = state[next(k for k in reversed(state) if k.endswith("weight"))].shape[0]
        quality.make_classifier(classes, 16).load_state_dict(state)
    images = np.random.default_rng(0).integers(0, 256, (20, 16, 16), dtype=np.uint8)
    labels = np.arange(20) % 2
    name = f"classifier-{quality.fingerprint(images)}.pt"
    monkeypatch.setattr(quality, "SHIPPED_JUDGES", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    torch.save({"state": quality.make_classifier(2, 16).state_dict(), "accuracy": 0.123}, tmp_path / "shipped" / name)
    assert quality.train_classifier(images, labels, 2, tmp_path / "cache" / name)[1] == 0.123
    assert not (tmp_path / "cache").exists()  # loaded, not trained and cached
    other = f"classifier-{quality.fingerprint(images[1:])}.pt"
    torch.manual_seed(1)
    first, accuracy = quality.train_classifier(images[1:], labels[1:], 2, tmp_path / "cache" / other)
    assert accuracy != 0.123 and (tmp_path / "cache" / other).exists()
    torch.rand(5)  # another process's random state: the same data still trains the same judge
    again, _ = quality.train_classifier(images[1:], labels[1:], 2, tmp_path / "again" / other)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_digits_are_written_as_16px_folders_per_class(tmp_path, capsys):
    import gzip

    rows = [[16] * 64 + [3], [0] * 32 + [8] * 32 + [7]]
    data = gzip.compress("\n".join(",".join(map(str, row)) for row in rows).encode())
    assert digits.write_digits(data, tmp_path / "d") == 2
    three = np.asarray(Image.open(tmp_path / "d" / "3" / "0000.png"))
    assert three.shape == (16, 16) and three.min() == 255
    half = np.asarray(Image.open(tmp_path / "d" / "7" / "0001.png")).astype(int)
    assert half[:6].max() == 0 and 120 <= half[-1].mean() <= 135  # top half black, bottom half grey level 8
    assert digits.main(["--out", str(tmp_path / "d")]) == 2  # never written over
    assert "is not empty" in capsys.readouterr().err


def test_edm_parts_swap_and_train(letters, tmp_path):
    """Every part of the edm side can be swapped for ours (one 2-step run with all swapped, in-process); a wrong
    part is one line naming the choices."""
    swapped = quality.parse_edm_parts(["sigma=ddpm", "weight=minsnr", "precond=eps", "cnoise=ddpm", "opt=ours",
                                       "ema=power", "sigma_data=1"])
    assert swapped["sigma_data"] == 1.0 and quality.edm_parts_tag({"sigma": "ddpm"}) == "-sigma=ddpm"
    quality.edm_worker(str(letters), 16, 4, 2, 0, 3, tmp_path / "edm", swapped)
    samples = np.load(tmp_path / "edm" / "samples.npy")
    assert samples.shape == (3, 16, 16) and samples.dtype == np.uint8 and samples.std() > 0
    with pytest.raises(SystemExit, match=r"--edm_parts sigma=uniform: expected one of sigma=lognormal\|ddpm"):
        quality.parse_edm_parts(["sigma=uniform"])


def test_fine_tune(tmp_path, capsys):
    """Pretrain on lower_*, fine-tune on upper_* with LR auto (the fixed LRs are rows of the same kind); a table."""
    data = tmp_path / "glyphs"
    rng = np.random.default_rng(1)
    for name in ("lower_a", "lower_b", "upper_A", "upper_B"):
        (data / name).mkdir(parents=True)
        for i in range(6):
            image = np.zeros((16, 16), dtype=np.uint8)
            column = (3 if name.endswith(("a", "A")) else 10) + rng.integers(0, 2)
            image[2:14, column:column + 3] = 255 if name.startswith("upper") else 128
            Image.fromarray(image).save(data / name / f"{i}.png")
    assert fine_tune.main(["--data", str(data), "--pretrain_steps", "2", "--fine_tune_steps", "2", "--fixed_lrs",
                           "--num_samples", "6", "--batch_size", "4", "--train_args", LIGHT_PREVIEWS, "--out",
                           str(tmp_path / "out"), "--sampler_args", "--scheduler ddim --num_inference_steps 2"]) == 0
    printed = capsys.readouterr().out
    assert "judge: CNN on the 2 uppercase classes of 12 images" in printed
    # auto for a fine-tune of the 1.0M UNet is the from-scratch rule's 1.7e-3 (bench/RESULTS.md: a tenth was worse)
    assert re.search(r"fine-tune LR auto +\(LR 1\.7e-03\) +distance +\d", printed), printed
    assert "best: " in printed and (tmp_path / "out" / "compare-pre2-steps2-seed0.png").exists()


def test_inpaints_sdedit_runs_the_deterministic_sampler_each_kind_of_model_has(tmp_path):
    """DDIM for a DDPM model, DPM-Solver++ for a --parameterization edm one (inference.py refuses DDIM there)."""
    for edm, scheduler in ((False, "ddim"), (True, "dpmsolver++")):
        model = save_tiny_pipeline(tmp_path / f"model-{edm}", size=16, channels=1, edm=edm)
        args = inpaint.parse_args(["--model_path", str(model)])
        assert inpaint.sdedit_flags(args) == ["--scheduler", scheduler, "--num_inference_steps", "50"]
    args = inpaint.parse_args(["--model_path", str(model), "--sdedit_args", "--scheduler heun"])
    assert inpaint.sdedit_flags(args) == ["--scheduler", "heun"]
    with pytest.raises(SystemExit, match="does not exist"):
        inpaint.sdedit_flags(inpaint.parse_args(["--model_path", str(tmp_path / "missing")]))


def test_inpaint(letters, tmp_path, capsys):
    """The training folder leaves out exactly the judge's held-out letters; the scores and pictures of each mask."""
    train = tmp_path / "train"
    assert inpaint.main(["--data", str(letters), "--write_training_folder", str(train)]) == 0
    held_out = quality.judge_split(18)[0].tolist()  # 3 classes of 6: one letter held out
    paths, _, _ = quality.labelled_files(str(letters))
    assert sorted(p.relative_to(train) for p in train.rglob("*.png")) == sorted(
        p.relative_to(letters) for i, p in enumerate(paths) if i not in held_out)
    assert "train_ddpm.py --dataset_name custom --dataset_path" in capsys.readouterr().out
    model = save_tiny_pipeline(tmp_path / "model", size=16, channels=1)
    out = tmp_path / "out"
    assert inpaint.main(["--data", str(letters), "--model_path", str(model), "--per_class", "0", "--out", str(out),
                         "--judge_dir", str(tmp_path / "judge"), "--sdedit_strengths", "0.5", "--sdedit_args",
                         "--scheduler ddim --num_inference_steps 4", "--repaint_args",
                         "--num_inference_steps 4 --jump_length 2 --jump_n_sample 2"]) == 0
    printed = capsys.readouterr().out
    for mask in ("right_half", "centre"):
        assert f"{mask} (" in printed and (out / f"defaults-{mask}.png").exists()
        assert (out / f"defaults-{mask}" / "repaint_num_inference_steps_4_jump_length_2_jump_n_sample_2" /
                "inpaint_grid.png").exists()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows[:4]] == ["mean", "nearest", "sdedit 0.5",
                                               "repaint --num_inference_steps 4 --jump_length 2 --jump_n_sample 2"]
    assert len(rows) == 8 and all(0 <= r["letter"] <= 1 and r["seam"] >= 0 for r in rows)
    assert all(0 <= r["ceiling_likeliest"] <= 1 and 0 <= r["ceiling_posterior"] <= 1 for r in rows)
    assert "ceiling, what the kept pixels say" in printed and len(list((tmp_path / "judge").glob("kept-*.pt"))) == 2
    # The ceiling's reading: the likeliest letter's accuracy, and the mean probability of the true letter.
    assert inpaint.kept_pixels_reading(np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 0])) == pytest.approx((0.5, 0.45))
    # The seam: |kept - painted| over the pixel pairs the border cuts (right half: the 16 pairs of columns 7 and 8).
    # The nearest fill: the hole from the pool letter that agrees best outside it, the kept pixels untouched.
    letters, pool = np.zeros((1, 16, 16), np.uint8), np.zeros((2, 16, 16), np.uint8)
    pool[0, :, :8], pool[0, :, 8:], pool[1, :, 8:], letters[0, :, 8:] = 90, 200, 50, 7
    painted = inpaint.painted_region("right_half")
    assert (inpaint.nearest_fill(letters, painted, pool) == np.where(painted, pool[1], letters)).all()
    step = np.zeros((1, 16, 16))
    step[:, :, 8:] = 40
    assert inpaint.seam(step, inpaint.painted_region("right_half")) == 40
    assert inpaint.seam(step, inpaint.painted_region("centre")) == 0  # the step lies inside the square: no cut pair


def test_every_gpu_job_parses_with_its_script():
    """bench/run_gpu.sh's jobs, read with each script's own argument parser: a renamed flag fails here, not on the
    GPU."""
    text = (ROOT / "bench" / "run_gpu.sh").read_text().replace("\\\n", " ")
    jobs = [shlex.split(line)[4:] for line in text.splitlines() if line.startswith("job ")]
    assert len(jobs) >= 7
    for script, *args in jobs:
        SCRIPTS[script.removeprefix("bench/").removesuffix(".py")].parse_args(args)
