"""Train a DDPM (diffusers UNet2DModel + DDPMScheduler) on CIFAR-10, MNIST, a folder or ZIP of images, or a
Hugging Face dataset (Hub id, save_to_disk folder or parquet files).

    python train_ddpm.py                                   # README defaults (config.py)
    python train_ddpm.py --dataset_name mnist --image_size 32 --num_epochs 5
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
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import config as config_module
from config import Config, DataConfig, ModelConfig, SchedulerConfig, TrainingConfig, UserError
from checkpoint import (CHECKPOINT_NAME, Progress, ema_weights, find_checkpoint, load_checkpoint, read_json,
                        register_wrapper_free_weights, save_checkpoint, save_pipeline, saved_layout,
                        strip_wrapper_prefixes, write_json)
from dataset import load_dataset, make_dataloader, source_kind, to_model_input
from evaluate import TrainingEvaluator, validate_training as validate_evaluation

RUN_OUTPUTS = ("logs", "final_model", "config.json", "sample_training_data.png", "final_samples.png", "best_model")
EXIT_USER_ERROR, EXIT_NONFINITE = 2, 3
LONG_CPU_RUN_S = 3600  # a CPU run estimated to take longer gets a hint towards a small preset


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------

SECTIONS = (TrainingConfig, DataConfig, ModelConfig, SchedulerConfig)
EXTRA_FLAGS = (("--dry_run", dict(action="store_true", help="print the resolved config as JSON and stop")),)


def default_values() -> dict[str, object]:
    """The defaults as config.py sets them (its module-level instances, which users may edit)."""
    return config_module.flat_fields(config_module.training_config, config_module.data_config,
                                     config_module.model_config, config_module.scheduler_config)


def parse_config(argv: Optional[list[str]] = None) -> tuple[Config, bool]:
    """The resolved config. When resuming, the checkpoint's config is the base that flags override."""
    defaults = default_values()
    prog, doc = "train_ddpm.py", __doc__
    values, options = config_module.parse_cli(argv, prog, doc, defaults, SECTIONS, config_module.PRESETS, EXTRA_FLAGS)
    cfg = config_module.build(Config, values)
    if cfg.training.resume_from_checkpoint:
        checkpoint = find_checkpoint(cfg.training.output_dir, cfg.training.resume_from_checkpoint)
        base = {**defaults, **config_module.read_config_file(checkpoint / "config.json", SECTIONS)}
        values, options = config_module.parse_cli(argv, prog, doc, base, SECTIONS, config_module.PRESETS, EXTRA_FLAGS)
        refuse_changes_on_resume(base, values)
        cfg = config_module.build(Config, values)
        cfg.training.resume_from_checkpoint = str(checkpoint)  # "latest" resolved once, and recorded as a path
    if cfg.data.random_flip is None:  # mirrored letters or digits are wrong samples; CIFAR-10's objects are not
        cfg.data.random_flip = cfg.training.dataset_name == "cifar10"
    validate(cfg)
    return cfg, getattr(options, "dry_run", False)


# What a checkpoint's weights and optimizer were built for: a resumed run keeps them (other flags take effect).
FIXED_ON_RESUME = (*(f.name for f in dataclasses.fields(ModelConfig)), "image_size", "num_channels", "use_ema",
                   "pretrained_model_path", "freeze_down_blocks", "lr_scheduler", "lr_warmup_steps")


def refuse_changes_on_resume(saved: dict[str, object], wanted: dict[str, object]) -> None:
    changed = [name for name in FIXED_ON_RESUME if wanted[name] != saved[name]]
    if changed:
        name = changed[0]
        shown = " ".join(map(str, saved[name])) if isinstance(saved[name], tuple) else saved[name]
        raise UserError(f"--{name} cannot change when resuming (the checkpoint has {shown}); leave it out, or start a "
                        f"new run from this checkpoint's weights with --pretrained_model_path")


