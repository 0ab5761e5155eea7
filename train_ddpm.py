"""Train a DDPM (diffusers UNet2DModel + DDPMScheduler) on CIFAR-10, MNIST, a folder or ZIP of images, or a
Hugging Face dataset (Hub id, save_to_disk folder or parquet files).

    python train_ddpm.py                                   # README defaults (config.py)
    python train_ddpm.py --dataset_name mnist --image_size 32 --num_epochs 5
    python train_ddpm.py --dataset_name custom --dataset_path ./pets --class_conditional   # a class per sub-folder
    accelerate launch train_ddpm.py ...                    # several GPUs or machines
    python train_ddpm.py --resume_from_checkpoint latest   # continue a stopped run exactly

Every field of config.py is a flag of the same name (--help lists them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import config as config_module
from config import TRAINING_SECTIONS, Config, Resolved, TrainingConfig, UserError
from checkpoint import (CHECKPOINT_NAME, Progress, ema_weights, find_checkpoint, load_checkpoint,
                        register_wrapper_free_weights, save_checkpoint, saved_layout)
from dataset import Labelled, batches_per_epoch, check_source, load_dataset, make_dataloader, to_model_input
from ema import POSTHOC_LENGTHS, SNAPSHOT_FOLDER, PowerEMA, drop_snapshots_after
from files import OLD, atomic_folder, read_json, restore_interrupted, write_json
from model import (build_noise_scheduler, build_unet, count_parameters, fit_class_embedding, hold_time_frequencies,
                   load_model, save_model, time_frequency_mask, time_phase_read)

RUN_OUTPUTS = ("logs", "final_model", "config.json", "sample_training_data.png", "final_samples.png", "best_model",
               SNAPSHOT_FOLDER)
EXIT_NONFINITE = 3
LONG_CPU_RUN_S = 3600  # a CPU run estimated to take longer gets a hint towards a small preset
TRAINING_EVAL_BATCH = 128  # images per sampling pass of the evaluation during training (halved on out-of-memory)


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------

EXTRA_FLAGS = (("--dry_run", dict(action="store_true", help="print the resolved config as JSON and stop")),)


def default_values() -> dict[str, object]:
    """The defaults as config.py sets them (its module-level instances, which users may edit)."""
    return config_module.flat_fields(config_module.training_config, config_module.data_config,
                                     config_module.model_config, config_module.scheduler_config)


def parse_config(argv: Optional[list[str]] = None) -> tuple[Config, bool]:
    """The config as asked for (checked, not yet resolved). When resuming, the checkpoint's config is the base that
    flags override."""
    defaults = default_values()
    prog, doc, sections = "train_ddpm.py", __doc__, TRAINING_SECTIONS
    values, options = config_module.parse_cli(argv, prog, doc, defaults, sections, config_module.PRESETS, EXTRA_FLAGS)
    cfg = config_module.build(Config, values)
    if cfg.training.resume_from_checkpoint:
        checkpoint = find_checkpoint(cfg.training.output_dir, cfg.training.resume_from_checkpoint)
        base = {**defaults, **config_module.read_config_file(checkpoint / "config.json", sections)}
        values, options = config_module.parse_cli(argv, prog, doc, base, sections, config_module.PRESETS, EXTRA_FLAGS)
        config_module.refuse_changes_on_resume(base, values)
        cfg = config_module.build(Config, values)
        # "latest" found once, and recorded as a path: under its own name even if a crash left it renamed aside
        # (checkpoint-*.old), which the main process puts back before any process loads it (agree_on_checkpoint)
        cfg.training.resume_from_checkpoint = str(checkpoint.with_name(checkpoint.name.removesuffix(OLD)))
    config_module.validate_training(cfg)
    check_source(cfg.training.dataset_name, cfg.data)
    return cfg, getattr(options, "dry_run", False)


def native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bf16 natively (Ampere and newer); torch reports emulated support otherwise."""
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch has no such argument and reports native support only
        return torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------------------------------------------
# EMA, signals, one training step
# ---------------------------------------------------------------------------------------------------


class StopSignal:
    """SIGTERM or Ctrl-C asks the loop to finish its step and checkpoint; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              f"(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


def step_seed(seed: int, epoch: int, batch: int, process: int) -> int:
    """Each micro-step's randomness (noise, timesteps, flips, dropout) is a pure function of where it is,
    so a resumed run draws exactly what the uninterrupted run would have drawn."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + batch) * 1_009 + process & (2**63 - 1)


