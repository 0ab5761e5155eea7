"""Score a model, or a folder of images, with FID and KID against a reference set.

    python evaluate.py --model_path ./results/final_model --reference cifar10
    python evaluate.py --model_path google/ddpm-cifar10-32 --reference cifar10 --scheduler ddim --num_inference_steps 50
    python evaluate.py --images ./inference_results --reference custom --dataset_path ./my_images
    accelerate launch evaluate.py ...    # or torchrun: the seeds are shared among the processes

Features are the pool3 features of the TF Inception-v3 (2015-12-05 weights) as torch-fidelity ports it, with its
resize to 299 px; FID and KID are torch-fidelity's. The reference statistics are computed once from the whole set
through the toolkit's dataset code, at the size of the scored images, and cached beside the dataset in
data_dir/cache, keyed by its fingerprint. Image i is drawn from seed + i, as in inference.py. Prints FID and KID on
one line and writes output_dir/metrics.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import config as config_module
from config import EvaluateConfig, UserError

EXIT_USER_ERROR = 2
FEATURE_LAYER = "2048"  # Inception's pool3 features, those of FID and KID
FEATURE_BATCH = 64  # images per Inception forward pass (torch-fidelity's default)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults (Binkowski et al. 2018); size capped by the counts
STANDARD_WEIGHTS_SHA256 = "6726825d"  # the start of the sha256 of torch-fidelity's converted 2015-12-05 weights
TRAINING_EVAL_BATCH = 128  # images per sampling pass during training (halved on out-of-memory)


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


def parse_config(argv: Optional[list[str]] = None) -> EvaluateConfig:
    values, _ = config_module.parse_cli(argv, "evaluate.py", __doc__, config_module.flat_fields(EvaluateConfig()),
                                        (EvaluateConfig,))
    cfg = config_module.build(EvaluateConfig, values)
    validate(cfg)
    return cfg


def validate(cfg: EvaluateConfig) -> None:
    """Catch the user's mistakes before any work."""
    if bool(cfg.model_path) == bool(cfg.images):
        raise UserError("pass either --model_path (a final_model/ folder to sample from) or --images DIR (images "
                        "already generated), not both" if cfg.model_path else
                        "nothing to score: pass --model_path (a final_model/ folder) or --images DIR")
    minimum = dict(num_images=(cfg.num_images, 2), batch_size=(cfg.batch_size, 1),
                   num_inference_steps=(1 if cfg.num_inference_steps is None else cfg.num_inference_steps, 1))
    for name, (value, least) in minimum.items():
        if value < least:
            raise UserError(f"--{name} must be at least {least}, got {value}")
    if not 0 <= cfg.eta <= 1:
        raise UserError(f"--eta must be between 0 and 1, got {cfg.eta}")
    if cfg.images and not Path(cfg.images).expanduser().is_dir():
        raise UserError(f"--images {cfg.images} is not a folder; pass the folder of generated images")
    if cfg.reference.endswith(".npz") and not Path(cfg.reference).expanduser().is_file():
        raise UserError(f"--reference {cfg.reference} does not exist; pass a statistics file (mu, sigma) or a "
                        f"dataset: cifar10, mnist or custom with --dataset_path")
    check_weights_path(cfg.inception_weights)


def validate_training(t) -> None:
    """train_ddpm.py's evaluation settings (TrainingConfig.eval_*), checked before training starts."""
    if t.eval_epochs is not None and t.eval_epochs < 1:
        raise UserError(f"--eval_epochs must be at least 1 (or none), got {t.eval_epochs}")
    if t.eval_num_images < 2:
        raise UserError(f"--eval_num_images must be at least 2, got {t.eval_num_images}")
    check_weights_path(t.inception_weights)


def check_weights_path(path: Optional[str]) -> None:
    if path and not Path(path).expanduser().is_file():
        raise UserError(f"--inception_weights {path} does not exist; pass the downloaded "
                        f"weights-inception-2015-12-05-6726825d.pth file")


# ---------------------------------------------------------------------------------------------------
# Inception features (torch-fidelity)
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inception:
    """torch-fidelity's Inception-v3 feature extractor and what its weights are."""

    extractor: object  # FeatureExtractorInceptionV3, in eval mode, on the device
    weights: str  # the file, or torch-fidelity's download URL
    key: str  # names the weights in cache files: features of different weights never mix
    standard: bool  # whether they are the 2015-12-05 weights the papers use (else the scores are not comparable)


