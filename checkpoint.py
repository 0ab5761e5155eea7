"""Training checkpoints: where a run is (progress.json), listing, atomic saves, rotation, loading, and the EMA
weights swapped in for whatever is saved or drawn.

A checkpoint-*/ folder holds two things:
- the whole training state for --resume_from_checkpoint (accelerate's save_state: weights, AdamW, EMA, RNGs),
  its weights stored without the `module.` (DDP) or `_orig_mod.` (torch.compile) prefixes, so a checkpoint
  resumes under any process count or compile setting;
- the EMA UNet as a diffusers pipeline (model.save_model: DDPMPipeline, or ConsistencyModelPipeline for
  --parameterization edm; model_index.json, unet/, scheduler/), so inference.py --model_path
  and train_ddpm.py --pretrained_model_path accept a checkpoint folder as they accept final_model/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch

from config import UserError
from files import OLD, current_version, partial_folder, read_json, replace_folder, write_json
from model import save_model, strip_wrapper_prefixes

CHECKPOINT_NAME = re.compile(r"^checkpoint-(epoch|step)-(\d+)$")


@dataclasses.dataclass
class Progress:
    """Where the run is. Saved as progress.json in every checkpoint."""

    global_step: int = 0  # optimizer steps done, skipped ones included: the LR schedule's and the EMA's position
    epoch: int = 0  # the current epoch, 0-based
    batches_in_epoch: int = 0  # micro-batches of the current epoch done (per process)
    nonfinite_steps: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient (fp16 loss-scale search excluded)
    skipped_steps: int = 0  # optimizer steps that left the weights as they were (NaN/inf, fp16 loss-scale overflow)
    lr_segment: Optional[list] = None  # the LR curve in force: [start, warmup, peak, end] (see train_ddpm.LRCurve)
    lineage: list = dataclasses.field(default_factory=list)  # save sequence numbers of the checkpoints it grew from

    @classmethod
    def read(cls, checkpoint: Path) -> "Progress":
        """progress.json, ignoring keys this version does not know (and missing ones: older checkpoints). The
        checkpoint itself joins the lineage of the run that resumes from it."""
        saved = read_json(checkpoint / "progress.json")
        progress = cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})
        progress.lineage = [*progress.lineage, saved.get("sequence", 0)]
        return progress


# ---------------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------------


def save_order(path: Path) -> tuple:
    """The order in which checkpoints were written: their save sequence number (so that after resuming from an
    older checkpoint, the new branch's saves come after the abandoned newer ones), then the step."""
    saved = read_json(path / "progress.json")
    return saved.get("sequence", 0), saved["global_step"], path.stat().st_mtime


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest save first. A checkpoint being replaced (or whose replacement a
    crash interrupted) is listed under its old version's path, checkpoint-*.old (files.current_version)."""
    def listed(p: Path) -> bool:
        own = p.with_name(p.name.removesuffix(OLD))
        return bool(CHECKPOINT_NAME.match(own.name)) and current_version(own) == p and (p / "progress.json").exists()

    return sorted(filter(listed, Path(output_dir).glob("checkpoint-*")), key=save_order)


def find_checkpoint(output_dir: str, which: str) -> Path:
    if which == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; train without it first")
        return checkpoints[-1]
    path = Path(which).expanduser()
    path = current_version(path if path.is_absolute() or current_version(path).exists() else Path(output_dir) / which)
    if not (path / "progress.json").exists():
        raise UserError(f"--resume_from_checkpoint {which}: not a complete checkpoint folder; "
                        f"pass one of {[p.name for p in list_checkpoints(output_dir)]} or 'latest'")
    return path


# ---------------------------------------------------------------------------------------------------
# Weights without wrappers, and the EMA weights
# ---------------------------------------------------------------------------------------------------


def register_wrapper_free_weights(accelerator) -> None:
    """Make save_state write, and load_state read, the UNet's weights under their plain names."""
    from safetensors.torch import load_file

    def before_save(models, weights, output_dir):
        weights[:] = [strip_wrapper_prefixes(w) for w in weights]

    def before_load(models, input_dir):
        for i, model in enumerate(models):
            stem = "model" if i == 0 else f"model_{i}"
            path = Path(input_dir) / f"{stem}.safetensors"
            weights = load_file(path) if path.exists() else torch.load(
                Path(input_dir) / f"pytorch_{stem}.bin", map_location="cpu", weights_only=True)
            accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(strip_wrapper_prefixes(weights))
        models.clear()  # loaded here: accelerate must not load them again under its wrapped names

    accelerator.register_save_state_pre_hook(before_save)
    accelerator.register_load_state_pre_hook(before_load)


@contextlib.contextmanager
def ema_weights(ema, model) -> Iterator[None]:
    """Swap the run's EMA weights (ema.PowerEMA) into `model` for the block; the training weights come back."""
    if ema is None:
        yield
        return
    with ema.swapped_in(model.parameters()):
        yield


# ---------------------------------------------------------------------------------------------------
# Saving, rotation, loading
# ---------------------------------------------------------------------------------------------------


def save_checkpoint(accelerator, output_dir: Path, name: str, progress: Progress, record: dict, pipeline: tuple,
                    total_limit: Optional[int]) -> Path:
    """Write the whole training state and the EMA pipeline to output_dir/name, atomically: a crash leaves no
    half-written checkpoint (files.replace_folder). `pipeline` is (unet, ema, noise_scheduler). Every process
    writes its part (accelerate's save_state: its RNG states) into one partial folder; the main process finishes."""
    final = output_dir / name
    tmp = partial_folder(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        unet, ema, noise_scheduler = pipeline
        with ema_weights(ema, unet):
            save_model(tmp, unet, noise_scheduler, record)
        sequence = 1 + max((save_order(p)[0] for p in list_checkpoints(output_dir)), default=0)
        write_json(tmp / "progress.json", {**dataclasses.asdict(progress), "sequence": sequence})
        progress.lineage.append(sequence)  # on the main process, which alone rotates
        replace_folder(tmp, final)
        rotate(output_dir, total_limit, progress.lineage)
    accelerator.wait_for_everyone()
    return final


def rotate(output_dir: Path, total_limit: Optional[int], lineage: list[int]) -> None:
    """Keep total_limit checkpoints: those of a branch abandoned by resuming from an older checkpoint go first, then
    the oldest of this run's lineage (checkpoints older than save sequences count as on it)."""
    if not total_limit:
        return

    def abandoned(path: Path) -> bool:
        return save_order(path)[0] not in (0, *lineage)

    for old in sorted(list_checkpoints(output_dir), key=lambda p: (not abandoned(p), save_order(p)))[:-total_limit]:
        shutil.rmtree(old)


def load_checkpoint(accelerator, checkpoint: Path, ema) -> Progress:
    """Restore the training state (weights under any wrapping, AdamW, EMA, RNGs) and return where the run was."""
    accelerator.load_state(str(checkpoint))
    # load_state brings back accelerate's micro-step counter from this process's random_states_{rank}.pkl: a process
    # new to the run has none and starts at 0, and with another --gradient_accumulation_steps the old count falls
    # elsewhere in the cycle, so the processes would sync their gradients at different micro-steps and hang. A
    # checkpoint is always taken at an optimizer step's end: the cycle starts again at 0 for every process.
    accelerator.step = 0
    if ema is not None:
        ema.to(accelerator.device)  # load_state puts the EMA weights on the CPU
    return Progress.read(checkpoint)


def saved_layout(checkpoint: Path) -> dict:
    """How the checkpoint's run cut its data into batches: what mid-epoch resume needs to be unchanged."""
    record = read_json(checkpoint / "config.json")
    return {"processes": record.get("_provenance", {}).get("num_processes", 1),
            "train_batch_size": record["training"]["train_batch_size"],
            "gradient_accumulation_steps": record["training"]["gradient_accumulation_steps"]}