def validate(cfg: Config) -> None:
    """Catch the user's mistakes before any work is done."""
    t, m, s = cfg.training, cfg.model, cfg.scheduler
    at_least_one = dict(image_size=t.image_size, train_batch_size=t.train_batch_size, num_epochs=t.num_epochs,
                        gradient_accumulation_steps=t.gradient_accumulation_steps, logging_steps=t.logging_steps,
                        save_image_epochs=t.save_image_epochs, save_model_epochs=t.save_model_epochs,
                        num_preview_images=t.num_preview_images, layers_per_block=m.layers_per_block,
                        sample_num_inference_steps=t.sample_num_inference_steps, norm_num_groups=m.norm_num_groups,
                        num_train_timesteps=s.num_train_timesteps, max_nonfinite_steps=t.max_nonfinite_steps,
                        max_train_steps=t.max_train_steps, checkpointing_steps=t.checkpointing_steps,
                        checkpoints_total_limit=t.checkpoints_total_limit, attention_head_dim=m.attention_head_dim)
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            optional = config_module.flags_of(*SECTIONS)[name].optional
            raise UserError(f"--{name} must be at least 1{' (or none)' if optional else ''}, got {value}")
    positive = dict(learning_rate=t.learning_rate, adam_epsilon=t.adam_epsilon, beta_start=s.beta_start,
                    snr_gamma=t.snr_gamma, ema_inv_gamma=t.ema_inv_gamma)
    for name, value in positive.items():
        if value not in (None, "auto") and not value > 0:
            raise UserError(f"--{name} must be positive, got {value}")
    in_range = dict(lr_warmup_steps=(t.lr_warmup_steps, 0, None), adam_weight_decay=(t.adam_weight_decay, 0, None),
                    max_grad_norm=(t.max_grad_norm, 0, None), adam_beta1=(t.adam_beta1, 0, 1),
                    adam_beta2=(t.adam_beta2, 0, 1), dropout=(m.dropout, 0, 1), ema_max_decay=(t.ema_max_decay, 0, 1),
                    beta_end=(s.beta_end, s.beta_start, 1), display_size=(t.display_size, 0, None))
    for name, (value, low, high) in in_range.items():  # low <= value < high
        if value != "auto" and not (value >= low and (high is None or value < high)):
            bounds = f"at least {low}" if high is None else f"in [{low}, {high})"
            raise UserError(f"--{name} must be {bounds}, got {value}")
    validate_evaluation(t)
    if t.sample_num_inference_steps > s.num_train_timesteps:
        raise UserError(f"--sample_num_inference_steps {t.sample_num_inference_steps} exceeds the "
                        f"{s.num_train_timesteps} training timesteps; lower it")
    if cfg.data.dataloader_num_workers < -1:
        raise UserError(f"--dataloader_num_workers must be -1 (auto) or at least 0, got "
                        f"{cfg.data.dataloader_num_workers}")
    if t.freeze_down_blocks and not t.pretrained_model_path:
        raise UserError("--freeze_down_blocks needs --pretrained_model_path (freezing untrained weights is pointless)")
    kind = source_kind(t.dataset_name)
    if kind in ("custom", "parquet") and not cfg.data.dataset_path:
        what = "a folder or .zip of images" if kind == "custom" else "a .parquet file, a folder of them or a glob"
        raise UserError(f"--dataset_name {kind} needs --dataset_path: {what}")
    images = Path(cfg.data.dataset_path or "").expanduser()
    if kind == "custom" and not (images.is_dir() or images.is_file() and zipfile.is_zipfile(images)):
        raise UserError(f"dataset_path {cfg.data.dataset_path} is not a folder or a ZIP archive; pass --dataset_path "
                        f"pointing at your images")
    if t.pretrained_model_path and not t.resume_from_checkpoint:  # the pretrained model's architecture, checked later
        return
    levels = len(m.block_out_channels)
    if not len(m.down_block_types) == len(m.up_block_types) == levels:
        raise UserError(f"block_out_channels, down_block_types and up_block_types must have the same length, got "
                        f"{levels}, {len(m.down_block_types)} and {len(m.up_block_types)}; give one of each per level")
    if t.image_size % 2 ** (levels - 1):
        raise UserError(f"--image_size {t.image_size} cannot be halved {levels - 1} times by a UNet of {levels} levels; "
                        f"use a multiple of {2 ** (levels - 1)} or fewer --block_out_channels")
    bad_groups = [c for c in m.block_out_channels if c % m.norm_num_groups]
    if bad_groups:
        raise UserError(f"--norm_num_groups {m.norm_num_groups} does not divide block_out_channels {bad_groups}; "
                        f"use channels that are multiples of it or a smaller --norm_num_groups")


