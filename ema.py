"""Moving averages of the weights: EDM2's power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models"), its snapshots during training, and the post-hoc reconstruction of an EMA of any length
from them.

An EMA's length is sigma_rel: the standard deviation of its averaging profile relative to the images seen. Time is
counted in images, so a length means the same whatever the batch size, accumulation or process count. The power-function
EMA of exponent gamma averages the weights theta_tau of all times tau <= t with weights proportional to tau ** gamma;
stepped from t - dt to t it is  ema <- beta ema + (1 - beta) theta,  beta = (1 - dt / t) ** (gamma + 1).
Snapshots of two such EMAs (two lengths) taken at several times span, by least squares, the EMA of any other length at
any of those times (the paper's Algorithm 3, solve_coefficients below): the length can be chosen after training.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

POSTHOC_LENGTHS = (0.05, 0.10)  # the two lengths whose snapshots are kept for post-hoc EMA (EDM2's)
SNAPSHOT_FOLDER = "ema_snapshots"  # in a run's output_dir, beside final_model/
SNAPSHOT_NAME = re.compile(r"^ema-(\d+)img-(\d\.\d+)\.safetensors$")  # ema-{images seen}img-{length}.safetensors


def length_to_exponent(sigma_rel: float) -> float:
    """gamma of the power-function profile with relative standard deviation sigma_rel (EDM2, eq. 3 solved for gamma:
    the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + 12 - s^-2)."""
    t = float(sigma_rel) ** -2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def exponent_to_length(gamma: float) -> float:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    return float(np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3)))


def profile_inner_products(a_time, a_length, b_time, b_length) -> np.ndarray:
    """<p_a, p_b> of the normalised power-function profiles p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]
    of EMAs taken at times a_time, b_time (broadcast), as EDM2's power_function_correlation."""
    a_gamma = np.vectorize(length_to_exponent)(a_length)
    b_gamma = np.vectorize(length_to_exponent)(b_length)
    ratio = np.float64(a_time) / np.float64(b_time)
    exponent = np.where(np.float64(a_time) < np.float64(b_time), b_gamma, -a_gamma)
    return (a_gamma + 1) * (b_gamma + 1) * ratio ** exponent / ((a_gamma + b_gamma + 1) * np.maximum(a_time, b_time))


def solve_coefficients(snapshot_times, snapshot_lengths, time: float, length: float) -> np.ndarray:
    """Weights of the snapshots whose sum is closest (least squares over the profiles) to the EMA of `length` at
    `time`: EDM2's Algorithm 3, normalised to sum to 1 (so that the weights' scale is kept exactly)."""
    times, lengths = np.float64(snapshot_times), np.float64(snapshot_lengths)
    gram = profile_inner_products(times[:, None], lengths[:, None], times[None, :], lengths[None, :])
    target = profile_inner_products(times, lengths, np.float64(time), np.float64(length))
    coefficients = np.linalg.lstsq(gram, target, rcond=None)[0]
    return coefficients / coefficients.sum()


