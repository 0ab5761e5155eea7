"""Every setting of the toolkit: the typed config tree, its command line, its checks, and how "auto" resolves.

Edit the defaults below (as the README shows: ``training_config.num_epochs = 200``) or override any field
from the command line with a flag of the same name (``--num_epochs 200``). A training run resolves its config once
(``resolve``: every "auto" and derived value, before anything is built) and writes the result to
``output_dir/config.json`` and into every checkpoint and ``final_model/``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import inspect
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Literal, Optional

Auto = Literal["auto"]  # a field typed `float | Auto` takes a number or "auto" (chosen by the script)
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "all"]  # accelerate's names (log_with)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}  # pip
LRSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine"]
# Samplers that are correct in sampling.sample_images (see SAMPLER_CLASSES there).
Sampler = Literal["ddpm", "ddim", "dpmsolver++", "unipc", "euler", "euler_a", "heun"]
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)
EDM_SAMPLERS = ("heun", "euler", "dpmsolver++")  # those of a model trained with --parameterization edm

# UNet2DModel blocks that work without text conditioning; Attn* ones add self-attention at their level.
DownBlock = Literal["DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D"]
UpBlock = Literal["UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D"]

# Classifier-free guidance (Ho & Salimans 2022) as diffusers writes it: eps = eps_uncond + w (eps_cond - eps_uncond), so
# w 0 is the unconditional model and w 1 the conditional one without guidance (their w is this w - 1). Their FID was
# best at a small push (their w 0.1-0.3 at 64 and 128 px, 1.1-1.3 here) and precision and the class's look grew with
# w while diversity fell; 1.5 asks a little more of the class than the best-FID point, what a user who names a class
# wants, and stays well below the saturated, uniform images of large w. Measured on the glyph letters (bench/RESULTS.md,
# 3,000 steps, 52 classes): w 1 reads as the letter asked 0.940 of the time, 1.5 0.988, 2 0.994; the distance per class
# is lowest at 1.5 (546, against 607 at 1 and 704 at 2), the distance over all letters lowest at 1 (68; 115 at 1.5).
DEFAULT_GUIDANCE_SCALE = 1.5

# The README's UNet: six levels, attention in the fifth down block and the matching up block.
README_DOWN_BLOCKS = ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
README_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4


class UserError(Exception):
    """A mistake the user can fix: reported as one line and exit code 2, never a traceback."""


EXIT_USER_ERROR = 2


def exit_code(command: Callable[[], object]) -> int:
    """Run a command line's work: the exit code it returns (0 when it returns anything else), or for a UserError one
    `error:` line on stderr and EXIT_USER_ERROR."""
    try:
        code = command()
        return code if isinstance(code, int) else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


@dataclass
class TrainingConfig:
    """How to train: data choice, optimisation, outputs, checkpoints, previews."""

    dataset_name: str = "cifar10"  # cifar10, mnist, letters (bundled: 5,772 16px letters, no download), custom (images in --dataset_path), parquet (files in --dataset_path), a Hugging Face Hub dataset id (user/name) or a folder written by save_to_disk
    image_size: int = 64  # side of the square training images, in pixels
    train_batch_size: int = 16  # images per process per micro-step
    num_epochs: int = 100  # passes over the data
    max_train_steps: Optional[int] = None  # stop after this many optimizer steps (overrides num_epochs)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    learning_rate: float | Auto = "auto"  # peak AdamW LR; auto: 1e-4 x (113.7M / parameters) ** 0.6, 1e-4 for the README's UNet; the same for a fine-tune (pretrained_model_path: a tenth was worse, bench/RESULTS.md)
    lr_scheduler: LRSchedule = "cosine"  # LR shape
    lr_warmup_steps: int | Auto = "auto"  # linear warm-up, in optimizer steps; auto: 5% of the run, at most 500
    adam_beta1: float = 0.9  # AdamW beta1: Adam's own 0.9 (Kingma & Ba; Ho et al., EDM and lucidrains train with it); the diffusers example's 0.95 was 1.2x worse on the letters (bench/RESULTS.md)
    adam_beta2: float = 0.999  # AdamW beta2
    adam_weight_decay: float = 1e-6  # AdamW decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # clip the gradient norm to this (0 turns clipping off)
    snr_gamma: Optional[float] = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023; bench/RESULTS.md); none: plain MSE
    loss_weighting: Literal["min_snr", "edm"] = "min_snr"  # min_snr: by --snr_gamma; edm: Karras et al.'s lambda(sigma) with --sigma_data, the EDM loss on the model's x0
    sigma_data: float = 0.5  # edm weighting and --parameterization edm: the data's standard deviation (EDM's 0.5 for images in [-1, 1])
    timestep_sampling: Literal["auto", "uniform", "lognormal"] = "auto"  # training timesteps: uniform, or lognormal: ln(sigma) ~ N(lognormal_mean, lognormal_std) as EDM draws its noise levels, sigma = sqrt((1 - alpha_bar) / alpha_bar), on the scheduler's own timesteps; auto: lognormal for v_prediction, uniform for epsilon (whose error at the rarely drawn high noise levels is multiplied by sigma, up to 157)
    lognormal_mean: float | Auto = "auto"  # lognormal timesteps: mean of ln(sigma); auto: -ln(snr_gamma) / 2 (-0.80 at gamma 5) with the min-SNR weight, where that weight times the denoised image's error scale peaks, EDM's P_mean -1.2 with --loss_weighting edm or without --snr_gamma (bench/RESULTS.md: -0.80 beat -1.2 on letters and digits)
    lognormal_std: float = 1.2  # lognormal timesteps: standard deviation of ln(sigma) (EDM's P_std)
    timestep_max_phase: Optional[float] = 3.2  # DDPM path: the UNet's time MLP reads only the sinusoids of its timestep embedding that turn through at most this many radians over the training timesteps (the others' weights held at zero, so the saved UNet2DModel is a stock one): the noise level as a smooth value, as EDM's c_noise = ln(sigma) / 4 gives it, not a hash of the integer timestep (with --beta_schedule log_sigma: 0.72x the distance on letters, bench/RESULTS.md); none: every sinusoid (diffusers' own); a fine-tune of a model that reads more keeps reading them all
    mixed_precision: MixedPrecision = "auto"  # auto: bf16 on GPUs that have it, else fp16; fp32 on CPU
    compile: bool = False  # torch.compile the UNet (GPU only; first steps are slow while it compiles)
    seed: Optional[int] = None  # makes the run reproducible; None draws one and records it in config.json
    use_ema: bool = True  # keep an exponential moving average of the weights for sampling
    ema_length: float = 0.10  # the EMA's length: the std of its averaging profile relative to the images seen (EDM2's sigma_rel; the same whatever the batch or process count)
    ema_snapshots: int = 0  # keep this many snapshots of two EMAs (lengths 0.05 and 0.10) over the run, in output_dir/ema_snapshots/, to choose the EMA length after training (evaluate.py --ema_length); 0: none
    output_dir: str = "./results"  # where logs, samples, checkpoints and final_model/ go
    overwrite_output_dir: bool = False  # start afresh in an output_dir that already holds a run
    logging_steps: int = 10  # read the loss back and log it every N optimizer steps
    report_to: Tracker = "tensorboard"  # where scalars, hyper-parameters and image grids go (accelerate's trackers); all: every one installed
    save_image_epochs: int = 10  # write samples_epoch_{E}.png every N epochs
    save_model_epochs: int = 10  # write checkpoint-epoch-{E}/ every N epochs
    checkpointing_steps: Optional[int] = None  # also write checkpoint-step-{N}/ every N optimizer steps
    checkpoints_total_limit: Optional[int] = None  # keep only the newest N checkpoints
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest" in output_dir
    pretrained_model_path: Optional[str] = None  # start from a final_model/ or checkpoint's weights
    freeze_down_blocks: bool = False  # with pretrained_model_path: train only the decoder half
    max_nonfinite_steps: int = 20  # stop after this many consecutive steps with a NaN/inf loss
    num_preview_images: int = 16  # images in each samples_epoch_{E}.png and final_samples.png
    sample_scheduler: Sampler = "heun"  # preview sampler (heun: the best measured at about 50 network evaluations)
    sample_num_inference_steps: int = 25  # preview sampling steps (Heun: two network evaluations a step)
    display_size: int = 256  # preview and training-data grids show each image at least this many px (0: native)
    # Quality during training (evaluate.py): FID and KID of the EMA weights against the training set.
    eval_epochs: Optional[int] = None  # every N epochs: FID/KID to TensorBoard (eval/fid, eval/kid), best model by FID kept as best_model/; none: off
    eval_num_images: int = 2000  # images per evaluation, drawn with sample_scheduler and sample_num_inference_steps
    inception_weights: Optional[str] = None  # torch-fidelity's Inception-v3 weights file, for offline machines; none: downloaded on first use
    class_conditional: bool = False  # train on the data's labels (sub-folders, CIFAR-10/MNIST/letters classes, a ClassLabel column) with a class embedding, so inference.py --class_label asks for a class
    class_dropout: float = 0.1  # with class_conditional: the share of images trained without their label (the null class), so the same model also samples unconditionally and guides (Ho & Salimans 2022: 0.1-0.2)
    ddp_timeout: int = 1800  # seconds a process may wait for the others in one collective (a save, a preview, an evaluation) before the run stops as hung; the start-up's data cache and Inception statistics may take longer


@dataclass
class DataConfig:
    """Where the images come from and how they are loaded."""

    dataset_path: Optional[str] = None  # custom: a folder (searched recursively) or a .zip of images; parquet: a .parquet file, a folder of them or a glob
    dataset_config_name: Optional[str] = None  # Hugging Face Hub datasets: the configuration (subset), for datasets that have several
    dataset_split: str = "train"  # Hugging Face datasets: the split to train on
    image_column: Optional[str] = None  # Hugging Face datasets: the column of images (or of their paths); none: the first column of type Image
    label_column: Optional[str] = None  # Hugging Face datasets: the column of each image's class (--class_conditional); none: the first column of type ClassLabel
    data_dir: str = "./data"  # where CIFAR-10/MNIST are downloaded and dataset caches are kept (Hub datasets: the datasets library's own cache)
    num_channels: Literal["auto", "1", "3"] = "auto"  # 1 (greyscale) or 3 (RGB); auto: 1 when every image is greyscale
    random_flip: Optional[bool] = None  # random horizontal flips; auto: on for cifar10 (Ho et al.), off for the rest (mirrored letters)
    dataloader_num_workers: int = -1  # loader processes; -1: none for in-memory data, up to 4 for large data


@dataclass
class ModelConfig:
    """The UNet2DModel. Input/output channels follow the data (3 for RGB, 1 for MNIST)."""

    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512, 512)  # channels per resolution level
    layers_per_block: int = 2  # ResNet layers in each block
    down_block_types: tuple[DownBlock, ...] = README_DOWN_BLOCKS  # one per level, from the input down
    up_block_types: tuple[UpBlock, ...] = README_UP_BLOCKS  # one per level, from the bottom up
    attention_head_dim: Optional[int] = 8  # channels per attention head (None: one head)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every block_out_channels
    dropout: float = 0.0  # dropout in the ResNet blocks


@dataclass
class SchedulerConfig:
    """The DDPMScheduler noise schedule used for training (and saved with the model for sampling)."""

    num_train_timesteps: int = 1000  # diffusion steps
    beta_start: float = 1e-4  # first beta (linear and scaled_linear schedules)
    beta_end: float = 0.02  # last beta (linear and scaled_linear schedules)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "log_sigma"] = "log_sigma"  # beta curve; log_sigma: noise levels sigma evenly spaced in ln(sigma) over EDM's 0.002-80, so the timestep is an affine function of EDM's c_noise (saved as trained_betas, which DDPMPipeline reads); linear: Ho et al.'s (with beta_start, beta_end)
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"  # what the UNet predicts; v (Salimans & Ho 2022) is x0 at high noise and epsilon at low, so it can train on EDM's log-normal noise levels (bench/RESULTS.md); a fine-tune keeps its pretrained model's
    parameterization: Literal["ddpm", "edm"] = "ddpm"  # ddpm: DDPMScheduler's timesteps (DDPMPipeline samples the saved model); edm: Karras et al.'s continuous log-normal noise levels and preconditioning with --sigma_data, c_noise = ln(sigma) / 4, the UNet predicts EDM's F (--prediction_type does not apply); saved with diffusers' EDMEulerScheduler as a ConsistencyModelPipeline, which DiffusionPipeline.from_pretrained samples (samplers: heun, euler, dpmsolver++)


@dataclass
class Config:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class InferenceConfig:
    """Settings of inference.py (generation, interpolation, inpainting and image-to-image)."""

    model_path: Optional[str] = None  # a final_model/ or checkpoint-*/ folder (both hold a diffusers DDPMPipeline)
    num_images: int = 16  # images to generate (--inpaint, --init_image: results per given image, seeds seed, seed + 1, ...)
    num_inference_steps: Optional[int] = None  # denoising steps; None: the sampler's default (ddpm 1000, heun 25, repaint 250, the others 50: about 50 network evaluations)
    seed: int = 0  # image i is drawn from seed + i, whatever the batch size
    grid_size: Optional[int] = None  # images per grid row; None: as square as the count allows
    batch_size: int = 16  # images per forward pass (halved automatically on out-of-memory)
    output_dir: str = "./inference_results"  # where PNGs, the grid and manifest.json go
    scheduler: Sampler = "heun"  # sampler (heun: the best measured at about 50 network evaluations; ddpm: the original 1000 steps)
    eta: float = 0.0  # DDIM and RePaint noise (0: DDIM's deterministic step, 1: DDPM-like)
    interpolate: bool = False  # interpolate between two seeds instead of generating
    interp_steps: int = 10  # frames of the interpolation, ends included
    start_seed: int = 0  # seed of the first frame
    end_seed: int = 1000  # seed of the last frame
    interp_scheduler: Sampler = "heun"  # deterministic by default, so frames change smoothly
    fps: float = 8.0  # frames per second of interpolation.gif
    inpaint: Optional[str] = None  # an image, or a folder of images, to inpaint with RePaint where --mask is white (default 250 steps)
    mask: Optional[str] = None  # with --inpaint: white where the model paints, black where the image is kept, the image's size; one mask for every image, or a folder of masks named as the images
    jump_length: int = 10  # RePaint: steps of each jump back in time (diffusers' RePaintScheduler)
    jump_n_sample: int = 10  # RePaint: times each stretch of jump_length steps is drawn (1: no jumps)
    init_image: Optional[str] = None  # an image, or a folder of images, to edit with SDEdit: noised --strength back, then denoised with --scheduler
    strength: float = 0.8  # with --init_image: the share of the noise schedule to go back, in (0, 1]; small keeps layout and colours, 1 is plain generation
    class_label: Optional[tuple[str, ...]] = None  # a class-conditional model: the classes to draw, by name or index, --num_images of each (--interpolate: one class for every frame, or two to go from the first to the second from --start_seed's noise); none: classes drawn by seed, in proportion to the training data
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE  # classifier-free guidance w of a class-conditional model: eps = uncond + w (cond - uncond); 0: unconditional, 1: conditional without guidance
    display_size: int = 256  # grid.png, the strip and the GIF show each image at least this many px (0: native)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the UNet (GPU only)


@dataclass
class EvaluateConfig:
    """Settings of evaluate.py (FID and KID against a reference set)."""

    model_path: Optional[str] = None  # a final_model/ or best_model/ folder (a DDPMPipeline), a folder holding unet/, or a Hub id such as google/ddpm-cifar10-32
    images: Optional[str] = None  # score the images in this folder (searched recursively) instead of generating them
    reference: str = "cifar10"  # cifar10, mnist, custom (images in --dataset_path; any --dataset_name of train_ddpm.py works) or a FILE.npz of statistics (mu, sigma; features for KID)
    dataset_path: Optional[str] = None  # reference custom: a folder or .zip of images; parquet: its files
    data_dir: str = "./data"  # where CIFAR-10/MNIST are downloaded and the reference statistics are cached (in data_dir/cache)
    num_images: int = 50000  # images to generate and score (50,000: the papers' protocol)
    scheduler: Sampler = "heun"  # sampler (as inference.py's)
    num_inference_steps: Optional[int] = None  # denoising steps; None: the sampler's default (ddpm 1000, heun 25, the others 50)
    eta: float = 0.0  # DDIM noise (0: deterministic, 1: DDPM-like)
    batch_size: int = 256  # images per UNet forward pass (halved automatically on out-of-memory)
    seed: int = 0  # image i is drawn from seed + i, as in inference.py
    output_dir: str = "./eval_results"  # where metrics.json goes
    save_images: bool = False  # also write each generated image as images/seed{N}.png (score them again with --images)
    inception_weights: Optional[str] = None  # torch-fidelity's Inception-v3 weights file, for offline machines; none: downloaded on first use
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # of the UNet; auto: fp16 on GPU, fp32 on CPU
    class_label: Optional[str] = None  # a class-conditional model: score this class (name or index) against the reference images of that class; none: every class, drawn in proportion to the training data
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE  # classifier-free guidance w of a class-conditional model (as inference.py's)
    ema_length: Optional[tuple[float, ...]] = None  # post-hoc EMA: rebuild the EMA of each length from the run's snapshots (train_ddpm.py --ema_snapshots), score each, save the best as output_dir/best_ema_model/; --model_path: the run's final_model/


# ---------------------------------------------------------------------------------------------------
# Command line: a view of the dataclasses above, generated from their fields and comments.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One config field as the command line sees it."""

    name: str
    section: type  # the dataclass that owns the field
    type: object  # the field's type, Optional[...] removed
    optional: bool  # whether None is allowed
    help: str  # the comment on the field's line
    auto: bool = False  # whether "auto" is allowed (resolved by the script from the model and the data)