README_UNET_PARAMETERS = 113_673_219  # the README's default UNet (config.py), whose learning rate is 1e-4


def auto_learning_rate(num_parameters: int) -> float:
    """1e-4 x (113.7M / parameters) ** 0.6: the original README's 1e-4 for its UNet, Ho et al.'s 2e-4 for their
    35.7M CIFAR-10 UNet, and on the glyph benchmark's 1.0M UNet 1.7e-3, which beat the square root's 1.1e-3 at
    1,000 steps (bench/RESULTS.md); two significant digits, at most 4e-3 (on a 0.25M UNet 4e-3 beat 2e-3 and 1e-3)."""
    lr = 1e-4 * (README_UNET_PARAMETERS / num_parameters) ** 0.6
    return float(f"{min(lr, 4e-3):.2g}")


def auto_warmup_steps(total_steps: int) -> int:
    """5% of the run, at most the 500 steps of diffusers' example: short runs do not waste their steps warming up."""
    return max(1, min(500, round(0.05 * total_steps)))


def resolve_auto(cfg: Config, num_parameters: int, total_steps: Optional[int]) -> None:
    """Replace the "auto" settings by what they resolve to (config.json records the values used)."""
    t = cfg.training
    if t.learning_rate == "auto":
        t.learning_rate = auto_learning_rate(num_parameters)
    if t.lr_warmup_steps == "auto" and total_steps is not None:
        t.lr_warmup_steps = auto_warmup_steps(total_steps)


def count_parameters(cfg: Config) -> int:
    """The UNet's parameter count, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_unet(cfg, 3).parameters())


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "python": sys.version.split()[0]}


def config_record(cfg: Config, **facts) -> dict:
    """What config.json holds: the resolved config, then provenance (keys with _ are ignored by --config)."""
    return {**dataclasses.asdict(cfg), "_provenance": {"versions": library_versions(), "argv": sys.argv, **facts}}


# ---------------------------------------------------------------------------------------------------
# Model and noise schedule
# ---------------------------------------------------------------------------------------------------


def build_unet(cfg: Config, channels: int):
    from diffusers import UNet2DModel

    m = cfg.model
    try:
        return UNet2DModel(sample_size=cfg.training.image_size, in_channels=channels, out_channels=channels,
                           layers_per_block=m.layers_per_block, block_out_channels=m.block_out_channels,
                           down_block_types=m.down_block_types, up_block_types=m.up_block_types,
                           attention_head_dim=m.attention_head_dim, norm_num_groups=m.norm_num_groups,
                           dropout=m.dropout)
    except ValueError as e:  # diffusers names the unknown block type
        raise UserError(f"{e}; use block types such as DownBlock2D, AttnDownBlock2D / UpBlock2D, AttnUpBlock2D") from None


def build_noise_scheduler(cfg: Config):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**dataclasses.asdict(cfg.scheduler))


def load_pretrained(cfg: Config, channels: int):
    """The UNet of a final_model/ (pipeline) or checkpoint folder, checked against the data."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    path = Path(cfg.training.pretrained_model_path).expanduser()
    if (path / "unet" / "config.json").exists():
        unet = UNet2DModel.from_pretrained(path / "unet")
    elif (path / "model.safetensors").exists() and (path / "config.json").exists():
        saved = config_module.build(Config, {**default_values(),
                                             **config_module.read_config_file(path / "config.json", SECTIONS)})
        unet = build_unet(saved, read_json(path / "config.json")["_provenance"]["channels"])
        # A checkpoint without unet/ (older versions): its training weights, stored under DDP's names by 2 processes.
        unet.load_state_dict(strip_wrapper_prefixes(load_file(path / "model.safetensors")))
    else:
        raise UserError(f"--pretrained_model_path {path} is neither a final_model/ folder nor a checkpoint folder")
    if unet.config.sample_size != cfg.training.image_size or unet.config.in_channels != channels:
        raise UserError(f"the pretrained model makes {unet.config.in_channels}-channel {unet.config.sample_size}px "
                        f"images but the data is {channels}-channel {cfg.training.image_size}px; set --image_size "
                        f"{unet.config.sample_size} or pick a matching model")
    for name in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                 "attention_head_dim", "norm_num_groups", "dropout"):
        value = unet.config[name]
        setattr(cfg.model, name, tuple(value) if isinstance(value, list) else value)
    return unet


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
    ema: Optional[object]  # diffusers EMAModel, or None
    noise_scheduler: object  # the DDPMScheduler that noises the training images
    ema_params: list = dataclasses.field(default_factory=list)  # unet's parameters, listed once
    loss_weights: Optional[torch.Tensor] = None  # per timestep (min-SNR-gamma), on the device; None: plain MSE


