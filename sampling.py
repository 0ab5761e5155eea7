"""Sampling and image writing: the samplers, the seed-addressed sampling loop, and the pictures and files it makes,
shared by the training previews, inference.py and evaluate.py.

An image is addressed by its seed: its initial noise and every noise draw of a stochastic sampler come
from a CPU generator of its own, so image i depends on (model, sampler, steps, seed) and not on the batch
it was drawn in, the batch size or the device. The same loop edits given images (Known): SDEdit starts it from a
noised image, RePaint keeps part of an image and jumps back in time; each result is still addressed by its seed.
A class-conditional model is asked for one class per image (Guidance), with classifier-free guidance: the image of
a seed then depends on its class and the guidance scale too, never on the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import imageio.v3 as iio
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    RePaintScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from config import DEFAULT_GUIDANCE_SCALE, EDM_SAMPLERS, UserError
from files import atomic_file, write_json
from model import to_dtype

T = TypeVar("T")

# name -> (scheduler class, settings over the trained DDPM config). Each of these is correct in the loop
# of sample_images: it calls scale_model_input and init_noise_sigma (Euler, Heun) and passes the per-image
# generators only to samplers whose step draws noise. Measured on the glyph benchmark (bench/RESULTS.md):
# - DDIM never clips x0 to [-1, 1]: DDPMScheduler's clip_sample=True, which DDIM inherits from the trained config,
#   clips every x0 prediction while the model's noise prediction stays unclipped, so the two disagree and the error
#   grows with the steps (DDIM 50: 1,260 clipped, 990 not; with clipping DDIM got worse with more steps). Song et al.
#   do not clip either. DDPM's 1000 ancestral steps keep the trained config's clipping, as Ho et al. sample: there it
#   changes nothing measurable (383.9 clipped, 381.0 not), as the step's posterior mean uses the clipped x0 alone.
# - DDIM steps on "leading" timesteps (980, 960, ..., 0 for 50 steps): the DDIM paper's uniform sequence and
#   diffusers' DDIMPipeline (6-7% lower distance than "trailing"; the calibration against Song et al. is exact).
# - Heun (Karras et al. 2022's second-order sampler, two network evaluations a step but the last) on the Karras rho-7
#   noise levels: the default. At about 50 evaluations it halved DDIM's distance (Heun 25: 556, DDIM 50: 990).
SAMPLER_CLASSES: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"timestep_spacing": "leading", "steps_offset": 0, "clip_sample": False}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "timestep_spacing": "trailing"}),
    "unipc": (UniPCMultistepScheduler, {"timestep_spacing": "trailing"}),
    "euler": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "euler_a": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "heun": (HeunDiscreteScheduler, {"timestep_spacing": "trailing", "use_karras_sigmas": True}),
}


FEW_STEP_DEFAULT = 50  # network evaluations a sample takes by default (but ddpm, which takes every timestep)
# Inpainting's sampler: not one of SAMPLER_CLASSES, as its step needs the image and mask (Known). 250 steps is
# RePaintPipeline's default; with its 10 jumps of 10 steps that is about 2,400 network evaluations an image.
REPAINT = "repaint"
REPAINT_STEPS_DEFAULT = 250


class VelocityRePaintScheduler(RePaintScheduler):
    """diffusers' RePaintScheduler for a v-prediction model: RePaint's step takes the noise, so each v is turned into
    the noise it implies, eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t (x_t = sqrt(alpha_bar_t) x0 +
    sqrt(1 - alpha_bar_t) eps and v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0)."""

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, *args, **kwargs):
        alpha_bar = self.alphas_cumprod[timestep].to(sample.device, sample.dtype)
        noise = alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * sample
        return super().step(noise, timestep, sample, *args, **kwargs)


class EDMHeunScheduler(EDMEulerScheduler):
    """Karras et al.'s deterministic Heun sampler (EDM's Algorithm 1) for a model trained with --parameterization edm:
    diffusers' EDMEulerScheduler (its rho-7 noise levels, preconditioning and c_noise) with the second-order correction
    that diffusers has no EDM scheduler for. Laid out as HeunDiscreteScheduler: every noise level but the first and
    the final 0 is visited twice (the correction of one step, then the start of the next), so n steps take 2n - 1
    network evaluations, the last step (to sigma 0) being Euler's."""

    order = 2

    @property
    def init_noise_sigma(self):
        return self.config.sigma_max  # EDM starts from sigma_max exactly (EDMEulerScheduler: sqrt(sigma_max^2 + 1))

    def set_timesteps(self, num_inference_steps: int = None, device=None, sigmas=None):
        super().set_timesteps(num_inference_steps, device, sigmas)
        levels = self.sigmas  # the n noise levels, then 0 (on the CPU)
        self.sigmas = torch.cat([levels[:1], levels[1:-1].repeat_interleave(2), levels[-1:]])
        self.timesteps = self.precondition_noise(self.sigmas[:-1]).to(device)
        self._euler = None  # the step being corrected: (its start, its first slope, its sigma step)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        denoised = self.precondition_outputs(sample, model_output, sigma)
        slope = (sample - denoised) / sigma
        if self._euler is None:  # a step's first evaluation: Euler to the next noise level
            prev_sample = sample + (sigma_next - sigma) * slope
            if sigma_next > 0:
                self._euler = (sample, slope, sigma_next - sigma)
        else:  # its correction, at the level Euler reached: the mean of the two slopes from the step's start
            start, first_slope, dt = self._euler
            prev_sample = start + dt * (first_slope + slope) / 2
            self._euler = None
        self._step_index += 1
        return EDMEulerSchedulerOutput(prev_sample, denoised) if return_dict else (prev_sample, denoised)


