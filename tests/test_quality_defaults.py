"""Defaults that fit the data (issue 13): greyscale folders train 1-channel models, flips only where they are
harmless, a preview of the data that is a random sample of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import dataset
import inference
import train_ddpm
from model import build_noise_scheduler, count_parameters
from conftest import TINY_RUN, call, load_cached, make_image_folder
from config import Config


def greyscale_folder(root: Path) -> Path:
    """Greyscale images in the modes a user's folder may hold, sorted into two class folders (dark, light)."""
    rng = np.random.default_rng(3)
    for k in range(8):
        for cls, low in (("a_dark", 0), ("b_light", 200)):
            (root / cls).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(low, low + 56, (18, 20)).astype(np.uint8)
            image = Image.fromarray(pixels)
            if k == 1:
                image = image.convert("LA")
            elif k == 2:
                image = Image.fromarray(pixels.astype(np.uint16) * 257)  # 16-bit greyscale
            name = f"{cls}{k}.jpg" if k == 3 else f"{cls}{k}.png"
            image.save(root / cls / name)
    return root


def config_for(folder: Path, data_dir: Path, num_channels: str = "auto") -> Config:
    cfg = Config()
    cfg.training.dataset_name, cfg.training.image_size = "custom", 16
    cfg.data.dataset_path, cfg.data.data_dir, cfg.data.num_channels = str(folder), str(data_dir), num_channels
    return cfg


def test_a_greyscale_folder_gives_one_channel_equal_to_the_plain_pipeline(tmp_path):
    folder = greyscale_folder(tmp_path / "grey")
    cache = load_cached(config_for(folder, tmp_path / "data"))
    assert "1 channel (every image is greyscale" in cache.describe(random_flip=False)
    cached = dataset.to_model_input(cache.__getitems__(list(range(len(cache)))), random_flip=False)
    transform = dataset.plain_transform(16, 1)
    expected = torch.stack([transform(dataset.to_rgb(Image.open(p)).convert("L"))
                            for p in dataset.find_images(str(folder))])
    assert cached.shape == expected.shape == (16, 1, 16, 16)
    torch.testing.assert_close(cached, expected, atol=1e-6, rtol=0)


def test_num_channels_overrides_the_detection(tmp_path):
    grey = greyscale_folder(tmp_path / "grey")
    colour = make_image_folder(tmp_path / "colour", count=4)
    assert load_cached(config_for(grey, tmp_path / "data", "3"), progress=False)[0].shape[0] == 3
    assert load_cached(config_for(colour, tmp_path / "data"), progress=False)[0].shape[0] == 3
    assert load_cached(config_for(colour, tmp_path / "data", "1"), progress=False)[0].shape[0] == 1


@pytest.mark.parametrize("name, flags, flip", [
    ("cifar10", [], True), ("mnist", [], False), ("letters", [], False), ("custom", [], False),
    ("custom", ["--random_flip"], True),
    ("cifar10", ["--no_random_flip"], False)])
def test_random_flip_default_follows_the_dataset(tmp_path, name, flags, flip):
    folder = ["--dataset_path", str(tmp_path)] if name == "custom" else []
    cfg, _ = train_ddpm.parse_config(["--dataset_name", name, *folder, *flags])
    assert config.resolve(cfg, count_parameters).cfg.data.random_flip is flip


