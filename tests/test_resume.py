"""Training that survives: exact resume, preemption, SIGKILL, NaN and fp16-overflow steps, overwrite protection,
fine-tuning, extending a run, settings changed on resume, resuming from an older checkpoint."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import config
from checkpoint import find_checkpoint
from model import count_parameters
from conftest import ROOT, TINY_MODEL, TINY_RUN, assert_user_error, call, cli_env, save_tiny_pipeline

# 12 images in batches of 4: 3 optimizer steps an epoch, so step 4 is in the middle of epoch 2.
# A warm-up schedule makes the LR change across the resume point without depending on the run's length.
EXACT = TINY_RUN + ["--random_flip", "--dropout", "0.1", "--lr_scheduler", "constant_with_warmup",
                    "--lr_warmup_steps", "6", "--checkpointing_steps", "4", "--save_image_epochs", "100"]


def train_args(image_folder: Path, out: Path, *extra) -> list:
    return [*EXACT, "--dataset_name", "custom", "--dataset_path", image_folder, "--data_dir", out.parent / "data",
            "--output_dir", out, *extra]


def train(capsys, *args) -> object:
    """train_ddpm.py in-process (conftest.call): what a new process would add is only its imports."""
    import train_ddpm

    result = call(train_ddpm.main, list(args), capsys)
    assert result.returncode == 0, f"train_ddpm.py exited {result.returncode}\n{result.stderr[-4000:]}"
    return result


def load_checkpoint_state(path: Path) -> dict[str, object]:
    return {
        "model": load_file(path / "model.safetensors"),
        "ema": torch.load(path / "custom_checkpoint_0.pkl", weights_only=False),
        "optimizer": torch.load(path / "optimizer.bin", weights_only=False),
        "progress": json.loads((path / "progress.json").read_text()),
    }


def assert_identical(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


# The second case also runs issue 22's training options: v-prediction, EDM's loss weight and log-normal timesteps.
V_EDM = ("--prediction_type", "v_prediction", "--loss_weighting", "edm", "--timestep_sampling", "lognormal")


EDM = ("--parameterization", "edm")  # and issue 22's full EDM: continuous noise levels, EDM's preconditioning


@pytest.mark.parametrize("accumulation, options", [(1, ()), (2, V_EDM), (1, EDM)])
def test_resume_mid_epoch_is_bit_identical(image_folder, tmp_path, accumulation, options, capsys):
    steps = 8
    straight = tmp_path / "straight"
    train(capsys, *train_args(image_folder, straight, "--max_train_steps", steps,
                              "--gradient_accumulation_steps", accumulation, "--train_batch_size", 2,
                              *options))
    halves = tmp_path / "halves"
    train(capsys, *train_args(image_folder, halves, "--max_train_steps", steps // 2,
                              "--gradient_accumulation_steps", accumulation, "--train_batch_size", 2,
                              *options))
    resumed = train(capsys, "--output_dir", halves, "--resume_from_checkpoint", "latest",
                    "--max_train_steps", steps)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    a = load_checkpoint_state(straight / f"checkpoint-step-{steps}")
    b = load_checkpoint_state(halves / f"checkpoint-step-{steps}")
    assert a["progress"]["batches_in_epoch"] % accumulation == 0
    assert_identical(a["model"], b["model"], "model")
    assert_identical(a["ema"], b["ema"], "ema")
    assert_identical(a["optimizer"], b["optimizer"], "optimizer")
    assert_identical(a["progress"], b["progress"], "progress")
    # The EMA weights differ from the training weights, and final_model/ holds the EMA ones.
    final = load_file(halves / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    name = "conv_in.weight"
    assert not torch.equal(final[name], b["model"][name])
    if options == EDM:  # DiffusionPipeline loads it as the pipeline that samples an EDM model (the README's lines)
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(halves / f"checkpoint-step-{steps}")
        assert type(pipeline).__name__ == "ConsistencyModelPipeline"  # init_noise_sigma and scale_model_input
        assert type(pipeline.scheduler).__name__ == "EDMEulerScheduler" and pipeline.scheduler.config.sigma_data == 0.5
        images = pipeline(batch_size=1, num_inference_steps=3, output_type="np").images
        assert images.ndim == 4 and np.isfinite(images).all()
    elif options:  # a checkpoint of such a run is a DDPMPipeline that samples with the target it was trained for
        from diffusers import DDPMPipeline

        pipeline = DDPMPipeline.from_pretrained(halves / f"checkpoint-step-{steps}")
        assert pipeline.scheduler.config.prediction_type == "v_prediction"
        images = pipeline(batch_size=1, num_inference_steps=3, output_type="np").images
        assert images.ndim == 4 and np.isfinite(images).all()


def start_training(image_folder: Path, out: Path, *extra) -> subprocess.Popen:
    args = train_args(image_folder, out, "--max_train_steps", 10_000_000, *extra)  # far longer than an hour
    return subprocess.Popen([sys.executable, str(ROOT / "train_ddpm.py"), *map(str, args)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for training to get going")
        time.sleep(0.2)


def progress_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "progress.json").read_text())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_checkpoints_and_a_fine_tune_resumes_to_the_end(image_folder, tmp_path, trained_run,
                                                                          signum, capsys):
    out, (base, _) = tmp_path / "run", trained_run
    if signum == signal.SIGTERM:  # a fine-tune with a frozen encoder, stopped and resumed
        proc = start_training(image_folder, out, "--pretrained_model_path", base / "final_model",
                              "--freeze_down_blocks")
    else:  # the stop is decided at a log step, whatever the process count
        proc = start_training(image_folder, out, "--logging_steps", 3)
    wait_for(lambda: (out / "checkpoint-step-4" / "progress.json").exists(), proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "--resume_from_checkpoint latest" in stderr
    assert "Traceback" not in stderr
    assert "--model_preset quickstart" in stdout, "a CPU run this long is told its time and a quicker start"
    latest = max((p for p in out.glob("checkpoint-step-*")), key=lambda p: progress_of(p)["global_step"])
    stopped_at = progress_of(latest)["global_step"]
    if signum == signal.SIGINT:
        assert stopped_at % 3 == 0 and stopped_at > 4
        return
    resumed = train(capsys, "--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps",
                    stopped_at + 2)
    assert f"done: {stopped_at + 2} steps" in resumed.stdout
    pretrained = load_file(base / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    stopped, end = load_checkpoint_state(latest), load_checkpoint_state(out / f"checkpoint-step-{stopped_at + 2}")
    frozen = [k for k in pretrained if k.startswith(("down_blocks.", "conv_in."))]
    assert frozen and all(torch.equal(pretrained[k], end["model"][k]) for k in frozen), "still frozen after resume"
    decoder = [k for k in end["model"] if k.startswith("up_blocks.")]
    assert any(not torch.equal(stopped["model"][k], end["model"][k]) for k in decoder)
    assert end["optimizer"]["state"][0]["step"] == stopped["optimizer"]["state"][0]["step"] + 2, "AdamW state resumed"
    assert json.loads((out / "config.json").read_text())["training"]["freeze_down_blocks"] is True


def test_sigkill_resumes_from_the_last_complete_checkpoint(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    proc = start_training(image_folder, out, "--checkpointing_steps", 2)
    wait_for(lambda: (out / "checkpoint-step-6" / "progress.json").exists(), proc)
    proc.kill()
    proc.communicate()
    # What a crash during a save leaves behind must never be picked up.
    (out / "checkpoint-step-99999.partial").mkdir()
    (out / "checkpoint-step-99998").mkdir()  # no progress.json: incomplete
    complete = max(progress_of(p)["global_step"] for p in out.glob("checkpoint-step-*") if (p / "progress.json").exists())
    resumed = train(capsys, "--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps",
                    complete + 3)
    assert f"at step {complete}" in resumed.stdout
    assert f"done: {complete + 3} steps" in resumed.stdout


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_advice(image_folder, tmp_path, capsys):
    import train_ddpm

    out = tmp_path / "run"  # also a run with a drawn seed, recorded in config.json and its checkpoint
    proc = call(train_ddpm.main, train_args(image_folder, out, "--learning_rate", "1e30", "--lr_scheduler",
                                            "constant", "--max_nonfinite_steps", 3, "--max_train_steps", 50,
                                            "--seed", "none"), capsys)
    assert proc.returncode == 3, proc.stderr
    assert "NaN/inf" in proc.stderr and "--learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    (checkpoint,) = out.glob("checkpoint-step-*")
    state = load_checkpoint_state(checkpoint)
    progress = state["progress"]
    assert progress["nonfinite_steps"] >= 3 and progress["skipped_steps"] == progress["nonfinite_steps"]
    assert state["ema"]["images"] == 4 * progress["global_step"], "a skipped step advances the EMA (no sync)"
    assert all(torch.isfinite(w).all() for w in state["model"].values()), "skipped steps leave the weights finite"
    assert all(torch.isfinite(w).all() for w in state["ema"]["averages"][0]), "and the EMA of them"
    assert not (out / "final_model").exists()
    seed = json.loads((out / "config.json").read_text())["training"]["seed"]
    assert isinstance(seed, int) and json.loads((checkpoint / "config.json").read_text())["training"]["seed"] == seed


def test_overwrite_output_dir_clears_the_previous_run_and_nothing_else(tmp_path):
    import train_ddpm

    out = tmp_path / "run"
    for name in ("logs", "final_model", "best_model", "checkpoint-step-4", "checkpoint-epoch-1"):
        (out / name).mkdir(parents=True)
    for name in ("config.json", "samples_epoch_1.png", "sample_training_data.png", "final_samples.png", "notes.txt"):
        (out / name).write_text("x")
    (out / "my_images").mkdir()
    cfg, _ = train_ddpm.parse_config(["--output_dir", str(out)])
    with pytest.raises(config.UserError, match="already holds a run"):
        train_ddpm.check_output_dir(cfg)
    cfg.training.overwrite_output_dir = True
    train_ddpm.check_output_dir(cfg)
    train_ddpm.prepare_output_dir(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["my_images", "notes.txt"]


def test_rotation_keeps_the_newest_saves_and_drops_an_abandoned_branch_first(tmp_path):
    from checkpoint import list_checkpoints, rotate

    def fake(step: int, sequence: int):
        (tmp_path / f"checkpoint-step-{step}").mkdir()
        (tmp_path / f"checkpoint-step-{step}" / "progress.json").write_text(
            json.dumps({"global_step": step, "sequence": sequence}))

    for step in (1, 2, 3, 4):
        fake(step, sequence=step)
    rotate(tmp_path, 2, lineage=[1, 2, 3, 4])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-step-3", "checkpoint-step-4"]
    fake(5, sequence=5)  # a run resumed from checkpoint-step-3 saved this: checkpoint-step-4 is an abandoned branch
    rotate(tmp_path, 2, lineage=[1, 2, 3, 5])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-step-3", "checkpoint-step-5"]
    rotate(tmp_path, None, lineage=[])  # no limit: nothing goes
    assert len(list_checkpoints(tmp_path)) == 2


def test_fine_tuning_from_final_model_with_frozen_encoder(image_folder, tmp_path, trained_run, capsys):
    base, _ = trained_run
    tuned = tmp_path / "tuned"
    train(capsys, *train_args(image_folder, tuned, "--max_train_steps", 3, "--pretrained_model_path",
                              base / "final_model", "--freeze_down_blocks", "--no_use_ema", "--learning_rate", "1e-2",
                              "--lr_scheduler", "constant"))
    before = load_file(base / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(tuned / "final_model" / "unet" / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in before if k.startswith(("down_blocks.", "conv_in."))]
    trained = [k for k in before if k.startswith("up_blocks.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    import train_ddpm  # a model of another size is refused (in-process: the CLI adds only imports)

    assert train_ddpm.main([*map(str, TINY_MODEL), "--image_size", "32", "--output_dir", str(tmp_path / "x"),
                            "--pretrained_model_path", str(base / "final_model"), "--dry_run"]) == 2
    assert "set --image_size 16" in capsys.readouterr().err
    # A fine-tune goes on with its model's noise schedule and target: v (the default) here, epsilon for a model
    # trained so (google/ddpm-cifar10-32, or a run of an earlier version), which then trains on uniform timesteps.
    assert json.loads((tuned / "config.json").read_text())["scheduler"]["prediction_type"] == "v_prediction"
    epsilon_model = save_tiny_pipeline(tmp_path / "epsilon", size=16, channels=3)
    assert train_ddpm.main(["--output_dir", str(tmp_path / "y"), "--pretrained_model_path", str(epsilon_model),
                            "--image_size", "16", "--dry_run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["scheduler"]["prediction_type"] == "epsilon" and resolved["training"]["timestep_sampling"] == "uniform"
    # ... and with its schedule and every timestep sinusoid its UNet reads (zeroing them would undo the pretraining);
    # a fine-tune of a default run keeps holding the fast ones at zero.
    assert resolved["scheduler"]["beta_schedule"] == "linear" and resolved["training"]["timestep_max_phase"] is None
    tuned_config = json.loads((tuned / "config.json").read_text())
    assert (tuned_config["scheduler"]["beta_schedule"], tuned_config["training"]["timestep_max_phase"]) == ("log_sigma",
                                                                                                          3.2)


def lr_by_run(out: Path) -> list[dict[int, float]]:
    """train/lr as TensorBoard holds it, one {step: lr} per run (event file), oldest run first."""
    runs = []
    for path in sorted((out / "logs").rglob("events.out.tfevents.*"), key=lambda p: p.name):
        events = EventAccumulator(str(path)).Reload()
        if "train/lr" in events.Tags()["scalars"]:
            runs.append({e.step: e.value for e in events.Scalars("train/lr")})
    return runs


def test_extend_a_finished_run_with_new_settings_then_resume_an_older_one(image_folder, tmp_path, capsys):
    out, peak = tmp_path / "run", 1e-3
    cosine = ["--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--learning_rate", peak]
    # 6 steps: checkpoint-step-4 (periodic) and, as every run that ends normally, checkpoint-step-6; post-hoc EMA
    # snapshots every 2 steps (of 4 images).
    train(capsys, *train_args(image_folder, out, "--max_train_steps", 6, *cosine, "--ema_snapshots", 3))
    assert progress_of(out / "checkpoint-step-6")["global_step"] == 6
    # Extended to 10 steps, with other AdamW and EMA settings: they take effect and config.json records them. A new
    # batch size starts at an epoch boundary (step 6 ends epoch 2), where it changes nothing else.
    extended = train(capsys, "--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps",
                     10, "--adam_beta1", 0.8, "--ema_length", 0.2, "--train_batch_size", 2)
    assert "at step 6" in extended.stdout and "a new one warms up from 0 over 2 steps" in extended.stdout
    assert "train_batch_size 4 -> 2; training continues at the start of epoch 3" in extended.stdout
    state = load_checkpoint_state(out / "checkpoint-step-10")
    assert state["optimizer"]["param_groups"][0]["betas"][0] == 0.8 and state["ema"]["lengths"][0] == 0.2
    assert state["ema"]["images"] == 6 * 4 + 4 * 2  # the EMA's clock counts images, whatever the batch
    record = json.loads((out / "config.json").read_text())["training"]
    assert record["adam_beta1"] == 0.8 and record["ema_length"] == 0.2 and record["max_train_steps"] == 10
    # Back to checkpoint-step-4 (mid-way down the 6-step cosine), to end at step 9: the LR goes on down from where it
    # was, and `latest` is this new branch's checkpoint-step-9, not the abandoned checkpoint-step-10.
    # Rotation drops the abandoned branch first (6, then 10; 8 is overwritten by this branch's periodic save) and
    # keeps this branch's 4, 8 and 9.
    rollback = train(capsys, "--output_dir", out, "--resume_from_checkpoint", "checkpoint-step-4",
                     "--max_train_steps", 9, "--checkpoints_total_limit", 3)
    assert "from its current value at step 4 down to 0 at step 9" in rollback.stdout
    assert find_checkpoint(str(out), "latest") == out / "checkpoint-step-9"  # what --resume_from_checkpoint uses
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-step-{n}" for n in (4, 8, 9)]
    # Post-hoc EMA snapshots: those of the abandoned branch (after checkpoint-step-4's 16 images) are gone, this
    # branch's (every 3 of its 9 steps of 4 images) are there, of both lengths.
    from ema import list_snapshots

    snapshots = list_snapshots(out / "ema_snapshots")
    assert sorted({seen for seen, _, _ in snapshots}) == [8, 16, 24, 36]
    assert sorted(length for seen, length, _ in snapshots if seen == 36) == [0.05, 0.10]
    # What the weights and the optimizer were built for is refused on resume, with one line.
    import train_ddpm

    assert train_ddpm.main(["--output_dir", str(out), "--resume_from_checkpoint", "latest", "--lr_scheduler",
                            "linear", "--dry_run"]) == 2
    assert "--lr_scheduler cannot change when resuming (the checkpoint has cosine)" in capsys.readouterr().err
    assert train_ddpm.main(["--output_dir", str(out), "--resume_from_checkpoint", "latest", "--beta_schedule",
                            "linear", "--dry_run"]) == 2  # the noise schedule the weights were trained on
    assert "--beta_schedule cannot change when resuming (the checkpoint has log_sigma)" in capsys.readouterr().err
    first, second, third = lr_by_run(out)[:3]
    assert first[6] == 0 and first[4] == pytest.approx(peak / 2)  # the cosine's middle: (4 - 2) / (6 - 2)
    assert second[7] == pytest.approx(peak / 2) and second[8] == pytest.approx(peak)  # warmed up from 0 again
    assert third[5] == pytest.approx(peak / 2 * (1 + math.cos(math.pi / 5)) / 2) and third[9] == 0
    for run in (first, second, third):  # no jump anywhere: each step moves the LR by at most one warm-up step
        steps = sorted(run)
        assert all(abs(run[a] - run[b]) <= peak / 2 + 1e-9 for a, b in zip(steps, steps[1:]))
    assert abs(third[5] - first[4]) < peak / 10


def test_fp16_overflow_skips_are_counted_as_skipped_not_as_nonfinite(tmp_path):
    """GradScaler's loss-scale search on CPU: a scaler stubbed with an infinite scale overflows every step. The
    weights stay; the LR schedule and the EMA move on, as in diffusers' example (no host sync in the step)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import train_ddpm

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))  # what prepare() hands the optimizer
    cfg, _ = train_ddpm.parse_config([*map(str, TINY_MODEL), "--seed", "0", "--learning_rate", "1e-3",
                                      "--lr_scheduler", "linear", "--lr_warmup_steps", "0", "--max_train_steps", "10",
                                      "--output_dir", str(tmp_path)])
    run = config.resolve(cfg, count_parameters, channels=3)
    cfg = run.cfg
    parts = train_ddpm.build_training(run, accelerator)
    window = train_ddpm.LogWindow(accelerator)
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    before = [p.detach().clone() for p in parts.unet.parameters()]
    for seed in range(3):
        window.add(*train_ddpm.train_step(batch, parts, accelerator, cfg, seed))
    assert all(torch.equal(a, b) for a, b in zip(before, parts.unet.parameters())), "the scaler skipped the steps"
    assert window.read(None, 4)["nonfinite"] == 0, "loss-scale search is not counted as NaN/inf steps"
    assert window.skipped_steps() == 3
    assert parts.lr_schedule.last_epoch == 3 and parts.ema.images == 3 * run.images_per_step
    accelerator.scaler.update(1.0)  # a scale that fits: the next step is applied
    loss, skipped, nonfinite = train_ddpm.train_step(batch, parts, accelerator, cfg, 3)
    assert not skipped and not nonfinite and not all(torch.equal(a, b) for a, b in zip(before, parts.unet.parameters()))
    assert parts.lr_schedule.get_last_lr() == [pytest.approx(0.6e-3)]  # linear: 1e-3 at step 0, 0 at step 10
    AcceleratorState._reset_state(True)