def build_training(cfg: Config, accelerator, channels: int, total_steps: int) -> TrainingParts:
    """Model (new or pretrained), AdamW, LR schedule and EMA, prepared and registered for checkpoints."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    t = cfg.training
    set_seed(t.seed)  # the initial weights
    # A resumed fine-tune gets its weights from the checkpoint; its config holds the pretrained architecture.
    fine_tune = t.pretrained_model_path and not t.resume_from_checkpoint
    model = load_pretrained(cfg, channels) if fine_tune else build_unet(cfg, channels)
    resolve_auto(cfg, sum(p.numel() for p in model.parameters()), total_steps)
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
    # Never prepared nor checkpointed: a pure function of the applied optimizer steps (LRCurve), stepped by
    # train_step once per applied step whatever the accumulation or process count; resume sets its position.
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, LRCurve(t.lr_scheduler, [0, t.lr_warmup_steps, 1.0,
                                                                                        total_steps]))
    model, optimizer = accelerator.prepare(model, optimizer)
    register_wrapper_free_weights(accelerator)
    unet = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema = None
    if t.use_ema:
        ema = EMAModel(unet.parameters(), decay=t.ema_max_decay, use_ema_warmup=True, inv_gamma=t.ema_inv_gamma,
                       power=t.ema_power, foreach=True)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    noise_scheduler = build_noise_scheduler(cfg)
    return TrainingParts(model, unet, optimizer, fused, lr_schedule, ema, noise_scheduler, list(unet.parameters()),
                         min_snr_weights(noise_scheduler, cfg, accelerator.device))


def apply_settings_after_load(parts: TrainingParts, cfg: Config) -> None:
    """load_state brings back the checkpoint's AdamW and EMA settings; the run's config (flags given on resume
    included, and recorded in config.json) is what trains."""
    t = cfg.training
    for group in parts.optimizer.param_groups:
        group.update(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    parts.lr_schedule.base_lrs = [t.learning_rate] * len(parts.optimizer.param_groups)
    if parts.ema is not None:
        parts.ema.decay, parts.ema.inv_gamma, parts.ema.power = t.ema_max_decay, t.ema_inv_gamma, t.ema_power


class LRCurve:
    """The LR multiplier at an applied optimizer step: over the segment [start, warmup, peak, end], a linear
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
        """Move the end of the curve to `end` at applied step `step` without a jump; a notice, when it changes."""
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
    """Put the LR schedule at applied optimizer step `step` (after a resume), as if it had been stepped there."""
    lr_schedule.last_epoch = step
    lrs = [base * lr_schedule.lr_lambdas[0](step) for base in lr_schedule.base_lrs]
    for group, lr in zip(lr_schedule.optimizer.param_groups, lrs):
        group["lr"] = lr
    lr_schedule._last_lr = lrs