def load_inception(weights_path: Optional[str], device, progress: bool = True) -> Inception:
    """The extractor, from --inception_weights or downloaded on first use into torch's hub cache.

    Offline without a file: a UserError naming the file to fetch and the flag."""
    import pickle

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    name = URL_INCEPTION_V3.rsplit("/", 1)[-1]
    if weights_path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / name  # where torch-fidelity's own download puts it
        try:  # downloaded here rather than by torch-fidelity, whose "Downloading:" line would precede an error
            if not cached.exists():
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=progress)
        except OSError as e:  # urllib's URLError, a refused connection, a full disk
            raise UserError(f"cannot download the Inception-v3 weights into {cached.parent} ({e.__class__.__name__}: "
                            f"no network?); fetch {URL_INCEPTION_V3} on a machine with internet and pass the file "
                            f"with --inception_weights {name}") from None
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE_LAYER], verbose=progress)
        weights, key, standard = URL_INCEPTION_V3, "inception-2015-12-05", True
    else:
        path = Path(weights_path).expanduser()
        check_weights_path(weights_path)
        try:
            extractor = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE_LAYER],
                                                    feature_extractor_weights_path=str(path))
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"--inception_weights {weights_path} is not torch-fidelity's Inception-v3 weights file "
                            f"({e.__class__.__name__}); pass {name}") from None
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        standard = sha256.startswith(STANDARD_WEIGHTS_SHA256)
        weights, key = str(path), "inception-2015-12-05" if standard else f"inception-{sha256[:12]}"
    return Inception(extractor.to(device).eval(), weights, key, standard)


@contextlib.contextmanager
def full_float32(device):
    """Inception in true float32, the precision of torch-fidelity's reference figures: no autocast (training samples
    under it) and no TF32, which PyTorch allows by default for cuDNN convolutions on Ampere and later GPUs."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def inception_features(inception: Inception, images, device, bar=None):
    """[N, 2048] float32 features (CPU) of uint8 [N, C, H, W] images; greyscale is read as RGB, as torch-fidelity
    reads a greyscale file. torch-fidelity resizes each image to 299 px itself."""
    import torch

    out = []
    with torch.no_grad(), full_float32(torch.device(device)):
        for start in range(0, len(images), FEATURE_BATCH):
            batch = images[start:start + FEATURE_BATCH]
            batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
            (features,) = inception.extractor(batch.to(device))
            out.append(features.float().cpu())
            if bar is not None:
                bar.update(len(batch))
    return torch.cat(out) if out else torch.zeros(0, int(FEATURE_LAYER))


# ---------------------------------------------------------------------------------------------------
# Reference statistics, cached beside the dataset
# ---------------------------------------------------------------------------------------------------


def reference_statistics(dataset, inception: Inception, device, progress: bool = True) -> dict:
    """mu, sigma and features of every image of a dataset cache (dataset.ImageCache), computed once and kept beside
    it: the cache's name carries the dataset's fingerprint, so changed data gets new statistics."""
    import numpy as np
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from tqdm.auto import tqdm

    path = statistics_path(dataset, inception)
    if path.exists():
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    chunk, parts = 1024, []  # images read from the cache at a time
    with tqdm(total=len(dataset), desc="reference features", unit="img", disable=not progress) as bar:
        for start in range(0, len(dataset), chunk):
            images = dataset.__getitems__(list(range(start, min(start + chunk, len(dataset)))))
            parts.append(inception_features(inception, images, device, bar))
    features = torch.cat(parts)
    stats = {**fid_features_to_statistics(features), "features": features.numpy()}
    from sampling import atomic_write

    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **stats)
    return stats


def statistics_path(dataset, inception: Inception) -> Path:
    """Beside the dataset's cache and named after it (remove_stale_caches deletes both) and after the weights."""
    return dataset.path.with_name(f"{dataset.path.stem}-{inception.key}.npz")