def test_checkpoint_weights_drop_the_names_of_wrappers():
    from model import strip_wrapper_prefixes

    weights = {"_orig_mod.module.conv_in.weight": 1, "module.up_blocks.0.module.x": 2, "conv_out.bias": 3}
    assert strip_wrapper_prefixes(weights) == {"conv_in.weight": 1, "up_blocks.0.module.x": 2, "conv_out.bias": 3}


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup", "constant"])
def test_lr_curve_is_diffusers_schedule_and_extends_without_a_jump(kind):
    from diffusers.optimization import get_scheduler

    import train_ddpm

    reference = get_scheduler(kind, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                              num_warmup_steps=3, num_training_steps=10).lr_lambdas[0]
    curve = train_ddpm.LRCurve(kind, [0, 3, 1.0, 10])
    assert [curve(step) for step in range(12)] == [reference(step) for step in range(12)]
    at_resume = curve(6)
    curve.extend(6, 20, warmup=3)  # the run goes on to step 20
    assert curve(6) == pytest.approx(at_resume)
    assert curve(20) == (at_resume if kind.startswith("constant") else 0) and curve(13) <= at_resume


def test_a_run_that_failed_before_its_first_checkpoint_is_simply_started_again(image_folder, tmp_path, capsys,
                                                                              monkeypatch):
    import train_ddpm

    out = tmp_path / "run"
    args = train_args(image_folder, out, "--max_train_steps", 2)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (a test's stand-in)")

    with monkeypatch.context() as patch:
        patch.setattr(train_ddpm, "train_step", out_of_memory)
        with pytest.raises(RuntimeError, match="stand-in"):
            call(train_ddpm.main, args, capsys)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "logs", "sample_training_data.png"]
    failed_logs = set((out / "logs").rglob("events.out.tfevents.*"))
    no_checkpoint = call(train_ddpm.main, ["--output_dir", out, "--resume_from_checkpoint", "latest"], capsys)
    assert_user_error(no_checkpoint, "no checkpoint", "train without it")
    rerun = call(train_ddpm.main, args, capsys)  # the same command again
    assert rerun.returncode == 0, rerun.stderr
    assert "held what a run that saved no checkpoint wrote (config.json, logs, sample_training_data.png)" in rerun.stdout
    assert "done: 2 steps" in rerun.stdout and (out / "checkpoint-step-2").is_dir()
    logs = set((out / "logs").rglob("events.out.tfevents.*"))
    assert failed_logs and len(logs) == len(failed_logs) and not logs & failed_logs, "the failed start's logs go"


