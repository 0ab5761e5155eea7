"""Editing a user's images with inference.py: inpainting (--inpaint with --mask, RePaint) and image-to-image
(--init_image with --strength, SDEdit). Reads the images as training reads them, checks each mask and pairs it with
its image, and writes the results: one PNG per (image, seed), the grid of images, masks and results, and the
manifest's entries.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from config import InferenceConfig, UserError
from dataset import UNREADABLE, as_mode, find_images, open_upright, to_array
from sampling import Known, save_grid, save_png


@dataclasses.dataclass
class Inputs:
    """The images to edit as the model sees them (resized and centre-cropped as in training), with their masks."""

    paths: list[Path]
    names: list[str]  # unique file-name stems of their results
    images: torch.Tensor  # float32 [K, C, S, S] in [0, 1]
    mask_paths: Optional[list[Path]] = None  # inpainting: each image's mask file
    masks: Optional[torch.Tensor] = None  # inpainting: float32 [K, 1, S, S], 1 where the model paints

    def known(self, cfg: InferenceConfig, per_image: int) -> Known:
        """What the sampling loop keeps or starts from, once for each result: per_image rows for every image."""
        images = (self.images * 2 - 1).repeat_interleave(per_image, dim=0)  # [-1, 1], as the model was trained
        if self.masks is None:
            return Known(images, strength=cfg.strength)
        keep = (1 - self.masks).repeat_interleave(per_image, dim=0)  # RePaintScheduler: 1 marks the kept pixels
        return Known(images, keep, jump_length=cfg.jump_length, jump_n_sample=cfg.jump_n_sample)


def read_inputs(cfg: InferenceConfig, size: int, channels: int) -> Inputs:
    """The images of --inpaint (and their --mask) or --init_image, for a model of size px and channels."""
    flag = "inpaint" if cfg.inpaint else "init_image"
    given = Path(getattr(cfg, flag)).expanduser()
    root = given if given.is_dir() else None
    paths = find_images(str(given), flag) if root else [given]
    decoded = [read_image(path, f"--{flag}") for path in paths]
    images = torch.from_numpy(np.stack([to_array(image, size, channels) for image in decoded])).float() / 255
    inputs = Inputs(paths, output_names(paths, root), images)
    if cfg.inpaint:
        inputs.mask_paths = pair_masks(paths, root, cfg.mask)
        inputs.masks = torch.from_numpy(np.stack([read_mask(mask, image, path, size) for mask, image, path in
                                                  zip(inputs.mask_paths, decoded, paths)]))
    return inputs


def read_image(path: Path, flag: str):
    try:
        return open_upright(path)
    except UNREADABLE:
        raise UserError(f"{flag} {path} is not a readable image (truncated, or not an image); pass a PNG or JPEG "
                        f"file") from None


def read_mask(path: Path, image, image_path: Path, size: int) -> np.ndarray:
    """A mask file as float32 [1, size, size], 1 where the model paints: resized and cropped as its image, a pixel
    painted where the resized mask is at least half white."""
    mask = read_image(path, "--mask")
    if mask.size != image.size:
        raise UserError(f"--mask {path} is {mask.size[0]}x{mask.size[1]} px but its image {image_path} is "
                        f"{image.size[0]}x{image.size[1]}; a mask must have its image's size")
    levels = np.unique(np.asarray(as_mode(mask, 1)))
    grey = levels[(levels != 0) & (levels != 255)]
    if len(grey):
        raise UserError(f"--mask {path} is not black and white (it holds grey levels such as {grey[0]}); paint the "
                        f"region to fill pure white, the rest pure black, and save it as PNG (JPEG blurs the edges)")
    if levels.max() == 0:
        raise UserError(f"--mask {path} is all black, so there is nothing to paint; paint the region to fill white")
    painted = (to_array(mask, size, 1) >= 128).astype(np.float32)
    if not painted.any():
        raise UserError(f"--mask {path}: its white region vanishes when the mask is resized to the model's "
                        f"{size}x{size} px; paint a larger region")
    return painted


def pair_masks(images: list[Path], root: Optional[Path], mask: str) -> list[Path]:
    """Each image's mask: the one --mask file for every image, or the file of the --mask folder at the image's
    place in the --inpaint folder (any image type)."""
    where = Path(mask).expanduser()
    if not where.is_dir():
        return [where] * len(images)
    if root is None:
        raise UserError(f"--mask {mask} is a folder but --inpaint is one image; pass that image's mask file")
    masks = {m.relative_to(where).with_suffix(""): m for m in find_images(str(where), "mask")}
    paired = []
    for image in images:
        key = image.relative_to(root).with_suffix("")
        if key not in masks:
            raise UserError(f"--mask {mask} holds no mask for {image} (looked for {where / key}.png or another image "
                            f"type); add a mask named as the image")
        paired.append(masks[key])
    return paired


def output_names(paths: list[Path], root: Optional[Path]) -> list[str]:
    """A unique file-name stem per image: its path in the folder without the extension, '/' as '_' (images whose
    stems clash, such as a.png and a.jpg, keep their extension)."""
    stems = ["_".join(p.relative_to(root).with_suffix("").parts) if root else p.stem for p in paths]
    counts = collections.Counter(stems)
    return [f"{s}_{p.suffix[1:]}" if counts[s] > 1 else s for s, p in zip(stems, paths)]


def save_edits(out: Path, inputs: Inputs, seeds: list[int], results: torch.Tensor, grid_name: str,
               display_size: int) -> list[dict]:
    """{name}_seed{N}.png for each image and seed (native size: data), and the grid (scaled for display): a row per
    image holding the image, its mask (inpainting) and its results. Returns the manifest's entries."""
    files, rows = [], []
    channels = results.shape[1]
    for k, (path, name) in enumerate(zip(inputs.paths, inputs.names)):
        mine = results[k * len(seeds):(k + 1) * len(seeds)]
        mask = {} if inputs.masks is None else {"mask": str(inputs.mask_paths[k])}
        for seed, image in zip(seeds, mine):
            file = f"{name}_seed{seed:06d}.png"
            save_png(image, out / file)
            files.append({"file": file, "image": str(path), **mask, "seed": seed})
        shown = [inputs.images[k]] + ([] if inputs.masks is None else [inputs.masks[k].expand(channels, -1, -1)])
        rows.append(torch.cat([torch.stack(shown), mine]))
    save_grid(torch.cat(rows), out / grid_name, columns=len(rows[0]), display_size=display_size)
    return files
