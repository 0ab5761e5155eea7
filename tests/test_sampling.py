"""Sampling: slerp, images addressed by seed, samplers built from the trained schedule, image writing."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, RePaintScheduler, UNet2DModel

import files
import sampling


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()


TRAINED = DDPMScheduler(num_train_timesteps=1000).config


def test_slerp_reproduces_unit_endpoints_exactly_and_steps_at_constant_angle():
    torch.manual_seed(1)
    a, b = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    a, b = a / a.norm(), b / b.norm()
    frames = [sampling.slerp(a, b, k / 9) for k in range(10)]
    assert torch.equal(frames[0], a) and torch.equal(frames[-1], b)
    assert all(math.isclose(f.norm().item(), 1.0, rel_tol=1e-5) for f in frames)
    angles = [torch.arccos((x.flatten() @ y.flatten()).clamp(-1, 1)).item() for x, y in zip(frames, frames[1:])]
    total = torch.arccos((a.flatten() @ b.flatten()).clamp(-1, 1)).item()
    assert all(math.isclose(angle, total / 9, rel_tol=1e-3) for angle in angles)


def test_slerp_of_gaussian_noise_keeps_its_scale():
    torch.manual_seed(2)
    a, b = torch.randn(3, 32, 32), torch.randn(3, 32, 32)
    middle = sampling.slerp(a, b, 0.5)
    assert abs(middle.std().item() - 1) < 0.05  # lerp would shrink it to about 0.71


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver++", "euler_a", "heun"])
def test_an_image_depends_on_its_seed_not_on_the_batch(unet, name):
    sampler = sampling.make_sampler(name, TRAINED)
    seeds = [10, 11, 12, 13, 14, 15]
    runs = [sampling.generate(unet, sampler, seeds, 6, batch_size=size, eta=0.7, progress=False)
            for size in (1, 4, 64)]
    for other in runs[1:]:
        torch.testing.assert_close(runs[0], other, atol=1e-4, rtol=0)
    alone = sampling.generate(unet, sampler, [13], 6, batch_size=1, eta=0.7, progress=False)
    torch.testing.assert_close(alone[0], runs[0][3], atol=1e-4, rtol=0)
    assert not torch.allclose(runs[0][0], runs[0][1]), "different seeds give different images"


def test_samplers_are_built_from_the_trained_schedule():
    trained = DDPMScheduler(num_train_timesteps=500, beta_end=0.03).config
    for name in sampling.SAMPLER_CLASSES:
        sampler = sampling.make_sampler(name, trained)
        assert sampler.config.num_train_timesteps == 500 and sampler.config.beta_end == 0.03
    assert sampling.make_sampler("dpmsolver++", trained).config.algorithm_type == "dpmsolver++"


def test_out_of_memory_halves_the_batch_and_keeps_the_images(unet, monkeypatch, capsys):
    sampler = sampling.make_sampler("ddpm", TRAINED)
    expected = sampling.generate(unet, sampler, list(range(5)), 4, batch_size=1, progress=False)
    real = sampling._denoise

    def small_memory(unet, sampler, noise, *args):
        if len(noise) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(unet, sampler, noise, *args)

    monkeypatch.setattr(sampling, "_denoise", small_memory)
    images = sampling.generate(unet, sampler, list(range(5)), 4, batch_size=8, progress=False)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    assert "retrying with batch_size 2" in capsys.readouterr().out


def test_image_writers_are_atomic(tmp_path):
    sampling.save_png(torch.rand(3, 8, 8), tmp_path / "a.png")
    with pytest.raises(RuntimeError):
        with files.atomic_file(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == [tmp_path / "a.png"], "a failed write leaves nothing behind"
    assert sampling.grid_columns(10) == 4 and sampling.grid_columns(16) == 4 and sampling.grid_columns(5, 5) == 5


def test_more_ddim_steps_never_make_a_trained_model_worse(tmp_path, capsys):
    """A tiny UNet trained 800 steps on white bars (at 8x8 px, to be quick): DDIM at 50, 100 and 200 steps is no
    further from the training images than at 25 (nearest-neighbour distance, 10% tolerance). With the trained config's
    clip_sample it was: x0 clipped while the predicted noise is not, so the error grew with the steps (this model:
    0.82 at 25 steps, 1.31 at 100 and 200; unclipped 0.93 to 0.95 at every count). (After only 400 steps the model is
    too raw for the question: its unclipped samples leave [-1, 1] at any step count.)"""
    import numpy as np
    from PIL import Image

    import train_ddpm
    from conftest import TINY_RUN, call, make_bars_folder
    from model import load_model

    bars = make_bars_folder(tmp_path / "bars")
    out = tmp_path / "run"
    result = call(train_ddpm.main, [*TINY_RUN, "--dataset_name", "custom", "--dataset_path", bars, "--data_dir",
                                    tmp_path / "data", "--output_dir", out, "--max_train_steps", 800, "--image_size", 8,
                                    "--train_batch_size", 8, "--logging_steps", 100, "--save_image_epochs", 1000,
                                    "--save_model_epochs", 1000], capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = load_model(str(out / "final_model"))
    assert saved.schedule.clip_sample, "the trained config clips; the sampler must not"
    real = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255)
                        for p in sorted(bars.rglob("*.png"))])
    real = torch.nn.functional.interpolate(real[:, None], size=8, mode="area").flatten(1)
    distance = {}
    for steps in (25, 50, 100, 200):
        images = sampling.generate(saved.unet, sampling.make_sampler("ddim", saved.schedule), list(range(32)), steps,
                                   batch_size=32, progress=False)
        distance[steps] = torch.cdist(images[:, 0].flatten(1), real).min(1).values.mean().item()
    assert all(distance[steps] < 1.1 * distance[25] for steps in (50, 100, 200)), distance


@pytest.mark.parametrize("name", list(sampling.SAMPLER_CLASSES))
def test_sdedit_runs_the_last_share_of_every_samplers_steps(unet, name):
    """From the image noised to the first of the last int(10 x 0.4) = 4 steps (Heun: 2 evaluations a step but the
    last), as diffusers' img2img pipelines; strength 1 is plain generation, bit for bit."""
    sampler = sampling.make_sampler(name, TRAINED)
    torch.manual_seed(3)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    calls = []
    forward = unet.forward
    unet.forward = lambda *args, **kwargs: (calls.append(args[1]), forward(*args, **kwargs))[1]
    try:
        edited = sampling.generate(unet, sampler, [5, 6], 10, 2, progress=False,
                                   known=sampling.Known(images, strength=0.4))
        sampler.set_timesteps(10)
        last_four = sampler.timesteps[(10 - 4) * sampler.order:]
        assert [int(t) for t in calls] == [int(t) for t in last_four]
        assert len(calls) == (4 if sampler.order == 1 else 7)
        full = sampling.generate(unet, sampler, [5, 6], 10, 2, progress=False,
                                 known=sampling.Known(images, strength=1.0))
    finally:
        unet.forward = forward
    plain = sampling.generate(unet, sampler, [5, 6], 10, 2, progress=False)
    assert torch.equal(full, plain)
    assert torch.isfinite(edited).all() and not torch.allclose(edited, plain, atol=1e-2)