def _unwrap_auto(tp: object) -> tuple[object, bool]:
    """float | Literal["auto"] -> (float, True): a value, or "auto" for the script to choose."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and Auto in args:
        rest = [a for a in args if a is not Auto]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _unwrap_optional(tp: object) -> tuple[object, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def flags_of(*sections: type) -> dict[str, Flag]:
    """Every field of the given dataclasses by name; names are unique across one command's sections."""
    table: dict[str, Flag] = {}
    for section in sections:
        comments = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(section), flags=re.M))
        for name, hint in typing.get_type_hints(section).items():
            assert name not in table, f"config field {name} is defined twice"
            tp, auto = _unwrap_auto(hint)
            tp, optional = _unwrap_optional(tp)
            table[name] = Flag(name, section, tp, optional, comments.get(name, ""), auto)
    return table


def _parse_text(flag: Flag, text: str):
    """Turn one command-line word into a value of the flag's (element) type."""
    tp = flag.type
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    if flag.optional and text.lower() == "none":
        return None
    if flag.auto and text.lower() == "auto":
        return "auto"
    if typing.get_origin(tp) is Literal:
        return text  # argparse checks the choices
    return tp(text)


def _check_value(flag: Flag, value: object, source: str) -> object:
    """Check a value read from a JSON file or a preset against the field's type."""
    if value is None and flag.optional or flag.auto and value == "auto":
        return value
    if typing.get_origin(flag.type) is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise UserError(f"{source}: {flag.name} must be a non-empty list, got {value!r}")
        element = dataclasses.replace(flag, type=typing.get_args(flag.type)[0], optional=False)
        return tuple(_check_value(element, item, source) for item in value)
    tp, name = flag.type, flag.name
    if typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp):
            return value
        raise UserError(f"{source}: {name} must be one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}")
    if tp is float and type(value) is int:
        return float(value)
    if isinstance(tp, type) and type(value) is tp:
        return value
    raise UserError(f"{source}: {name} has the wrong type ({value!r}); see --help for its meaning")


