"""The UNet and its noise schedule: built from the config, saved as a diffusers pipeline, and loaded back from
anything a user may point at (final_model/, best_model/, a checkpoint, a folder holding unet/, a Hub id).

load_model is the one loader of train_ddpm.py (--pretrained_model_path), inference.py and evaluate.py
(--model_path), with one set of error messages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from config import ModelConfig, SchedulerConfig, UserError

WRAPPER_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")  # DDP and torch.compile wrap a model under these names
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# The UNet2DModel settings that ModelConfig holds (the rest follow from the data: size and channels).
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(ModelConfig))
LOG_SIGMA_RANGE = (0.002, 80.0)  # --beta_schedule log_sigma: EDM's sigma_min and sigma_max (Karras et al. 2022)


# The model_index.json class names of the folders save_model writes (pipeline_class), each with the scheduler class it
# is written with (None: any; a consistency model's ConsistencyModelPipeline has a CMStochasticIterativeScheduler and
# is not ours). Their unet/ and scheduler/ load alike, so load_model reads both through DDPMPipeline.from_pretrained
# and keeps only the two parts.
SAVED_PIPELINES = {"DDPMPipeline": None, "ConsistencyModelPipeline": "EDMEulerScheduler"}
CLASS_NAMES_FILE = "class_names.json"  # in unet/, beside the weights: a class-conditional model's classes


def build_unet(m: ModelConfig, image_size: int, channels: int, num_classes: int = 0):
    """The UNet; with num_classes, a class embedding of num_classes + 1 rows: the last is the null class (no label),
    which classifier-free guidance asks for."""
    from diffusers import UNet2DModel

    try:
        return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                           layers_per_block=m.layers_per_block, block_out_channels=m.block_out_channels,
                           down_block_types=m.down_block_types, up_block_types=m.up_block_types,
                           attention_head_dim=m.attention_head_dim, norm_num_groups=m.norm_num_groups,
                           dropout=m.dropout, num_class_embeds=num_classes + 1 if num_classes else None)
    except ValueError as e:  # diffusers names the unknown block type
        raise UserError(f"{e}; use block types such as DownBlock2D, AttnDownBlock2D / UpBlock2D, AttnUpBlock2D") from None


def fit_class_embedding(unet, num_classes: int):
    """A pretrained UNet (a fine-tune's) made to take this run's classes: with another class count, or none before, a
    new class embedding of num_classes + 1 rows, zeroed, so the fine-tune starts from the pretrained model's own
    predictions (diffusers adds the class embedding to the time embedding); the other weights are kept."""
    from diffusers import UNet2DModel

    rows, wanted = unet.config.num_class_embeds, num_classes + 1 if num_classes else None
    if rows == wanted:
        return unet
    if wanted is None:
        raise UserError(f"--pretrained_model_path is a class-conditional model ({rows - 1} classes); fine-tune it "
                        f"with --class_conditional on labelled data, or start from an unconditional model")
    fitted = UNet2DModel.from_config({**unet.config, "num_class_embeds": wanted})
    weights = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding.")}
    fitted.load_state_dict(weights, strict=False)
    torch.nn.init.zeros_(fitted.class_embedding.weight)
    return fitted.to(unet.dtype)


def log_sigma_betas(num_train_timesteps: int) -> list[float]:
    """--beta_schedule log_sigma: the betas whose noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) are evenly
    spaced in ln(sigma) over EDM's range (LOG_SIGMA_RANGE), so the timestep is an affine function of EDM's
    c_noise = ln(sigma) / 4."""
    low, high = (math.log(s) for s in LOG_SIGMA_RANGE)
    sigma = torch.exp(torch.linspace(low, high, num_train_timesteps, dtype=torch.float64))
    alpha_bar = 1 / (1 + sigma ** 2)
    before = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return (1 - alpha_bar / before).tolist()


def build_noise_scheduler(s: SchedulerConfig, sigma_data: float = 0.5):
    """The trained schedule, saved with the model: DDPMScheduler, or for --parameterization edm diffusers'
    EDMEulerScheduler (EDM's sigma range 0.002-80, rho 7, and its c_in, c_skip, c_out and c_noise with sigma_data).
    --beta_schedule log_sigma is saved as the DDPMScheduler's trained_betas (every diffusers scheduler reads them
    before the beta_schedule name, which stays in the config to say what they are)."""
    from diffusers import DDPMScheduler, EDMEulerScheduler

    fields = dataclasses.asdict(s)
    if fields.pop("parameterization") == "edm":
        return EDMEulerScheduler(sigma_data=sigma_data, prediction_type=s.prediction_type,
                                 num_train_timesteps=s.num_train_timesteps)
    if s.beta_schedule == "log_sigma":
        fields["trained_betas"] = log_sigma_betas(s.num_train_timesteps)
    return DDPMScheduler(**fields)


def to_dtype(unet, dtype: torch.dtype):
    """The UNet in dtype. diffusers' ModelMixin.to warns of float32-only modules on every cast to a dtype, even for
    a model that has none (UNet2DModel; diffusers 0.42), so a cast goes through torch's own Module.to."""
    return unet if unet.dtype == dtype else torch.nn.Module.to(unet, dtype=dtype)