def seed_micro_step(seed: int, device: torch.device) -> None:
    """Seed the CPU (and this GPU's) generator; cheaper than torch.manual_seed, which seeds every backend."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


@dataclasses.dataclass
class TrainingParts:
    """What one training step works on."""

    model: torch.nn.Module  # as prepared by accelerate (DDP, torch.compile): what the step runs
    unet: torch.nn.Module  # the plain UNet inside it: EMA, previews and saving use this
    optimizer: torch.optim.Optimizer  # accelerate's wrapper of AdamW
    fused: bool  # fused AdamW: it skips a NaN/inf step itself, given found_inf
    lr_schedule: torch.optim.lr_scheduler.LRScheduler  # stepped once per optimizer step
    ema: Optional[PowerEMA]  # the EMAs of the weights (ema.py), or None
    noise_scheduler: object  # the DDPMScheduler that noises the training images
    images_per_step: int  # images one optimizer step trains on, over all processes: the EMA's clock
    ema_params: list = dataclasses.field(default_factory=list)  # unet's parameters, listed once
    null_class: Optional[int] = None  # class-conditional: the label of no class, that class_dropout drops labels to
    loss_weights: Optional[torch.Tensor] = None  # per timestep (loss_weights()), on the device; None: plain MSE
    sigma_boundaries: Optional[torch.Tensor] = None  # lognormal timesteps (lognormal_boundaries()); None: uniform


def build_training(run: Resolved, accelerator, pretrained=None) -> TrainingParts:
    """Model (new, or the pretrained UNet given), AdamW, LR schedule and EMA, prepared and registered for
    checkpoints."""
    from accelerate.utils import set_seed

    cfg, t = run.cfg, run.cfg.training
    set_seed(t.seed)  # the initial weights
    if pretrained is not None:
        model = fit_class_embedding(pretrained, len(run.classes))
    else:
        model = build_unet(cfg.model, t.image_size, run.channels, len(run.classes))
    model.train()  # from_pretrained leaves a model in eval mode: dropout would be off
    if t.timestep_max_phase is not None:
        hold_time_frequencies(model, time_frequency_mask(model, t.timestep_max_phase,
                                                         cfg.scheduler.num_train_timesteps))
    if t.freeze_down_blocks:
        model.conv_in.requires_grad_(False)
        model.down_blocks.requires_grad_(False)
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adamw = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay,
                 eps=t.adam_epsilon)
    try:
        optimizer, fused = torch.optim.AdamW(trainable, fused=True, **adamw), True
    except RuntimeError:  # no fused kernel for this device: skipping a NaN step then costs a sync
        optimizer, fused = torch.optim.AdamW(trainable, **adamw), False
    # Never prepared nor checkpointed: a pure function of the optimizer steps (LRCurve), stepped by train_step once
    # per optimizer step whatever the accumulation or process count; resume sets its position.
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, LRCurve(t.lr_scheduler, [0, t.lr_warmup_steps, 1.0,
                                                                                        run.total_steps]))
    model, optimizer = accelerator.prepare(model, optimizer)
    register_wrapper_free_weights(accelerator)
    unet = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema = None
    if t.use_ema:  # the run's EMA first, then the two kept for post-hoc snapshots
        lengths = dict.fromkeys([t.ema_length, *(POSTHOC_LENGTHS if t.ema_snapshots else ())])
        ema = PowerEMA(unet.parameters(), lengths).to(accelerator.device)
        ema.images_per_step = run.images_per_step  # for checkpoints of earlier versions, which count steps
        accelerator.register_for_checkpointing(ema)
    noise_scheduler = build_noise_scheduler(cfg.scheduler, t.sigma_data)
    ddpm = cfg.scheduler.parameterization == "ddpm"  # edm: continuous noise levels, weighted in train_step
    return TrainingParts(model, unet, optimizer, fused, lr_schedule, ema, noise_scheduler, run.images_per_step,
                         list(unet.parameters()), len(run.classes) if run.classes else None,
                         loss_weights(noise_scheduler, cfg, accelerator.device) if ddpm else None,
                         lognormal_boundaries(noise_scheduler, accelerator.device)
                         if ddpm and t.timestep_sampling == "lognormal" else None)


def apply_settings_after_load(parts: TrainingParts, cfg: Config) -> None:
    """load_state brings back the checkpoint's AdamW and EMA settings; the run's config (flags given on resume
    included, and recorded in config.json) is what trains."""
    t = cfg.training
    for group in parts.optimizer.param_groups:
        group.update(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    parts.lr_schedule.base_lrs = [t.learning_rate] * len(parts.optimizer.param_groups)


class LRCurve:
    """The LR multiplier at an optimizer step: over the segment [start, warmup, peak, end], a linear
    warm-up from 0 to `peak`, then the schedule's shape down to 0 at `end` (flat for the constant ones). The same
    numbers as diffusers' get_scheduler for a run's first segment; an extended run gets a new segment that starts
    where the LR is (extend), so its curve never jumps."""

    def __init__(self, kind: str, segment: list):
        self.kind, self.segment = kind, list(segment)

    def __call__(self, step: int) -> float:
        start, warmup, peak, end = self.segment
        step -= start
        if self.kind == "constant":
            return peak
        if step < warmup:
            return peak * (float(step) / float(max(1.0, warmup)))
        if self.kind == "constant_with_warmup":
            return peak
        span = end - start
        if self.kind == "linear":
            return peak * max(0.0, float(span - step) / float(max(1, span - warmup)))
        progress = float(step - warmup) / float(max(1, span - warmup))
        return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def extend(self, step: int, end: int, warmup: int) -> Optional[str]:
        """Move the end of the curve to `end` at optimizer step `step` without a jump; a notice, when it changes."""
        start, old_warmup, peak, old_end = self.segment
        if end == old_end or self.kind in ("constant", "constant_with_warmup") or step < start + old_warmup:
            self.segment[3] = end  # the curve so far does not depend on its end
            return None
        factor = self(step)
        if factor > 0:
            self.segment = [step, 0, factor, end]
            return f"LR schedule: {self.kind} from its current value at step {step} down to 0 at step {end}"
        warmup = max(1, min(warmup, (end - step) // 2))
        self.segment = [step, warmup, 1.0, end]
        return (f"LR schedule: the {self.kind} curve had reached 0 at step {step}; a new one warms up from 0 over "
                f"{warmup} steps and ends at step {end}")


def set_lr_position(lr_schedule, step: int) -> None:
    """Put the LR schedule at optimizer step `step` (after a resume), as if it had been stepped there."""
    lr_schedule.last_epoch = step
    lrs = [base * lr_schedule.lr_lambdas[0](step) for base in lr_schedule.base_lrs]
    for group, lr in zip(lr_schedule.optimizer.param_groups, lrs):
        group["lr"] = lr
    lr_schedule._last_lr = lrs


def loss_weights(noise_scheduler, cfg: Config, device: torch.device) -> Optional[torch.Tensor]:
    """The loss weight of each timestep, on the device (None: plain MSE), for the UNet's target (epsilon or v):
    - min_snr: min(SNR, gamma) / SNR for epsilon (/(SNR + 1) for v): less weight on the nearly clean timesteps, whose
      loss is easy and whose gradients otherwise dominate (Hang et al. 2023);
    - edm: Karras et al.'s lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0 error, written
      for the target: with sigma^2 = 1 / SNR, x0's error is sigma times epsilon's and sigma / sqrt(1 + sigma^2) times
      v's, so the weight is 1 + sigma^2 / sigma_data^2 on epsilon, (sigma_data^2 + sigma^2) / (sigma_data^2 (1 +
      sigma^2)) on v (1 for sigma_data 1: v-prediction is EDM's loss for data of unit variance)."""
    from diffusers.training_utils import compute_snr

    t = cfg.training
    snr = compute_snr(noise_scheduler, torch.arange(noise_scheduler.config.num_train_timesteps)).double()
    epsilon = cfg.scheduler.prediction_type == "epsilon"
    if t.loss_weighting == "edm":
        sigma2, data2 = 1 / snr, t.sigma_data ** 2
        weights = 1 + sigma2 / data2 if epsilon else (data2 + sigma2) / (data2 * (1 + sigma2))
    elif t.snr_gamma:
        weights = snr.clamp(max=t.snr_gamma) / (snr if epsilon else snr + 1)
    else:
        return None
    return weights.float().to(device)


def lognormal_boundaries(noise_scheduler, device: torch.device) -> torch.Tensor:
    """ln(sigma) half-way between neighbouring timesteps, sigma = sqrt((1 - alpha_bar) / alpha_bar) rising with t:
    torch.bucketize of a drawn ln(sigma) into them gives the timestep nearest to it (on the device, no host sync)."""
    alphas = noise_scheduler.alphas_cumprod.double()
    log_sigma = 0.5 * torch.log((1 - alphas) / alphas)
    return ((log_sigma[1:] + log_sigma[:-1]) / 2).float().to(device)


def edm_loss_weights(sigma: torch.Tensor, t: TrainingConfig) -> torch.Tensor:
    """--parameterization edm: the weight of each image's error in the denoised image D(x; sigma) (EDM's loss),
    by --loss_weighting:
    - min_snr: min(1 / sigma^2, snr_gamma), the min-SNR-gamma weight of the DDPM timestep of this sigma (SNR =
      1 / sigma^2) carried over to D's error; without --snr_gamma, 1 / sigma^2 (plain epsilon MSE). On the letters
      at 1,000 steps it beat EDM's own weight, 287 against 359 (bench/RESULTS.md);
    - edm: Karras et al.'s lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, which gives the UNet's
      own output a unit-weight loss at every sigma."""
    if t.loss_weighting == "edm":
        return (sigma ** 2 + t.sigma_data ** 2) / (sigma * t.sigma_data) ** 2
    inverse = 1 / sigma ** 2
    return inverse.clamp(max=t.snr_gamma) if t.snr_gamma else inverse


def drop_labels(labels: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
    """Each label replaced by the null class with probability p, drawn on the labels' device (no host sync): the
    images trained without their class teach the same model the unconditional prediction that guidance needs."""
    return torch.where(torch.rand(labels.shape, device=labels.device) < p, null_class, labels)


def train_step(batch, parts: TrainingParts, accelerator, cfg: Config, seed: int):
    """One micro-step: the diffusion loss and backward; every accumulation also a clipped AdamW step, the LR schedule
    and the EMA. Never waits for the GPU: every decision stays on the device. Returns the loss and, on optimizer steps,
    whether the step was skipped (a NaN/inf gradient, or the fp16 loss scaler's search) and whether it was skipped for a
    NaN/inf (an fp16 overflow with a finite loss is the scaler's search, not a NaN step); None on micro-steps."""
    seed_micro_step(seed, accelerator.device)
    model, optimizer, noise_scheduler = parts.model, parts.optimizer, parts.noise_scheduler
    batch, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)  # labels: class-conditional runs
    clean = to_model_input(batch, cfg.data.random_flip)
    if clean.is_cuda:
        clean = clean.contiguous(memory_format=torch.channels_last)
    noise = torch.randn_like(clean)
    edm = cfg.scheduler.parameterization == "edm"
    if edm:  # Karras et al.: x0 + sigma n at a log-normal sigma; the UNet sees c_in x at c_noise = ln(sigma) / 4
        t = cfg.training
        sigma = (t.lognormal_mean + t.lognormal_std * torch.randn(len(clean), device=clean.device)).exp()
        noisy = clean + sigma.view(-1, 1, 1, 1) * noise
        model_input = noise_scheduler.precondition_inputs(noisy, sigma.view(-1, 1, 1, 1))
        timesteps = noise_scheduler.precondition_noise(sigma)
    elif parts.sigma_boundaries is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),), device=clean.device)
    else:  # EDM's log-normal noise levels, each on the nearest timestep
        t = cfg.training
        log_sigma = t.lognormal_mean + t.lognormal_std * torch.randn(len(clean), device=clean.device)
        timesteps = torch.bucketize(log_sigma, parts.sigma_boundaries)
    if not edm:
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t} eps
        model_input = noisy
        velocity = cfg.scheduler.prediction_type == "v_prediction"
        target = noise_scheduler.get_velocity(clean, noise, timesteps) if velocity else noise
    if labels is not None:
        labels = drop_labels(labels, cfg.training.class_dropout, parts.null_class)
    finite = None
    with accelerator.accumulate(model):
        prediction = model(model_input, timesteps, class_labels=labels, return_dict=False)[0]
        if edm:  # the error of the denoised image c_skip x + c_out F, weighted by sigma
            denoised = noise_scheduler.precondition_outputs(noisy, prediction.float(), sigma.view(-1, 1, 1, 1))
            per_image = F.mse_loss(denoised, clean.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (per_image * edm_loss_weights(sigma, cfg.training)).mean()
        elif parts.loss_weights is None:
            loss = F.mse_loss(prediction.float(), target.float())
        else:
            per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (per_image * parts.loss_weights[timesteps]).mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(parts.ema_params, cfg.training.max_grad_norm or float("inf"))
            finite = torch.isfinite(grad_norm)  # what the GradScaler or the fused AdamW below decide on
            if accelerator.scaler is None and parts.fused:
                optimizer.optimizer.found_inf = (~finite).float()  # fused AdamW skips the step on the device
        if accelerator.scaler is not None or parts.fused or finite is None or bool(finite):  # bool: only without
            optimizer.step()  # a fused AdamW for this device (none on some backends), where it costs a sync
        optimizer.zero_grad(set_to_none=True)
    if finite is None:
        return loss.detach(), None, None
    # A skipped step still advances the LR schedule and the EMA, as in diffusers' example and EDM: holding them back
    # would need the flag on the host every step, a GPU sync. The weights did not change on such a step, so the EMA
    # only averages them once more, and the LR moves on by one step of thousands.
    parts.lr_schedule.step()
    if parts.ema is not None:
        parts.ema.step(parts.ema_params, parts.images_per_step)
    skipped = ~finite
    nonfinite = skipped & ~torch.isfinite(loss.detach()) if accelerator.scaler is not None else skipped
    return loss.detach(), skipped, nonfinite


# ---------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------


def previous_run_outputs(out: Path) -> list[Path]:
    """What a run writes into output_dir (old versions a crash left aside by files.replace_folder included)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if (name := p.name.removesuffix(OLD)) in RUN_OUTPUTS
                  or CHECKPOINT_NAME.match(name) or name.startswith("samples_epoch_"))


def saved_models(outputs: list[Path]) -> list[Path]:
    """The outputs that make a folder a run: a checkpoint, final_model/ or best_model/. A run that stopped before
    any of them (a crash in its first steps) left only its config.json, logs and pictures: a rerun replaces them."""
    return [p for p in outputs if (name := p.name.removesuffix(OLD)) in ("final_model", "best_model")
            or CHECKPOINT_NAME.match(name)]


def check_output_dir(cfg: Config) -> None:
    """Before any work: never mix a new run into an old one, and never train into a folder that cannot be made."""
    out = Path(cfg.training.output_dir).expanduser()
    held = saved_models(previous_run_outputs(out))
    if held and not cfg.training.resume_from_checkpoint and not cfg.training.overwrite_output_dir:
        resumable = any(CHECKPOINT_NAME.match(p.name.removesuffix(OLD)) for p in held)
        raise UserError(f"output_dir {out} already holds a run ({', '.join(p.name for p in held[:3])}...); "
                        + ("continue it with --resume_from_checkpoint latest, " if resumable else "")
                        + "start over with --overwrite_output_dir, or pick another --output_dir")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"output_dir {out} is not writable ({existing} is not a writable folder); pass a "
                        f"writable --output_dir")


def prepare_output_dir(cfg: Config) -> Path:
    """Create output_dir, clearing a previous run's outputs when --overwrite_output_dir asks for it."""
    out = Path(cfg.training.output_dir).expanduser()
    if not cfg.training.resume_from_checkpoint:
        previous = previous_run_outputs(out)
        if previous and not cfg.training.overwrite_output_dir:  # check_output_dir let only a failed start through
            print(f"notice: {out} held what a run that saved no checkpoint wrote ("
                  f"{', '.join(p.name for p in previous[:3])}); starting afresh there")
        for old in previous:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir {out} is not writable ({e.strerror}); pass a writable --output_dir") from None
    return out


class GraphView(torch.nn.Module):
    """The UNet with plain tensor outputs, as TensorBoard's graph tracer needs."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, class_labels=None):
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]


def log_graph(writer, unet, channels: int, size: int) -> None:
    sample = torch.zeros(1, channels, size, size, device=unet.device)
    timestep = torch.zeros(1, dtype=torch.long, device=unet.device)
    inputs = (sample, timestep) + ((timestep,) if unet.config.num_class_embeds else ())  # class 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            writer.add_graph(GraphView(unet).eval(), inputs)
        except Exception as e:  # the graph is a nicety; never let it stop training
            print(f"notice: the model graph was not logged ({e.__class__.__name__})")
    unet.train()


PREVIEW_CLASSES = 16  # a class-conditional run's previews show at most this many classes, a row each


def preview_layout(t: TrainingConfig, num_classes: int) -> tuple[list[int], Optional[list[int]], Optional[int]]:
    """The previews' seeds, and for a class-conditional run their classes and row length: a row per class (at most
    PREVIEW_CLASSES, chosen by the run's seed), the same seeds in every row, so a column shows one noise in each
    class; at least 2 per row, num_preview_images in all when the classes allow."""
    if not num_classes:
        return list(range(t.num_preview_images)), None, None
    generator = torch.Generator().manual_seed(t.seed)
    shown = sorted(torch.randperm(num_classes, generator=generator)[:PREVIEW_CLASSES].tolist())
    columns = max(2, math.ceil(t.num_preview_images / len(shown)))
    return list(range(columns)) * len(shown), [c for c in shown for _ in range(columns)], columns


def draw_previews(accelerator, unet, ema, cfg: Config, noise_scheduler, path: Path, tag: str, step: int):
    """Sample the preview grid with the EMA weights (main process; the others wait); a class-conditional run's with
    the default guidance, a row per class."""
    from sampling import for_model, generate, image_grid, make_sampler, save_grid

    if accelerator.is_main_process:
        sampler = make_sampler(cfg.training.sample_scheduler, noise_scheduler.config)
        rows = unet.config.num_class_embeds
        seeds, labels, columns = preview_layout(cfg.training, rows - 1 if rows else 0)
        with ema_weights(ema, unet), accelerator.autocast():
            unet.eval()
            images = generate(unet, sampler, seeds, cfg.training.sample_num_inference_steps,
                              batch_size=len(seeds), desc=f"preview {path.name}", guidance=for_model(unet, labels))
            unet.train()
        save_grid(images, path, columns, display_size=cfg.training.display_size)
        log_image(accelerator, tag, image_grid(images, columns), step)
    accelerator.wait_for_everyone()


def log_image(accelerator, tag: str, grid: torch.Tensor, step: int) -> None:
    """One grid ([3,H,W] in [0, 1], native size: the trackers' viewers zoom) to every tracker of the run through its
    own image call (accelerate's log_images exists for TensorBoard and W&B only); other trackers get none."""
    from sampling import to_hwc, to_uint8

    pixels = to_hwc(to_uint8(grid.cpu()))  # H x W x 3 uint8, what W&B, MLflow and Comet take
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: grid[None]}, step)
        elif tracker.name == "wandb":
            tracker.log_images({tag: [pixels]}, step)
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_image(pixels, key=tag, step=step)
        elif tracker.name == "comet_ml":
            tracker.tracker.log_image(pixels, name=tag, step=step)


def save_final_model(accelerator, unet, ema, noise_scheduler, out: Path, record: dict) -> None:
    """final_model/: a diffusers pipeline with the EMA weights (model.save_model: DDPMPipeline.from_pretrained loads a
    default run, DiffusionPipeline.from_pretrained any)."""
    if accelerator.is_main_process:
        with atomic_folder(out / "final_model") as tmp, ema_weights(ema, unet):
            save_model(tmp, unet, noise_scheduler, record)
    accelerator.wait_for_everyone()


def precision_name(precision: str) -> str:
    """accelerate's mixed_precision value as a person reads it: fp32, bf16 or fp16."""
    return "fp32" if precision == "no" else precision


def warn_if_long_on_cpu(device: torch.device, steps_left: int, seconds_per_step: float) -> None:
    """One line, when the steps left of a CPU run would take over LONG_CPU_RUN_S at the speed measured so far."""
    from tqdm.auto import tqdm

    seconds = steps_left * seconds_per_step
    if device.type != "cpu" or seconds <= LONG_CPU_RUN_S:
        return
    hours = seconds / 3600
    duration = f"{hours:.1f} hours" if hours < 48 else f"{hours / 24:.0f} days"
    tqdm.write(f"notice: at this speed the {steps_left} steps left take about {duration} on the CPU; for a quick "
               f"look on a CPU try: python train_ddpm.py --model_preset quickstart")


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def start_processes(cfg: Config):
    """Stage 1: this process among the run's (accelerate launch, torchrun: one per GPU, or CPU processes), on its
    device, and a seed drawn for all of them (used when --seed is none)."""
    from accelerate.utils import broadcast_object_list

    from sampling import process_state

    state = process_state(cfg.training.ddp_timeout)
    if state.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return state, broadcast_object_list([secrets.randbits(31)])[0]


def agree_on_checkpoint(cfg: Config, state) -> Optional[Path]:
    """Stage 1, resuming: the checkpoint that every process loads. parse_config found it on each process before they
    met. Now the main process puts back what a crash left renamed aside (files.restore_interrupted), then tells the
    others its choice; each checks that it found the same one and sees it whole. Processes on machines that do not
    share output_dir, or whose network file system does not show them the newest checkpoint yet, stop the run with
    one error, where they would have resumed from another checkpoint than the rest and hung."""
    from accelerate.utils import broadcast_object_list, gather_object

    wanted = cfg.training.resume_from_checkpoint
    if not wanted:
        return None
    checkpoint = Path(wanted)
    if state.is_main_process:
        for path in (checkpoint, *previous_run_outputs(Path(cfg.training.output_dir).expanduser())):
            restore_interrupted(path.with_name(path.name.removesuffix(OLD)))
    if state.num_processes == 1:
        return checkpoint
    chosen = broadcast_object_list([wanted])[0]  # sent once the main process has put everything back
    seen = wanted == chosen and (checkpoint / "progress.json").exists()
    views = gather_object([(state.process_index, socket.gethostname(), wanted, seen)])
    apart = [(rank, host, theirs) for rank, host, theirs, ok in views if not ok]
    if apart and state.is_main_process:
        raise UserError(f"processes {', '.join(f'{rank} ({host})' for rank, host, _ in apart)} do not see {chosen} "
                        f"as the checkpoint to resume (they found {sorted({theirs for _, _, theirs in apart})}): a run "
                        f"on several machines needs an output_dir that all of them share and see up to date (README); "
                        f"start it again, or pass --resume_from_checkpoint with a checkpoint folder")
    if apart:
        raise SystemExit(config_module.EXIT_USER_ERROR)  # the main process prints why
    return checkpoint


def load_inputs(cfg: Config, state):
    """Stage 2: everything the run reads, and that can fail, before anything is written: the dataset (downloaded
    and cached once per machine: its local main process first, the others then open the same cache file), the
    pretrained UNet of a fine-tune, and for --eval_epochs the Inception weights and the reference statistics."""
    from sampling import first_alone

    t = cfg.training
    dataset = first_alone(state, lambda: load_dataset(t.dataset_name, t.image_size, cfg.data,
                                                      progress=state.is_local_main_process), local=True)
    if t.class_conditional:
        check_classes(cfg, dataset)
    # A resumed fine-tune gets its weights from the checkpoint; its config holds the pretrained architecture.
    pretrained = None  # the SavedModel: its UNet and the noise schedule it learned
    if t.pretrained_model_path and not t.resume_from_checkpoint:
        pretrained = load_model(t.pretrained_model_path, flag="--pretrained_model_path")
    evaluation = Evaluation(cfg, state, dataset) if t.eval_epochs else None
    return dataset, pretrained, evaluation


def check_classes(cfg: Config, dataset) -> None:
    """A class-conditional run needs labelled data, and a resumed one the classes its checkpoint was trained on."""
    t = cfg.training
    if dataset.classes is None:
        raise UserError(f"--class_conditional needs labels, and {dataset.meta.get('source')} has none: put each "
                        f"class's images in a sub-folder of its own (as torchvision's ImageFolder reads them), or "
                        f"name a Hugging Face dataset's class column with --label_column")
    if t.resume_from_checkpoint:
        saved = read_json(Path(t.resume_from_checkpoint) / "config.json").get("_provenance", {}).get("classes")
        if saved != dataset.classes:
            raise UserError(f"the data's classes ({len(dataset.classes)}: {', '.join(dataset.classes[:5])}...) are not "
                            f"the {len(saved or ())} the checkpoint was trained on; resume on the same classes, or "
                            f"start a new run from its weights with --pretrained_model_path")


def start_accelerator(run: Resolved, state, dataset):
    """Stage 4: the Accelerator (precision, accumulation, compile, the --report_to trackers) and this process's share
    of the data."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    t, out = run.cfg.training, Path(run.cfg.training.output_dir).expanduser()
    accelerator = Accelerator(
        cpu=state.device.type == "cpu", mixed_precision=run.precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps, log_with=t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # The batch copy does not wait for the GPU (from pinned memory, pin_memory below).
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        step_scheduler_with_optimizer=False, dynamo_backend="inductor" if run.compile else "no")
    batches = Labelled(dataset) if run.classes else dataset  # a class-conditional run's batches carry their labels
    loader, order = make_dataloader(batches, t.train_batch_size, run.num_processes, t.seed,
                                    run.cfg.data.dataloader_num_workers, pin_memory=state.device.type == "cuda")
    loader = accelerator.prepare(loader)
    assert math.ceil(len(loader) / t.gradient_accumulation_steps) == run.steps_per_epoch
    return accelerator, loader, order


def resume(accelerator, parts: TrainingParts, run: Resolved, checkpoint: Path) -> Progress:
    """Stage 5: the checkpoint's training state, with this run's settings applied over it. A changed data layout
    (processes, batch size, accumulation) cannot continue mid-epoch, so it starts at the next epoch."""
    cfg, t, main = run.cfg, run.cfg.training, accelerator.is_main_process
    progress = load_checkpoint(accelerator, checkpoint, parts.ema)
    apply_settings_after_load(parts, cfg)
    notices = [f"resumed from {checkpoint} at step {progress.global_step} (epoch {progress.epoch + 1}, batch "
               f"{progress.batches_in_epoch})"]
    layout = {"processes": accelerator.num_processes, "train_batch_size": t.train_batch_size,
              "gradient_accumulation_steps": t.gradient_accumulation_steps}
    saved = saved_layout(checkpoint)
    if layout != saved:
        changes = ", ".join(f"{k} {saved[k]} -> {layout[k]}" for k in layout if layout[k] != saved[k])
        if progress.batches_in_epoch:
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
            notices.append(f"notice: {changes}: the batches of the rest of the interrupted epoch would differ, so "
                           f"training continues at the start of epoch {progress.epoch + 1}")
        else:
            notices.append(f"notice: {changes}; training continues at the start of epoch {progress.epoch + 1}")
    curve = parts.lr_schedule.lr_lambdas[0]
    if progress.lr_segment:
        curve.segment = list(progress.lr_segment)
    else:  # a checkpoint older than lr_segment: its run's one curve, which ended where that run was to end
        saved_run = read_json(checkpoint / "config.json")["training"]
        curve.segment[3] = saved_run["max_train_steps"] or saved_run["num_epochs"] * run.steps_per_epoch
    notices.append(curve.extend(progress.global_step, run.total_steps, t.lr_warmup_steps))
    set_lr_position(parts.lr_schedule, progress.global_step)
    for line in filter(None, notices):
        if main:
            print(line)
    return progress


def start_outputs(accelerator, run: Resolved, record: dict, progress: Progress, dataset, parts: TrainingParts):
    """Stage 6, once everything has loaded: the output folder (a previous run's outputs cleared when
    --overwrite_output_dir asks), config.json, the trackers (hyper-parameters, and for a new run the training images;
    TensorBoard also the config as text and the model graph)."""
    from sampling import image_grid, save_grid

    cfg, t = run.cfg, run.cfg.training
    out = prepare_output_dir(cfg) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    write_json(out / "config.json", record)
    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
               for section in dataclasses.asdict(cfg).values() for k, v in section.items()}
    accelerator.init_trackers("ddpm", config=hparams)
    tensorboard = next((tracker.tracker for tracker in accelerator.trackers if tracker.name == "tensorboard"), None)
    if tensorboard is not None:  # what only TensorBoard shows: the whole record as text, and the graph
        tensorboard.add_text("config", "```\n" + json.dumps(record, indent=2, default=str) + "\n```",
                             progress.global_step)
    if not t.resume_from_checkpoint:
        shown = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(t.seed))
        first = dataset.__getitems__(sorted(shown[: t.num_preview_images].tolist())).float() / 255
        save_grid(first, out / "sample_training_data.png", display_size=t.display_size)
        log_image(accelerator, "training_data", image_grid(first), 0)
        if tensorboard is not None:
            log_graph(tensorboard, parts.unet, first.shape[1], t.image_size)


def train(cfg: Config) -> int:
    from tqdm.auto import tqdm

    # --- 1. Processes and seed -----------------------------------------------------------------------
    state, drawn_seed = start_processes(cfg)
    resumed_from = agree_on_checkpoint(cfg, state)
    main, device = state.is_main_process, state.device
    # --- 2. Inputs: data, pretrained weights, Inception (nothing written yet) ------------------------
    dataset, pretrained, evaluation = load_inputs(cfg, state)
    # --- 3. The resolved config: every "auto" and derived value, once ---------------------------------
    t = cfg.training
    run = config_module.resolve(
        cfg, count_parameters, channels=dataset.channels, num_processes=state.num_processes, seed=drawn_seed,
        batches_per_epoch=batches_per_epoch(len(dataset), t.train_batch_size, state.num_processes),
        pretrained=pretrained.unet.config if pretrained is not None else None,
        pretrained_schedule=pretrained.schedule if pretrained is not None else None,
        pretrained_time_phase=time_phase_read(pretrained.unet, pretrained.schedule["num_train_timesteps"])
        if pretrained is not None else None, device_type=device.type,
        native_bf16=native_bf16(device), classes=dataset.classes)
    cfg, t, out, total_steps = run.cfg, run.cfg.training, Path(run.cfg.training.output_dir).expanduser(), run.total_steps
    if main:
        print("\n".join([*run.notices, dataset.describe(cfg.data.random_flip, t.class_conditional)]))
        if run.chosen:
            print("auto: " + ", ".join(f"{name} {value:g}" for name, value in run.chosen.items()) +
                  f" (for {run.num_parameters / 1e6:.1f}M parameters and {total_steps} steps; pass a value to "
                  f"override)")
    # --- 4. Accelerator, loader, model, EMA, optimizer, LR schedule ----------------------------------
    accelerator, loader, order = start_accelerator(run, state, dataset)
    parts = build_training(run, accelerator, pretrained.unet if pretrained is not None else None)
    unet, ema, noise_scheduler = parts.unet, parts.ema, parts.noise_scheduler
    pipeline = (unet, ema, noise_scheduler)
    record = config_module.config_record(cfg, seed=t.seed, channels=run.channels, num_processes=run.num_processes,
                                         mixed_precision=run.precision, device=str(device),
                                         dataset_images=len(dataset),
                                         **(dict(classes=list(run.classes), class_counts=dataset.class_counts())
                                            if run.classes else {}))
    # --- 5. Resume -----------------------------------------------------------------------------------
    progress = Progress()
    if resumed_from:
        progress = resume(accelerator, parts, run, resumed_from)
        if main and ema is not None:  # snapshots of an abandoned branch, or of steps this run trains again
            drop_snapshots_after(out / SNAPSHOT_FOLDER, ema.images)
    # --- 6. Outputs and logging ----------------------------------------------------------------------
    start_outputs(accelerator, run, record, progress, dataset, parts)
    if main:
        print(f"training on {len(dataset)} images, {run.num_processes} process(es) on {device.type}, "
              f"{precision_name(run.precision)}: {total_steps} optimizer steps of {t.train_batch_size} x "
              f"{run.num_processes} x {t.gradient_accumulation_steps} images; outputs in {out}")

    # --- 7. The loop ---------------------------------------------------------------------------------
    def save(name: str) -> Path:
        progress.skipped_steps = window.skipped_steps()
        progress.lr_segment = parts.lr_schedule.lr_lambdas[0].segment
        return save_checkpoint(accelerator, out, name, progress, record, pipeline, t.checkpoints_total_limit)

    def snapshot_due() -> bool:
        """A post-hoc EMA snapshot every total_steps / ema_snapshots optimizer steps, and at the end."""
        every = max(1, total_steps // t.ema_snapshots) if t.ema_snapshots and ema is not None else 0
        return bool(every) and (progress.global_step % every == 0 or progress.global_step == total_steps)

    signals = StopSignal()
    window = LogWindow(accelerator, skipped_before=progress.skipped_steps)
    estimated = False  # whether the time to the end was estimated yet (once, from the first logged steps)
    bar = tqdm(total=total_steps, initial=progress.global_step, desc="training", unit="step", disable=not main)
    stop_reason: Optional[str] = None
    saved_at: Optional[int] = progress.global_step if resumed_from else None  # the step of the newest checkpoint
    while progress.global_step < total_steps and not stop_reason:
        order.start_epoch(progress.epoch)
        skip = progress.batches_in_epoch  # after a resume: batches of this epoch already trained on, not loaded
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            seed = step_seed(t.seed, progress.epoch, progress.batches_in_epoch, accelerator.process_index)
            loss, skipped, nonfinite = train_step(batch, parts, accelerator, cfg, seed)
            progress.batches_in_epoch += 1
            window.add(loss, skipped, nonfinite)
            if skipped is None:  # a micro-step inside gradient accumulation
                continue
            progress.global_step += 1
            bar.update(1)
            if main and snapshot_due():
                ema.snapshot(out / SNAPSHOT_FOLDER, [name for name, _ in unet.named_parameters()])
            # Stop decisions are taken at log steps only, where every process reads the same numbers.
            if progress.global_step % t.logging_steps == 0 or progress.global_step == total_steps:
                stats = window.read(signals.signum, t.train_batch_size)  # the loop's only collective
                progress.nonfinite_steps += stats["nonfinite"]
                lr = parts.lr_schedule.get_last_lr()[0]
                accelerator.log({"train/loss": stats["loss"], "train/lr": lr, "train/img_per_s": stats["img_per_s"],
                                 "train/nonfinite_steps": progress.nonfinite_steps}, step=progress.global_step)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{stats['img_per_s']:.0f}")
                if main and not estimated:
                    estimated = True
                    warn_if_long_on_cpu(device, total_steps - progress.global_step,
                                        run.images_per_step / stats["img_per_s"])
                if stats["in_a_row"] >= t.max_nonfinite_steps:
                    stop_reason = "nonfinite"
                elif stats["signal"]:
                    stop_reason = "signal"
            if stop_reason or (t.checkpointing_steps and progress.global_step % t.checkpointing_steps == 0):
                saved = save(f"checkpoint-step-{progress.global_step}")
                saved_at = progress.global_step
            if stop_reason:
                signals.signum = signals.signum or signal.SIGTERM
                report_stop(stop_reason, signals.signum, saved, progress, t, main)
                break
            if progress.global_step >= total_steps:
                break
        if not stop_reason and progress.batches_in_epoch == len(loader):  # the epoch ran to its end
            progress.epoch += 1
            progress.batches_in_epoch = 0
            epoch = progress.epoch  # 1-based in file names, as in the README
            if epoch % t.save_image_epochs == 0:
                draw_previews(accelerator, unet, ema, cfg, noise_scheduler, out / f"samples_epoch_{epoch}.png",
                              "samples", progress.global_step)
            if evaluation and epoch % t.eval_epochs == 0:
                with ema_weights(ema, unet):
                    evaluation(accelerator, unet, noise_scheduler, progress.global_step, record)
            if epoch % t.save_model_epochs == 0:
                save(f"checkpoint-epoch-{epoch}")
                saved_at = progress.global_step
    bar.close()

    # --- 8. Final checkpoint, model and samples ------------------------------------------------------
    if not stop_reason:
        if saved_at != progress.global_step:  # so that extending the run starts from its end
            save(f"checkpoint-step-{progress.global_step}")
        save_final_model(accelerator, unet, ema, noise_scheduler, out, record)
        draw_previews(accelerator, unet, ema, cfg, noise_scheduler, out / "final_samples.png", "final_samples",
                      progress.global_step)
        if main:
            print(f"done: {progress.global_step} steps; the model is in {out / 'final_model'}")
    accelerator.end_training()
    if stop_reason == "nonfinite":
        return EXIT_NONFINITE
    return 128 + signals.signum if stop_reason == "signal" else 0


class Evaluation:
    """FID and KID of the EMA weights during training (--eval_epochs), against the training set (metrics.py);
    keeps best_model/ by FID.

    Built before anything is written, so that missing Inception weights stop the run before it trains; called with
    the EMA weights swapped in. Every process generates its share of the images; the main process scores, logs
    and saves."""

    def __init__(self, cfg: Config, state, dataset):
        from metrics import load_inception, reference_statistics
        from sampling import first_alone

        self.cfg, self.best_dir = cfg, Path(cfg.training.output_dir).expanduser() / "best_model"
        main = state.is_main_process

        def load():  # on the main process first: the weights download once
            inception = load_inception(cfg.training.inception_weights, state.device, progress=main)
            return inception, reference_statistics(dataset, inception, state.device, main) if main else None

        self.inception, self.reference = first_alone(state, load)
        self.class_counts = dataset.class_counts() if cfg.training.class_conditional else None
        self.best_fid = math.inf
        if (self.best_dir / "metrics.json").exists():  # a resumed run competes with its earlier best
            self.best_fid = read_json(self.best_dir / "metrics.json")["fid"]

    def __call__(self, accelerator, unet, noise_scheduler, step: int, record: dict) -> None:
        from tqdm.auto import tqdm

        from config import DEFAULT_GUIDANCE_SCALE
        from metrics import describe, generated_features, score
        from sampling import classes_by_seed, make_sampler

        t = self.cfg.training
        sampler = make_sampler(t.sample_scheduler, noise_scheduler.config)
        seeds = list(range(t.eval_num_images))
        counts = self.class_counts  # a class-conditional model draws its classes in proportion to the data
        labels = classes_by_seed(seeds, counts, len(counts)) if counts else None
        unet.eval()
        with accelerator.autocast():
            features, _, _ = generated_features(unet, sampler, seeds, t.sample_num_inference_steps,
                                                TRAINING_EVAL_BATCH, unet.dtype, 0.0, self.inception, accelerator,
                                                desc=f"evaluating at step {step}", labels=labels,
                                                guidance_scale=DEFAULT_GUIDANCE_SCALE)
        unet.train()
        if accelerator.is_main_process:
            result = score(self.reference, features)
            accelerator.log({"eval/fid": result["fid"], **({"eval/kid": result["kid_mean"]} if "kid_mean" in result
                                                           else {})}, step=step)
            best = result["fid"] < self.best_fid
            if best:  # best_model/: a DDPMPipeline like final_model/, with metrics.json; replaced whole or not at all
                self.best_fid = result["fid"]
                with atomic_folder(self.best_dir) as tmp:
                    save_model(tmp, unet, noise_scheduler, record)
                    write_json(tmp / "metrics.json", {**result, "step": step})
            tqdm.write(f"eval at step {step} ({t.eval_num_images} images, {t.sample_scheduler} "
                       f"{t.sample_num_inference_steps} steps): {describe(result)}"
                       + ("; the best so far, saved as best_model/" if best else ""))
        accelerator.wait_for_everyone()


class LogWindow:
    """Loss and NaN/inf counts since the last log, and skipped steps since the start, kept on the device so steps never
    wait for the GPU: read at log steps (read) and saves (skipped_steps) only."""

    def __init__(self, accelerator, skipped_before: int = 0):
        self.accelerator = accelerator
        device = accelerator.device
        self.loss_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), device=device)
        self.in_a_row = torch.zeros((), device=device)
        self.skipped = torch.full((), skipped_before, device=device)  # on this process: the main one saves it
        self.batches, self.started = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, skipped: Optional[torch.Tensor], nonfinite: Optional[torch.Tensor]) -> None:
        self.loss_sum += loss
        self.batches += 1
        if skipped is not None:
            self.skipped += skipped
            self.nonfinite += nonfinite
            self.in_a_row = (self.in_a_row + 1) * nonfinite

    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (NaN/inf or the fp16 scaler's search): a sync, for saves only."""
        return int(self.skipped)

    def read(self, signum: Optional[int], batch_size: int) -> dict:
        """Average over processes and reset the window (a collective: every process calls it together)."""
        n = self.accelerator.num_processes
        signalled = torch.tensor(float(bool(signum)), device=self.loss_sum.device)
        values = torch.stack([self.loss_sum / self.batches, self.nonfinite, self.in_a_row, signalled])
        loss, nonfinite, in_a_row, signal_share = self.accelerator.reduce(values, "mean").tolist()
        seconds = time.perf_counter() - self.started
        stats = {"loss": loss, "nonfinite": round(nonfinite), "in_a_row": round(in_a_row), "signal": signal_share > 0,
                 "img_per_s": self.batches * batch_size * n / seconds}
        self.loss_sum.zero_(), self.nonfinite.zero_()
        self.batches, self.started = 0, time.perf_counter()
        return stats


def report_stop(reason: str, signum: Optional[int], path: Path, progress: Progress, t: TrainingConfig,
                main: bool) -> None:
    if not main:
        return
    if reason == "nonfinite":
        print(f"error: {t.max_nonfinite_steps} optimizer steps in a row had a NaN/inf loss or gradient, so training "
              f"stopped at step {progress.global_step}; the last good weights are in {path}. Try a lower "
              f"--learning_rate, --mixed_precision bf16 (or no), or a smaller --max_grad_norm.", file=sys.stderr)
    else:
        print(f"stopped by {signal.Signals(signum).name} at step {progress.global_step}; saved {path}. Continue "
              f"with: python train_ddpm.py --output_dir {t.output_dir} --resume_from_checkpoint latest",
              file=sys.stderr)


def dry_run(cfg: Config) -> int:
    """--dry_run: the config resolved as far as it can be without reading the data, printed as JSON."""
    t = cfg.training
    fine_tune = t.pretrained_model_path and not t.resume_from_checkpoint
    saved = load_model(t.pretrained_model_path, "--pretrained_model_path") if fine_tune else None
    pretrained = saved.unet.config if saved else None
    run = config_module.resolve(cfg, count_parameters, pretrained=pretrained,
                                pretrained_schedule=saved.schedule if saved else None,
                                pretrained_time_phase=time_phase_read(saved.unet, saved.schedule["num_train_timesteps"])
                                if saved else None, channels=pretrained and pretrained["in_channels"])
    print(json.dumps(dataclasses.asdict(run.cfg), indent=2))
    return 0


def start(argv: Optional[list[str]]) -> int:
    cfg, dry = parse_config(argv)
    if dry:
        return dry_run(cfg)
    check_output_dir(cfg)
    return train(cfg)


def main(argv: Optional[list[str]] = None) -> int:
    return config_module.exit_code(lambda: start(argv))


if __name__ == "__main__":
    sys.exit(main())