def _underscored(word: str) -> str:
    """Accept --learning-rate as well as --learning_rate."""
    if not word.startswith("--"):
        return word
    name, eq, value = word[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def _build_parser(prog: str, description: str, table: dict[str, Flag], defaults: dict[str, object]):
    parser = _OneLineParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                            usage="%(prog)s [--FIELD VALUE ...]", formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[type, argparse._ArgumentGroup] = {}
    for flag in table.values():
        if flag.section not in groups:
            groups[flag.section] = parser.add_argument_group(flag.section.__name__, flag.section.__doc__)
        group, default = groups[flag.section], defaults[flag.name]
        flag = dataclasses.replace(flag, help=flag.help.replace("%", "%%"))  # argparse %-formats help texts
        if flag.type is bool:
            shown = "auto" if default is None else "on" if default else "off"
            group.add_argument(f"--{flag.name}", dest=flag.name, action="store_const", const=True,
                               help=f"{flag.help} (default: {shown}; --no_{flag.name} turns it off)")
            group.add_argument(f"--no_{flag.name}", dest=flag.name, action="store_const", const=False,
                               help=argparse.SUPPRESS)
            continue
        element = typing.get_args(flag.type)[0] if typing.get_origin(flag.type) is tuple else flag.type
        kwargs: dict[str, object] = {"nargs": "+"} if typing.get_origin(flag.type) is tuple else {}
        metavar = flag.name.upper() + ("|auto" if flag.auto else "")
        if typing.get_origin(element) is Literal:
            kwargs["choices"] = list(typing.get_args(element)) + (["none"] if flag.optional else [])
            metavar = "{" + ",".join(kwargs["choices"]) + "}"
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        parse = functools.partial(_parse_text, flag)
        parse.__name__ = getattr(element, "__name__", "value")  # argparse names the type in its errors
        group.add_argument(f"--{flag.name}", dest=flag.name, type=parse, metavar=metavar,
                           help=f"{flag.help} (default: {shown})", **kwargs)
    return parser


# What one invocation asks for rather than how to train: not read back from a config.json that training wrote.
PER_RUN_FIELDS = ("resume_from_checkpoint", "overwrite_output_dir")
# Fields of earlier versions that config.json files of their runs still hold: skipped when such a file is read. The
# warm-up EMA's decay settings gave way to the EMA's length (ema_length).
RETIRED_FIELDS = ("ema_max_decay", "ema_inv_gamma", "ema_power")
# Defaults that changed, as the runs that wrote config.json files without the field had them: a checkpoint of an
# earlier version resumes as it trained.
EARLIER_DEFAULTS = {"prediction_type": "epsilon", "timestep_sampling": "uniform", "adam_beta1": 0.95,
                    "lognormal_mean": -1.2, "timestep_max_phase": None}


def read_config_file(path: str | Path, sections: tuple[type, ...]) -> dict[str, object]:
    """Field values from a JSON file: flat {"field": value}, or sectioned as the config.json training writes."""
    table = flags_of(*sections)
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read --config {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path} is not valid JSON ({e}); fix the file or leave --config out") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} must hold a JSON object of config fields")
    written_by_training = "_provenance" in raw
    flat: dict[str, object] = {}
    for key, value in raw.items():
        if key.startswith("_"):  # provenance that train_ddpm.py writes beside the config
            continue
        flat.update(value if isinstance(value, dict) and key not in table else {key: value})
    flat = {key: value for key, value in flat.items() if not (written_by_training and key in RETIRED_FIELDS)}
    if written_by_training:
        flat = {key: value for key, value in EARLIER_DEFAULTS.items() if key in table} | flat
    for key in flat:
        if key not in table:
            near = difflib.get_close_matches(key, list(table), n=1)
            raise UserError(f"--config {path}: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
    return {key: _check_value(table[key], value, f"--config {path}") for key, value in flat.items()
            if not (written_by_training and key in PER_RUN_FIELDS)}


def parse_cli(argv: Optional[list[str]], prog: str, description: str, defaults: dict[str, object],
              sections: tuple[type, ...], presets: Optional[dict[str, dict[str, object]]] = None,
              extra_flags: tuple[tuple[str, dict], ...] = ()) -> tuple[dict[str, object], argparse.Namespace]:
    """Resolve field values from argv. Precedence: defaults < --config file < --model_preset < flags.

    Returns the values by field name and the namespace (for the extra, non-config flags).
    """
    table = flags_of(*sections)
    parser = _build_parser(prog, description, table, defaults)
    parser.add_argument("--config", metavar="FILE.json", help="read config fields from a JSON file; flags override it")
    if presets:
        parser.add_argument("--model_preset", choices=sorted(presets), help="start from a named preset (see config.py)")
    for name, kwargs in extra_flags:
        parser.add_argument(name, **kwargs)
    words = [_underscored(w) for w in (sys.argv[1:] if argv is None else argv)]
    namespace, unknown = parser.parse_known_args(words)
    if unknown:
        known = [s for action in parser._actions for s in action.option_strings]
        near = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        parser.error(f"unknown argument {unknown[0]}" + (f"; did you mean {near[0]}?" if near else ""))
    values = dict(defaults)
    if getattr(namespace, "config", None):
        values.update(read_config_file(namespace.config, sections))
    if getattr(namespace, "model_preset", None):
        values.update(presets[namespace.model_preset])
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items() if k in table})
    return values, namespace