def min_snr_weights(noise_scheduler, cfg: Config, device: torch.device) -> Optional[torch.Tensor]:
    """min(SNR(t), gamma) / SNR(t) for epsilon targets (/(SNR(t) + 1) for v): less weight on the nearly clean
    timesteps, whose loss is easy and whose gradients otherwise dominate (Hang et al. 2023)."""
    from diffusers.training_utils import compute_snr

    gamma = cfg.training.snr_gamma
    if not gamma:
        return None
    snr = compute_snr(noise_scheduler, torch.arange(noise_scheduler.config.num_train_timesteps))
    divisor = snr if cfg.scheduler.prediction_type == "epsilon" else snr + 1
    return (snr.clamp(max=gamma) / divisor).float().to(device)


def train_step(batch, parts: TrainingParts, accelerator, cfg: Config, seed: int):
    """One micro-step: the diffusion loss and backward; every accumulation also a clipped AdamW step, and when
    that step was applied, the LR schedule and the EMA. Returns the loss and, on optimizer steps, whether the step
    was free of NaN/inf (an fp16 loss-scale overflow with a finite loss is the scaler's search, not a NaN step)."""
    seed_micro_step(seed, accelerator.device)
    model, optimizer, noise_scheduler = parts.model, parts.optimizer, parts.noise_scheduler
    clean = to_model_input(batch, cfg.data.random_flip)
    if clean.is_cuda:
        clean = clean.contiguous(memory_format=torch.channels_last)
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)  # \sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t} eps
    target = noise if cfg.scheduler.prediction_type == "epsilon" else noise_scheduler.get_velocity(clean, noise, timesteps)
    finite = None
    with accelerator.accumulate(model):
        prediction = model(noisy, timesteps, return_dict=False)[0]
        if parts.loss_weights is None:
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
        if accelerator.scaler is not None or parts.fused or finite is None or bool(finite):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if finite is None:
        return loss.detach(), None
    if bool(finite):  # a host sync per optimizer step: the LR and the EMA must not advance on a skipped step
        parts.lr_schedule.step()
        if parts.ema is not None:
            parts.ema.step(parts.ema_params)
    if accelerator.scaler is not None:
        finite = finite | torch.isfinite(loss.detach())
    return loss.detach(), finite


# ---------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------


def previous_run_outputs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in RUN_OUTPUTS or CHECKPOINT_NAME.match(p.name)
                  or p.name.startswith("samples_epoch_"))


def check_output_dir(cfg: Config) -> None:
    """Before any work: never mix a new run into an old one, and never train into a folder that cannot be made."""
    out = Path(cfg.training.output_dir).expanduser()
    held = previous_run_outputs(out)
    if held and not cfg.training.resume_from_checkpoint and not cfg.training.overwrite_output_dir:
        raise UserError(f"output_dir {out} already holds a run ({', '.join(p.name for p in held[:3])}...); continue "
                        f"it with --resume_from_checkpoint latest, start over with --overwrite_output_dir, or pick "
                        f"another --output_dir")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"output_dir {out} is not writable ({existing} is not a writable folder); pass a "
                        f"writable --output_dir")


def prepare_output_dir(cfg: Config) -> Path:
    """Create output_dir, clearing a previous run's outputs when --overwrite_output_dir asks for it."""
    out = Path(cfg.training.output_dir).expanduser()
    if not cfg.training.resume_from_checkpoint:
        for old in previous_run_outputs(out):
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

    def forward(self, sample, timestep):
        return self.unet(sample, timestep, return_dict=False)[0]


