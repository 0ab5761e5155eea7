"""Generate images, or a seed-to-seed interpolation, from a trained model.

    python inference.py --model_path ./results/final_model --num_images 16 --output_dir ./inference_results
    python inference.py --model_path ./results/final_model --scheduler dpmsolver++ --num_inference_steps 20
    python inference.py --model_path ./results/final_model --interpolate --interp_steps 10 --output_dir ./interp
    accelerate launch inference.py --model_path ./results/final_model --num_images 1000   # or torchrun

Image i is drawn from seed + i: the same image whatever --batch_size, device or number of processes (under
accelerate launch or torchrun each process draws a share of the seeds; the main process writes). Every run writes
manifest.json listing each file with its seed, sampler, steps and model. Without --num_inference_steps each
sampler takes its own default: every training timestep (1000) for ddpm, 50 for the others.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Collection, Optional

import config as config_module
from config import InferenceConfig, UserError

EXIT_USER_ERROR = 2
FEW_STEP_DEFAULT = 50  # denoising steps of every sampler but ddpm when --num_inference_steps is not given


def parse_config(argv: Optional[list[str]] = None) -> InferenceConfig:
    values, options = config_module.parse_cli(argv, "inference.py", __doc__,
                                              config_module.flat_fields(InferenceConfig()), (InferenceConfig,))
    cfg = config_module.build(InferenceConfig, values)
    validate(cfg, given=set(vars(options)))  # the flags on the command line (argparse leaves the others out)
    return cfg


def validate(cfg: InferenceConfig, given: Collection[str] = ()) -> None:
    """Catch the user's mistakes before any work; `given` names the flags on the command line."""
    if not cfg.model_path:
        raise UserError("--model_path is required: pass the final_model/ folder that train_ddpm.py wrote")
    minimum = dict(num_images=(cfg.num_images, 1), interp_steps=(cfg.interp_steps, 2),
                   num_inference_steps=(1 if cfg.num_inference_steps is None else cfg.num_inference_steps, 1),
                   batch_size=(cfg.batch_size, 1), grid_size=(1 if cfg.grid_size is None else cfg.grid_size, 1),
                   display_size=(cfg.display_size, 0))
    for name, (value, least) in minimum.items():
        if value < least:
            raise UserError(f"--{name} must be at least {least}, got {value}")
    if not cfg.fps > 0:
        raise UserError(f"--fps must be positive, got {cfg.fps}")
    if not 0 <= cfg.eta <= 1:
        raise UserError(f"--eta must be between 0 and 1, got {cfg.eta}")
    if cfg.interpolate and "scheduler" in given:  # a value equal to the default is still the user's intent
        raise UserError(f"--scheduler does not apply to --interpolate, which samples with --interp_scheduler "
                        f"(default {InferenceConfig.interp_scheduler}); pass --interp_scheduler {cfg.scheduler}")


def load_model(model_path: str, dtype):
    """The UNet (in dtype) and trained noise-schedule config of a DDPMPipeline folder: final_model/ or a checkpoint
    (or a Hub id such as google/ddpm-cifar10-32)."""
    from diffusers import DDPMPipeline

    path = Path(model_path).expanduser()
    if path.is_dir():
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, ValueError):  # missing, unreadable or not JSON
            index = None
        if not isinstance(index, dict) or index.get("_class_name") != "DDPMPipeline":
            raise UserError(f"--model_path {model_path} is not a diffusers DDPMPipeline folder (no DDPMPipeline "
                            f"model_index.json); pass the final_model/ or a checkpoint-*/ folder that train_ddpm.py "
                            f"writes")
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", model_path):
        raise UserError(f"--model_path {model_path} does not exist; pass the final_model/ folder that "
                        f"train_ddpm.py writes")
    try:
        with warnings.catch_warnings():  # newer diffusers call it dtype, older ones know only torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            pipeline = DDPMPipeline.from_pretrained(model_path, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        where = ("is not a local folder and could not be loaded from the Hugging Face Hub (no network?)"
                 if not path.is_dir() else "could not be loaded")
        raise UserError(f"--model_path {model_path} {where}: {e.__class__.__name__}: {reason}; pass the "
                        f"final_model/ folder that train_ddpm.py writes") from None
    return pipeline.unet, pipeline.scheduler.config


def choose_device_and_dtype(requested: str, device=None, quiet: bool = False):
    """The device (this process's, when given) and the UNet's dtype."""
    import torch

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    if requested in ("fp16", "bf16") and device.type != "cuda":
        if not quiet:
            print(f"notice: --dtype {requested} needs a GPU; sampling in fp32 on the CPU")
        return device, torch.float32
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[requested]


def prepare_output_dir(output_dir: str) -> Path:
    out = Path(output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"output_dir {out} is not writable ({e.strerror}); pass a writable --output_dir") from None
    return out


