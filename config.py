"""The single source of truth for every setting of the toolkit.

Edit the defaults below (as the README shows: ``training_config.num_epochs = 200``) or override any field
from the command line with a flag of the same name (``--num_epochs 200``). ``train_ddpm.py`` writes the
resolved configuration to ``output_dir/config.json`` and into every checkpoint and ``final_model/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

Auto = Literal["auto"]  # a field typed `float | Auto` takes a number or "auto" (chosen by the script)
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LRSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine"]
# Samplers that are correct in sampling.sample_images (NOTES.md lists the diffusers ones that are not drop-in).
Sampler = Literal["ddpm", "ddim", "dpmsolver++", "unipc", "euler", "euler_a", "heun"]
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)

# UNet2DModel blocks that work without text conditioning; Attn* ones add self-attention at their level.
DownBlock = Literal["DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D"]
UpBlock = Literal["UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D"]

# The README's UNet: six levels, attention in the fifth down block and the matching up block.
README_DOWN_BLOCKS = ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
README_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4


class UserError(Exception):
    """A mistake the user can fix: reported as one line and exit code 2, never a traceback."""


@dataclass
class TrainingConfig:
    """How to train: data choice, optimisation, outputs, checkpoints, previews."""

    dataset_name: str = "cifar10"  # cifar10, mnist, custom (images in --dataset_path), parquet (files in --dataset_path), a Hugging Face Hub dataset id (user/name) or a folder written by save_to_disk
    image_size: int = 64  # side of the square training images, in pixels
    train_batch_size: int = 16  # images per process per micro-step
    num_epochs: int = 100  # passes over the data
    max_train_steps: Optional[int] = None  # stop after this many optimizer steps (overrides num_epochs)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    learning_rate: float | Auto = "auto"  # peak AdamW LR; auto: 1e-4 x (113.7M / parameters) ** 0.6, 1e-4 for the README's UNet
    lr_scheduler: LRSchedule = "cosine"  # LR shape
    lr_warmup_steps: int | Auto = "auto"  # linear warm-up, in optimizer steps; auto: 5% of the run, at most 500
    adam_beta1: float = 0.95  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_weight_decay: float = 1e-6  # AdamW decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # clip the gradient norm to this (0 turns clipping off)
    snr_gamma: Optional[float] = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023; bench/RESULTS.md); none: plain MSE
    mixed_precision: MixedPrecision = "auto"  # auto: bf16 on GPUs that have it, else fp16; fp32 on CPU
    compile: bool = False  # torch.compile the UNet (GPU only; first steps are slow while it compiles)
    seed: Optional[int] = None  # makes the run reproducible; None draws one and records it in config.json
    use_ema: bool = True  # keep an exponential moving average of the weights for sampling
    ema_max_decay: float = 0.9999  # EMA decay once warmed up
    ema_inv_gamma: float = 1.0  # EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power
    ema_power: float = 0.75  # EMA warm-up power (3/4 suits short runs, 2/3 long ones)
    output_dir: str = "./results"  # where logs, samples, checkpoints and final_model/ go
    overwrite_output_dir: bool = False  # start afresh in an output_dir that already holds a run
    logging_steps: int = 10  # read the loss back and log it every N optimizer steps
    save_image_epochs: int = 10  # write samples_epoch_{E}.png every N epochs
    save_model_epochs: int = 10  # write checkpoint-epoch-{E}/ every N epochs
    checkpointing_steps: Optional[int] = None  # also write checkpoint-step-{N}/ every N optimizer steps
    checkpoints_total_limit: Optional[int] = None  # keep only the newest N checkpoints
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest" in output_dir
    pretrained_model_path: Optional[str] = None  # start from a final_model/ or checkpoint's weights
    freeze_down_blocks: bool = False  # with pretrained_model_path: train only the decoder half
    max_nonfinite_steps: int = 20  # stop after this many consecutive steps with a NaN/inf loss
    num_preview_images: int = 16  # images in each samples_epoch_{E}.png and final_samples.png
    sample_scheduler: Sampler = "ddim"  # preview sampler
    sample_num_inference_steps: int = 50  # preview sampling steps
    display_size: int = 256  # preview and training-data grids show each image at least this many px (0: native)
    # Quality during training (evaluate.py): FID and KID of the EMA weights against the training set.
    eval_epochs: Optional[int] = None  # every N epochs: FID/KID to TensorBoard (eval/fid, eval/kid), best model by FID kept as best_model/; none: off
    eval_num_images: int = 2000  # images per evaluation, drawn with sample_scheduler and sample_num_inference_steps
    inception_weights: Optional[str] = None  # torch-fidelity's Inception-v3 weights file, for offline machines; none: downloaded on first use


@dataclass
class DataConfig:
    """Where the images come from and how they are loaded."""

    dataset_path: Optional[str] = None  # custom: a folder (searched recursively) or a .zip of images; parquet: a .parquet file, a folder of them or a glob
    dataset_config_name: Optional[str] = None  # Hugging Face Hub datasets: the configuration (subset), for datasets that have several
    dataset_split: str = "train"  # Hugging Face datasets: the split to train on
    image_column: Optional[str] = None  # Hugging Face datasets: the column of images (or of their paths); none: the first column of type Image
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
    beta_start: float = 1e-4  # first beta
    beta_end: float = 0.02  # last beta
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"  # beta curve
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the UNet predicts


@dataclass
class Config:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class InferenceConfig:
    """Settings of inference.py (generation and interpolation)."""

    model_path: Optional[str] = None  # a final_model/ or checkpoint-*/ folder (both hold a diffusers DDPMPipeline)
    num_images: int = 16  # images to generate
    num_inference_steps: Optional[int] = None  # denoising steps; None: the sampler's default (ddpm 1000, the others 50)
    seed: int = 0  # image i is drawn from seed + i, whatever the batch size
    grid_size: Optional[int] = None  # images per grid row; None: as square as the count allows
    batch_size: int = 16  # images per forward pass (halved automatically on out-of-memory)
    output_dir: str = "./inference_results"  # where PNGs, the grid and manifest.json go
    scheduler: Sampler = "ddpm"  # sampler
    eta: float = 0.0  # DDIM noise (0: deterministic, 1: DDPM-like)
    interpolate: bool = False  # interpolate between two seeds instead of generating
    interp_steps: int = 10  # frames of the interpolation, ends included
    start_seed: int = 0  # seed of the first frame
    end_seed: int = 1000  # seed of the last frame
    interp_scheduler: Sampler = "ddim"  # deterministic by default, so frames change smoothly
    fps: float = 8.0  # frames per second of interpolation.gif
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
    scheduler: Sampler = "ddpm"  # sampler
    num_inference_steps: Optional[int] = None  # denoising steps; None: the sampler's default (ddpm 1000, the others 50)
    eta: float = 0.0  # DDIM noise (0: deterministic, 1: DDPM-like)
    batch_size: int = 256  # images per UNet forward pass (halved automatically on out-of-memory)
    seed: int = 0  # image i is drawn from seed + i, as in inference.py
    output_dir: str = "./eval_results"  # where metrics.json goes
    save_images: bool = False  # also write each generated image as images/seed{N}.png (score them again with --images)
    inception_weights: Optional[str] = None  # torch-fidelity's Inception-v3 weights file, for offline machines; none: downloaded on first use
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # of the UNet; auto: fp16 on GPU, fp32 on CPU


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
    # A CPU quickstart (under 10 minutes on 2 cores): MNIST at 16 px on a 1.0M-parameter UNet, 1,000 steps. The same
    # model and steps as bench/quality.py's 1,000-step protocol (RESULTS.md shows what it draws).
    "quickstart": dict(
        dataset_name="mnist",
        image_size=16,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        train_batch_size=64,
        max_train_steps=1000,
        save_image_epochs=1,
        save_model_epochs=1,
    ),
}


# The defaults. Edit these lines to change them; command-line flags override them.
config = Config()
training_config = config.training
data_config = config.data
model_config = config.model
scheduler_config = config.scheduler
# Change a default here, for example (a command-line flag still overrides it):
# training_config.dataset_name = "custom"
# data_config.dataset_path = "/path/to/your/images"