def flat_fields(*instances) -> dict[str, object]:
    """Field values of dataclass instances, by field name (the module-level defaults, say)."""
    return {f.name: getattr(obj, f.name) for obj in instances for f in dataclasses.fields(obj)}


def build(cls: type, values: dict[str, object]):
    """A dataclass instance (a nested Config too) from flat field values."""
    if cls is Config:
        return Config(*(build(f.default_factory, values) for f in dataclasses.fields(Config)))
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


# Presets hold only their differences from the defaults (--model_preset NAME).
PRESETS: dict[str, dict[str, object]] = {
    # The 35.7M-parameter CIFAR-10 UNet of Ho et al. (2020), attention at 16x16.
    "ddpm-cifar10": dict(
        image_size=32,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        dropout=0.1,
        learning_rate=2e-4,
        train_batch_size=128,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=5000,
    ),
    # A CPU quickstart that needs no network: the bundled letters (assets/letters16.npz: 5,772 greyscale 16px letters)
    # on a 1.0M-parameter UNet, 1,000 steps, 15 to 25 minutes on 2 cores. The same data, model and steps as
    # bench/quality.py's 1,000-step protocol (RESULTS.md shows what it draws). MNIST: add --dataset_name mnist.
    # An epoch of letters is 90 steps: a preview every 2 epochs, a checkpoint every 5 (and one at the end).
    "quickstart": dict(
        dataset_name="letters",
        image_size=16,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        train_batch_size=64,
        max_train_steps=1000,
        save_image_epochs=2,
        save_model_epochs=5,
    ),
}


