"""Score a model, or a folder of images, with FID and KID against a reference set.

    python evaluate.py --model_path ./results/final_model --reference cifar10
    python evaluate.py --model_path google/ddpm-cifar10-32 --reference cifar10 --scheduler ddim --num_inference_steps 50
    python evaluate.py --images ./inference_results --reference custom --dataset_path ./my_images
    python evaluate.py --model_path ./results/final_model --reference custom --dataset_path ./pets --class_label dog
    accelerate launch evaluate.py ...    # or torchrun: the seeds are shared among the processes

Features are the pool3 features of the TF Inception-v3 (2015-12-05 weights) as torch-fidelity ports it, with its
resize to 299 px; FID and KID are torch-fidelity's (metrics.py). The reference statistics are computed once from the
whole set through the toolkit's dataset code, at the size of the scored images, and cached beside the dataset in
data_dir/cache, keyed by its fingerprint. Image i is drawn from seed + i, as in inference.py. Prints FID and KID on
one line and writes output_dir/metrics.json.

A class-conditional model (train_ddpm.py --class_conditional) draws each seed's class in proportion to its training
data, with classifier-free guidance of --guidance_scale, and is scored against the whole reference set; with
--class_label it draws that class alone and is scored against the reference images of that class (matched by name).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import config as config_module
from config import DataConfig, EvaluateConfig, UserError

def parse_config(argv: Optional[list[str]] = None) -> EvaluateConfig:
    values, _ = config_module.parse_cli(argv, "evaluate.py", __doc__, config_module.flat_fields(EvaluateConfig()),
                                        (EvaluateConfig,))
    cfg = config_module.build(EvaluateConfig, values)
    config_module.validate_evaluate(cfg)
    return cfg


def reference_data(cfg: EvaluateConfig, image_size: int, inception, device,
                   class_name: Optional[str] = None) -> tuple[dict, dict]:
    """The reference statistics and how metrics.json names them: a statistics file, or a dataset read through
    dataset.py at the scored images' size (cached), or its images of the class named. The main process's work: the
    others do not wait for it."""
    from dataset import load_dataset
    from metrics import load_statistics_file, reference_statistics, statistics_path

    if cfg.reference.endswith(".npz"):
        if class_name is not None:
            raise UserError(f"--class_label needs the reference images, to score against those of class "
                            f"{class_name}; pass --reference as a dataset, not a statistics file")
        stats = load_statistics_file(cfg.reference)
        return stats, {"file": str(cfg.reference), "images": len(stats.get("features", ()))}
    dataset = load_dataset(cfg.reference, image_size, DataConfig(dataset_path=cfg.dataset_path, data_dir=cfg.data_dir))
    label, images = None, len(dataset)
    if class_name is not None:
        if class_name not in (dataset.classes or ()):
            raise UserError(f"--class_label {class_name}: the reference {cfg.reference} has no images of that class "
                            f"(its classes: {', '.join(dataset.classes or ['none, it has no labels'])}); pass the "
                            f"model's training data as --reference")
        label = dataset.classes.index(class_name)
        images = int((dataset.labels == label).sum())
    stats = reference_statistics(dataset, inception, device, label=label)
    return stats, {"dataset": cfg.reference, "dataset_path": cfg.dataset_path, "images": images,
                   "image_size": image_size, "channels": dataset.channels,
                   "statistics_file": str(statistics_path(dataset, inception, label)),
                   **({"class": class_name} if class_name is not None else {})}


def read_images(folder: str):
    """Every image in the folder as uint8 [N, 3, S, S]: as stored when they share one square size (generated
    images), else resized and centre-cropped to the smallest side by dataset.py."""
    import numpy as np
    import torch
    from PIL import Image

    from dataset import decode_file, find_images

    files = [f for f in find_images(folder) if not f.name.startswith(".")]
    with Image.open(files[0]) as first:
        size = min(first.size)
    arrays = [decode_file(str(f), size, 3) for f in files]
    readable = [a for a in arrays if a is not None]
    if len(readable) < 2:
        raise UserError(f"--images {folder} holds fewer than 2 readable images; FID needs at least 2")
    return torch.from_numpy(np.stack(readable))


def save_best_ema(model_path: str, snapshots: Path, length: float, folder: Path, metrics: dict) -> None:
    """The model at model_path with the post-hoc EMA of `length` as its weights, saved whole like final_model/ (its
    diffusers pipeline and the run's config.json, which records the length and its scores)."""
    from ema import reconstruct
    from files import atomic_folder
    from model import load_model, save_model, trained_scheduler

    saved = load_model(model_path)  # float32, whatever dtype was scored
    saved.unet.load_state_dict(reconstruct(snapshots, length)[0])
    record = {**(saved.record or {}), "_posthoc_ema": {"length": length, "snapshots": str(snapshots), **metrics}}
    with atomic_folder(folder) as tmp:
        save_model(tmp, saved.unet, trained_scheduler(saved.schedule), record)
    print(f"saved the model with the best EMA length ({length}) as {folder}")


def run(cfg: EvaluateConfig) -> dict:
    from tqdm.auto import tqdm

    from ema import find_snapshots, reconstruct
    from files import write_json, writable_folder
    from metrics import FEATURE_LAYER, describe, generated_features, inception_features, load_inception, score
    from model import load_model
    from sampling import (check_guidance, class_indices, classes_by_seed, default_steps, make_sampler, prepare_unet,
                          process_state, sampling_dtype, save_png)

    started, began = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    state = process_state()
    main, device = state.is_main_process, state.device
    dtype = sampling_dtype(cfg.dtype, device, quiet=not main)
    out = writable_folder(cfg.output_dir) if main else Path(cfg.output_dir)
    steps, snapshots, class_name = None, None, None
    if not cfg.images:  # the model first: a wrong --model_path is reported before any weights are fetched
        saved = load_model(cfg.model_path, dtype=dtype)
        snapshots = find_snapshots(cfg.model_path) if cfg.ema_length else None
        trained = saved.schedule.num_train_timesteps
        steps = cfg.num_inference_steps or default_steps(cfg.scheduler, trained)
        if steps > trained:
            raise UserError(f"--num_inference_steps {steps} exceeds the model's {trained} training timesteps; "
                            f"lower it")
        check_guidance(cfg.guidance_scale, saved.classes)
        if cfg.class_label is not None:
            class_name = saved.classes[class_indices([cfg.class_label], saved.classes)[0]]
    with state.main_process_first():  # the weights download once
        inception = load_inception(cfg.inception_weights, device, progress=main)
    if not inception.standard and main:
        print(f"notice: --inception_weights {cfg.inception_weights} are not the standard 2015-12-05 weights; the "
              f"scores are not comparable with published ones")
    seconds: dict[str, float] = {}
    if cfg.images:
        if not main:  # a folder of images: the main process scores it alone
            return {}
        images = read_images(cfg.images)
        began_ref = time.perf_counter()
        reference, reference_info = reference_data(cfg, images.shape[-1], inception, device)
        seconds["reference_s"] = time.perf_counter() - began_ref
        began_features = time.perf_counter()
        with tqdm(total=len(images), desc="scoring", unit="img") as bar:
            features = inception_features(inception, images, device, bar)
        seconds["features_s"] = time.perf_counter() - began_features
        model = {"images": str(cfg.images), "count": len(images)}
    else:
        unet = prepare_unet(saved.unet, device, dtype)
        began_ref = time.perf_counter()
        reference, reference_info = (reference_data(cfg, unet.config.sample_size, inception, device, class_name)
                                     if main else (None, None))
        seconds["reference_s"] = time.perf_counter() - began_ref
        sampler = make_sampler(cfg.scheduler, saved.schedule)
        seeds = [cfg.seed + i for i in range(cfg.num_images)]
        labels = None  # a class-conditional model: the class, else each seed's in proportion to the training data
        if class_name is not None:
            labels = [saved.classes.index(class_name)] * len(seeds)
        elif saved.classes is not None:
            labels = classes_by_seed(seeds, saved.class_counts, len(saved.classes))
        drawn = {}  # EMA length (None: the model's own weights) -> features and images
        for length in cfg.ema_length or (None,):
            if length is not None:
                unet.load_state_dict(reconstruct(snapshots, length)[0])
            shown = "" if length is None else f", EMA length {length}"
            features, images, timing = generated_features(unet, sampler, seeds, steps, cfg.batch_size, dtype, cfg.eta,
                                                          inception, state, keep_images=cfg.save_images,
                                                          desc=f"generating ({cfg.scheduler}, {steps} steps{shown}) "
                                                               f"+ scoring", labels=labels,
                                                          guidance_scale=cfg.guidance_scale)
            drawn[length] = features, images
            for key, value in timing.items():  # this process's share
                seconds[key] = seconds.get(key, 0) + value
        model = {"path": str(cfg.model_path), "sample_size": unet.config.sample_size,
                 "channels": unet.config.in_channels, "parameters": sum(p.numel() for p in unet.parameters())}
        if saved.classes is not None:
            model.update(classes=len(saved.classes), guidance_scale=cfg.guidance_scale,
                         **({"class": class_name} if class_name else {"class_counts": saved.class_counts}))
    if not main:
        return {}
    began_metrics = time.perf_counter()
    if cfg.images:
        result = score(reference, features)
    else:
        by_length = {length: score(reference, features) for length, (features, _) in drawn.items()}
        best = min(by_length, key=lambda length: by_length[length]["fid"])
        result, images = by_length[best], drawn[best][1]
        if cfg.ema_length:
            for length, metrics in by_length.items():
                print(f"EMA length {length}: {describe(metrics)}" + ("  <- the best" if length == best else ""))
            model["ema_lengths"] = {str(length): metrics for length, metrics in by_length.items()}
            model["best_ema_length"] = best
            save_best_ema(cfg.model_path, snapshots, best, out / "best_ema_model", by_length[best])
        if cfg.save_images:
            (out / "images").mkdir(exist_ok=True)
            for seed, image in zip(seeds, images):
                save_png(image.float() / 255, out / "images" / f"seed{seed:06d}.png")
    seconds["metrics_s"] = time.perf_counter() - began_metrics
    seconds["total_s"] = time.perf_counter() - began
    record = {"metrics": result, "settings": {**dataclasses.asdict(cfg), "num_inference_steps_used": steps,
                                              "num_processes": state.num_processes, "device": str(device),
                                              "dtype_used": str(dtype).replace("torch.", "")},
              "model": model, "reference": reference_info,
              "inception": {"weights": inception.weights, "standard": inception.standard,
                            "features": f"pool3 ({FEATURE_LAYER})"},
              "versions": config_module.library_versions("torch-fidelity"),
              "time": {"started": started, **{k: round(v, 3) for k, v in seconds.items()}}}
    write_json(out / "metrics.json", record)
    scored = f"{result['num_images']} images" + (f" ({cfg.scheduler}, {steps} steps)" if steps else "")
    if class_name is not None:
        scored += f" of class {class_name}, guidance {cfg.guidance_scale}"
    elif model.get("classes"):
        scored += f" of {model['classes']} classes, guidance {cfg.guidance_scale}"
    print(f"{describe(result)}  [{scored} vs {reference_info.get('dataset', reference_info.get('file'))} "
          f"({reference_info['images'] or 'statistics'}{' of that class' if class_name else ''}), "
          f"{seconds['total_s']:.0f} s; {out / 'metrics.json'}]")
    return record


def main(argv: Optional[list[str]] = None) -> int:
    return config_module.exit_code(lambda: run(parse_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
