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

import sys
from typing import Optional

import config as config_module
from config import InferenceConfig, UserError

def parse_config(argv: Optional[list[str]] = None) -> InferenceConfig:
    values, options = config_module.parse_cli(argv, "inference.py", __doc__,
                                              config_module.flat_fields(InferenceConfig()), (InferenceConfig,))
    cfg = config_module.build(InferenceConfig, values)
    config_module.validate_inference(cfg, given=set(vars(options)))  # the flags given (argparse leaves out others)
    return cfg


def sampler_and_steps(cfg: InferenceConfig, num_train_timesteps: int) -> tuple[str, int]:
    """The sampler of this run (--interp_scheduler when interpolating) and its steps: --num_inference_steps, else
    the sampler's default."""
    from sampling import default_steps

    name = cfg.interp_scheduler if cfg.interpolate else cfg.scheduler
    return name, cfg.num_inference_steps or default_steps(name, num_train_timesteps)


def run(cfg: InferenceConfig) -> None:
    from files import writable_folder
    from model import load_model
    from sampling import (gather_by_seed, generate, interpolation_noise, make_sampler, prepare_unet,
                          process_state, sample_images, sampling_dtype, save_images_by_seed, save_interpolation,
                          shard, write_manifest)

    state = process_state()
    main = state.is_main_process
    dtype = sampling_dtype(cfg.dtype, state.device, quiet=not main)
    if cfg.compile and state.device.type != "cuda" and main:
        print("notice: --compile needs a CUDA GPU; sampling uncompiled on the CPU")
    saved = load_model(cfg.model_path, dtype=dtype)
    trained = saved.schedule.num_train_timesteps
    name, steps = sampler_and_steps(cfg, trained)
    if steps > trained:
        raise UserError(f"--num_inference_steps {steps} exceeds the model's {trained} training timesteps; lower it")
    out = writable_folder(cfg.output_dir) if main else None
    unet = prepare_unet(saved.unet, state.device, dtype, cfg.compile)
    sampler = make_sampler(name, saved.schedule)
    manifest = {"model_path": str(cfg.model_path), "scheduler": name, "num_inference_steps": steps,
                "num_inference_steps_default": cfg.num_inference_steps is None, "eta": cfg.eta}
    if not cfg.interpolate:  # each process draws its share of the seeds; the main process writes every image
        mine = shard([cfg.seed + i for i in range(cfg.num_images)], state)
        images = generate(unet, sampler, mine, steps, cfg.batch_size, dtype, cfg.eta,
                          desc=f"generating ({name}, {steps} steps)", progress=main)
        seeds, images = gather_by_seed(state, mine, images)
        if main:
            files = save_images_by_seed(out, images, seeds, cfg.grid_size, cfg.display_size)
            write_manifest(out, {**manifest, "grid": "grid.png", "files": files})
            print(f"wrote {len(images)} images, grid.png and manifest.json to {out}")
    elif main:  # a few frames: the main process draws them all, with a deterministic sampler by default
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        noise, generators, fractions = interpolation_noise(shape, cfg.start_seed, cfg.end_seed, cfg.interp_steps)
        frames = sample_images(unet, sampler, noise, generators, steps, cfg.batch_size, dtype, cfg.eta,
                               desc=f"interpolating ({name}, {steps} steps)")
        files = save_interpolation(out, frames, fractions, cfg.start_seed, cfg.end_seed, cfg.fps, cfg.display_size)
        write_manifest(out, {**manifest, "strip": "interpolation_strip.png", "gif": "interpolation.gif",
                             "fps": cfg.fps, "files": files})
        print(f"wrote {len(frames)} frames, interpolation_strip.png and interpolation.gif to {out}")


def main(argv: Optional[list[str]] = None) -> int:
    return config_module.exit_code(lambda: run(parse_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