def time_phases(unet, num_train_timesteps: int) -> torch.Tensor:
    """The phase, in radians, that each sinusoid of UNet2DModel's timestep embedding turns through over the training
    timesteps (frequencies as diffusers' get_timestep_embedding draws them)."""
    half = unet.time_embedding.linear_1.weight.shape[1] // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - unet.config.freq_shift)
    return torch.exp(exponent) * num_train_timesteps


def time_frequency_mask(unet, max_phase: float, num_train_timesteps: int) -> torch.Tensor:
    """For --timestep_max_phase: 1 for the weights of the time MLP's first layer (time_embedding.linear_1) that read
    a sinusoid turning through at most max_phase radians over the training timesteps, 0 for the rest (the sine and
    the cosine of frequency i are columns i and half + i, whichever comes first)."""
    weight = unet.time_embedding.linear_1.weight
    kept = (time_phases(unet, num_train_timesteps) <= max_phase).to(weight.dtype)
    if not kept.any():
        raise UserError(f"--timestep_max_phase {max_phase:g} keeps none of the UNet's timestep sinusoids (the slowest "
                        f"turns through {time_phases(unet, num_train_timesteps).min():.3g} radians); raise it")
    return torch.cat([kept, kept]).expand_as(weight).to(weight.device)


def time_phase_read(unet, num_train_timesteps: int) -> float:
    """The highest phase among the timestep sinusoids that the UNet's time MLP reads (weights not all zero)."""
    weight = unet.time_embedding.linear_1.weight
    half = weight.shape[1] // 2
    read = weight.ne(0).any(dim=0)
    phases = time_phases(unet, num_train_timesteps)[(read[:half] | read[half:]).cpu()]
    return float(phases.max()) if len(phases) else 0.0


def hold_time_frequencies(unet, mask: torch.Tensor) -> None:
    """Zero the time MLP's weights outside mask and keep them zero while training (their gradient is masked, so
    AdamW and its weight decay leave them at 0): the saved UNet is a stock UNet2DModel that never reads those
    sinusoids."""
    weight, on_device = unet.time_embedding.linear_1.weight, {}

    def masked(grad):
        if grad.device not in on_device:  # once: the model may move to its device after this
            on_device[grad.device] = mask.to(grad.device, grad.dtype)
        return grad * on_device[grad.device]

    with torch.no_grad():
        weight.mul_(mask.to(weight.device, weight.dtype))
    weight.register_hook(masked)