class EDMRePaintScheduler(EDMEulerScheduler):
    """RePaint (Lugmayr et al. 2022) for a model trained with --parameterization edm: RePaintScheduler's schedule of
    jumps back in time (its own set_timesteps, on num_inference_steps levels), laid on EDMEulerScheduler's rho-7 noise
    levels and its preconditioning, with RePaint's steps written for x = x0 + sigma n.

    A step from sigma to the next level sigma' is DDIM's (Euler's) in the painted region: x' = D + sigma_down / sigma
    (x - D) + sigma_up z, with sigma_up = eta sigma' sqrt(1 - sigma'^2 / sigma^2) and sigma_down^2 = sigma'^2 -
    sigma_up^2 (eta 0: deterministic; 1: ancestral, as RePaintScheduler's eta); the kept region becomes the image
    plus sigma' z (the same z, as RePaintScheduler reuses its noise), so at the last level, 0, it is the image
    itself. A jump back one level adds sqrt(sigma^2 - sigma'^2) of fresh noise."""

    eta = 0.0  # set by sample_images, as RePaintPipeline sets RePaintScheduler's

    @property
    def init_noise_sigma(self):
        return self.config.sigma_max

    def set_timesteps(self, num_inference_steps: int = None, jump_length: int = 10, jump_n_sample: int = 10,
                      device=None):
        super().set_timesteps(num_inference_steps)  # the n levels from sigma_max to sigma_min, then 0
        jumps = RePaintScheduler(num_train_timesteps=num_inference_steps)
        jumps.set_timesteps(num_inference_steps, jump_length, jump_n_sample)
        levels = jumps.timesteps.tolist()  # n - 1 down to 0, going back up jump_length at a time
        sigma = self.sigmas.flip(0)  # sigma[level + 1]: level -1 is 0, level n - 1 is sigma_max
        # Each visit moves the sample from one level to another: a step down from its level v to v - 1; a jump back
        # undoes the step before it (from v - 2 to v - 1), so that the next step down starts where the jumps ended.
        self.moves = [(sigma[v + 1], sigma[v]) if k == 0 or v < levels[k - 1] else (sigma[v - 1], sigma[v])
                      for k, v in enumerate(levels)]
        self.timesteps = self.precondition_noise(sigma[torch.tensor(levels) + 1]).to(device)  # up entries rise
        self._position = 0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return self.precondition_inputs(sample, self.moves[self._position][0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, original_image: torch.Tensor = None,
             mask: torch.Tensor = None, generator=None, return_dict: bool = True):
        sigma, sigma_next = self.moves[self._position]
        self._position += 1
        denoised = self.precondition_outputs(sample, model_output, sigma)
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        up = min(sigma_next, self.eta * sigma_next * (1 - sigma_next ** 2 / sigma ** 2) ** 0.5)
        down = (sigma_next ** 2 - up ** 2) ** 0.5
        painted = denoised + down / sigma * (sample - denoised) + up * noise
        kept = original_image + sigma_next * noise
        prev_sample = mask * kept + (1 - mask) * painted
        return EDMEulerSchedulerOutput(prev_sample, denoised) if return_dict else (prev_sample, denoised)

    def undo_step(self, sample: torch.Tensor, timestep=None, generator=None) -> torch.Tensor:
        sigma, sigma_up = self.moves[self._position]
        self._position += 1
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return sample + (sigma_up ** 2 - sigma ** 2) ** 0.5 * noise


REPAINT_SCHEDULERS = (RePaintScheduler, EDMRePaintScheduler)  # set up with jumps, given the image and mask


# name -> (scheduler class, settings) for a model trained with --parameterization edm, whose saved scheduler is
# diffusers' EDMEulerScheduler: Heun as EDM samples, and the EDM samplers diffusers ships.
EDM_SAMPLER_CLASSES: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "heun": (EDMHeunScheduler, {}),
    "euler": (EDMEulerScheduler, {}),
    "dpmsolver++": (EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
}
assert tuple(EDM_SAMPLER_CLASSES) == EDM_SAMPLERS


def is_edm(trained_scheduler_config) -> bool:
    """Whether a model was trained with --parameterization edm (its scheduler is an EDM one, with sigma_data)."""
    return "sigma_data" in trained_scheduler_config


def make_sampler(name: str, trained_scheduler_config, **overrides) -> SchedulerMixin:
    """A sampler built from the noise schedule the model was trained with (REPAINT: diffusers' RePaintScheduler, on
    the noise the model's epsilon or v implies; EDMRePaintScheduler for an EDM model; the other samplers of an EDM
    model: EDM_SAMPLER_CLASSES); overrides: diffusers scheduler settings over the toolkit's own (bench/samplers.py)."""
    if is_edm(trained_scheduler_config):
        if name == REPAINT:
            return EDMRePaintScheduler.from_config(trained_scheduler_config, **overrides)
        if name not in EDM_SAMPLER_CLASSES:
            raise UserError(f"--scheduler {name} samples a DDPM model, and this one was trained with "
                            f"--parameterization edm; use --scheduler {', '.join(EDM_SAMPLERS)}")
        cls, settings = EDM_SAMPLER_CLASSES[name]
        return cls.from_config(trained_scheduler_config, **{**settings, **overrides})
    if name == REPAINT:
        velocity = trained_scheduler_config.get("prediction_type") == "v_prediction"
        betas = trained_scheduler_config.get("trained_betas")  # --beta_schedule log_sigma: RePaint reads numpy
        if betas is not None:
            overrides = {"trained_betas": np.asarray(betas, np.float32), **overrides}
        return (VelocityRePaintScheduler if velocity else RePaintScheduler).from_config(trained_scheduler_config,
                                                                                        **overrides)
    cls, settings = SAMPLER_CLASSES[name]
    return cls.from_config(trained_scheduler_config, **{**settings, **overrides})


def default_steps(name: str, num_train_timesteps: int) -> int:
    """The denoising steps of a sampler when none are asked for: DDPM's ancestral sampler needs every training
    timestep; RePaint takes its pipeline's 250; the others are made for few, about 50 network evaluations a sample
    (Heun's 25 steps take 49)."""
    if name == "ddpm":
        return num_train_timesteps
    if name == REPAINT:
        return min(REPAINT_STEPS_DEFAULT, num_train_timesteps)
    return min(FEW_STEP_DEFAULT // 2 if name == "heun" else FEW_STEP_DEFAULT, num_train_timesteps)


def edit_steps(num_inference_steps: int, strength: float) -> int:
    """The steps SDEdit runs at this strength: the sampler's last int(steps x strength), as diffusers' img2img
    pipelines count them (get_timesteps)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
    """One float32 noise image per generator, drawn on the CPU (so the same on every device)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation from a (t=0) to b (t=1), along the great circle between them.

    Computed in float64; returns a exactly at t=0 and b exactly at t=1, and equal angles for equal steps of t.
    """
    a64, b64 = a.double(), b.double()
    cos_omega = (a64.flatten() @ b64.flatten()) / (a64.norm() * b64.norm())
    omega = torch.arccos(cos_omega.clamp(-1.0, 1.0))
    if omega.abs() < 1e-6:  # (anti)parallel inputs: the great circle is undefined, lerp is exact enough
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    # slerp(a, b; t) = sin((1-t)w)/sin(w) a + sin(tw)/sin(w) b
    out = torch.sin((1 - t) * omega) / torch.sin(omega) * a64 + torch.sin(t * omega) / torch.sin(omega) * b64
    return out.to(a.dtype)


@dataclasses.dataclass(frozen=True)
class Known:
    """Given images that a sampling run edits, one per noise image: float32 [N,C,H,W] in [-1, 1] on the CPU.

    SDEdit (Meng et al. 2022), `keep` None: the run starts from each image noised to the timestep a `strength`
    share of the schedule back, and takes that share of the steps (edit_steps); strength 1 is plain generation
    from the seed's noise (as diffusers' inpainting pipelines start at full strength).
    RePaint (Lugmayr et al. 2022), `keep` [N,1,H,W] (1 where the image is kept, 0 where the model paints), with a
    RePaintScheduler (EDMRePaintScheduler for an EDM model): its step puts the image, noised to the step's level,
    into the kept region, so the kept pixels come back exactly at t = 0; its timesteps jump back in time
    (jump_length steps, jump_n_sample times), and the loop noises the sample forward again there, so the painted
    region agrees with the kept one.
    """

    images: torch.Tensor
    keep: Optional[torch.Tensor] = None
    strength: float = 1.0
    jump_length: int = 10
    jump_n_sample: int = 10

    def __getitem__(self, part: slice | list[int]) -> "Known":  # a batch, or a process's share
        return dataclasses.replace(self, images=self.images[part], keep=None if self.keep is None else self.keep[part])


def _timesteps(sampler: SchedulerMixin, num_inference_steps: int, known: Optional[Known]) -> torch.Tensor:
    """Set the sampler up for one batch and return the timesteps to visit, in order (RePaint's go back and forth)."""
    if isinstance(sampler, REPAINT_SCHEDULERS):
        sampler.set_timesteps(num_inference_steps, known.jump_length, known.jump_n_sample)
        return sampler.timesteps
    sampler.set_timesteps(num_inference_steps)
    if known is None or known.strength >= 1:
        return sampler.timesteps
    first = (num_inference_steps - edit_steps(num_inference_steps, known.strength)) * sampler.order
    if hasattr(sampler, "set_begin_index"):  # multistep and sigma samplers count their steps from here
        sampler.set_begin_index(first)
    return sampler.timesteps[first:]


def _start(sampler: SchedulerMixin, noise: torch.Tensor, timesteps: torch.Tensor, known: Optional[Known]):
    """The sample the loop starts from: the seed's noise, or (SDEdit) the image noised to the first timestep."""
    if known is None or known.keep is not None or known.strength >= 1:
        return noise * sampler.init_noise_sigma
    return sampler.add_noise(known.images, noise, timesteps[:1].repeat(len(noise)))


@dataclasses.dataclass(frozen=True)
class Guidance:
    """What a class-conditional model is asked for: a class per image, and the classifier-free guidance scale w
    (Ho & Salimans 2022, as diffusers writes it): eps = eps(x, null) + w (eps(x, class) - eps(x, null)); w 0 draws
    unconditionally, w 1 conditionally without guidance. Labels index the model's classes; null_class is the class
    embedding's last row, the "no label" that training drops labels to."""

    labels: torch.Tensor  # int64 [N] on the CPU, one per noise image
    null_class: int
    scale: float = DEFAULT_GUIDANCE_SCALE

    def __getitem__(self, index) -> "Guidance":
        return dataclasses.replace(self, labels=self.labels[index])


def for_model(unet, labels: Optional[list[int]], scale: float = DEFAULT_GUIDANCE_SCALE) -> Optional[Guidance]:
    """The Guidance of these labels for this UNet (None for an unconditional one, which takes no labels)."""
    rows = unet.config.get("num_class_embeds")
    if not rows or labels is None:
        return None
    return Guidance(torch.as_tensor(labels, dtype=torch.long), rows - 1, scale)


def predict_noise(unet, x: torch.Tensor, t, guidance: Optional[Guidance]) -> torch.Tensor:
    """The UNet's prediction (epsilon or v, float32). With guidance, the conditional and unconditional predictions
    come from one batched forward pass of [x, x] with [labels, null] (w 0 and 1 need only one of them); a
    class-conditional UNet asked for no class predicts unconditionally."""
    rows = unet.config.get("num_class_embeds")
    if not rows:
        return unet(x, t, return_dict=False)[0].float()
    if guidance is None:
        guidance = Guidance(torch.full((len(x),), rows - 1), rows - 1, 0.0)
    labels = guidance.labels.to(x.device)
    null = torch.full_like(labels, guidance.null_class)
    if guidance.scale in (0, 1):
        return unet(x, t, class_labels=labels if guidance.scale else null, return_dict=False)[0].float()
    both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null]), return_dict=False)[0].float()
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance.scale * (conditional - unconditional)