TRAINING_SECTIONS = (TrainingConfig, DataConfig, ModelConfig, SchedulerConfig)  # train_ddpm.py's flags


# ---------------------------------------------------------------------------------------------------
# Checks: a user's mistakes caught before any work, one line each
# ---------------------------------------------------------------------------------------------------


def _check_ranges(at_least: dict, positive: dict = {}, in_range: dict = {}, optional: Collection[str] = ()) -> None:
    """at_least: name -> (value, least); positive: name -> value; in_range: name -> (value, low, high), low <= value
    < high (high None: no bound). None and "auto" pass every check (the field's "not set")."""
    for name, (value, least) in at_least.items():
        if value not in (None, "auto") and value < least:
            raise UserError(f"--{name} must be at least {least}{' (or none)' if name in optional else ''}, got {value}")
    for name, value in positive.items():
        if value not in (None, "auto") and not value > 0:
            raise UserError(f"--{name} must be positive, got {value}")
    for name, (value, low, high) in in_range.items():
        if value not in (None, "auto") and not (value >= low and (high is None or value < high)):
            bounds = f"at least {low}" if high is None else f"in [{low}, {high})"
            raise UserError(f"--{name} must be {bounds}, got {value}")


def check_inception_weights(path: Optional[str]) -> None:
    if path and not Path(path).expanduser().is_file():
        raise UserError(f"--inception_weights {path} does not exist; pass the downloaded "
                        f"weights-inception-2015-12-05-6726825d.pth file")


def check_tracker(report_to: str) -> None:
    """The --report_to tracker is installed: accelerate would leave out a missing one without a word."""
    from accelerate.tracking import get_available_trackers  # accelerate's own test of what it can log with

    if report_to != "all" and report_to not in {str(tracker) for tracker in get_available_trackers()}:
        package = TRACKER_PACKAGES[report_to]
        instead = "" if report_to == "tensorboard" else " (or log to TensorBoard: --report_to tensorboard)"
        raise UserError(f"--report_to {report_to} needs the {package} package, which is not installed: pip install "
                        f"{package}{instead}")


def validate_training(cfg: Config) -> None:
    """train_ddpm.py's settings: ranges, the UNet's shape, evaluation. (The data source is dataset.check_source's.)"""
    t, m, s = cfg.training, cfg.model, cfg.scheduler
    one = ("image_size", "train_batch_size", "num_epochs", "gradient_accumulation_steps", "logging_steps",
           "save_image_epochs", "save_model_epochs", "num_preview_images", "sample_num_inference_steps",
           "max_nonfinite_steps", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "eval_epochs",
           "ddp_timeout")
    at_least = {name: (getattr(t, name), 1) for name in one}
    at_least.update(layers_per_block=(m.layers_per_block, 1), norm_num_groups=(m.norm_num_groups, 1),
                    attention_head_dim=(m.attention_head_dim, 1), num_train_timesteps=(s.num_train_timesteps, 1),
                    eval_num_images=(t.eval_num_images, 2))
    optional = [f.name for f in flags_of(*TRAINING_SECTIONS).values() if f.optional]
    _check_ranges(at_least, optional=optional,
                  positive=dict(learning_rate=t.learning_rate, adam_epsilon=t.adam_epsilon, beta_start=s.beta_start,
                                snr_gamma=t.snr_gamma, sigma_data=t.sigma_data, lognormal_std=t.lognormal_std,
                                timestep_max_phase=t.timestep_max_phase),
                  in_range=dict(lr_warmup_steps=(t.lr_warmup_steps, 0, None), display_size=(t.display_size, 0, None),
                                adam_weight_decay=(t.adam_weight_decay, 0, None), adam_beta1=(t.adam_beta1, 0, 1),
                                max_grad_norm=(t.max_grad_norm, 0, None), adam_beta2=(t.adam_beta2, 0, 1),
                                dropout=(m.dropout, 0, 1), ema_length=(t.ema_length, 0.001, 0.28),
                                ema_snapshots=(t.ema_snapshots, 0, None), class_dropout=(t.class_dropout, 0, 1),
                                beta_end=(s.beta_end, s.beta_start, 1)))
    check_inception_weights(t.inception_weights)
    check_tracker(t.report_to)
    if t.sample_num_inference_steps > s.num_train_timesteps:
        raise UserError(f"--sample_num_inference_steps {t.sample_num_inference_steps} exceeds the "
                        f"{s.num_train_timesteps} training timesteps; lower it")
    if cfg.data.dataloader_num_workers < -1:
        raise UserError(f"--dataloader_num_workers must be -1 (auto) or at least 0, got "
                        f"{cfg.data.dataloader_num_workers}")
    if t.freeze_down_blocks and not t.pretrained_model_path:
        raise UserError("--freeze_down_blocks needs --pretrained_model_path (freezing untrained weights is pointless)")
    if t.pretrained_model_path and not t.resume_from_checkpoint:  # the pretrained model's shape, checked by resolve
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


