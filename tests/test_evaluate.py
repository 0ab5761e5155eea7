"""FID and KID: the metric against direct computations, evaluate.py end to end, during training, on two processes.

Offline throughout: Inception runs on a random-weights file of the real architecture (conftest.inception_weights).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

import evaluate
import inference
import metrics
from conftest import ROOT, call, cli_env, make_image_folder, run_cli, save_tiny_pipeline
from model import load_model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
# 5 images in batches of 2: uneven shares on two processes (3 and 2) and a short last batch. Few images, as the
# random Inception takes about 0.2 s an image on a CPU.
SAMPLING = ["--num_images", 5, "--batch_size", 2, "--scheduler", "ddim", "--num_inference_steps", 3]
TINY_8PX = ["--image_size", "8", "--block_out_channels", "8", "16", "--norm_num_groups", "8", "--layers_per_block", "1",
            "--down_block_types", "DownBlock2D", "DownBlock2D", "--up_block_types", "UpBlock2D", "UpBlock2D"]


def gaussian(rng, n: int, mean, std) -> torch.Tensor:
    return torch.from_numpy(rng.normal(mean, std, (n, len(std))).astype(np.float32))


def test_fid_matches_the_closed_form_of_two_gaussians():
    rng = np.random.default_rng(0)
    d = 8
    mu_r, std_r = rng.normal(0, 1, d), rng.uniform(0.5, 2, d)
    mu_g, std_g = rng.normal(0, 1, d), rng.uniform(0.5, 2, d)
    reference = {"mu": mu_r.astype(np.float32), "sigma": np.diag(std_r ** 2)}  # the population's own statistics
    # Diagonal covariances: ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^1/2) = sum of squares of both differences.
    closed_form = ((mu_r - mu_g) ** 2).sum() + ((std_r - std_g) ** 2).sum()
    assert metrics.frechet_distance(reference, gaussian(rng, 50_000, mu_g, std_g)) == pytest.approx(closed_form,
                                                                                                    rel=0.03)


def test_fid_of_a_set_against_itself_is_zero_and_the_few_image_path_is_torch_fidelitys():
    rng = np.random.default_rng(1)
    many, few = gaussian(rng, 300, 0, np.ones(16)), gaussian(rng, 12, 0, np.linspace(0.5, 3, 64))
    for features in (many, few):  # torch-fidelity's path (more images than dimensions), then the n x n one
        assert abs(metrics.frechet_distance(fid_features_to_statistics(features), features)) < 1e-6
    reference = fid_features_to_statistics(gaussian(rng, 200, 0.3, np.linspace(1, 2, 64)))
    direct = fid_statistics_to_metric(reference, fid_features_to_statistics(few), verbose=False)
    assert metrics.frechet_distance(reference, few) == pytest.approx(direct["frechet_inception_distance"], rel=1e-6)


def test_kid_is_unbiased_around_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(2)
    std = np.ones(16)
    same = [metrics.kernel_inception_distance(gaussian(rng, 100, 0, std).numpy(), gaussian(rng, 100, 0, std))
            for _ in range(12)]
    means = np.array([r["kid_mean"] for r in same])
    assert (means < 0).any() and (means > 0).any(), "an unbiased estimate of a zero MMD takes both signs"
    shifted = metrics.kernel_inception_distance(gaussian(rng, 100, 0, std).numpy(), gaussian(rng, 100, 0.5, std))
    assert shifted["kid_mean"] > 10 * np.abs(means).max() and shifted["kid_mean"] > 3 * shifted["kid_std"]
    assert shifted["kid_subset_size"] == 100  # capped by the number of images


@pytest.fixture(scope="module")
def scored(tmp_path_factory, inception_weights):
    """One evaluate.py run on an untrained 8 px model against an 8-image folder, its images saved."""
    root = tmp_path_factory.mktemp("evaluate")
    model = save_tiny_pipeline(root / "model")
    data = ["--reference", "custom", "--dataset_path", make_image_folder(root / "reference", count=8), "--data_dir",
            root / "data",
            "--inception_weights", inception_weights]
    proc = run_cli("evaluate.py", "--model_path", model, *SAMPLING, *data, "--output_dir", root / "one",
                   "--save_images")
    return root, model, data, proc


def test_a_model_is_scored_end_to_end_with_metrics_json(scored):
    root, model, _, proc = scored
    record = json.loads((root / "one" / "metrics.json").read_text())
    metrics = record["metrics"]
    assert metrics["num_images"] == 5 and metrics["fid"] > 0 and metrics["kid_std"] >= 0
    assert metrics["kid_subset_size"] == 5  # min(1000, 5 generated, 8 reference)
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("FID")]
    assert f"FID {metrics['fid']:.3f}  KID {metrics['kid_mean']:.5f} ± {metrics['kid_std']:.5f}" in line
    assert record["settings"]["scheduler"] == "ddim" and record["settings"]["num_inference_steps_used"] == 3
    assert record["model"]["path"] == str(model) and record["model"]["sample_size"] == 8
    reference = record["reference"]
    assert reference["images"] == 8 and reference["image_size"] == 8 and Path(reference["statistics_file"]).exists()
    assert record["inception"]["standard"] is False and "not comparable with published" in proc.stdout
    assert record["versions"]["torch-fidelity"] == "0.4.0"
    assert record["time"]["generation_s"] > 0 and record["time"]["features_s"] > 0
    assert sorted(p.name for p in (root / "one" / "images").iterdir()) == [f"seed{i:06d}.png" for i in range(5)]


def test_scoring_the_saved_images_gives_the_models_scores(scored, tmp_path, capsys):
    root, _, data, _ = scored
    # In-process: a subprocess would add only its imports. The PNGs hold the uint8 images Inception saw.
    assert evaluate.main(["--images", str(root / "one" / "images"), *map(str, data), "--output_dir",
                          str(tmp_path)]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    first = json.loads((root / "one" / "metrics.json").read_text())["metrics"]
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-5)
    assert again["kid_mean"] == pytest.approx(first["kid_mean"], rel=1e-4, abs=1e-7)


def test_two_processes_score_the_same_images_as_one(scored):
    root, model, data, _ = scored
    proc = subprocess.run([*TORCHRUN, str(ROOT / "evaluate.py"), "--model_path", str(model),
                           *map(str, SAMPLING + data), "--output_dir", str(root / "two"), "--save_images"],
                          capture_output=True, text=True, timeout=300, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("FID ") == 1, "the main process reports"
    one, two = (json.loads((root / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert two["settings"]["num_processes"] == 2
    assert two["metrics"]["fid"] == pytest.approx(one["metrics"]["fid"], rel=1e-5)
    for png in sorted((root / "one" / "images").iterdir()):
        assert (root / "two" / "images" / png.name).read_bytes() == png.read_bytes(), png.name


def test_two_processes_give_inference_the_same_files_as_one(scored, tmp_path):
    _, model, _, _ = scored
    args = ["--model_path", model, "--num_images", 5, "--batch_size", 2, "--num_inference_steps", 3]
    assert inference.main([str(a) for a in args + ["--output_dir", tmp_path / "one"]]) == 0
    proc = subprocess.run([*TORCHRUN, str(ROOT / "inference.py"), *map(str, args + ["--output_dir", tmp_path / "two"])],
                          capture_output=True, text=True, timeout=300, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(files) == 7  # 5 PNGs, grid, manifest
    for name in files:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_eval_epochs_logs_fid_and_kid_and_keeps_the_best_model(scored, inception_weights, tmp_path, capsys):
    from diffusers import DDPMPipeline

    import train_ddpm

    root, _, _, _ = scored
    out = tmp_path / "run"
    # The reference folder in batches of 4: 2 optimizer steps an epoch. Its statistics are cached by `scored`.
    proc = call(train_ddpm.main, [*TINY_8PX, "--train_batch_size", 4, "--sample_num_inference_steps", 2,
                                  "--num_preview_images", 4, "--dataloader_num_workers", 0, "--seed", 7,
                                  "--dataset_name", "custom", "--dataset_path", root / "reference", "--data_dir",
                                  root / "data", "--output_dir", out, "--num_epochs", 2, "--eval_epochs", 1,
                                  "--eval_num_images", 4, "--inception_weights", inception_weights], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = {p.parent for p in (out / "logs").rglob("events.out.tfevents.*")
              if "eval/fid" in EventAccumulator(str(p)).Reload().Tags()["scalars"]}
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    fid = {e.step: e.value for e in events.Scalars("eval/fid")}
    assert sorted(fid) == [2, 4]  # after each epoch of 2 optimizer steps, at the optimizer step
    assert [e.step for e in events.Scalars("eval/kid")] == [2, 4]
    best = json.loads((out / "best_model" / "metrics.json").read_text())
    assert best["step"] == min(fid, key=fid.get) and best["fid"] == pytest.approx(fid[best["step"]], rel=1e-5)
    assert DDPMPipeline.from_pretrained(out / "best_model").unet.config.sample_size == 8
    assert proc.stdout.count("eval at step") == 2 and (out / "final_model").exists()


def test_offline_without_weights_is_one_line_and_exit_2(scored, tmp_path, monkeypatch, capsys):
    _, model, _, _ = scored
    for name, value in cli_env().items():  # the proxies of every CLI run: no download can succeed
        if "proxy" in name.lower():
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    assert evaluate.main(["--model_path", str(model), "--num_images", "2", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # the model is loaded (its progress bar) before the weights are looked for
    (line,) = [line for line in err.splitlines() if line.strip() and "Loading pipeline components" not in line]
    assert line.startswith("error: cannot download the Inception-v3 weights")
    assert "weights-inception-2015-12-05-6726825d.pth" in line and "--inception_weights" in line
    # A wrong model is named first, before any weights are looked for.
    assert evaluate.main(["--model_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "--model_path" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    ([], ["nothing to score", "--model_path", "--images"]),
    (["--model_path", "m", "--images", "."], ["either --model_path", "not both"]),
    (["--model_path", "m", "--num_images", "1"], ["--num_images must be at least 2"]),
    (["--model_path", "m", "--reference", "missing.npz"], ["--reference missing.npz does not exist"]),
    (["--model_path", "m", "--inception_weights", "missing.pth"], ["--inception_weights missing.pth does not exist"]),
])
def test_evaluate_validation_errors_are_one_line(argv, words, capsys):
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(word in err for word in words), err


@pytest.mark.parametrize("argv, words", [
    (["--eval_epochs", "0"], ["--eval_epochs must be at least 1 (or none)"]),
    (["--eval_epochs", "1", "--eval_num_images", "1"], ["--eval_num_images must be at least 2"]),
    (["--eval_epochs", "1", "--inception_weights", "missing.pth"], ["--inception_weights missing.pth does not exist"]),
])
def test_training_evaluation_settings_are_checked_before_training(argv, words, tmp_path, capsys):
    import train_ddpm

    assert train_ddpm.main([*argv, "--output_dir", str(tmp_path / "out"), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(word in err for word in words), err


def test_the_one_loader_reads_what_is_on_disk(scored, trained_run, tmp_path):
    """model.load_model, the loader of train_ddpm.py, inference.py and evaluate.py. A folder holding only unet/ and
    scheduler/ (no model_index.json) gives the weights stored there and its own schedule; a training checkpoint gives
    its EMA weights (at the run's last epoch: final_model's), not its training weights."""
    import shutil

    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    _, model_dir, _, _ = scored
    shutil.copytree(model_dir / "unet", tmp_path / "unet")
    DDPMScheduler(num_train_timesteps=500, beta_end=0.03).save_pretrained(tmp_path / "scheduler")
    saved = load_model(str(tmp_path))
    stored = load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = saved.unet.state_dict()
    assert loaded.keys() == stored.keys() and all(torch.equal(loaded[k], v) for k, v in stored.items())
    assert saved.schedule.num_train_timesteps == 500 and saved.schedule.beta_end == 0.03 and saved.record is None

    out, _ = trained_run
    checkpoint = load_model(str(out / "checkpoint-epoch-2"))
    loaded = checkpoint.unet.state_dict()
    ema = load_file(out / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    training = load_file(out / "checkpoint-epoch-2" / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in ema.items())
    assert not torch.equal(loaded["conv_in.weight"], training["conv_in.weight"])
    assert checkpoint.record["training"]["seed"] == 7


def test_post_hoc_ema_scores_each_length_and_saves_the_best(scored, inception_weights, tmp_path, capsys):
    """A run that kept EMA snapshots: evaluate.py rebuilds the EMA of each --ema_length from them, scores each with
    the same seeds, and saves the best as a model of its own, trained schedule included (an EDM run here: it once
    came back as a DDPMScheduler, which samples an EDM model into noise)."""
    import train_ddpm
    from conftest import call
    from model import trained_scheduler

    root, untrained, data, _ = scored
    out = tmp_path / "run"
    result = call(train_ddpm.main, [*TINY_8PX, "--train_batch_size", 4, "--num_preview_images", 2,
                                    "--sample_num_inference_steps", 2, "--dataloader_num_workers", 0, "--seed", 7,
                                    "--dataset_name", "custom", "--dataset_path", root / "reference", "--data_dir",
                                    root / "data", "--output_dir", out, "--max_train_steps", 8, "--ema_snapshots", 4,
                                    "--parameterization", "edm"],
                  capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((out / "ema_snapshots").glob("*.safetensors"))) == 8  # 4 times, 2 lengths
    edm_sampling = [value if value != "ddim" else "euler" for value in SAMPLING]  # EDM models refuse DDIM
    argv = ["--model_path", out / "final_model", *edm_sampling, *data, "--output_dir", tmp_path / "eval"]
    result = call(evaluate.main, [*argv, "--ema_length", 0.03, 0.2], capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("EMA length")]
    assert len(lines) == 2 and sum("<- the best" in line for line in lines) == 1
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    best = record["model"]["best_ema_length"]
    assert record["metrics"] == record["model"]["ema_lengths"][str(best)]
    saved = load_model(str(tmp_path / "eval" / "best_ema_model"))
    assert saved.record["_posthoc_ema"]["length"] == best and saved.unet.config.sample_size == 8
    assert saved.schedule == load_model(str(out / "final_model")).schedule
    assert type(trained_scheduler(saved.schedule)).__name__ == "EDMEulerScheduler"
    index = json.loads((tmp_path / "eval" / "best_ema_model" / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyModelPipeline"
    assert not torch.equal(saved.unet.state_dict()["conv_in.weight"],
                           load_model(str(out / "final_model")).unet.state_dict()["conv_in.weight"])
    result = call(evaluate.main, ["--model_path", untrained, "--ema_length", 0.1, "--output_dir", tmp_path / "x"],
                  capsys)
    assert result.returncode == 2 and "--ema_snapshots" in result.stderr  # a model of a run without snapshots