@pytest.mark.parametrize("held, refused_with", [
    (["config.json", "logs", "sample_training_data.png", "samples_epoch_1.png"], None),  # a failed start: reused
    (["config.json", "logs", "best_model"], "start over with --overwrite_output_dir"),  # a model, but no checkpoint
    (["config.json", "logs", "checkpoint-step-4.old"], "continue it with --resume_from_checkpoint latest"),
    (["final_model.old"], "already holds a run (final_model.old...)"),
])
def test_only_a_folder_that_holds_a_model_is_a_run(tmp_path, held, refused_with):
    import train_ddpm

    out = tmp_path / "run"
    out.mkdir()
    for name in held:
        (out / name).mkdir() if "." not in name or name.endswith(".old") else (out / name).write_text("x")
    cfg, _ = train_ddpm.parse_config(["--output_dir", str(out)])
    if refused_with is None:
        train_ddpm.check_output_dir(cfg)
        train_ddpm.prepare_output_dir(cfg)
        assert list(out.iterdir()) == []
        return
    with pytest.raises(config.UserError) as refused:
        train_ddpm.check_output_dir(cfg)
    assert refused_with in str(refused.value)
    assert ("--resume_from_checkpoint" in str(refused.value)) == any(n.startswith("checkpoint") for n in held)