def _denoise(unet, sampler: SchedulerMixin, noise: torch.Tensor, generators: list[torch.Generator],
             num_inference_steps: int, dtype: torch.dtype, step_kwargs: dict,
             known: Optional[Known] = None, guidance: Optional[Guidance] = None) -> torch.Tensor:
    """Run the sampler from `noise` (float32, CPU) to images in [0, 1] (float32, CPU), editing `known` if given."""
    device = next(unet.parameters()).device
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    timesteps = _timesteps(sampler, num_inference_steps, known)
    x = _start(sampler, noise, timesteps, known).to(device)  # the latents stay float32 for an exact sampler
    if "generator" in inspect.signature(sampler.step).parameters:
        step_kwargs = {**step_kwargs, "generator": generators}
    if known is not None and known.keep is not None:  # RePaint's step merges the kept region itself
        step_kwargs = {**step_kwargs, "original_image": known.images.to(device), "mask": known.keep.to(device)}
    previous = None
    for t in timesteps:
        if previous is not None and t > previous:  # RePaint's jump back in time: noise the sample forward again
            x = sampler.undo_step(x, previous, generators)
        else:
            model_input = sampler.scale_model_input(x, t).to(dtype=dtype, memory_format=memory_format)
            eps = predict_noise(unet, model_input, t, guidance)
            x = sampler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
        previous = t
    return (x / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def sample_images(unet, sampler: SchedulerMixin, noise: torch.Tensor, generators: list[torch.Generator],
                  num_inference_steps: int, batch_size: int, dtype: torch.dtype = torch.float32,
                  eta: float = 0.0, desc: str = "sampling", progress: bool = True,
                  known: Optional[Known] = None, guidance: Optional[Guidance] = None) -> torch.Tensor:
    """Denoise each noise image with its own generator (editing its known image, if given; of its class, if
    guided), batch_size at a time; images in [0, 1] on the CPU.

    A CUDA out-of-memory error halves the batch and retries, with the generators rewound so the images are
    unchanged.
    """
    step_kwargs = {"eta": eta} if isinstance(sampler, DDIMScheduler) else {}
    if isinstance(sampler, REPAINT_SCHEDULERS):
        sampler.eta = eta  # its step reads the attribute, which RePaintPipeline sets so too
    done: list[torch.Tensor] = []
    with tqdm(total=len(noise), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        start = 0
        while start < len(noise):
            stop = min(start + batch_size, len(noise))
            states = [g.get_state() for g in generators[start:stop]]
            try:
                done.append(_denoise(unet, sampler, noise[start:stop], generators[start:stop],
                                     num_inference_steps, dtype, step_kwargs,
                                     None if known is None else known[start:stop],
                                     None if guidance is None else guidance[start:stop]))
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                for g, state in zip(generators[start:stop], states):
                    g.set_state(state)
                torch.cuda.empty_cache()
                tqdm.write(f"notice: out of GPU memory; retrying with batch_size {batch_size}")
                continue
            bar.update(stop - start)
            start = stop
    return torch.cat(done)


def generate(unet, sampler: SchedulerMixin, seeds: list[int], num_inference_steps: int, batch_size: int,
             dtype: torch.dtype = torch.float32, eta: float = 0.0, desc: str = "sampling",
             progress: bool = True, known: Optional[Known] = None,
             guidance: Optional[Guidance] = None) -> torch.Tensor:
    """Images addressed by seed: image i is a function of (model, sampler, steps, seeds[i]) alone, and of its known
    image when editing (seeds may repeat: one per edit of each image), and of its class and the guidance scale for
    a class-conditional model."""
    cfg = unet.config
    generators = seeded_generators(seeds)
    noise = initial_noise(generators, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    return sample_images(unet, sampler, noise, generators, num_inference_steps, batch_size, dtype, eta, desc, progress,
                         known, guidance)


# ---------------------------------------------------------------------------------------------------
# Classes: asked for by name or number, or drawn by seed
# ---------------------------------------------------------------------------------------------------


CLASS_STREAM = 0xC1A55  # the random stream a seed's class is drawn from, apart from its noise


def classes_by_seed(seeds: list[int], counts: Optional[list[int]], num_classes: int) -> list[int]:
    """Each seed's class, drawn from a random stream of the seed's own in proportion to counts (the training images
    of each class; None: equal): the same seed always gets the same class, in any batch or process."""
    import numpy as np

    weights = np.asarray(counts if counts else [1] * num_classes, dtype=np.float64)
    cumulative = np.cumsum(weights) / weights.sum()
    draws = [np.random.default_rng([CLASS_STREAM, int(seed) % 2 ** 63]).random() for seed in seeds]
    return np.minimum(np.searchsorted(cumulative, draws, side="right"), num_classes - 1).tolist()


def check_guidance(guidance_scale: float, classes: Optional[list[str]]) -> None:
    """A guidance scale other than the default, asked of a model without classes, is a mistake: say so (nothing would
    be guided, and the images would silently be the unguided ones)."""
    if classes is None and guidance_scale != DEFAULT_GUIDANCE_SCALE:
        raise UserError(f"--guidance_scale {guidance_scale:g} needs a class-conditional model; this one was trained "
                        f"without classes (leave --guidance_scale out, or train one with train_ddpm.py "
                        f"--class_conditional)")


def class_indices(wanted: list[str], classes: Optional[list[str]], flag: str = "--class_label") -> list[int]:
    """The labels of classes named by name or number; a UserError naming the model's classes for any other."""
    if classes is None:
        raise UserError(f"{flag} needs a class-conditional model; this one was trained without classes (train one "
                        f"with train_ddpm.py --class_conditional)")
    indices = []
    for word in wanted:
        if word in classes:
            indices.append(classes.index(word))
        elif word.isdigit() and int(word) < len(classes):
            indices.append(int(word))
        else:
            raise UserError(f"{flag} {word} is not one of the model's classes: {', '.join(classes)} (or their numbers "
                            f"0-{len(classes) - 1})")
    return indices


def rows_by_class(images: torch.Tensor, labels: list[int]) -> tuple[torch.Tensor, int]:
    """The images laid out one row per class (classes in label order, each row in the given order), shorter rows
    padded with blank cells; and the row length, for save_grid."""
    rows = [[image for image, label in zip(images, labels) if label == c] for c in sorted(set(labels))]
    columns = max(map(len, rows))
    blank = torch.zeros_like(images[0])
    return torch.stack([cell for row in rows for cell in row + [blank] * (columns - len(row))]), columns


# ---------------------------------------------------------------------------------------------------
# Several processes (accelerate launch, torchrun): each draws a share of the seeds.
# ---------------------------------------------------------------------------------------------------


def process_state(timeout_s: Optional[float] = None):
    """This process among those accelerate launch or torchrun started (alone when run plainly), on its device: a
    GPU when there is one, else the CPU (accelerate must be told, or torchrun's CPU processes each run alone).
    timeout_s: how long one collective may wait before the run stops as hung (the first call sets it: the process
    group is made here, before any Accelerator); None keeps torch's default (10 minutes for NCCL, 30 for gloo)."""
    from datetime import timedelta

    from accelerate import PartialState

    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    return PartialState(cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available(), **timeout)


def first_alone(state, work: Callable[[], T], local: bool = False, poll_s: float = 1.0) -> T:
    """work() on the main process (local: on each machine's main process) first, then on the others, as accelerate's
    main_process_first, but the others never sit in one collective while it works: a barrier held for the hour a
    large data cache takes would hit the process group's timeout and kill the run. The first process works in a
    thread while every process checks in together every poll_s. If the work fails there, that process raises its
    error and the others exit quietly with the same kind of exit code (2 for a user's mistake, else 1)."""
    if state.num_processes == 1:
        return work()
    import threading

    import torch.distributed as dist

    first = state.is_local_main_process if local else state.is_main_process
    outcome: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as e:  # handed to the main thread, which raises it
            outcome["error"] = e
        finally:
            done.set()

    if first:
        threading.Thread(target=run, name="first_alone", daemon=True).start()
    while True:
        finished = done.wait(poll_s) if first else True
        error = outcome.get("error")
        failure = 0 if error is None else 2 if isinstance(error, UserError) else 1
        status = torch.tensor([int(not finished), failure], device=state.device)
        dist.all_reduce(status, op=dist.ReduceOp.MAX)
        working, failure = status.tolist()
        if not working:
            break
    if "error" in outcome:
        raise outcome["error"]
    if failure:
        raise SystemExit(failure)  # the failing process has printed why
    return outcome["result"] if first else work()


def sampling_dtype(requested: str, device: torch.device, quiet: bool = False) -> torch.dtype:
    """The UNet's dtype for sampling on this device: auto is fp16 on a GPU and fp32 on the CPU."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if requested in ("fp16", "bf16") and device.type != "cuda":
        if not quiet:
            print(f"notice: --dtype {requested} needs a GPU; sampling in fp32 on the CPU")
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[requested]


def prepare_unet(unet, device: torch.device, dtype: torch.dtype, compile_unet: bool = False):
    """The UNet on the device, in eval mode and dtype, channels_last on a GPU, compiled if asked (GPU only)."""
    unet = to_dtype(unet.to(device), dtype).eval()
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
        if compile_unet:
            unet = torch.compile(unet)
    return unet


def shard(seeds: list[int], state) -> list[int]:
    """This process's share of the seeds: every num_processes-th, from its index."""
    return seeds[state.process_index::state.num_processes]


def gather_by_seed(state, seeds: list[int], rows: torch.Tensor) -> tuple[list[int], Optional[torch.Tensor]]:
    """Every process's rows (one per seed, on the CPU) on the main process, ordered by seed; None elsewhere."""
    if state.num_processes == 1:
        return seeds, rows
    from accelerate.utils import gather_object

    parts = gather_object([(seeds, rows)])  # a collective: every process calls it
    if not state.is_main_process:
        return [], None
    everything = sorted(((s, i, k) for k, (part, _) in enumerate(parts) for i, s in enumerate(part)))
    return [s for s, _, _ in everything], torch.stack([parts[k][1][i] for _, i, k in everything])


# ---------------------------------------------------------------------------------------------------
# Writing images: each file appears whole or not at all (files.atomic_file).
# ---------------------------------------------------------------------------------------------------


# Pictures for people (grids, the interpolation strip and GIF) are scaled up; per-image PNGs stay native: they are data.
MAX_DISPLAY_SIDE = 4096  # px: a grid of many images is scaled up less, so viewers still open it
GRID_PADDING = 2  # px between grid cells


def display_factor(side: int, display_size: int, cells_across: int = 1) -> int:
    """k = ceil(display_size / side), the integer factor that shows a side-px image at least display_size px;
    never below 1 (no shrinking; display_size 0 keeps the native size), and lowered so that cells_across padded
    cells of k * side px fit in MAX_DISPLAY_SIDE."""
    if display_size <= 0:
        return 1
    wanted = math.ceil(display_size / side)
    fits = ((MAX_DISPLAY_SIDE - GRID_PADDING) // cells_across - GRID_PADDING) // side
    return max(1, min(wanted, fits))


def for_display(images: torch.Tensor, display_size: int, cells_across: int = 1) -> torch.Tensor:
    """[N,C,H,W] images scaled up by display_factor with nearest neighbour: each pixel becomes a k x k block, so
    nothing is blurred or invented, and the channels (1 for greyscale) are kept."""
    k = display_factor(max(images.shape[-2:]), display_size, cells_across)
    return images if k == 1 else images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def grid_columns(count: int, columns: Optional[int] = None) -> int:
    """Images per grid row: the given number, else as square as the count allows."""
    return columns or math.ceil(math.sqrt(count))


def save_grid(images: torch.Tensor, path: str | os.PathLike, columns: Optional[int] = None, *,
              display_size: int) -> None:
    """The images in one padded grid PNG, each cell shown at least display_size px (see for_display)."""
    columns = min(grid_columns(len(images), columns), len(images))  # as make_grid lays them out
    cells_across = max(columns, math.ceil(len(images) / columns))
    grid = image_grid(for_display(to_uint8(images), display_size, cells_across), columns)  # uint8: 4x less memory
    with atomic_file(path) as tmp:  # make_grid repeats a single channel three times; keep greyscale grey
        iio.imwrite(tmp, to_hwc(grid[: images.shape[1]]), extension=".png")


def save_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    """One [C,H,W] image in [0, 1] as an RGB PNG, or a greyscale one for a 1-channel model."""
    with atomic_file(path) as tmp:
        iio.imwrite(tmp, to_hwc(to_uint8(image)), extension=".png")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as uint8, rounded as torchvision's save_image rounds."""
    return images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def to_hwc(image: torch.Tensor):
    """A [C,H,W] uint8 image as an HxWx3 (or HxW, greyscale) array."""
    array = image.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def save_gif(frames: torch.Tensor, path: str | os.PathLike, fps: float, *, display_size: int) -> None:
    """An endlessly looping GIF of [N,C,H,W] frames in [0, 1], each shown at least display_size px."""
    frames = for_display(to_uint8(frames), display_size)
    with atomic_file(path) as tmp:
        iio.imwrite(tmp, [to_hwc(f) for f in frames], extension=".gif", duration=1000.0 / fps, loop=0)


def image_grid(images: torch.Tensor, columns: Optional[int] = None) -> torch.Tensor:
    """The grid as one [C,H,W] tensor, at the images' own size (TensorBoard logs it so)."""
    return make_grid(images, nrow=grid_columns(len(images), columns), padding=GRID_PADDING)


# ---------------------------------------------------------------------------------------------------
# What inference.py writes: images by seed, interpolation frames, and the manifest that redoes them
# ---------------------------------------------------------------------------------------------------


def save_images_by_seed(out: Path, images: torch.Tensor, seeds: list[int], columns: Optional[int],
                        display_size: int, labels: Optional[list[int]] = None,
                        classes: Optional[list[str]] = None) -> list[dict]:
    """seed{N}.png for each image (native size: data) and grid.png (scaled for display); the manifest's entries.
    Images of a class-conditional model (labels: each one's class) are {class}_seed{N}.png, in a grid of a row per
    class."""
    files = []
    for k, (seed, image) in enumerate(zip(seeds, images)):
        if labels is None:
            name, entry = f"seed{seed:06d}.png", {}
        else:
            name = f"{file_safe(classes[labels[k]])}_seed{seed:06d}.png"
            entry = {"class": classes[labels[k]], "label": labels[k]}
        save_png(image, out / name)
        files.append({"file": name, "seed": seed, **entry})
    if labels is not None:
        images, by_class = rows_by_class(images, labels)
        columns = columns or by_class
    save_grid(images, out / "grid.png", columns, display_size=display_size)
    return files


def file_safe(name: str) -> str:
    """A class name as part of a file name: anything but letters, digits, '.', '-' and '_' becomes '_'."""
    import re

    return re.sub(r"[^\w.-]+", "_", name) or "_"


def interpolation_noise(shape: tuple[int, int, int], start_seed: int, end_seed: int, frames: int):
    """The slerp between the initial noise of two seeds, `frames` points ends included, and the frames' generators:
    stochastic samplers (ddpm, euler_a, ddim with eta > 0) share start_seed's step noise across frames."""
    start, end = initial_noise(seeded_generators([start_seed, end_seed]), shape)
    fractions = [k / (frames - 1) for k in range(frames)]
    noise = torch.stack([slerp(start, end, f) for f in fractions])
    return noise, seeded_generators([start_seed] * frames), fractions


@contextlib.contextmanager
def blended_classes(unet, first: int, last: int, fractions: list[float]) -> Iterator[list[int]]:
    """Labels that ask for the class embeddings (1 - f) E[first] + f E[last], one per fraction f, for the block: the
    UNet's class embedding is extended by those rows meanwhile (diffusers adds the class embedding to the time
    embedding, so a blend of two rows is a class between the two). The null class keeps its label."""
    table = unet.class_embedding
    weight = table.weight.detach()
    blends = torch.stack([torch.lerp(weight[first], weight[last], f) for f in fractions])
    unet.class_embedding = torch.nn.Embedding.from_pretrained(torch.cat([weight, blends]))
    try:
        yield list(range(len(weight), len(weight) + len(fractions)))
    finally:
        unet.class_embedding = table


def save_interpolation(out: Path, frames: torch.Tensor, fractions: list[float], start_seed: int, end_seed: int,
                       fps: float, display_size: int) -> list[dict]:
    """frame_{k}.png (native size), interpolation_strip.png and a looping interpolation.gif (scaled for display);
    the manifest's entries."""
    files = []
    for k, (fraction, frame) in enumerate(zip(fractions, frames)):
        name = f"frame_{k:03d}.png"
        save_png(frame, out / name)
        files.append({"file": name, "t": fraction, "start_seed": start_seed, "end_seed": end_seed})
    save_grid(frames, out / "interpolation_strip.png", columns=len(frames), display_size=display_size)
    save_gif(frames, out / "interpolation.gif", fps, display_size=display_size)
    return files


def write_manifest(out: Path, manifest: dict) -> None:
    """manifest.json: how every file was made (model, sampler, steps, seeds), enough to make it again."""
    write_json(out / "manifest.json", manifest)