def log_graph(writer, unet, channels: int, size: int) -> None:
    sample = torch.zeros(1, channels, size, size, device=unet.device)
    timestep = torch.zeros(1, dtype=torch.long, device=unet.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            writer.add_graph(GraphView(unet).eval(), (sample, timestep))
        except Exception as e:  # the graph is a nicety; never let it stop training
            print(f"notice: the model graph was not logged ({e.__class__.__name__})")
    unet.train()


def draw_previews(accelerator, unet, ema, cfg: Config, noise_scheduler, path: Path, writer, tag: str, step: int):
    """Sample the preview grid with the EMA weights (main process; the others wait)."""
    from sampling import generate, image_grid, make_sampler, save_grid

    if accelerator.is_main_process:
        sampler = make_sampler(cfg.training.sample_scheduler, noise_scheduler.config)
        seeds = list(range(cfg.training.num_preview_images))
        with ema_weights(ema, unet), accelerator.autocast():
            unet.eval()
            images = generate(unet, sampler, seeds, cfg.training.sample_num_inference_steps,
                              batch_size=cfg.training.num_preview_images, desc=f"preview {path.name}")
            unet.train()
        save_grid(images, path, display_size=cfg.training.display_size)
        writer.add_image(tag, image_grid(images), step)  # native size: TensorBoard zooms itself
    accelerator.wait_for_everyone()


def save_final_model(accelerator, unet, ema, noise_scheduler, out: Path, record: dict) -> None:
    """final_model/: a DDPMPipeline with the EMA weights (DDPMPipeline.from_pretrained loads it)."""
    if accelerator.is_main_process:
        tmp, final = out / "final_model.partial", out / "final_model"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pipeline(tmp, unet, ema, noise_scheduler)
        write_json(tmp / "config.json", record)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
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


def resolve_precision(requested: str, device: torch.device) -> tuple[str, Optional[str]]:
    """The precision accelerate runs with, and a notice when it differs from what was asked."""
    if device.type == "cuda":
        # Pre-Ampere GPUs only emulate bf16 (slowly); accelerate refuses GPUs without it with a traceback.
        try:
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch has no such argument and reports native support only
            native_bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16" if native_bf16 else "fp16"), None
        if requested == "bf16" and not native_bf16:
            return "fp16", ("notice: mixed_precision bf16 needs an Ampere or newer GPU; training in fp16 "
                            "(--mixed_precision no for fp32)")
        return requested, None
    if requested == "fp16":
        return "no", f"notice: mixed_precision fp16 needs a GPU; training in fp32 on {device.type}"
    return ("no" if requested == "auto" else requested), None


def resolve_compile(requested: bool, device: torch.device) -> tuple[bool, Optional[str]]:
    """Whether to torch.compile the UNet, and a notice when --compile is dropped: it pays off on CUDA GPUs only."""
    if requested and device.type != "cuda":
        return False, f"notice: --compile needs a CUDA GPU; training uncompiled on {device.type}"
    return requested, None


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def start_processes(t: TrainingConfig):
    """Stage 1: the Accelerator (processes, device, precision, compile), the seed and the output folder's place."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, broadcast_object_list

    # Without a GPU, accelerate must be told it is on CPUs, or torchrun's processes each run alone.
    on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    device = PartialState(cpu=on_cpu).device
    precision, notice = resolve_precision(t.mixed_precision, device)
    compile_unet, compile_notice = resolve_compile(t.compile, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(t.output_dir).expanduser()
    accelerator = Accelerator(
        cpu=on_cpu, mixed_precision=precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        step_scheduler_with_optimizer=False, dynamo_backend="inductor" if compile_unet else "no")
    for line in filter(None, (notice, compile_notice)):
        if accelerator.is_main_process:
            print(line)
    if t.seed is None:
        t.seed = broadcast_object_list([secrets.randbits(31)])[0]
    return accelerator, precision


def load_data(cfg: Config, accelerator):
    """Stage 2: the dataset, downloaded and cached once per machine (its local main process first, the others
    then open the same cache file), and this process's loader."""
    with accelerator.local_main_process_first():
        dataset = load_dataset(cfg, progress=accelerator.is_local_main_process)
    if accelerator.is_main_process:
        prepare_output_dir(cfg)
    accelerator.wait_for_everyone()
    t = cfg.training
    loader, order = make_dataloader(dataset, t.train_batch_size, accelerator.num_processes, t.seed,
                                    cfg.data.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda")
    return dataset, accelerator.prepare(loader), order


def resume(accelerator, parts: TrainingParts, cfg: Config, checkpoint: Path, total_steps: int,
           steps_per_epoch: int) -> Progress:
    """Stage 4: the checkpoint's training state, with this run's settings applied over it. A changed data layout
    (processes, batch size, accumulation) cannot continue mid-epoch, so it starts at the next epoch."""
    t, main = cfg.training, accelerator.is_main_process
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
        curve.segment[3] = saved_run["max_train_steps"] or saved_run["num_epochs"] * steps_per_epoch
    notices.append(curve.extend(progress.applied_steps, total_steps, t.lr_warmup_steps))
    set_lr_position(parts.lr_schedule, progress.applied_steps)
    for line in filter(None, notices):
        if main:
            print(line)
    return progress


def start_logging(accelerator, cfg: Config, record: dict, progress: Progress, dataset, parts: TrainingParts):
    """Stage 5: config.json, TensorBoard (config, and for a new run the training images and the model graph)."""
    from sampling import save_grid

    t, out = cfg.training, Path(cfg.training.output_dir).expanduser()
    if not accelerator.is_main_process:
        return None
    write_json(out / "config.json", record)
    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
               for section in dataclasses.asdict(cfg).values() for k, v in section.items()}
    accelerator.init_trackers("ddpm", config=hparams)
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    writer.add_text("config", "```\n" + json.dumps(record, indent=2, default=str) + "\n```", progress.global_step)
    if not t.resume_from_checkpoint:
        shown = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(t.seed))
        first = dataset.__getitems__(sorted(shown[: t.num_preview_images].tolist())).float() / 255
        save_grid(first, out / "sample_training_data.png", display_size=t.display_size)
        writer.add_images("training_data", first, 0)
        log_graph(writer, parts.unet, first.shape[1], t.image_size)
    return writer