class PowerEMA:
    """Power-function EMAs of the same parameters at several lengths, stepped by images seen. lengths[0] is the EMA
    that previews, checkpoints and final_model/ use; the others are tracked for post-hoc snapshots. The averages are
    registered with accelerate for checkpointing (state_dict / load_state_dict), so a resumed run goes on exactly."""

    def __init__(self, parameters: Sequence[torch.Tensor], lengths: Sequence[float]):
        parameters = list(parameters)
        self.lengths = tuple(float(length) for length in lengths)
        self.exponents = [length_to_exponent(length) for length in self.lengths]
        self.averages = [[p.detach().clone().float() for p in parameters] for _ in self.lengths]
        self.images = 0  # images seen by the weights averaged so far
        self._stored: Optional[list[torch.Tensor]] = None

    @torch.no_grad()
    def step(self, parameters: Sequence[torch.Tensor], images: int) -> None:
        """Average in the weights after `images` more images (one optimizer step's worth); no host sync."""
        self.images += images
        weights = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in parameters]
        for average, gamma in zip(self.averages, self.exponents):
            beta = (1 - images / self.images) ** (gamma + 1)
            torch._foreach_lerp_(average, weights, 1 - beta)

    def to(self, device) -> "PowerEMA":
        self.averages = [[a.to(device) for a in average] for average in self.averages]
        return self

    @contextlib.contextmanager
    def swapped_in(self, parameters: Sequence[torch.Tensor], index: int = 0) -> Iterator[None]:
        """The EMA of lengths[index] in `parameters` for the block; the training weights come back untouched."""
        parameters = list(parameters)
        stored = [p.detach().clone() for p in parameters]
        with torch.no_grad():
            for p, a in zip(parameters, self.averages[index]):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(parameters, stored):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"lengths": list(self.lengths), "images": self.images, "averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        """A state of this class, or of diffusers' EMAModel (checkpoints of earlier versions: its shadow weights start
        every length here, and the images seen are estimated from its step count by the caller's images_per_step)."""
        if "shadow_params" in state:
            shadow = [s.float() for s in state["shadow_params"]]
            self.averages = [[s.clone() for s in shadow] for _ in self.lengths]
            self.images = state.get("optimization_step", 0) * getattr(self, "images_per_step", 1)
            return
        saved = dict(zip(state["lengths"], state["averages"]))
        first = state["averages"][0]
        self.averages = [[a.clone() for a in saved.get(length, first)] for length in self.lengths]
        self.images = state["images"]

    def snapshot(self, folder: Path, names: Sequence[str]) -> list[Path]:
        """Write the EMAs of POSTHOC_LENGTHS as safetensors named by images seen and length (the parameters' names
        are `names`); returns the files written."""
        from safetensors.torch import save_file

        from files import atomic_file

        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for length, average in zip(self.lengths, self.averages):
            if length not in POSTHOC_LENGTHS:
                continue
            path = folder / f"ema-{self.images:012d}img-{length:.4f}.safetensors"
            with atomic_file(path) as tmp:
                save_file({name: a.contiguous().cpu() for name, a in zip(names, average)}, str(tmp))
            written.append(path)
        return written


def find_snapshots(model_path: str) -> Path:
    """The snapshot folder of the run that wrote the model at model_path (its final_model/, a checkpoint, or the
    output_dir itself); a UserError when there is none."""
    from config import UserError

    for folder in (Path(model_path) / SNAPSHOT_FOLDER, Path(model_path).parent / SNAPSHOT_FOLDER):
        if len({length for _, length, _ in list_snapshots(folder)}) >= 2:
            return folder
    raise UserError(f"--ema_length needs the EMA snapshots of the run that made {model_path}: train it with "
                    f"--ema_snapshots N (they go to output_dir/{SNAPSHOT_FOLDER}/), and pass its final_model/")


def list_snapshots(folder: Path) -> list[tuple[int, float, Path]]:
    """(images seen, length, file) of every snapshot in folder, oldest first."""
    found = []
    for path in sorted(Path(folder).glob("ema-*.safetensors")):
        match = SNAPSHOT_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), float(match.group(2)), path))
    return sorted(found)


def drop_snapshots_after(folder: Path, images: int) -> None:
    """Delete the snapshots taken after `images` (an abandoned branch, when a run resumes from an older checkpoint)."""
    for seen, _, path in list_snapshots(folder):
        if seen > images:
            path.unlink(missing_ok=True)


def reconstruct(folder: Path, length: float, images: Optional[int] = None) -> tuple[dict, np.ndarray]:
    """The weights of the EMA of `length` at `images` seen (default: the last snapshot's time), summed from the
    snapshots, and the coefficients used (one per snapshot)."""
    from safetensors.torch import load_file

    snapshots = [s for s in list_snapshots(folder) if images is None or s[0] <= images]
    if len({length for _, length, _ in snapshots}) < 2:
        raise ValueError(f"{folder} holds snapshots of fewer than two EMA lengths; post-hoc EMA needs two")
    time = images or max(seen for seen, _, _ in snapshots)
    coefficients = solve_coefficients([s[0] for s in snapshots], [s[1] for s in snapshots], time, length)
    total: dict = {}
    for coefficient, (_, _, path) in zip(coefficients, snapshots):
        for name, tensor in load_file(str(path)).items():
            total[name] = total.get(name, 0) + tensor.double() * float(coefficient)
    return {name: tensor.float() for name, tensor in total.items()}, coefficients