def test_greyscale_folder_end_to_end(tmp_path, capsys):
    """A class-sorted greyscale folder: a 1-channel model, greyscale PNGs from inference, and a preview of the
    data that shows both classes (a random sample, not the first files)."""
    folder = greyscale_folder(tmp_path / "grey")
    out = tmp_path / "results"
    proc = call(train_ddpm.main, [*TINY_RUN, "--dataset_name", "custom", "--dataset_path", folder, "--data_dir",
                                  tmp_path / "data", "--output_dir", out, "--max_train_steps", 2,
                                  "--num_preview_images", 8], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 channel" in proc.stdout and "random flips off" in proc.stdout
    record = json.loads((out / "config.json").read_text())
    assert record["_provenance"]["channels"] == 1 and record["data"]["random_flip"] is False
    assert Image.open(out / "sample_training_data.png").mode == "L"  # greyscale data, greyscale grid
    preview = np.asarray(Image.open(out / "sample_training_data.png").convert("L"))
    light = (preview > 190).mean()
    assert 0.15 < light < 0.85, f"the preview shows one class only ({light:.2f} of it is light)"
    assert inference.main([str(a) for a in ("--model_path", out / "final_model", "--num_images", 2,
                                            "--num_inference_steps", 2, "--output_dir", tmp_path / "samples")]) == 0
    image = Image.open(tmp_path / "samples" / "seed000000.png")
    assert image.mode == "L" and image.size == (16, 16)


SMALL_UNET = ["--image_size", "16", "--block_out_channels", "32", "64", "--down_block_types", "DownBlock2D",
              "AttnDownBlock2D", "--up_block_types", "AttnUpBlock2D", "UpBlock2D"]


@pytest.mark.parametrize("flags, steps, learning_rate, warmup", [
    ([], 20000, 1e-4, 500),  # the README's UNet keeps 1e-4, and a long run diffusers' 500 warm-up steps
    (["--model_preset", "ddpm-cifar10"], 20000, 2e-4, 5000),  # Ho et al.'s settings, given by the preset
    (SMALL_UNET, 3000, 1.7e-3, 150),  # the quality benchmark's 1.0M-parameter UNet
    (SMALL_UNET, 1000, 1.7e-3, 50),
    (SMALL_UNET + ["--learning_rate", "3e-4", "--lr_warmup_steps", "7"], 3000, 3e-4, 7),  # a value always wins
    (SMALL_UNET + ["--pretrained_model_path", "a/final_model"], 1000, 1.7e-3, 50),  # a fine-tune: the same (measured)
    (["--pretrained_model_path", "a/final_model"], 20000, 1e-4, 500),  # (the model's shape is the pretrained one's)
])
def test_auto_learning_rate_and_warmup(flags, steps, learning_rate, warmup):
    cfg, _ = train_ddpm.parse_config(["--max_train_steps", str(steps), *flags])
    t = config.resolve(cfg, count_parameters).cfg.training
    assert (t.learning_rate, t.lr_warmup_steps) == (learning_rate, warmup)


def test_count_parameters_matches_the_readme_anchor():
    cfg, _ = train_ddpm.parse_config([])
    assert count_parameters(cfg.model, 64, 3) == config.README_UNET_PARAMETERS


def test_min_snr_weights_are_on_by_default_and_down_weight_only_the_nearly_clean_steps():
    cfg, _ = train_ddpm.parse_config(["--prediction_type", "epsilon"])
    assert cfg.training.snr_gamma == 5.0
    scheduler = build_noise_scheduler(cfg.scheduler)
    weights = train_ddpm.loss_weights(scheduler, cfg, torch.device("cpu"))
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    torch.testing.assert_close(weights, (snr.clamp(max=5) / snr).float())  # min(SNR, gamma) / SNR, for epsilon
    assert weights[0] < 0.01 and weights[-1] == 1.0 and bool((weights[1:] >= weights[:-1]).all())
    cfg, _ = train_ddpm.parse_config([])  # the default v target: min(SNR, gamma) / (SNR + 1)
    torch.testing.assert_close(train_ddpm.loss_weights(scheduler, cfg, torch.device("cpu")),
                               (snr.clamp(max=5) / (snr + 1)).float())
    cfg.training.snr_gamma = None
    assert train_ddpm.loss_weights(scheduler, cfg, torch.device("cpu")) is None


def test_ddim_steps_on_the_papers_leading_timesteps_whatever_the_models_config():
    """DDIM 50 runs 980, 960, ..., 0 as in Song et al. and DDIMPipeline (measured better than trailing)."""
    from diffusers import DDPMScheduler

    import sampling

    for trained in (DDPMScheduler(), DDPMScheduler(timestep_spacing="trailing", steps_offset=1)):
        ddim = sampling.make_sampler("ddim", trained.config)
        ddim.set_timesteps(50)
        assert ddim.timesteps.tolist() == list(range(980, -1, -20))


def test_edm_weighting_and_lognormal_timesteps_are_karras_et_al_on_the_ddpm_timesteps():
    cfg, _ = train_ddpm.parse_config(["--loss_weighting", "edm", "--sigma_data", "0.5", "--prediction_type", "epsilon",
                                      "--beta_schedule", "linear"])
    scheduler = build_noise_scheduler(cfg.scheduler)
    alphas = scheduler.alphas_cumprod.double()
    sigma2 = (1 - alphas) / alphas
    torch.testing.assert_close(train_ddpm.loss_weights(scheduler, cfg, torch.device("cpu")),
                               (1 + sigma2 / 0.25).float())  # on epsilon: lambda(sigma) sigma^2
    cfg.scheduler.prediction_type, cfg.training.sigma_data = "v_prediction", 1.0
    assert torch.equal(train_ddpm.loss_weights(scheduler, cfg, torch.device("cpu")), torch.ones(1000))
    boundaries = train_ddpm.lognormal_boundaries(scheduler, torch.device("cpu"))
    log_sigma = 0.5 * torch.log(sigma2).float()
    assert torch.equal(torch.bucketize(log_sigma, boundaries), torch.arange(1000)), "each sigma to its own timestep"
    torch.manual_seed(0)
    drawn = torch.bucketize(-1.2 + 1.2 * torch.randn(100_000), boundaries)
    median = drawn.median().item()
    assert abs(log_sigma[median].item() + 1.2) < 0.05  # EDM's P_mean
    assert 0.6 < (drawn < 250).float().mean() < 0.95 and (drawn > 600).float().mean() < 0.01  # mid noise levels
    # On the default log_sigma schedule the timestep is affine in ln(sigma): log-normal sigmas give normal timesteps.
    cfg.scheduler.beta_schedule = "log_sigma"
    boundaries = train_ddpm.lognormal_boundaries(build_noise_scheduler(cfg.scheduler), torch.device("cpu"))
    drawn = torch.bucketize(-1.2 + 1.2 * torch.randn(100_000), boundaries).double()
    per_log_sigma = 999 / math.log(80 / 0.002)  # timesteps per unit of ln(sigma)
    assert abs(drawn.mean() - (-1.2 - math.log(0.002)) * per_log_sigma) < 2
    assert abs(drawn.std() - 1.2 * per_log_sigma) < 2


def test_v_prediction_trains_on_lognormal_timesteps_by_default_and_epsilon_on_uniform_ones():
    """timestep_sampling auto: EDM's log-normal noise levels for the default v target (bench/RESULTS.md: uniform DDPM
    timesteps were 1.6x worse in the EDM recipe), uniform for epsilon, whose error at the rarely drawn high noise
    levels sigma multiplies; a checkpoint of an earlier version (no such fields) resumes with epsilon, uniform, 0.95."""
    def resolved(*argv):
        cfg, _ = train_ddpm.parse_config(list(argv))
        run = config.resolve(cfg, count_parameters, channels=1, batches_per_epoch=10)
        return run.cfg.scheduler.prediction_type, run.cfg.training.timestep_sampling, run.cfg.training.adam_beta1

    assert resolved() == ("v_prediction", "lognormal", 0.9)
    assert resolved("--prediction_type", "epsilon") == ("epsilon", "uniform", 0.9)
    assert resolved("--timestep_sampling", "uniform") == ("v_prediction", "uniform", 0.9)
    assert config.EARLIER_DEFAULTS == {"prediction_type": "epsilon", "timestep_sampling": "uniform", "adam_beta1": 0.95,
                                       "lognormal_mean": -1.2, "timestep_max_phase": None}


def test_the_lognormal_centre_follows_the_loss_weight_and_an_earlier_run_keeps_edms():
    """lognormal_mean auto: -ln(gamma) / 2, the peak of the min-SNR weight times c_out^2 (for any sigma_data), on both
    paths; EDM's -1.2 with EDM's own weight or no min-SNR; a number given is kept; a config.json of an earlier version
    (no such field) resumes with the -1.2 it trained with."""
    def resolved(*argv):
        cfg, _ = train_ddpm.parse_config(list(argv))
        run = config.resolve(cfg, count_parameters, channels=1, batches_per_epoch=10)
        return run.cfg.training.lognormal_mean, run.chosen.get("lognormal_mean")

    assert resolved() == (-0.8, -0.8) and resolved("--parameterization", "edm") == (-0.8, -0.8)
    assert resolved("--snr_gamma", "2") == (-0.35, -0.35)
    assert resolved("--loss_weighting", "edm") == (-1.2, -1.2) and resolved("--snr_gamma", "none") == (-1.2, -1.2)
    assert resolved("--lognormal_mean", "-1.0") == (-1.0, None)
    assert resolved("--prediction_type", "epsilon") == (-0.8, None)  # uniform timesteps: not used, not reported
    for sigma_data in (0.5, 1.0):  # the peak of min(1 / sigma^2, 5) sigma^2 sd^2 / (sigma^2 + sd^2) over ln(sigma)
        log_sigma = torch.linspace(-6, 5, 110_001, dtype=torch.float64)
        s2 = log_sigma.exp() ** 2
        weight = (1 / s2).clamp(max=5) * s2 * sigma_data ** 2 / (s2 + sigma_data ** 2)
        assert abs(log_sigma[weight.argmax()].item() - -0.8) < 0.01
    assert config.EARLIER_DEFAULTS["lognormal_mean"] == -1.2


def test_a_config_json_of_an_earlier_version_keeps_the_defaults_it_trained_with(tmp_path):
    written = tmp_path / "config.json"  # as train_ddpm.py wrote it before these fields existed
    written.write_text(json.dumps({"training": {"learning_rate": 1e-3}, "_provenance": {}}))
    values = config.read_config_file(written, config.TRAINING_SECTIONS)
    assert (values["prediction_type"], values["timestep_sampling"], values["adam_beta1"]) == ("epsilon", "uniform", 0.95)
    assert values["timestep_max_phase"] is None  # its UNet read every timestep sinusoid
    written.write_text(json.dumps({"training": {"adam_beta1": 0.9}, "scheduler": {"prediction_type": "v_prediction"},
                                   "_provenance": {}}))
    values = config.read_config_file(written, config.TRAINING_SECTIONS)
    assert (values["prediction_type"], values["adam_beta1"]) == ("v_prediction", 0.9)
    flat = tmp_path / "mine.json"  # a user's --config file: only what it says
    flat.write_text(json.dumps({"learning_rate": 1e-3}))
    assert config.read_config_file(flat, config.TRAINING_SECTIONS) == {"learning_rate": 1e-3}


def test_edm_parameterization_trains_on_lognormal_sigmas_with_min_snr_or_edm_weights_and_refuses_the_rest():
    """--parameterization edm: log-normal noise levels always, EDM's own F (EDMEulerScheduler's epsilon), a sampler
    it has; the loss weight on the denoised image is min(1 / sigma^2, gamma) (min-SNR) or EDM's lambda(sigma)."""
    def resolved(*argv):
        cfg, _ = train_ddpm.parse_config(["--parameterization", "edm", *argv])
        return config.resolve(cfg, count_parameters, channels=1, batches_per_epoch=10).cfg

    cfg = resolved()
    assert (cfg.scheduler.prediction_type, cfg.training.timestep_sampling) == ("epsilon", "lognormal")
    saved = build_noise_scheduler(cfg.scheduler, cfg.training.sigma_data)
    assert type(saved).__name__ == "EDMEulerScheduler" and saved.config.sigma_data == 0.5
    sigma = torch.tensor([0.1, 0.5, 2.0])
    torch.testing.assert_close(train_ddpm.edm_loss_weights(sigma, cfg.training), torch.tensor([5.0, 4.0, 0.25]))
    torch.testing.assert_close(train_ddpm.edm_loss_weights(sigma, resolved("--loss_weighting", "edm").training),
                               (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)
    for argv, message in ((("--timestep_sampling", "uniform"), "log-normally"),
                          (("--sample_scheduler", "ddim"), "sample_scheduler ddim")):
        with pytest.raises(config.UserError, match=message):
            resolved(*argv)


def test_timestep_max_phase_holds_the_fast_sinusoids_of_the_time_embedding_at_zero_through_training():
    """--timestep_max_phase: the time MLP's weights on the sinusoids that turn through more than the phase over the
    1,000 training timesteps are zero and stay zero under AdamW with weight decay; the slow ones train. Which
    columns are slow is read off diffusers' own embedding, not our formula."""
    from model import build_unet, hold_time_frequencies, time_frequency_mask, time_phase_read

    cfg, _ = train_ddpm.parse_config(["--block_out_channels", "32", "64", "--norm_num_groups", "8",
                                      "--layers_per_block", "1", "--down_block_types", "DownBlock2D", "DownBlock2D",
                                      "--up_block_types", "UpBlock2D", "UpBlock2D"])
    unet = build_unet(cfg.model, 16, 1)
    assert time_phase_read(unet, 1000) == 1000  # diffusers' own: every sinusoid, the fastest one radian a step
    mask = time_frequency_mask(unet, 3.2, 1000)
    embedding = unet.time_proj(torch.arange(1000))  # (timesteps, 32): cosines and sines as the UNet computes them
    slowest_step = embedding.diff(dim=0).abs().max(dim=0).values  # each column's largest change between timesteps
    assert torch.equal(mask[0].bool(), slowest_step <= 3.2 / 1000 + 1e-6) and int(mask[0].sum()) == 12  # 6 of 16
    hold_time_frequencies(unet, mask)
    weight = unet.time_embedding.linear_1.weight
    before = weight.detach().clone()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = unet(torch.randn(2, 1, 16, 16), torch.tensor([3, 700])).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.all(weight[mask == 0] == 0) and not torch.equal(weight[mask == 1], before[mask == 1])
    assert time_phase_read(unet, 1000) == pytest.approx(1000 * 10000 ** (-10 / 16))
    with pytest.raises(config.UserError, match="keeps none of the UNet's timestep sinusoids"):
        time_frequency_mask(unet, 0.01, 1000)


def test_the_log_sigma_schedule_spaces_the_noise_levels_evenly_in_log_sigma_over_edms_range():
    cfg, _ = train_ddpm.parse_config(["--beta_schedule", "log_sigma"])
    scheduler = build_noise_scheduler(cfg.scheduler)
    sigma = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double()
    torch.testing.assert_close(sigma[[0, -1]], torch.tensor([0.002, 80.0], dtype=torch.float64), rtol=2e-3, atol=0)
    steps = sigma[sigma > 0.01].log().diff()  # below, diffusers' float32 cumprod of 1 - beta ~ 1 - 1e-7 blurs them
    assert steps.max() - steps.min() < 0.05 * steps.mean() and steps.mean() == pytest.approx(math.log(40_000) / 999,
                                                                                              rel=0.01)
    assert scheduler.config.beta_schedule == "log_sigma" and len(scheduler.config.trained_betas) == 1000