def load_statistics_file(path: str) -> dict:
    """A FILE.npz of reference statistics: mu and sigma (pytorch-fid, torch-fidelity and ADM keep them so), and
    features for KID."""
    import numpy as np

    try:
        with np.load(Path(path).expanduser()) as stored:
            stats = {name: stored[name] for name in stored.files if name in ("mu", "sigma", "features")}
    except (OSError, ValueError) as e:
        raise UserError(f"--reference {path} is not a readable .npz file ({e.__class__.__name__})") from None
    d = int(FEATURE_LAYER)
    if stats.get("mu", np.zeros(0)).shape != (d,) or stats.get("sigma", np.zeros(0)).shape != (d, d):
        raise UserError(f"--reference {path} must hold mu [{d}] and sigma [{d}, {d}] of Inception pool3 features")
    stats["mu"] = stats["mu"].astype(np.float32)  # torch-fidelity's FID wants both means of one dtype
    stats["sigma"] = stats["sigma"].astype(np.float64)
    return stats


# ---------------------------------------------------------------------------------------------------
# FID and KID
# ---------------------------------------------------------------------------------------------------


def frechet_distance(reference: dict, features) -> float:
    """torch-fidelity's FID between the reference statistics and these features."""
    import numpy as np
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    generated = fid_features_to_statistics(features)
    n, d = features.shape
    if n > d:
        return fid_statistics_to_metric(reference, generated, verbose=False)[KEY_METRIC_FID]
    # Fewer images than dimensions (training-time evaluation, tests): sigma_g = C^T C, so sigma_r sigma_g has the
    # non-zero eigenvalues of the symmetric n x n C sigma_r C^T. The same value as torch-fidelity's general 2048 x 2048
    # eigvals, in milliseconds instead of ~30 s on a CPU (tests/test_evaluate.py compares the two).
    centred = (features.double().numpy() - generated["mu"].astype(np.float64)) / math.sqrt(n - 1)
    tr_covmean = np.sqrt(np.linalg.eigvalsh(centred @ reference["sigma"] @ centred.T).clip(min=0)).sum()
    diff = reference["mu"].astype(np.float64) - generated["mu"].astype(np.float64)
    return float(diff @ diff + np.trace(reference["sigma"]) + np.trace(generated["sigma"]) - 2 * tr_covmean)


def kernel_inception_distance(reference_features, features) -> dict:
    """torch-fidelity's KID (unbiased MMD^2, cubic polynomial kernel) over random subsets; mean and std."""
    import torch
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(KID_SUBSET_SIZE, len(reference_features), len(features))
    out = kid_features_to_metric(torch.as_tensor(reference_features), features, kid_subsets=KID_SUBSETS,
                                 kid_subset_size=size, verbose=False)
    return {"kid_mean": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD], "kid_subset_size": size,
            "kid_subsets": KID_SUBSETS}


def score(reference: dict, features) -> dict:
    """FID, and KID when the reference has its features (a statistics file may hold mu and sigma only)."""
    result = {"fid": frechet_distance(reference, features), "num_images": len(features)}
    if "features" in reference:
        result.update(kernel_inception_distance(reference["features"], features))
    return result


def describe(result: dict) -> str:
    kid = (f"KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}" if "kid_mean" in result
           else "KID n/a (the reference file holds no features)")
    return f"FID {result['fid']:.3f}  {kid}"


# ---------------------------------------------------------------------------------------------------
# Generated images, shared among processes by seed
# ---------------------------------------------------------------------------------------------------


def generated_features(unet, sampler, seeds: list[int], steps: int, batch_size: int, dtype, eta: float,
                       inception: Inception, state, keep_images: bool = False, desc: str = "generating + scoring"):
    """Features of the images of these seeds, ordered by seed, on the main process (None elsewhere); each process
    draws its share (seeds[rank::processes]). Also the uint8 images when asked, and the seconds spent."""
    import torch
    from tqdm.auto import tqdm

    from sampling import gather_by_seed, generate, shard, to_uint8

    mine = shard(seeds, state)
    features, images, seconds = [], [], {"generation_s": 0.0, "features_s": 0.0}
    with tqdm(total=len(seeds), desc=desc, unit="img", disable=not state.is_main_process) as bar:
        for start in range(0, len(mine), batch_size):
            began = time.perf_counter()
            chunk = to_uint8(generate(unet, sampler, mine[start:start + batch_size], steps, batch_size, dtype, eta,
                                      progress=False))
            seconds["generation_s"] += time.perf_counter() - began
            began = time.perf_counter()
            features.append(inception_features(inception, chunk, state.device))
            seconds["features_s"] += time.perf_counter() - began
            images += [chunk] if keep_images else []
            bar.update(min(len(chunk) * state.num_processes, bar.total - bar.n))  # the others keep the same pace
    mine_features = torch.cat(features) if features else torch.zeros(0, int(FEATURE_LAYER))
    _, all_features = gather_by_seed(state, mine, mine_features)
    all_images = None
    if keep_images:
        all_images = gather_by_seed(state, mine, torch.cat(images) if images else torch.zeros(0))[1]
    return all_features, all_images, seconds