def inference_steps(cfg: InferenceConfig, num_train_timesteps: int) -> int:
    """The denoising steps of this run: --num_inference_steps if given, else its sampler's default. DDPM's
    ancestral sampler needs every training timestep; the others are made for few steps."""
    if cfg.num_inference_steps is not None:
        return cfg.num_inference_steps
    interpolating = getattr(cfg, "interpolate", False)  # evaluate.py's config has no interpolation
    sampler = cfg.interp_scheduler if interpolating else cfg.scheduler
    return num_train_timesteps if sampler == "ddpm" else min(FEW_STEP_DEFAULT, num_train_timesteps)


def write_manifest(out: Path, cfg: InferenceConfig, sampler_name: str, steps: int, files: list[dict],
                   extra: dict) -> None:
    from sampling import atomic_write

    manifest = {"model_path": str(cfg.model_path), "scheduler": sampler_name, "num_inference_steps": steps,
                "num_inference_steps_default": cfg.num_inference_steps is None, "eta": cfg.eta, **extra,
                "files": files}
    with atomic_write(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))


def generate_images(cfg: InferenceConfig, unet, trained_schedule, dtype, out: Path, steps: int, state) -> None:
    """Each process draws its share of the seeds; the main process writes every image."""
    from sampling import gather_by_seed, generate, make_sampler, save_grid, save_png, shard

    mine = shard([cfg.seed + i for i in range(cfg.num_images)], state)
    sampler = make_sampler(cfg.scheduler, trained_schedule)
    images = generate(unet, sampler, mine, steps, cfg.batch_size, dtype, cfg.eta,
                      desc=f"generating ({cfg.scheduler}, {steps} steps)", progress=state.is_main_process)
    seeds, images = gather_by_seed(state, mine, images)
    if not state.is_main_process:
        return
    files = []
    for seed, image in zip(seeds, images):
        name = f"seed{seed:06d}.png"
        save_png(image, out / name)
        files.append({"file": name, "seed": seed})
    save_grid(images, out / "grid.png", cfg.grid_size, display_size=cfg.display_size)
    write_manifest(out, cfg, cfg.scheduler, steps, files, {"grid": "grid.png"})
    print(f"wrote {len(images)} images, grid.png and manifest.json to {out}")


def interpolate(cfg: InferenceConfig, unet, trained_schedule, dtype, out: Path, steps: int) -> None:
    """Frames along the slerp between the initial noise of start_seed and end_seed, denoised with the same
    (by default deterministic) sampler, so neighbouring frames stay close."""
    import torch

    from sampling import initial_noise, make_sampler, sample_images, save_gif, save_grid, save_png, \
        seeded_generators, slerp

    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    start, end = initial_noise(seeded_generators([cfg.start_seed, cfg.end_seed]), shape)
    fractions = [k / (cfg.interp_steps - 1) for k in range(cfg.interp_steps)]
    noise = torch.stack([slerp(start, end, f) for f in fractions])
    # Stochastic samplers (ddpm, euler_a, ddim with eta > 0) share start_seed's step noise across frames.
    generators = seeded_generators([cfg.start_seed] * cfg.interp_steps)
    sampler = make_sampler(cfg.interp_scheduler, trained_schedule)
    frames = sample_images(unet, sampler, noise, generators, steps, cfg.batch_size, dtype, cfg.eta,
                           desc=f"interpolating ({cfg.interp_scheduler}, {steps} steps)")
    files = []
    for k, (fraction, frame) in enumerate(zip(fractions, frames)):
        name = f"frame_{k:03d}.png"
        save_png(frame, out / name)
        files.append({"file": name, "t": fraction, "start_seed": cfg.start_seed, "end_seed": cfg.end_seed})
    save_grid(frames, out / "interpolation_strip.png", columns=len(frames), display_size=cfg.display_size)
    save_gif(frames, out / "interpolation.gif", cfg.fps, display_size=cfg.display_size)
    write_manifest(out, cfg, cfg.interp_scheduler, steps, files,
                   {"strip": "interpolation_strip.png", "gif": "interpolation.gif", "fps": cfg.fps})
    print(f"wrote {len(frames)} frames, interpolation_strip.png and interpolation.gif to {out}")


def run(cfg: InferenceConfig) -> None:
    import torch

    from sampling import process_state

    state = process_state()
    device, dtype = choose_device_and_dtype(cfg.dtype, state.device, quiet=not state.is_main_process)
    if cfg.compile and device.type != "cuda" and state.is_main_process:
        print("notice: --compile needs a CUDA GPU; sampling uncompiled on the CPU")
    unet, trained_schedule = load_model(cfg.model_path, dtype)
    steps = inference_steps(cfg, trained_schedule.num_train_timesteps)
    if steps > trained_schedule.num_train_timesteps:
        raise UserError(f"--num_inference_steps {steps} exceeds the model's "
                        f"{trained_schedule.num_train_timesteps} training timesteps; lower it")
    out = prepare_output_dir(cfg.output_dir) if state.is_main_process else None
    unet = unet.to(device).eval()
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        unet = torch.compile(unet) if device.type == "cuda" else unet
    if not cfg.interpolate:
        generate_images(cfg, unet, trained_schedule, dtype, out, steps, state)
    elif state.is_main_process:  # a few frames: the main process draws them all
        interpolate(cfg, unet, trained_schedule, dtype, out, steps)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        run(parse_config(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