def count_parameters(m: ModelConfig, image_size: int, channels: int) -> int:
    """The UNet's parameter count, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_unet(m, image_size, channels).parameters())


def architecture(unet_config) -> dict:
    """The ModelConfig fields of a UNet2DModel config (lists as tuples, as the config holds them)."""
    return {name: tuple(unet_config[name]) if isinstance(unet_config[name], list) else unet_config[name]
            for name in ARCHITECTURE}


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """`module.conv_in.weight` (DDP) or `_orig_mod.module.conv_in.weight` (compiled DDP) -> `conv_in.weight`."""
    return {WRAPPER_PREFIX.sub("", key): value for key, value in state_dict.items()}


def trained_scheduler(schedule):
    """The scheduler a model was trained with, from its config (SavedModel.schedule): EDMEulerScheduler for a
    --parameterization edm model (its config has sigma_data), DDPMScheduler otherwise."""
    from diffusers import DDPMScheduler, EDMEulerScheduler

    from sampling import is_edm

    return (EDMEulerScheduler if is_edm(schedule) else DDPMScheduler).from_config(schedule)


def pipeline_class(noise_scheduler):
    """The diffusers pipeline that samples a model trained with this schedule, and so the class its folder is saved
    as (model_index.json's _class_name, which DiffusionPipeline.from_pretrained follows):
    - DDPMScheduler: DDPMPipeline;
    - EDMEulerScheduler (--parameterization edm): ConsistencyModelPipeline, diffusers' one unconditional pipeline that
      starts from the scheduler's init_noise_sigma and feeds the UNet scheduler.scale_model_input(x, t), as an EDM
      model needs. DDPMPipeline does neither: on an EDM model it draws faint, wrong images without an error.
    The pairs are SAVED_PIPELINES, which load_model checks."""
    import diffusers

    for pipeline, scheduler in SAVED_PIPELINES.items():
        if scheduler is not None and isinstance(noise_scheduler, getattr(diffusers, scheduler)):
            return getattr(diffusers, pipeline)
    return diffusers.DDPMPipeline


def save_model(folder: Path, unet, noise_scheduler, record: dict) -> None:
    """A diffusers pipeline folder (model_index.json, unet/, scheduler/; DiffusionPipeline.from_pretrained loads the
    pipeline_class that samples it) and the run's config.json, into a folder being written (files.atomic_folder, or a
    checkpoint's partial folder). A class-conditional UNet gets its class names (and each class's training images)
    beside its weights, in unet/class_names.json: UNet2DModel.from_pretrained ignores the file and the folder stays a
    diffusers one."""
    from files import write_json

    pipeline_class(noise_scheduler)(unet=unet, scheduler=noise_scheduler).save_pretrained(folder)
    write_json(folder / "config.json", record)
    if unet.config.num_class_embeds:
        facts = record.get("_provenance", {})
        write_json(folder / "unet" / CLASS_NAMES_FILE, {"classes": facts["classes"],
                                                         "counts": facts.get("class_counts"),
                                                         "null_class": unet.config.num_class_embeds - 1})


@dataclasses.dataclass
class SavedModel:
    """A trained model as load_model finds it."""

    unet: torch.nn.Module  # UNet2DModel, in eval mode, on the CPU
    schedule: dict  # the trained DDPMScheduler's config: every sampler is built from it
    record: Optional[dict] = None  # the config.json train_ddpm.py saved beside the weights (None: not ours)
    folder: Optional[Path] = None  # where it was loaded from (None: the Hub)
    # A class-conditional UNet's class names by label (None: unconditional), and its training images of each class
    # (None: not known, taken as equal); read from unet/class_names.json.
    classes: Optional[list[str]] = dataclasses.field(init=False, default=None)
    class_counts: Optional[list[int]] = dataclasses.field(init=False, default=None)

    def __post_init__(self):
        self.classes, self.class_counts = class_names(self.unet, self.folder)


def class_names(unet, folder: Optional[Path]) -> tuple[Optional[list[str]], Optional[list[int]]]:
    """A class-conditional UNet's class names and counts from unet/class_names.json; without the file (a model not
    trained here), its labels' numbers."""
    rows = unet.config.get("num_class_embeds")
    if not rows:
        return None, None
    saved = {}
    if folder is not None and (folder / "unet" / CLASS_NAMES_FILE).exists():
        saved = json.loads((folder / "unet" / CLASS_NAMES_FILE).read_text())
    classes = saved.get("classes") or [str(i) for i in range(rows - 1)]
    return classes, saved.get("counts")