def _check_sampling(num_inference_steps: Optional[int], batch_size: int, eta: float, guidance_scale: float) -> None:
    _check_ranges(dict(num_inference_steps=(num_inference_steps, 1), batch_size=(batch_size, 1)),
                  in_range=dict(guidance_scale=(guidance_scale, 0, None)))
    if not 0 <= eta <= 1:
        raise UserError(f"--eta must be between 0 and 1, got {eta}")


def validate_inference(cfg: InferenceConfig, given: Collection[str] = ()) -> None:
    """inference.py's settings; `given` names the flags on the command line."""
    if not cfg.model_path:
        raise UserError("--model_path is required: pass the final_model/ folder that train_ddpm.py writes")
    _check_ranges(dict(num_images=(cfg.num_images, 1), interp_steps=(cfg.interp_steps, 2),
                       grid_size=(cfg.grid_size, 1), display_size=(cfg.display_size, 0)))
    _check_sampling(cfg.num_inference_steps, cfg.batch_size, cfg.eta, cfg.guidance_scale)
    if not cfg.fps > 0:
        raise UserError(f"--fps must be positive, got {cfg.fps}")
    if cfg.interpolate and cfg.class_label and len(cfg.class_label) > 2:
        raise UserError(f"--interpolate goes between two seeds in one class, or between two classes from one seed; "
                        f"pass one or two --class_label, not {len(cfg.class_label)}")
    if cfg.interpolate and "scheduler" in given:  # a value equal to the default is still the user's intent
        raise UserError(f"--scheduler does not apply to --interpolate, which samples with --interp_scheduler "
                        f"(default {InferenceConfig.interp_scheduler}); pass --interp_scheduler {cfg.scheduler}")
    _validate_editing(cfg, given)


def _validate_editing(cfg: InferenceConfig, given: Collection[str]) -> None:
    """--inpaint with --mask (RePaint) and --init_image with --strength (SDEdit)."""
    modes = [f"--{name}" for name in ("inpaint", "init_image", "interpolate") if getattr(cfg, name)]
    if len(modes) > 1:
        raise UserError(f"{modes[0]} and {modes[1]} are different modes; pass one of them")
    if cfg.mask and not cfg.inpaint:
        raise UserError("--mask needs --inpaint IMAGE_OR_FOLDER, the image(s) the mask belongs to")
    if cfg.inpaint and not cfg.mask:
        raise UserError("--inpaint needs --mask MASK_OR_FOLDER: white where the model paints, black where the image "
                        "is kept")
    for name in ("jump_length", "jump_n_sample"):
        if name in given and not cfg.inpaint:
            raise UserError(f"--{name} is a setting of RePaint; it needs --inpaint and --mask")
    if cfg.inpaint and "scheduler" in given:
        raise UserError("--scheduler does not apply to --inpaint, which samples with RePaint (diffusers' "
                        "RePaintScheduler); leave --scheduler out")
    if "strength" in given and not cfg.init_image:
        raise UserError("--strength is a setting of --init_image (SDEdit); pass --init_image IMAGE_OR_FOLDER")
    if not 0 < cfg.strength <= 1:
        raise UserError(f"--strength must be in (0, 1], the share of the noise schedule to go back, got "
                        f"{cfg.strength}")
    _check_ranges(dict(jump_length=(cfg.jump_length, 1), jump_n_sample=(cfg.jump_n_sample, 1)))
    for name in ("inpaint", "mask", "init_image"):
        path = getattr(cfg, name)
        if path and not Path(path).expanduser().exists():
            raise UserError(f"--{name} {path} does not exist; pass an image file or a folder of images")


def validate_evaluate(cfg: EvaluateConfig) -> None:
    """evaluate.py's settings."""
    if bool(cfg.model_path) == bool(cfg.images):
        raise UserError("pass either --model_path (a final_model/ folder to sample from) or --images DIR (images "
                        "already generated), not both" if cfg.model_path else
                        "nothing to score: pass --model_path (a final_model/ folder) or --images DIR")
    _check_ranges(dict(num_images=(cfg.num_images, 2)))
    _check_sampling(cfg.num_inference_steps, cfg.batch_size, cfg.eta, cfg.guidance_scale)
    if cfg.images and cfg.class_label is not None:
        raise UserError("--class_label asks a class-conditional model for a class; it does not apply to --images")
    if cfg.images and not Path(cfg.images).expanduser().is_dir():
        raise UserError(f"--images {cfg.images} is not a folder; pass the folder of generated images")
    if cfg.ema_length:
        if cfg.images:
            raise UserError("--ema_length rebuilds a model's weights; it does not apply to --images")
        for length in cfg.ema_length:
            _check_ranges({}, in_range=dict(ema_length=(length, 0.001, 0.28)))
    if cfg.reference.endswith(".npz") and not Path(cfg.reference).expanduser().is_file():
        raise UserError(f"--reference {cfg.reference} does not exist; pass a statistics file (mu, sigma) or a "
                        f"dataset: cifar10, mnist or custom with --dataset_path")
    check_inception_weights(cfg.inception_weights)


# What a checkpoint's weights and optimizer were built for: a resumed run keeps them (other flags take effect).
FIXED_ON_RESUME = (*(f.name for section in (ModelConfig, SchedulerConfig) for f in dataclasses.fields(section)),
                   "image_size", "num_channels", "use_ema", "class_conditional", "timestep_max_phase",
                   "pretrained_model_path", "freeze_down_blocks", "lr_scheduler", "lr_warmup_steps")


def refuse_changes_on_resume(saved: dict[str, object], wanted: dict[str, object]) -> None:
    changed = [name for name in FIXED_ON_RESUME if wanted[name] != saved[name]]
    if changed:
        name = changed[0]
        shown = " ".join(map(str, saved[name])) if isinstance(saved[name], tuple) else saved[name]
        raise UserError(f"--{name} cannot change when resuming (the checkpoint has {shown}); leave it out, or start a "
                        f"new run from this checkpoint's weights with --pretrained_model_path")