def test_repaint_of_a_v_model_steps_as_on_the_noise_its_v_implies():
    """RePaintScheduler takes the noise; for a v-prediction model make_sampler's RePaint turns each v into it."""
    config = DDPMScheduler(prediction_type="v_prediction").config
    v_sampler, eps_sampler = (sampling.make_sampler(sampling.REPAINT, c) for c in (config, {**config, "prediction_type": "epsilon"}))
    assert type(eps_sampler) is RePaintScheduler and isinstance(v_sampler, sampling.VelocityRePaintScheduler)
    for s in (v_sampler, eps_sampler):
        s.set_timesteps(10, jump_length=3, jump_n_sample=2)
    t = int(v_sampler.timesteps[3])
    a = v_sampler.alphas_cumprod[t]
    clean, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    x_t = a.sqrt() * clean + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * clean
    image, keep = torch.rand(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    steps = [s.step(out, t, x_t, image, keep, generator=torch.Generator().manual_seed(0)).prev_sample
             for s, out in ((v_sampler, v), (eps_sampler, noise))]
    torch.testing.assert_close(steps[0], steps[1], atol=1e-5, rtol=1e-5)


def karras_levels(steps: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    """EDM's rho-7 noise levels from sigma_max to sigma_min, then 0, written out from the paper in float64."""
    i = torch.arange(steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def edm_denoiser(unet):
    """D(x, sigma) of a UNet under EDM's preconditioning written out (sigma_data 0.5, c_noise = ln(sigma) / 4)."""
    def denoise(x, sigma):
        c_in, c_skip = 1 / (sigma ** 2 + 0.25).sqrt(), 0.25 / (sigma ** 2 + 0.25)
        c_out = sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
        with torch.no_grad():
            out = unet((c_in * x).float(), (sigma.log() / 4).float().expand(len(x))).sample.double()
        return c_skip * x + c_out * out
    return denoise


def karras_heun(denoise, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """EDM's Algorithm 1 (deterministic Heun on the rho-7 noise levels), written out from the paper in float64."""
    t = karras_levels(steps)
    x = noise.double() * t[0]
    for k in range(steps):
        d = (x - denoise(x, t[k])) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if k < steps - 1:
            x_next = x + (t[k + 1] - t[k]) * (d + (x_next - denoise(x_next, t[k + 1])) / t[k + 1]) / 2
        x = x_next
    return (x.float() / 2 + 0.5).clamp(0, 1)


def test_an_edm_models_heun_is_karras_algorithm_1_and_its_images_are_addressed_by_seed(unet):
    """--parameterization edm: EDMHeunScheduler reproduces the paper's sampler with the preconditioning written out
    (sigma_data 0.5, c_noise = ln(sigma) / 4); SDEdit runs its last share of steps; DDPM samplers are refused."""
    from diffusers import EDMEulerScheduler

    from config import UserError

    trained = EDMEulerScheduler(sigma_data=0.5).config
    denoise = edm_denoiser(unet)

    seeds = [3, 4, 5]
    heun = sampling.make_sampler("heun", trained)
    ours = sampling.generate(unet, heun, seeds, 5, 3, progress=False)
    reference = karras_heun(denoise, sampling.initial_noise(sampling.seeded_generators(seeds), (3, 16, 16)), 5)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(sampling.generate(unet, heun, seeds[1:2], 5, 1, progress=False), ours[1:2], atol=1e-4, rtol=0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    full = sampling.generate(unet, heun, [5, 6], 5, 2, progress=False, known=sampling.Known(images, strength=1.0))
    plain = sampling.generate(unet, heun, [5, 6], 5, 2, progress=False)
    assert torch.equal(full, plain)
    edited = sampling.generate(unet, heun, [5, 6], 5, 2, progress=False, known=sampling.Known(images, strength=0.4))
    assert torch.isfinite(edited).all() and not torch.allclose(edited, plain, atol=1e-2)
    for name in ("euler", "dpmsolver++"):
        assert torch.isfinite(sampling.generate(unet, sampling.make_sampler(name, trained), seeds, 6, 3,
                                                progress=False)).all()
    with pytest.raises(UserError, match="parameterization edm"):
        sampling.make_sampler("ddim", trained)


def test_diffusers_own_pipeline_draws_a_saved_edm_models_images_as_our_euler_does(unet, tmp_path):
    """model.save_model writes an EDM model as a ConsistencyModelPipeline: DiffusionPipeline.from_pretrained loads
    it, and from the same noise it draws the images of `inference.py --scheduler euler`. DDPMPipeline, which skips
    init_noise_sigma and scale_model_input, does not (why an EDM folder is not labelled DDPMPipeline)."""
    from diffusers import DDPMPipeline, DiffusionPipeline, EDMEulerScheduler

    from model import load_model, save_model

    save_model(tmp_path / "edm", unet, EDMEulerScheduler(sigma_data=0.5), {})
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "edm")
    assert type(pipeline).__name__ == "ConsistencyModelPipeline"
    seeds = [3, 4]
    noise = sampling.initial_noise(sampling.seeded_generators(seeds), (3, 16, 16))
    theirs = pipeline(batch_size=2, num_inference_steps=6, latents=noise.clone(), output_type="pt").images
    saved = load_model(str(tmp_path / "edm"))
    ours = sampling.generate(saved.unet, sampling.make_sampler("euler", saved.schedule), seeds, 6, 2, progress=False)
    torch.testing.assert_close(theirs.cpu(), ours, atol=1e-5, rtol=0)
    wrong = DDPMPipeline.from_pretrained(tmp_path / "edm")(batch_size=2, num_inference_steps=6, output_type="np")
    assert not torch.allclose(torch.as_tensor(wrong.images).permute(0, 3, 1, 2), ours, atol=0.1)


def test_repaint_of_an_edm_model_is_euler_where_it_paints_and_the_image_where_it_keeps(unet):
    """--inpaint on a --parameterization edm model (EDMRePaintScheduler): its visits chain (each starts where the one
    before ended, from sigma_max to 0, the jumps back rising); with no jumps and nothing kept it is DDIM (Euler) on
    the rho-7 levels, the preconditioning written out; the kept pixels come back exactly; the batch does not
    matter."""
    from diffusers import EDMEulerScheduler

    trained = EDMEulerScheduler(sigma_data=0.5).config
    sampler = sampling.make_sampler(sampling.REPAINT, trained)
    assert isinstance(sampler, sampling.EDMRePaintScheduler)
    sampler.set_timesteps(6, jump_length=3, jump_n_sample=2)  # 5..0, back up to 3, down to 0 again
    moves, t = sampler.moves, sampler.timesteps
    assert len(moves) == 12 and moves[0][0] == 80 and moves[-1][1] == 0
    assert all(start == reached for (_, reached), (start, _) in zip(moves, moves[1:]))
    ups = [k for k in range(1, len(t)) if t[k] > t[k - 1]]
    assert ups == [6, 7, 8] and all(moves[k][1] > moves[k][0] for k in ups)
    assert all(moves[k][1] < moves[k][0] for k in range(len(t)) if k not in ups)
    denoise = edm_denoiser(unet)

    seeds, steps = [3, 4, 5], 5
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    nothing_kept = sampling.Known(images, torch.zeros(3, 1, 16, 16), jump_n_sample=1)
    ours = sampling.generate(unet, sampler, seeds, steps, 3, progress=False, known=nothing_kept)
    levels = karras_levels(steps)
    x = sampling.initial_noise(sampling.seeded_generators(seeds), (3, 16, 16)).double() * 80
    for k in range(steps):
        d = denoise(x, levels[k])
        x = d + levels[k + 1] / levels[k] * (x - d)
    torch.testing.assert_close(ours, (x.float() / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)

    keep = (torch.rand(3, 1, 16, 16) > 0.5).float()
    known = sampling.Known(images, keep, jump_length=2, jump_n_sample=3)
    painted = sampling.generate(unet, sampler, seeds, 8, 3, progress=False, known=known, eta=1.0)
    kept = keep.expand_as(images).bool()
    assert torch.equal(painted[kept], (images[kept] / 2 + 0.5).clamp(0, 1))
    assert (painted[~kept] - (images[~kept] / 2 + 0.5)).abs().mean() > 0.05
    one_by_one = sampling.generate(unet, sampler, seeds, 8, 1, progress=False, known=known, eta=1.0)
    torch.testing.assert_close(one_by_one, painted, atol=1e-4, rtol=0)
