"""FID and KID: torch-fidelity's Inception-v3 features, reference statistics cached beside a dataset, and the
metrics, for evaluate.py and for the evaluation during training.

Features are the pool3 features of the TF Inception-v3 (2015-12-05 weights) as torch-fidelity ports it, with its
resize to 299 px, computed in full float32; FID and KID are torch-fidelity's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Optional

from config import UserError, check_inception_weights

FEATURE_LAYER = "2048"  # Inception's pool3 features, those of FID and KID
FEATURE_BATCH = 64  # images per Inception forward pass (torch-fidelity's default)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults (Binkowski et al. 2018); size capped by the counts
STANDARD_WEIGHTS_SHA256 = "6726825d"  # the start of the sha256 of torch-fidelity's converted 2015-12-05 weights


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
        check_inception_weights(weights_path)
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


def reference_statistics(dataset, inception: Inception, device, progress: bool = True,
                         label: Optional[int] = None) -> dict:
    """mu, sigma and features of every image of a dataset cache (dataset.ImageCache), or of its images of class
    `label`, computed once and kept beside it: the cache's name carries the dataset's fingerprint and labels, so
    changed data gets new statistics."""
    import numpy as np
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from tqdm.auto import tqdm

    from files import atomic_file

    path = statistics_path(dataset, inception, label)
    if path.exists():
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    indices = np.arange(len(dataset)) if label is None else np.flatnonzero(dataset.labels == label)
    chunk, parts = 1024, []  # images read from the cache at a time
    with tqdm(total=len(indices), desc="reference features", unit="img", disable=not progress) as bar:
        for start in range(0, len(indices), chunk):
            images = dataset.__getitems__(indices[start:start + chunk].tolist())
            parts.append(inception_features(inception, images, device, bar))
    features = torch.cat(parts)
    stats = {**fid_features_to_statistics(features), "features": features.numpy()}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **stats)
    return stats


def statistics_path(dataset, inception: Inception, label: Optional[int] = None) -> Path:
    """Beside the dataset's cache and named after it (remove_stale_caches deletes both), after the weights, and after
    the class of a class's statistics."""
    return dataset.path.with_name(f"{dataset.path.stem}-{inception.key}{'' if label is None else f'-class{label}'}.npz")


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
                       inception: Inception, state, keep_images: bool = False, desc: str = "generating + scoring",
                       labels: Optional[list[int]] = None, guidance_scale: float = 1.0):
    """Features of the images of these seeds, ordered by seed, on the main process (None elsewhere); each process
    draws its share (seeds[rank::processes]). Also the uint8 images when asked, and the seconds spent. A
    class-conditional model draws seed i of class labels[i] with that guidance scale."""
    import torch
    from tqdm.auto import tqdm

    from sampling import for_model, gather_by_seed, generate, shard, to_uint8

    mine = shard(seeds, state)
    my_labels = shard(labels, state) if labels is not None else None
    features, images, seconds = [], [], {"generation_s": 0.0, "features_s": 0.0}
    with tqdm(total=len(seeds), desc=desc, unit="img", disable=not state.is_main_process) as bar:
        for start in range(0, len(mine), batch_size):
            began = time.perf_counter()
            guidance = for_model(unet, my_labels and my_labels[start:start + batch_size], guidance_scale)
            chunk = to_uint8(generate(unet, sampler, mine[start:start + batch_size], steps, batch_size, dtype, eta,
                                      progress=False, guidance=guidance))
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