# ---------------------------------------------------------------------------------------------------
# During training
# ---------------------------------------------------------------------------------------------------


class TrainingEvaluator:
    """FID and KID of the (EMA) weights during training, against the training set; keeps best_model/ by FID.

    Built before the loop, so missing weights stop the run before it trains; called with the EMA weights swapped
    in. Every process generates its share of the images; the main process scores, logs and saves."""

    def __init__(self, cfg, accelerator, dataset, out: Path):
        self.cfg, self.accelerator, self.best_dir = cfg, accelerator, out / "best_model"
        main = accelerator.is_main_process
        with accelerator.main_process_first():  # the weights download once
            self.inception = load_inception(cfg.training.inception_weights, accelerator.device, progress=main)
            self.reference = reference_statistics(dataset, self.inception, accelerator.device, main) if main else None
        self.best_fid = math.inf
        if (self.best_dir / "metrics.json").exists():  # a resumed run competes with its earlier best
            self.best_fid = json.loads((self.best_dir / "metrics.json").read_text())["fid"]

    def __call__(self, unet, noise_scheduler, step: int, record: dict) -> None:
        from tqdm.auto import tqdm

        from sampling import make_sampler

        t, accelerator = self.cfg.training, self.accelerator
        sampler = make_sampler(t.sample_scheduler, noise_scheduler.config)
        unet.eval()
        with accelerator.autocast():
            features, _, _ = generated_features(unet, sampler, list(range(t.eval_num_images)),
                                                t.sample_num_inference_steps, TRAINING_EVAL_BATCH, unet.dtype, 0.0,
                                                self.inception, accelerator, desc=f"evaluating at step {step}")
        unet.train()
        if accelerator.is_main_process:
            result = score(self.reference, features)
            accelerator.log({"eval/fid": result["fid"], **({"eval/kid": result["kid_mean"]} if "kid_mean" in result
                                                           else {})}, step=step)
            best = result["fid"] < self.best_fid
            if best:
                self.best_fid = result["fid"]
                self.save_best(unet, noise_scheduler, record, {**result, "step": step})
            tqdm.write(f"eval at step {step} ({t.eval_num_images} images, {t.sample_scheduler} "
                       f"{t.sample_num_inference_steps} steps): {describe(result)}"
                       + ("; the best so far, saved as best_model/" if best else ""))
        accelerator.wait_for_everyone()

    def save_best(self, unet, noise_scheduler, record: dict, result: dict) -> None:
        """best_model/: a DDPMPipeline like final_model/, with metrics.json; replaced whole or not at all."""
        import shutil

        from diffusers import DDPMPipeline

        tmp = self.best_dir.with_name("best_model.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(record, indent=2, default=str))
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
        shutil.rmtree(self.best_dir, ignore_errors=True)
        os.replace(tmp, self.best_dir)


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------


def load_model(model_path: str, dtype):
    """The UNet and noise schedule of a DDPMPipeline folder or Hub id (inference.load_model), or of a folder that
    holds a diffusers unet/ (and scheduler/) without the pipeline's model_index.json."""
    from inference import load_model as load_pipeline

    path = Path(model_path).expanduser()
    if (path / "model_index.json").exists() or not (path / "unet" / "config.json").exists():
        return load_pipeline(model_path, dtype)
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(path / "unet", torch_dtype=dtype)
    has_schedule = (path / "scheduler" / "scheduler_config.json").exists()
    schedule = DDPMScheduler.from_pretrained(path / "scheduler") if has_schedule else DDPMScheduler()
    return unet, schedule.config


def reference_data(cfg: EvaluateConfig, image_size: int, inception: Inception, device) -> tuple[dict, dict]:
    """The reference statistics and how metrics.json names them: a statistics file, or a dataset read through
    dataset.py at the scored images' size (cached). The main process's work: the others do not wait for it."""
    if cfg.reference.endswith(".npz"):
        stats = load_statistics_file(cfg.reference)
        return stats, {"file": str(cfg.reference), "images": len(stats.get("features", ()))}
    from config import Config
    from dataset import load_dataset

    data = Config()
    data.training.dataset_name, data.training.image_size = cfg.reference, image_size
    data.data.dataset_path, data.data.data_dir = cfg.dataset_path, cfg.data_dir
    dataset = load_dataset(data)
    stats = reference_statistics(dataset, inception, device)
    return stats, {"dataset": cfg.reference, "dataset_path": cfg.dataset_path, "images": len(dataset),
                   "image_size": image_size, "channels": int(dataset[0].shape[0]),
                   "statistics_file": str(statistics_path(dataset, inception))}


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


def run(cfg: EvaluateConfig) -> dict:
    import torch

    from inference import choose_device_and_dtype, inference_steps, prepare_output_dir
    from sampling import make_sampler, process_state, save_png

    started, began = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    state = process_state()
    device, dtype = choose_device_and_dtype(cfg.dtype, state.device, quiet=not state.is_main_process)
    main = state.is_main_process
    out = prepare_output_dir(cfg.output_dir) if main else Path(cfg.output_dir)
    if not cfg.images:  # the model first: a wrong --model_path is reported before any weights are fetched
        unet, trained_schedule = load_model(cfg.model_path, dtype)
        steps = inference_steps(cfg, trained_schedule.num_train_timesteps)
        if steps > trained_schedule.num_train_timesteps:
            raise UserError(f"--num_inference_steps {steps} exceeds the model's "
                            f"{trained_schedule.num_train_timesteps} training timesteps; lower it")
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
        from tqdm.auto import tqdm
        with tqdm(total=len(images), desc="scoring", unit="img") as bar:
            features = inception_features(inception, images, device, bar)
        seconds["features_s"] = time.perf_counter() - began_features
        model = {"images": str(cfg.images), "count": len(images)}
        steps = None
    else:
        unet = unet.to(device).eval()
        if device.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)
        began_ref = time.perf_counter()
        reference, reference_info = (reference_data(cfg, unet.config.sample_size, inception, device) if main
                                     else (None, None))
        seconds["reference_s"] = time.perf_counter() - began_ref
        sampler = make_sampler(cfg.scheduler, trained_schedule)
        seeds = [cfg.seed + i for i in range(cfg.num_images)]
        features, images, timing = generated_features(unet, sampler, seeds, steps, cfg.batch_size, dtype, cfg.eta,
                                                      inception, state, keep_images=cfg.save_images,
                                                      desc=f"generating ({cfg.scheduler}, {steps} steps) + scoring")
        seconds.update(timing)  # this process's share
        model = {"path": str(cfg.model_path), "sample_size": unet.config.sample_size,
                 "channels": unet.config.in_channels, "parameters": sum(p.numel() for p in unet.parameters())}
        if main and cfg.save_images:
            (out / "images").mkdir(exist_ok=True)
            for seed, image in zip(seeds, images):
                save_png(image.float() / 255, out / "images" / f"seed{seed:06d}.png")
    if not main:
        return {}
    began_metrics = time.perf_counter()
    result = score(reference, features)
    seconds["metrics_s"] = time.perf_counter() - began_metrics
    seconds["total_s"] = time.perf_counter() - began
    record = {"metrics": result, "settings": {**dataclasses.asdict(cfg), "num_inference_steps_used": steps,
                                              "num_processes": state.num_processes, "device": str(device),
                                              "dtype_used": str(dtype).replace("torch.", "")},
              "model": model, "reference": reference_info,
              "inception": {"weights": inception.weights, "standard": inception.standard,
                            "features": f"pool3 ({FEATURE_LAYER})"},
              "versions": library_versions(), "time": {"started": started, **{k: round(v, 3) for k, v in
                                                                                   seconds.items()}}}
    from sampling import atomic_write
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    scored = f"{result['num_images']} images" + (f" ({cfg.scheduler}, {steps} steps)" if steps else "")
    print(f"{describe(result)}  [{scored} vs {reference_info.get('dataset', reference_info.get('file'))} "
          f"({reference_info['images'] or 'statistics'}), {seconds['total_s']:.0f} s; {out / 'metrics.json'}]")
    return record


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import torch
    import torch_fidelity
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "torch-fidelity": torch_fidelity.__version__,
            "python": sys.version.split()[0]}


def main(argv: Optional[list[str]] = None) -> int:
    try:
        run(parse_config(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