def train(cfg: Config) -> int:
    from tqdm.auto import tqdm

    t = cfg.training
    out = Path(t.output_dir).expanduser()
    # --- 1. Processes, precision, seed ---------------------------------------------------------------
    accelerator, precision = start_processes(t)
    main, device = accelerator.is_main_process, accelerator.device
    # --- 2. Data -------------------------------------------------------------------------------------
    dataset, loader, order = load_data(cfg, accelerator)
    channels = dataset[0].shape[0]
    # --- 3. Model, EMA, optimizer, LR schedule -------------------------------------------------------
    steps_per_epoch = math.ceil(len(loader) / t.gradient_accumulation_steps)
    total_steps = t.max_train_steps or t.num_epochs * steps_per_epoch
    automatic = [name for name in ("learning_rate", "lr_warmup_steps") if getattr(t, name) == "auto"]
    parts = build_training(cfg, accelerator, channels, total_steps)
    if automatic and main:
        print("auto: " + ", ".join(f"{name} {getattr(t, name):g}" for name in automatic) +
              f" (for {sum(p.numel() for p in parts.unet.parameters()) / 1e6:.1f}M parameters and {total_steps} "
              f"steps; pass a value to override)")
    unet, ema, noise_scheduler = parts.unet, parts.ema, parts.noise_scheduler
    pipeline = (unet, ema, noise_scheduler)
    record = config_record(cfg, seed=t.seed, channels=channels, num_processes=accelerator.num_processes,
                           mixed_precision=precision, device=str(device), dataset_images=len(dataset))
    # --- 4. Resume -----------------------------------------------------------------------------------
    resumed_from = Path(t.resume_from_checkpoint) if t.resume_from_checkpoint else None  # found by parse_config
    progress = Progress()
    if resumed_from:
        progress = resume(accelerator, parts, cfg, resumed_from, total_steps, steps_per_epoch)
    # --- 5. Logging ----------------------------------------------------------------------------------
    writer = start_logging(accelerator, cfg, record, progress, dataset, parts)
    if main:
        print(f"training on {len(dataset)} images, {accelerator.num_processes} process(es) on {device.type}, "
              f"{precision_name(precision)}: {total_steps} optimizer steps of {t.train_batch_size} x "
              f"{accelerator.num_processes} x {t.gradient_accumulation_steps} images; outputs in {out}")
    evaluator = TrainingEvaluator(cfg, accelerator, dataset, out) if t.eval_epochs else None  # FID/KID (evaluate.py)

    # --- 6. The loop ---------------------------------------------------------------------------------
    def save(name: str) -> Path:
        progress.skipped_steps = progress.global_step - parts.lr_schedule.last_epoch
        progress.lr_segment = parts.lr_schedule.lr_lambdas[0].segment
        return save_checkpoint(accelerator, out, name, progress, record, pipeline, t.checkpoints_total_limit)

    signals = StopSignal()
    window = LogWindow(accelerator)
    images_per_step = t.train_batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    estimated = False  # whether the time to the end was estimated yet (once, from the first logged steps)
    bar = tqdm(total=total_steps, initial=progress.global_step, desc="training", unit="step", disable=not main)
    stop_reason: Optional[str] = None
    saved_at: Optional[int] = progress.global_step if resumed_from else None  # the step of the newest checkpoint
    while progress.global_step < total_steps and not stop_reason:
        order.start_epoch(progress.epoch)
        skip = progress.batches_in_epoch  # after a resume: batches of this epoch already trained on, not loaded
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            seed = step_seed(t.seed, progress.epoch, progress.batches_in_epoch, accelerator.process_index)
            loss, finite = train_step(batch, parts, accelerator, cfg, seed)
            progress.batches_in_epoch += 1
            window.add(loss, finite)
            if finite is None:  # a micro-step inside gradient accumulation
                continue
            progress.global_step += 1
            bar.update(1)
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
                                        images_per_step / stats["img_per_s"])
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
                              writer, "samples", progress.global_step)
            if evaluator and epoch % t.eval_epochs == 0:
                with ema_weights(ema, unet):
                    evaluator(unet, noise_scheduler, progress.global_step, record)
            if epoch % t.save_model_epochs == 0:
                save(f"checkpoint-epoch-{epoch}")
                saved_at = progress.global_step
    bar.close()

    # --- 7. Final checkpoint, model and samples ------------------------------------------------------
    if not stop_reason:
        if saved_at != progress.global_step:  # so that extending the run starts from its end
            save(f"checkpoint-step-{progress.global_step}")
        save_final_model(accelerator, unet, ema, noise_scheduler, out, record)
        draw_previews(accelerator, unet, ema, cfg, noise_scheduler, out / "final_samples.png", writer,
                      "final_samples", progress.global_step)
        if main:
            print(f"done: {progress.global_step} steps; the model is in {out / 'final_model'}")
    accelerator.end_training()
    if stop_reason == "nonfinite":
        return EXIT_NONFINITE
    return 128 + signals.signum if stop_reason == "signal" else 0


class LogWindow:
    """Loss and NaN/inf counts since the last log, kept on the device so steps never wait for the GPU."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        device = accelerator.device
        self.loss_sum = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), device=device)
        self.in_a_row = torch.zeros((), device=device)
        self.batches, self.started = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, finite: Optional[torch.Tensor]) -> None:
        self.loss_sum += loss
        self.batches += 1
        if finite is not None:
            self.nonfinite += ~finite
            self.in_a_row = (self.in_a_row + 1) * ~finite

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


def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg, dry_run = parse_config(argv)
        if dry_run:
            if not cfg.training.pretrained_model_path:  # else the architecture is the pretrained model's
                resolve_auto(cfg, count_parameters(cfg), cfg.training.max_train_steps)
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return 0
        check_output_dir(cfg)
        return train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