def load_model(path: str, flag: str = "--model_path", dtype: Optional[torch.dtype] = None) -> SavedModel:
    """The UNet (in dtype; default float32) and trained schedule of:
    - a diffusers DDPMPipeline folder (ConsistencyModelPipeline for --parameterization edm; either class for an
      edm model saved before that): final_model/, best_model/ or a checkpoint-*/ (their EMA weights);
    - a folder holding a diffusers unet/ (and scheduler/) without the pipeline's model_index.json;
    - a checkpoint of older versions, without unet/: its training weights (model.safetensors) and config.json;
    - a Hugging Face Hub id such as google/ddpm-cifar10-32.
    Anything else is a UserError naming the flag. While train_ddpm.py replaces the folder (or after a crash stopped
    it halfway), its previous version is loaded."""
    from files import current_version

    folder = current_version(Path(path).expanduser())
    hint = "pass the final_model/ folder that train_ddpm.py writes"
    if not folder.is_dir():
        if not HUB_ID.fullmatch(path):
            raise UserError(f"{flag} {path} does not exist; {hint}")
        return _load_pipeline(path, flag, dtype, where="is not a local folder and could not be loaded from the "
                                                        "Hugging Face Hub (no network?)")
    if (folder / "model_index.json").exists():
        try:
            index = json.loads((folder / "model_index.json").read_text())
        except (OSError, ValueError):  # unreadable or not JSON
            index = None
        if isinstance(index, dict) and _saved_here(folder, index.get("_class_name")):
            return _load_pipeline(str(folder), flag, dtype, where="could not be loaded")
    elif (folder / "unet" / "config.json").exists():
        return _load_parts(folder, dtype)
    elif (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return _load_old_checkpoint(folder, dtype)
    raise UserError(f"{flag} {path} is not a diffusers DDPMPipeline folder (nor a ConsistencyModelPipeline with an "
                    f"EDMEulerScheduler, as --parameterization edm saves); pass the final_model/ or a checkpoint-*/ "
                    f"folder that train_ddpm.py writes")


def _saved_here(folder: Path, pipeline: Optional[str]) -> bool:
    """Whether a folder's model_index.json names a pipeline save_model writes, with its scheduler."""
    if pipeline not in SAVED_PIPELINES:
        return False
    if SAVED_PIPELINES[pipeline] is None:
        return True
    try:
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(scheduler, dict) and scheduler.get("_class_name") == SAVED_PIPELINES[pipeline]


def _record_beside(folder: Path) -> Optional[dict]:
    try:
        record = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "_provenance" in record else None


def _load_pipeline(path: str, flag: str, dtype, where: str) -> SavedModel:
    from diffusers import DDPMPipeline

    try:
        with warnings.catch_warnings():  # newer diffusers call it dtype, older ones know only torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            pipeline = DDPMPipeline.from_pretrained(path, torch_dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{flag} {path} {where}: {e.__class__.__name__}: {reason}; pass the final_model/ folder "
                        f"that train_ddpm.py writes") from None
    folder = Path(path).expanduser()
    local = folder.is_dir()
    return SavedModel(pipeline.unet.eval(), pipeline.scheduler.config, _record_beside(folder) if local else None,
                      folder=folder if local else None)


def _load_parts(folder: Path, dtype) -> SavedModel:
    """A folder holding a diffusers unet/ and maybe scheduler/ (the default DDPM schedule without one)."""
    import diffusers
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet", torch_dtype=dtype or torch.float32)
    saved = folder / "scheduler" / "scheduler_config.json"
    schedule = DDPMScheduler()
    if saved.exists():  # the class it was saved as: DDPMScheduler, or EDMEulerScheduler (--parameterization edm)
        kind = getattr(diffusers, json.loads(saved.read_text()).get("_class_name", ""), DDPMScheduler)
        schedule = kind.from_pretrained(saved.parent)
    return SavedModel(unet.eval(), schedule.config, _record_beside(folder), folder=folder)


def _load_old_checkpoint(folder: Path, dtype) -> SavedModel:
    """A checkpoint written before checkpoints held the EMA pipeline: the training weights, stored under DDP's
    names by several processes, and the UNet's shape from its config.json."""
    from safetensors.torch import load_file

    import config as config_module

    record = _record_beside(folder) or {}
    saved = config_module.read_config_file(folder / "config.json", config_module.TRAINING_SECTIONS)
    m = config_module.ModelConfig(**{name: saved.get(name, getattr(ModelConfig(), name)) for name in ARCHITECTURE})
    s = config_module.SchedulerConfig(**{f.name: saved.get(f.name, getattr(SchedulerConfig(), f.name))
                                         for f in dataclasses.fields(SchedulerConfig)})
    weights = strip_wrapper_prefixes(load_file(folder / "model.safetensors"))
    classes = len(weights["class_embedding.weight"]) - 1 if "class_embedding.weight" in weights else 0
    unet = build_unet(m, saved.get("image_size", 64), record.get("_provenance", {}).get("channels", 3), classes)
    unet.load_state_dict(weights)
    return SavedModel(to_dtype(unet, dtype or torch.float32).eval(), build_noise_scheduler(s).config, record or None)
