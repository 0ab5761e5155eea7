"""Generate images, or a seed-to-seed interpolation, from a trained model; or edit your own images with it.

    python inference.py --model_path ./results/final_model --num_images 16 --output_dir ./inference_results
    python inference.py --model_path ./results/final_model --scheduler dpmsolver++ --num_inference_steps 20
    python inference.py --model_path ./results/final_model --interpolate --interp_steps 10 --output_dir ./interp
    python inference.py --model_path ./results/final_model --inpaint photo.png --mask hole.png --num_images 4
    python inference.py --model_path ./results/final_model --init_image sketch.png --strength 0.6 --scheduler ddim
    python inference.py --model_path ./results/final_model --class_label dog cat --guidance_scale 3
    accelerate launch inference.py --model_path ./results/final_model --num_images 1000   # or torchrun

Image i is drawn from seed + i: the same image whatever --batch_size, device or number of processes (under
accelerate launch or torchrun each process draws a share of the seeds; the main process writes). Every run writes
manifest.json listing each file with its seed, sampler, steps and model. Without --num_inference_steps each
sampler takes its own default: every training timestep (1000) for ddpm, 50 for the others, 250 for RePaint.

--inpaint (an image or a folder) fills the white region of each --mask with RePaint (Lugmayr et al. 2022) and keeps
the black region's pixels exactly; --init_image redraws each image from --strength back in the noise schedule
(SDEdit, Meng et al. 2022), taking that share of --num_inference_steps. Images are resized and centre-cropped as in
training. Each image gets --num_images results, from seeds seed, seed + 1, ...: its_name_seed{N}.png, and
inpaint_grid.png or edit_grid.png shows a row per image: the image, its mask and its results.

A class-conditional model (train_ddpm.py --class_conditional) draws --num_images of each --class_label (a name or
number), seeds seed, seed + 1, ... for every class, with classifier-free guidance of --guidance_scale; without
--class_label, each seed draws its class in proportion to the training data. Files are {class}_seed{N}.png, grid.png
has a row per class, and the manifest records each image's class and the scale. Interpolation and edits keep one
class: --class_label, else the (first) seed's; --interpolate with two --class_label goes from the first class to the
second, every frame from --start_seed's noise.
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
    """The sampler of this run (--interp_scheduler when interpolating, RePaint when inpainting) and its steps:
    --num_inference_steps, else the sampler's default."""
    from sampling import REPAINT, default_steps

    name = cfg.interp_scheduler if cfg.interpolate else REPAINT if cfg.inpaint else cfg.scheduler
    return name, cfg.num_inference_steps or default_steps(name, num_train_timesteps)


def check_editing(cfg: InferenceConfig, steps: int, schedule) -> None:
    """The edits this model and step count cannot make."""
    from sampling import edit_steps

    if cfg.inpaint and schedule.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise UserError(f"--inpaint needs a model that predicts the noise or v (RePaintScheduler); this one predicts "
                        f"{schedule['prediction_type']}; use --init_image")
    if cfg.init_image and edit_steps(steps, cfg.strength) == 0:
        raise UserError(f"--strength {cfg.strength} of {steps} steps leaves no step to run (int({steps} x "
                        f"{cfg.strength}) = 0); raise --strength or --num_inference_steps")


def class_of_each(cfg: InferenceConfig, saved, seeds: list[int]) -> Optional[list[int]]:
    """Each seed's class for a class-conditional model: the one --class_label, else drawn by seed in proportion to
    the training data; None for an unconditional model."""
    from sampling import class_indices, classes_by_seed

    if saved.classes is None:
        if cfg.class_label:
            class_indices(cfg.class_label, None)  # the error
        return None
    if cfg.class_label:
        return class_indices(cfg.class_label, saved.classes)[:1] * len(seeds)
    return classes_by_seed(seeds, saved.class_counts, len(saved.classes))


def edit(cfg: InferenceConfig, state, unet, sampler, inputs, name: str, steps: int, dtype, out,
         manifest: dict, saved) -> None:
    """Inpaint or redraw each given image num_images times; each process edits a share of the (image, seed) pairs,
    and the main process writes them all."""
    from editing import save_edits
    from sampling import edit_steps, for_model, gather_by_seed, generate, shard, write_manifest

    seeds = [cfg.seed + i for i in range(cfg.num_images)]
    known = inputs.known(cfg, len(seeds))  # row j: image j // len(seeds), seed seeds[j % len(seeds)]
    mine = shard(list(range(len(known.images))), state)
    what = "inpainting" if cfg.inpaint else "editing"
    labels = class_of_each(cfg, saved, seeds)
    guidance = for_model(unet, labels and [labels[j % len(seeds)] for j in mine], cfg.guidance_scale)
    results = generate(unet, sampler, [seeds[j % len(seeds)] for j in mine], steps, cfg.batch_size, dtype, cfg.eta,
                       desc=f"{what} ({name}, {steps} steps)", progress=state.is_main_process, known=known[mine],
                       guidance=guidance)
    _, results = gather_by_seed(state, mine, results)
    if not state.is_main_process:
        return
    grid = "inpaint_grid.png" if cfg.inpaint else "edit_grid.png"
    files = save_edits(out, inputs, seeds, results, grid, cfg.display_size)
    if labels is not None:
        for entry in files:
            entry["class"] = saved.classes[labels[seeds.index(entry["seed"])]]
    size, channels = unet.config.sample_size, unet.config.in_channels
    if cfg.inpaint:
        settings = {"mode": "inpaint", "jump_length": cfg.jump_length, "jump_n_sample": cfg.jump_n_sample}
    else:
        settings = {"mode": "edit", "strength": cfg.strength, "steps_run": edit_steps(steps, cfg.strength)}
    write_manifest(out, {**manifest, **settings, "image_size": size, "channels": channels, "seeds": seeds,
                         "grid": grid, "files": files})
    print(f"wrote {len(files)} {what} results of {len(inputs.paths)} image(s), {grid} and manifest.json to {out}")