# ---------------------------------------------------------------------------------------------------
# Resolution: every "auto" and derived value of a training run, once, before anything is built
# ---------------------------------------------------------------------------------------------------


README_UNET_PARAMETERS = 113_673_219  # the README's default UNet (ModelConfig's defaults), whose learning rate is 1e-4


FINE_TUNE_LR_FACTOR = 1.0  # a fine-tune's auto LR over a from-scratch run's, for the same UNet (measured: see below)


EDM_P_MEAN = -1.2  # Karras et al. 2022's P_mean, for their own loss weight (--loss_weighting edm)


def auto_lognormal_mean(t: TrainingConfig) -> float:
    """The centre of the log-normal noise levels, matched to the loss weight. EDM's lambda(sigma) gives the UNet's
    output the same loss scale at every sigma, and EDM centres its levels at ln(sigma) = -1.2 for that weight. The
    min-SNR weight, min(1 / sigma^2, gamma) on the denoised image's error, times that error's scale c_out^2 = sigma^2
    sigma_data^2 / (sigma^2 + sigma_data^2), is no longer flat: it rises as sigma^2 below sigma = 1 / sqrt(gamma) and
    falls as 1 / sigma^2 above it, for any sigma_data (so v-prediction's 1 and the EDM path's 0.5 alike). Centring
    the levels at that peak, ln(sigma) = -ln(gamma) / 2 (-0.80 at gamma 5), puts the training where the weight acts,
    and gives the high noise levels, which decide a sample's overall shape, more of the weighted loss (sigma > 1: 9.6%
    instead of 6.9% at sigma_data 0.5; EDM's own: 15.9%). Measured, two seeds each (bench/RESULTS.md): -0.8 against
    -1.2 was 0.87x on the letters at 1,000 steps (DDPM path), 0.72x on the digits at 1,000 (EDM path) and 0.86x on
    the letters at 3,000 (EDM path with EDM's Adam settings)."""
    if t.loss_weighting == "min_snr" and t.snr_gamma:
        return round(-0.5 * math.log(t.snr_gamma), 2)
    return EDM_P_MEAN


def auto_learning_rate(num_parameters: int, fine_tune: bool = False) -> float:
    """1e-4 x (113.7M / parameters) ** 0.6: the original README's 1e-4 for its UNet, Ho et al.'s 2e-4 for their
    35.7M CIFAR-10 UNet, and on the glyph benchmark's 1.0M UNet 1.7e-3, which beat the square root's 1.1e-3 at
    1,000 steps (bench/RESULTS.md); two significant digits, at most 4e-3 (on a 0.25M UNet 4e-3 beat 2e-3 and 1e-3).

    A fine-tune (--pretrained_model_path) gets the same: the usual tenth of the pre-training LR (Stable Diffusion v1
    1e-4, diffusers' fine-tuning example 1e-5) lost to it in bench/fine_tune.py (1,000 steps on the lowercase
    letters, then 300 on the uppercase ones: 1.7e-3 scored 548, 5e-4 608, the tenth 1.7e-4 725, 5e-5 829;
    bench/RESULTS.md). A short fine-tune onto new images needs the large steps; FINE_TUNE_LR_FACTOR is where a
    measured rule for gentler fine-tunes would go."""
    lr = 1e-4 * (README_UNET_PARAMETERS / num_parameters) ** 0.6
    return float(f"{min(lr, 4e-3) * (FINE_TUNE_LR_FACTOR if fine_tune else 1):.2g}")


def auto_warmup_steps(total_steps: int) -> int:
    """5% of the run, at most the 500 steps of diffusers' example: short runs do not waste their steps warming up."""
    return max(1, min(500, round(0.05 * total_steps)))


def resolve_precision(requested: str, device_type: str, native_bf16: bool) -> tuple[str, Optional[str]]:
    """The precision accelerate runs with (no, fp16, bf16), and a notice when it differs from what was asked."""
    if device_type == "cuda":  # pre-Ampere GPUs only emulate bf16 (slowly); accelerate refuses GPUs without it
        if requested == "auto":
            return ("bf16" if native_bf16 else "fp16"), None
        if requested == "bf16" and not native_bf16:
            return "fp16", ("notice: mixed_precision bf16 needs an Ampere or newer GPU; training in fp16 "
                            "(--mixed_precision no for fp32)")
        return requested, None
    if requested == "fp16":
        return "no", f"notice: mixed_precision fp16 needs a GPU; training in fp32 on {device_type}"
    return ("no" if requested == "auto" else requested), None


def resolve_compile(requested: bool, device_type: str) -> tuple[bool, Optional[str]]:
    """Whether to torch.compile the UNet, and a notice when --compile is dropped: it pays off on CUDA GPUs only."""
    if requested and device_type != "cuda":
        return False, f"notice: --compile needs a CUDA GPU; training uncompiled on {device_type}"
    return requested, None


@dataclass(frozen=True)
class Resolved:
    """A training run as it will run, made once by resolve before anything is built; the run only reads it.

    Settings that belong to the run (learning rate, warm-up, flips, seed, a pretrained model's shape) are filled into
    `cfg`, which config.json records. Those that belong to the machine it runs on (precision, compile) stay as asked
    in `cfg`, so that a resume on another machine resolves them again, and their values here are derived ones."""

    cfg: Config  # no "auto" left (lr_warmup_steps keeps it only while the run's length is unknown: --dry_run)
    channels: int  # of the images and the UNet
    num_processes: int
    num_parameters: int  # of the UNet that trains
    steps_per_epoch: Optional[int]  # optimizer steps in one pass over the data (None: the data is not read yet)
    total_steps: Optional[int]  # optimizer steps of the whole run
    precision: str  # accelerate's mixed_precision: no (fp32), fp16 or bf16
    compile: bool  # torch.compile the UNet
    chosen: dict  # the "auto" fields and the values they resolved to
    classes: tuple[str, ...] = ()  # class_conditional: the data's class names, in label order (the UNet's class embedding)
    notices: tuple[str, ...] = ()  # what was asked but cannot be had here, one line each

    @property
    def images_per_step(self) -> int:
        t = self.cfg.training
        return t.train_batch_size * self.num_processes * t.gradient_accumulation_steps