def test_a_crash_between_the_renames_of_a_swap_leaves_the_old_version_whole(tmp_path, monkeypatch):
    import files
    from files import current_version, replace_folder

    def folder(path: Path, text: str) -> Path:
        path.mkdir()
        (path / "weights").write_text(text)
        return path

    path = folder(tmp_path / "final_model", "old")
    renames, os_replace = [], files.os.replace

    def crash_before_the_second_rename(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        if len(renames) == 2:
            raise KeyboardInterrupt  # the process dies here
        os_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "replace", crash_before_the_second_rename)
        with pytest.raises(KeyboardInterrupt):
            replace_folder(folder(tmp_path / "new.partial", "new"), path)
    assert renames == [("final_model", "final_model.old"), ("new.partial", "final_model")]
    # Neither under its own name, but the old version is whole beside it, and that is what a reader opens.
    assert not path.exists() and (tmp_path / "final_model.old" / "weights").read_text() == "old"
    assert (current_version(path) / "weights").read_text() == "old"
    # The next replacement puts the old one back before it starts, so it never deletes the only version.
    replace_folder(folder(tmp_path / "newer.partial", "newer"), path)
    assert (path / "weights").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model", "new.partial"]


def test_resume_and_readers_after_a_crash_between_the_renames(image_folder, tmp_path, capsys):
    """A crash while a checkpoint and final_model/ were being replaced (files.replace_folder between its renames):
    `latest`, --model_path and the overwrite check see their old versions, and the resume puts them back."""
    import train_ddpm
    from model import load_model

    out = tmp_path / "run"
    assert call(train_ddpm.main, train_args(image_folder, out, "--max_train_steps", 4), capsys).returncode == 0
    newest, final = out / "checkpoint-step-4", out / "final_model"
    for path in (newest, final):
        path.rename(path.with_name(path.name + ".old"))  # renamed aside, the new version not yet in place
    (out / "checkpoint-step-4.partial").mkdir()  # the new version, half-written
    assert find_checkpoint(str(out), "latest") == out / "checkpoint-step-4.old"
    assert load_model(str(final)).unet.config.sample_size == 16
    cfg, _ = train_ddpm.parse_config(["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert cfg.training.resume_from_checkpoint == str(newest)
    resumed = call(train_ddpm.main, ["--output_dir", out, "--resume_from_checkpoint", "latest", "--max_train_steps",
                                     6], capsys)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {newest} at step 4" in resumed.stdout and "done: 6 steps" in resumed.stdout
    assert newest.is_dir() and final.is_dir() and not list(out.glob("*.old"))