def run(cfg: InferenceConfig) -> None:
    from editing import read_inputs
    from files import writable_folder
    from model import load_model
    from sampling import (check_guidance, class_indices, for_model, gather_by_seed, generate, make_sampler,
                          prepare_unet, process_state, sampling_dtype, save_images_by_seed, shard, write_manifest)

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
    check_guidance(cfg.guidance_scale, saved.classes)
    if cfg.class_label:  # a wrong name is reported before anything is written
        class_indices(cfg.class_label, saved.classes)
        if (cfg.inpaint or cfg.init_image) and len(cfg.class_label) > 1:
            raise UserError(f"--{'inpaint' if cfg.inpaint else 'init_image'} edits towards one class; pass one "
                            f"--class_label, not {len(cfg.class_label)}")
    inputs = None
    if cfg.inpaint or cfg.init_image:  # every mistake in the given images is found before anything is written
        check_editing(cfg, steps, saved.schedule)
        inputs = read_inputs(cfg, saved.unet.config.sample_size, saved.unet.config.in_channels)
    out = writable_folder(cfg.output_dir) if main else None
    unet = prepare_unet(saved.unet, state.device, dtype, cfg.compile)
    sampler = make_sampler(name, saved.schedule)
    manifest = {"model_path": str(cfg.model_path), "scheduler": name, "num_inference_steps": steps,
                "num_inference_steps_default": cfg.num_inference_steps is None, "eta": cfg.eta}
    if saved.classes is not None:
        manifest.update(guidance_scale=cfg.guidance_scale, classes=saved.classes)
    if inputs is not None:
        edit(cfg, state, unet, sampler, inputs, name, steps, dtype, out, manifest, saved)
    elif not cfg.interpolate:  # each process draws its share of the images; the main process writes every image
        seeds = [cfg.seed + i for i in range(cfg.num_images)]
        labels = None
        if saved.classes is not None and cfg.class_label:  # num_images of each class, from the same seeds
            labels = [c for c in class_indices(cfg.class_label, saved.classes) for _ in seeds]
            seeds = seeds * len(cfg.class_label)
        elif saved.classes is not None:
            labels = class_of_each(cfg, saved, seeds)
        mine = shard(list(range(len(seeds))), state)
        images = generate(unet, sampler, [seeds[j] for j in mine], steps, cfg.batch_size, dtype, cfg.eta,
                          desc=f"generating ({name}, {steps} steps)", progress=main,
                          guidance=for_model(unet, labels and [labels[j] for j in mine], cfg.guidance_scale))
        _, images = gather_by_seed(state, mine, images)
        if main:
            files = save_images_by_seed(out, images, seeds, cfg.grid_size, cfg.display_size, labels, saved.classes)
            write_manifest(out, {**manifest, "grid": "grid.png", "files": files})
            print(f"wrote {len(images)} images, grid.png and manifest.json to {out}")
    elif main:  # a few frames: the main process draws them all, with a deterministic sampler by default
        manifest.update(interpolate(cfg, saved, unet, sampler, steps, dtype, out, name))
        write_manifest(out, {**manifest, "strip": "interpolation_strip.png", "gif": "interpolation.gif",
                             "fps": cfg.fps})
        print(f"wrote {cfg.interp_steps} frames, interpolation_strip.png and interpolation.gif to {out}")


def interpolate(cfg: InferenceConfig, saved, unet, sampler, steps: int, dtype, out, name: str) -> dict:
    """The frames between two seeds in one class (--class_label, else the start seed's), or, given two classes, from
    the first class to the second with --start_seed's noise in every frame; the manifest's entries."""
    import contextlib

    from sampling import (blended_classes, class_indices, for_model, interpolation_noise, sample_images,
                          save_interpolation)

    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    two = saved.classes is not None and cfg.class_label is not None and len(cfg.class_label) == 2
    end_seed = cfg.start_seed if two else cfg.end_seed
    noise, generators, fractions = interpolation_noise(shape, cfg.start_seed, end_seed, cfg.interp_steps)
    labels, blend, entries = None, contextlib.nullcontext(), {}
    if two:
        first, last = class_indices(cfg.class_label, saved.classes)
        blend = blended_classes(unet, first, last, fractions)
        entries["classes_interpolated"] = [saved.classes[first], saved.classes[last]]
    elif saved.classes is not None:
        labels = class_of_each(cfg, saved, [cfg.start_seed]) * len(fractions)  # one class for every frame
        entries["class"] = saved.classes[labels[0]]
    with blend as blended:
        frames = sample_images(unet, sampler, noise, generators, steps, cfg.batch_size, dtype, cfg.eta,
                               desc=f"interpolating ({name}, {steps} steps)",
                               guidance=for_model(unet, blended or labels, cfg.guidance_scale))
    files = save_interpolation(out, frames, fractions, cfg.start_seed, end_seed, cfg.fps, cfg.display_size)
    return {**entries, "files": files}


def main(argv: Optional[list[str]] = None) -> int:
    return config_module.exit_code(lambda: run(parse_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