def resolve(cfg: Config, count_parameters: Callable[[ModelConfig, int, int], int], *, channels: Optional[int] = None,
            batches_per_epoch: Optional[int] = None, num_processes: int = 1, seed: Optional[int] = None,
            pretrained: Optional[dict] = None, pretrained_schedule: Optional[dict] = None,
            pretrained_time_phase: Optional[float] = None, device_type: str = "cpu", native_bf16: bool = False,
            classes: Optional[list[str]] = None) -> Resolved:
    """The run's settings from its config and the facts of this run: the data's channels and batches per epoch
    (per process) and class names, the process count, the drawn seed (used when --seed is none), the pretrained UNet's config (its
    shape replaces the model fields), noise schedule (it replaces the scheduler fields) and the highest phase its time
    MLP reads (model.time_phase_read) and the device. count_parameters(model, image_size, channels) counts a UNet's
    parameters, for the learning rate. Facts not known yet (--dry_run) leave what depends on them unresolved."""
    cfg = copy.deepcopy(cfg)
    t, d = cfg.training, cfg.data
    if d.random_flip is None:  # mirrored letters or digits are wrong samples; CIFAR-10's objects are not
        d.random_flip = t.dataset_name == "cifar10"
    if t.seed is None:
        t.seed = seed
    channels = channels or (3 if d.num_channels == "auto" else int(d.num_channels))
    if pretrained is not None:
        if pretrained["sample_size"] != t.image_size or pretrained["in_channels"] != channels:
            raise UserError(f"the pretrained model makes {pretrained['in_channels']}-channel "
                            f"{pretrained['sample_size']}px images but the data is {channels}-channel {t.image_size}px; "
                            f"set --image_size {pretrained['sample_size']} or pick a matching model")
        for f in dataclasses.fields(ModelConfig):
            value = pretrained[f.name]
            setattr(cfg.model, f.name, tuple(value) if isinstance(value, list) else value)
    if pretrained_schedule is not None:  # a fine-tune goes on with the noise schedule and target its model learned
        for f in dataclasses.fields(SchedulerConfig):
            if f.name in pretrained_schedule:
                setattr(cfg.scheduler, f.name, pretrained_schedule[f.name])
        cfg.scheduler.parameterization = "edm" if "sigma_data" in pretrained_schedule else "ddpm"
        t.sigma_data = pretrained_schedule.get("sigma_data", t.sigma_data)
    if cfg.scheduler.parameterization == "edm":
        t.timestep_max_phase = None  # c_noise = ln(sigma) / 4 spans a few radians: every sinusoid is a smooth one
        if t.timestep_sampling == "uniform":
            raise UserError("--parameterization edm draws its noise levels log-normally (--lognormal_mean, "
                            "--lognormal_std); drop --timestep_sampling uniform")
        t.timestep_sampling = "lognormal"
        cfg.scheduler.prediction_type = "epsilon"  # EDMEulerScheduler's name for EDM's own F (v_prediction: -F)
        if t.sample_scheduler not in EDM_SAMPLERS:
            raise UserError(f"--sample_scheduler {t.sample_scheduler} samples DDPM models; with --parameterization edm "
                            f"use {', '.join(EDM_SAMPLERS)}")
    notices = []
    if pretrained_time_phase is not None and t.timestep_max_phase is not None \
            and pretrained_time_phase > t.timestep_max_phase:  # zeroing weights it reads would undo the pretraining
        notices.append(f"the pretrained UNet reads timestep sinusoids of up to {pretrained_time_phase:.3g} radians, "
                       f"more than --timestep_max_phase {t.timestep_max_phase:g}: its fine-tune reads them all")
        t.timestep_max_phase = None
    if t.timestep_sampling == "auto":
        t.timestep_sampling = "lognormal" if cfg.scheduler.prediction_type == "v_prediction" else "uniform"
    num_parameters = count_parameters(cfg.model, t.image_size, channels)
    steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps) if batches_per_epoch else None
    total_steps = t.max_train_steps or (t.num_epochs * steps_per_epoch if steps_per_epoch else None)
    chosen = {}
    if t.lognormal_mean == "auto":  # resolved even where unused (uniform timesteps), so config.json holds a number
        t.lognormal_mean = auto_lognormal_mean(t)
        if t.timestep_sampling == "lognormal":
            chosen["lognormal_mean"] = t.lognormal_mean
    if t.learning_rate == "auto":
        t.learning_rate = chosen["learning_rate"] = auto_learning_rate(num_parameters, bool(t.pretrained_model_path))
    if t.lr_warmup_steps == "auto" and total_steps is not None:
        t.lr_warmup_steps = chosen["lr_warmup_steps"] = auto_warmup_steps(total_steps)
    precision, precision_notice = resolve_precision(t.mixed_precision, device_type, native_bf16)
    compile_unet, compile_notice = resolve_compile(t.compile, device_type)
    return Resolved(cfg, channels, num_processes, num_parameters, steps_per_epoch, total_steps, precision,
                    compile_unet, chosen, tuple(classes or ()) if t.class_conditional else (),
                    tuple(filter(None, (*notices, precision_notice, compile_notice))))


# ---------------------------------------------------------------------------------------------------
# Provenance: what config.json, manifests and metrics files record beside the settings
# ---------------------------------------------------------------------------------------------------


def library_versions(*extra: str) -> dict[str, str]:
    """Versions of Python and the libraries that make the numbers, plus the `extra` packages named."""
    from importlib.metadata import version

    import torch  # its own version string names the build (+cu130, +cpu)

    names = ("torchvision", "diffusers", "accelerate", *extra)
    return {"torch": torch.__version__, **{name: version(name) for name in names}, "python": sys.version.split()[0]}


def config_record(cfg: Config, **facts) -> dict:
    """What config.json holds: the resolved config, then provenance (keys with _ are ignored by --config)."""
    return {**dataclasses.asdict(cfg), "_provenance": {"versions": library_versions(), "argv": sys.argv, **facts}}


# The defaults. Edit these lines to change them; command-line flags override them.
config = Config()
training_config = config.training
data_config = config.data
model_config = config.model
scheduler_config = config.scheduler
# Change a default here, for example (a command-line flag still overrides it):
# training_config.dataset_name = "custom"
# data_config.dataset_path = "/path/to/your/images"
