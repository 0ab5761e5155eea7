"""A user's mistake gets one `error: ...` line naming the problem and the fix, exit code 2, no traceback, and
nothing lost or half-written. Checks run in-process (a CLI subprocess costs ~5 s of imports); one real CLI
run per kind of answer keeps the entry points covered: a validation error, an error after the Accelerator
exists, a training run on an awkward folder, and inference's offline model-path error."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

import config as config_module
import dataset
import inference
import train_ddpm
from config import Config, UserError
from conftest import (TINY_MODEL, TINY_RUN, assert_user_error, call, error_line, load_cached, make_image_folder,
                      make_mixed_mode_folder, run_cli, save_tiny_pipeline)

# Three levels (image_size must be a multiple of 4), for the UNet-shape cases.
THREE_LEVELS = ["--block_out_channels", "16", "32", "64", "--norm_num_groups", "8",
                "--down_block_types", "DownBlock2D", "DownBlock2D", "DownBlock2D",
                "--up_block_types", "UpBlock2D", "UpBlock2D", "UpBlock2D"]


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def snapshot(path: Path) -> dict[str, tuple]:
    """Every file and folder under path with its mtime and (files) content hash."""
    return {str(p.relative_to(path)): (p.is_dir(), p.stat().st_mtime_ns,
                                       None if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(path.rglob("*"))}


def train_args(tmp_path: Path, *extra) -> list:
    return [*TINY_RUN, "--max_train_steps", "1", "--data_dir", tmp_path / "data", "--output_dir", tmp_path / "out",
            *extra]


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def add_bad_files(folder: Path) -> list[str]:
    """Files a scraped folder may hold that are not readable images; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray((np.random.default_rng(3).random((30, 40, 3)) * 255).astype(np.uint8))
    png, jpeg = encoded(image, "PNG"), encoded(image, "JPEG")
    bad = {"truncated.png": png[: len(png) // 2], "truncated.jpg": jpeg[: len(jpeg) // 2], "empty.png": b"",
           "not_an_image.jpg": b"<html>404 Not Found</html>\n"}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return sorted(bad)


@pytest.fixture(scope="session")
def tiny_run(trained_run) -> Path:
    """conftest's finished tiny run: an output_dir holding final_model/, checkpoints and samples."""
    out, _ = trained_run
    assert (out / "final_model" / "model_index.json").exists()
    return out


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """In-process calls resolve default paths (./results, ./inference_results) inside tmp_path."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------------
# config.parse_cli, in-process
# ---------------------------------------------------------------------------------------------------


def parse(argv: list[str]):
    defaults = config_module.flat_fields(config_module.TrainingConfig(), config_module.DataConfig(),
                                         config_module.ModelConfig(), config_module.SchedulerConfig())
    return config_module.parse_cli(argv, "train_ddpm.py", "", defaults, config_module.TRAINING_SECTIONS, config_module.PRESETS,
                                   train_ddpm.EXTRA_FLAGS)


@pytest.mark.parametrize("argv, words", [
    (["--lerning-rate=1e-3"], ["unknown argument --lerning_rate", "did you mean --learning_rate?"]),
    (["--image_size", "big"], ["--image_size", "invalid int value"]),
    (["--learning_rate", "fast"], ["--learning_rate", "invalid float value"]),
    (["--num_channels", "2"], ["--num_channels", "invalid choice", "auto"]),
    (["--model_preset", "huge"], ["--model_preset", "invalid choice", "ddpm-cifar10"]),
    (["--block_out_channels"], ["--block_out_channels", "expected at least one argument"]),
])
def test_parse_cli_rejects_bad_flags(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err
    line = error_line(err)
    for word in words:
        assert word in line


@pytest.mark.parametrize("content, words", [
    ("{'image_size': 32}", ["not valid JSON"]),
    ('{"image_size": 32,}', ["not valid JSON"]),
    ("[16, 32]", ["must hold a JSON object"]),
    ('{"lerning_rate": 0.001}', ["unknown key 'lerning_rate'", "did you mean 'learning_rate'?"]),
    ('{"training": {"imagesize": 32}}', ["unknown key 'imagesize'", "did you mean 'image_size'?"]),
    ('{"image_size": "32"}', ["image_size has the wrong type"]),
    ('{"image_size": true}', ["image_size has the wrong type"]),
    ('{"block_out_channels": 32}', ["block_out_channels must be a non-empty list"]),
    ('{"lr_scheduler": "exponential"}', ["lr_scheduler must be one of", "cosine"]),
    ('{"block_out_channels": ["16", "32"]}', ["block_out_channels has the wrong type"]),
    ('{"down_block_types": [1, 2]}', ["down_block_types must be one of"]),
    ('{"block_out_channels": [], "down_block_types": [], "up_block_types": []}', ["block_out_channels"]),
])
def test_parse_cli_rejects_bad_config_files(tmp_path, content, words):
    path = tmp_path / "my_config.json"
    path.write_text(content)
    with pytest.raises(UserError) as error:
        parse(["--config", str(path)])
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


def test_parse_cli_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="cannot read --config .*nope.json"):
        parse(["--config", str(tmp_path / "nope.json")])


# ---------------------------------------------------------------------------------------------------
# dataset.py sources, in-process
# ---------------------------------------------------------------------------------------------------


def test_find_images_errors(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        dataset.find_images(str(tmp_path / "missing"))
    (tmp_path / "a_file.png").write_bytes(b"")
    with pytest.raises(UserError, match="is not a folder"):
        dataset.find_images(str(tmp_path / "a_file.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no images \(read recursively: .jpg, .jpeg, .png"):
        dataset.find_images(str(tmp_path / "empty"))


def test_decode_file_returns_none_for_unreadable_files(tmp_path):
    names = add_bad_files(tmp_path)
    (tmp_path / "good.png").write_bytes(encoded(Image.new("RGB", (9, 7), "red"), "PNG"))
    assert dataset.decode_file(str(tmp_path / "good.png"), 8).shape == (3, 8, 8)
    for name in names:
        assert dataset.decode_file(str(tmp_path / name), 8) is None, name


def data_config(tmp_path: Path, name: str, folder: Optional[Path] = None) -> Config:
    cfg = Config()
    cfg.training.dataset_name, cfg.training.image_size = name, 16
    cfg.data.dataset_path, cfg.data.data_dir = folder and str(folder), str(tmp_path / "data")
    return cfg


def test_all_images_unreadable(tmp_path):
    bad = add_bad_files(tmp_path / "images")
    with pytest.raises(UserError, match=f"none of the {len(bad)} images in .* could be read"):
        load_cached(data_config(tmp_path, "custom", tmp_path / "images"), progress=False)


@pytest.mark.parametrize("name, title", [("cifar10", "CIFAR-10"), ("mnist", "MNIST")])
def test_download_without_network(name, title, tmp_path, monkeypatch):
    from torchvision import datasets

    # A port nothing listens on: torchvision's own download code fails as it does offline, at once, anywhere.
    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(UserError) as error:
        load_cached(data_config(tmp_path, name), progress=False)
    message = str(error.value)
    for word in (f"could not download {title}", "network", "--data_dir", "--dataset_name custom",
                 "--dataset_name letters", "python train_ddpm.py --model_preset quickstart"):  # what runs offline
        assert word in message
    assert "\n" not in message and files_under(tmp_path / "data") == []


# ---------------------------------------------------------------------------------------------------
# train_ddpm.py validation, in-process (every error here comes before any Accelerator exists)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (TINY_MODEL[2:] + ["--image_size", "15"], ["--image_size 15", "halved", "multiple of 2"]),
    (TINY_MODEL[2:] + THREE_LEVELS + ["--image_size", "18"], ["--image_size 18", "multiple of 4"]),
    (TINY_MODEL[2:] + THREE_LEVELS + ["--image_size", "20", "--block_out_channels", "16", "16", "32", "32",
                                      "--down_block_types", *["DownBlock2D"] * 4, "--up_block_types",
                                      *["UpBlock2D"] * 4], ["--image_size 20", "multiple of 8"]),
    (TINY_MODEL + ["--block_out_channels", "16", "32", "64"], ["same length", "3, 2 and 2"]),
    (TINY_MODEL + ["--up_block_types", "UpBlock2D"], ["same length", "2, 2 and 1"]),
    (TINY_MODEL + ["--norm_num_groups", "12"], ["--norm_num_groups 12", "does not divide"]),
    (["--dataset_name", "../imagenet"], ["--dataset_name ../imagenet", "custom", "save_to_disk", "Hub dataset id"]),
    (["--mixed_precision", "fp8"], ["--mixed_precision", "invalid choice", "bf16"]),
    (["--lr_scheduler", "exponential"], ["--lr_scheduler", "invalid choice", "cosine"]),
    (["--sample_scheduler", "plms"], ["--sample_scheduler", "invalid choice", "ddim"]),
    (["--image_size", "0"], ["--image_size must be at least 1"]),
    (["--learning_rate", "0"], ["--learning_rate must be positive"]),
    (["--dataset_name", "custom"], ["--dataset_path"]),
    (["--sample_num_inference_steps", "2000"], ["--sample_num_inference_steps 2000", "1000 training timesteps"]),
    (["--freeze_down_blocks"], ["--pretrained_model_path"]),
    (["--resume_from_checkpoint", "latest"], ["no checkpoint in"]),
    (["--ema_length", "0.3"], ["--ema_length must be in [0.001, 0.28)"]),  # no power-function EMA is that long
    (["--attention_head_dim", "0"], ["--attention_head_dim must be at least 1 (or none)"]),
    (["--dataloader_num_workers", "-7"], ["--dataloader_num_workers must be -1 (auto) or at least 0"]),
    (["--max_train_steps", "0"], ["--max_train_steps must be at least 1"]),
    (["--checkpointing_steps", "0"], ["--checkpointing_steps must be at least 1"]),
    (["--checkpoints_total_limit", "0"], ["--checkpoints_total_limit must be at least 1"]),
    (["--lr_warmup_steps", "-1"], ["--lr_warmup_steps must be at least 0"]),
    (["--adam_beta1", "1.0"], ["--adam_beta1 must be in [0, 1)"]),
    (["--dropout", "1.5"], ["--dropout must be in [0, 1)"]),
    (["--beta_end", "1.5"], ["--beta_end must be in"]),
    (TINY_MODEL + ["--down_block_types", "DownBlock2X", "AttnDownBlock2D"], ["DownBlock2X", "DownBlock2D"]),
    (["--dataset_name", "custom", "--dataset_path", "no/such/folder"], ["no/such/folder", "not a folder"]),
])
def test_train_validation_errors(argv, words, capsys, tmp_path):
    result = call(train_ddpm.main, [*argv, "--output_dir", tmp_path / "out", "--dry_run"], capsys)
    assert_user_error(result, *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()


def test_train_output_dir_not_writable(tmp_path, image_folder, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    result = call(train_ddpm.main, train_args(tmp_path, "--dataset_name", "custom", "--dataset_path", image_folder,
                                              "--output_dir", blocker / "sub"), capsys)
    assert_user_error(result, str(blocker / "sub"), "not writable", "--output_dir")
    assert blocker.read_text() == "keep me" and not (tmp_path / "data").exists()


def test_existing_run_is_not_overwritten(tiny_run, tmp_path, image_folder, capsys):
    before = snapshot(tiny_run)
    result = call(train_ddpm.main, train_args(tmp_path, "--dataset_name", "custom", "--dataset_path", image_folder,
                                              "--output_dir", tiny_run), capsys)
    assert_user_error(result, "already holds a run", "--resume_from_checkpoint", "--overwrite_output_dir")
    assert snapshot(tiny_run) == before


@pytest.mark.parametrize("native_bf16, requested, expected, notice", [
    (False, "bf16", "fp16", "bf16 needs an Ampere or newer GPU; training in fp16"),  # a T4 or V100
    (False, "auto", "fp16", None),
    (True, "bf16", "bf16", None),
    (True, "auto", "bf16", None),
])
def test_bf16_on_a_gpu_without_it_falls_back_to_fp16(native_bf16, requested, expected, notice, monkeypatch):
    # Older GPUs emulate bf16 (slowly): torch reports bf16 on them unless asked for native support only.
    supported = lambda including_emulation=True: native_bf16 or including_emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    precision, line = config_module.resolve_precision(requested, "cuda", train_ddpm.native_bf16(torch.device("cuda")))
    assert precision == expected
    if notice is None:
        assert line is None
    else:
        assert line.startswith("notice: ") and notice in line and "\n" not in line


def test_compile_on_a_cpu_is_dropped_with_a_notice():
    assert config_module.resolve_compile(True, "cpu") == (
        False, "notice: --compile needs a CUDA GPU; training uncompiled on cpu")
    assert config_module.resolve_compile(True, "cuda") == (True, None)
    assert config_module.resolve_compile(False, "cpu") == (False, None)


# ---------------------------------------------------------------------------------------------------
# train_ddpm.py, real CLI
# ---------------------------------------------------------------------------------------------------


def test_train_cli_user_error(tmp_path):
    """The real entry point: a mistake found by validation is exit code 2 and one line on stderr, nothing else."""
    result = run_cli("train_ddpm.py", *TINY_MODEL[2:], "--image_size", "15", "--output_dir", tmp_path / "out",
                     check=False)
    assert_user_error(result, "--image_size 15", "halved")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_custom_folder_without_images(tmp_path, capsys):
    """A mistake found once the Accelerator exists (the data is read): the same one line, nothing written."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub" / "data.npy").write_bytes(b"\x93NUMPY")
    result = call(train_ddpm.main, train_args(tmp_path, "--dataset_name", "custom", "--dataset_path", folder), capsys)
    line = assert_user_error(result, str(folder), "--dataset_path", "holds no images")
    assert all(ext in line for ext in dataset.IMAGE_EXTENSIONS) and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and files_under(tmp_path / "data") == []


def test_awkward_folder_trains_and_unreadable_files_are_skipped_with_a_warning(tmp_path, capsys):
    """Every mode and format a user's folder may hold, images smaller than image_size, and files that are not
    readable images: the readable ones all train, the others are named in one warning."""
    folder = make_mixed_mode_folder(tmp_path / "images")
    readable = len(files_under(folder))
    bad = add_bad_files(folder)
    result = call(train_ddpm.main, train_args(tmp_path, "--dataset_name", "custom", "--dataset_path", folder,
                                              "--compile"), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    output = result.stdout + result.stderr
    (warning,) = [line for line in output.splitlines() if line.startswith("warning:")]
    assert f"skipped {len(bad)} of {readable + len(bad)} images" in warning
    assert all(name in warning for name in bad[:3])
    assert f"training on {readable} images" in output
    assert "notice: --compile needs a CUDA GPU; training uncompiled on cpu\n" in result.stdout
    assert (tmp_path / "out" / "final_model" / "model_index.json").exists()


# ---------------------------------------------------------------------------------------------------
# inference.py
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    ([], ["--model_path is required"]),
    (["--model_path", "no_such_dir/deeper/final_model"], ["no_such_dir/deeper/final_model", "does not exist"]),
    (["--model_path", "{model}", "--num_images", "0"], ["--num_images must be at least 1"]),
    (["--model_path", "{model}", "--interpolate", "--interp_steps", "1"], ["--interp_steps must be at least 2"]),
    (["--model_path", "{model}", "--grid_size", "0"], ["--grid_size must be at least 1"]),
    (["--model_path", "{model}", "--num_inference_steps", "0"], ["--num_inference_steps must be at least 1"]),
    (["--model_path", "{model}", "--num_inference_steps", "1001"], ["--num_inference_steps 1001", "1000 training"]),
    (["--model_path", "{model}", "--batch_size", "0"], ["--batch_size must be at least 1"]),
    (["--model_path", "{model}", "--eta", "2"], ["--eta must be between 0 and 1"]),
    (["--model_path", "{model}", "--guidance_scale", "3"], ["--guidance_scale 3 needs a class-conditional model"]),
    (["--model_path", "{model}", "--fps", "0"], ["--fps must be positive"]),
    (["--model_path", "{model}", "--scheduler", "plms"], ["--scheduler", "invalid choice", "dpmsolver++"]),
    (["--model_path", "{model}", "--nm_images", "3"], ["did you mean --num_images?"]),
    (["--model_path", "{model}", "--output_dir", "{tmp}/a_file/sub"], ["{tmp}/a_file/sub", "not writable"]),
    # Given on the command line, even at its default value, --scheduler would be silently ignored.
    (["--model_path", "{model}", "--interpolate", "--scheduler", "ddpm"],
     ["--scheduler does not apply to --interpolate", "--interp_scheduler ddpm"]),
])
def test_inference_validation_errors(argv, words, tiny_run, capsys, tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_run / "final_model"))
    argv = [fill(a) for a in argv]
    # Small enough that a check that stopped working costs a second, not a 1000-step generation.
    defaults = {"--num_images": "1", "--num_inference_steps": "2", "--output_dir": tmp_path / "out"}
    argv += [word for flag, value in defaults.items() if flag not in argv for word in (flag, value)]
    assert_user_error(call(inference.main, argv, capsys), *map(fill, words))
    assert (tmp_path / "a_file").read_text() == "keep me" and not (tmp_path / "out").exists()


def test_inference_compile_on_a_cpu_prints_a_notice(tiny_run, capsys, tmp_path):
    result = call(inference.main, ["--model_path", tiny_run / "final_model", "--compile", "--num_images", "1",
                                   "--num_inference_steps", "2", "--output_dir", tmp_path / "out"], capsys)
    assert result.returncode == 0, result.stderr
    assert "notice: --compile needs a CUDA GPU; sampling uncompiled on the CPU\n" in result.stdout
    assert (tmp_path / "out" / "seed000000.png").exists()


def not_a_pipeline(tmp_path: Path, tiny_run: Path, kind: str) -> Path:
    folder = tmp_path / kind
    if kind == "image_folder":
        make_image_folder(folder, count=2)
    elif kind == "run_dir_not_final_model":
        return tiny_run
    elif kind == "broken_model_index":
        folder.mkdir()
        (folder / "model_index.json").write_text("{not json")
    elif kind == "other_pipeline":
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    elif kind == "consistency_model":  # the class an edm run is saved as, but a consistency model's scheduler
        shutil.copytree(tiny_run / "final_model", folder)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "ConsistencyModelPipeline"}))
        (folder / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "CMStochasticIterativeScheduler", "sigma_data": 0.5}))
    elif kind == "weights_missing":
        shutil.copytree(tiny_run / "final_model", folder)
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("kind", ["image_folder", "run_dir_not_final_model", "broken_model_index", "other_pipeline",
                                  "consistency_model", "weights_missing"])
def test_inference_model_path_not_a_pipeline(kind, tiny_run, capsys, tmp_path):
    folder = not_a_pipeline(tmp_path, tiny_run, kind)
    result = call(inference.main, ["--model_path", folder, "--num_images", "1", "--num_inference_steps", "2",
                                   "--output_dir", tmp_path / "out"], capsys)
    line = assert_user_error(result, str(folder), "final_model/")
    assert ("could not be loaded" if kind == "weights_missing" else "not a diffusers DDPMPipeline folder") in line
    assert not (tmp_path / "out").exists()


def test_inference_cli_user_error(tmp_path):
    """The real entry point, offline: a --model_path that is neither a folder nor on the Hub is one error line.
    (diffusers logs two lines of its own before it about the Hub being unreachable.)"""
    result = run_cli("inference.py", "--model_path", "runs/final_mdoel", "--num_images", "1", "--num_inference_steps",
                     "2", "--output_dir", tmp_path / "out", check=False)
    assert_user_error(result, "runs/final_mdoel", "not a local folder", "final_model/")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# inference.py: editing given images (--inpaint with --mask, --init_image with --strength)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def editing_files(tmp_path_factory) -> Path:
    """An untrained 16px model, an image, and masks right and wrong."""
    root = tmp_path_factory.mktemp("editing")
    save_tiny_pipeline(root / "model", size=16, channels=3)
    Image.fromarray((np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)).save(root / "photo.png")
    (root / "folder" / "nested").mkdir(parents=True)
    shutil.copy(root / "photo.png", root / "folder" / "nested" / "photo.png")
    (root / "masks").mkdir()
    masks = {"mask": (slice(4, 20), slice(10, 30)), "all_black": (slice(0, 0), slice(0, 0)),
             "speck": (slice(12, 13), slice(15, 16))}  # one pixel: gone when resized to 16 px
    for name, (rows, columns) in masks.items():
        mask = np.zeros((24, 32), np.uint8)
        mask[rows, columns] = 255
        Image.fromarray(mask).save(root / f"{name}.png")
    grey = np.zeros((24, 32), np.uint8)
    grey[4:20, 10:30] = 255
    grey[4, 10] = 200  # an anti-aliased edge
    Image.fromarray(grey).save(root / "grey_levels.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "small_mask.png")
    (root / "not_an_image.png").write_bytes(b"<html>404 Not Found</html>\n")
    return root


@pytest.mark.parametrize("argv, words", [
    (["--inpaint", "photo.png", "--mask", "small_mask.png"], ["small_mask.png is 16x16 px", "photo.png is 32x24",
                                                              "a mask must have its image's size"]),
    (["--inpaint", "photo.png", "--mask", "grey_levels.png"], ["grey_levels.png is not black and white", "200"]),
    (["--inpaint", "photo.png", "--mask", "all_black.png"], ["all_black.png is all black", "nothing to paint"]),
    (["--inpaint", "photo.png", "--mask", "speck.png"], ["speck.png", "vanishes", "16x16 px", "larger region"]),
    (["--inpaint", "missing.png", "--mask", "mask.png"], ["--inpaint", "missing.png does not exist"]),
    (["--inpaint", "photo.png", "--mask", "missing.png"], ["--mask", "missing.png does not exist"]),
    (["--init_image", "missing.png"], ["--init_image", "missing.png does not exist"]),
    (["--inpaint", "not_an_image.png", "--mask", "mask.png"], ["not_an_image.png is not a readable image"]),
    (["--inpaint", "photo.png", "--mask", "not_an_image.png"], ["--mask", "not_an_image.png is not a readable"]),
    (["--init_image", "photo.png", "--strength", "0"], ["--strength must be in (0, 1]", "got 0.0"]),
    (["--init_image", "photo.png", "--strength", "1.5"], ["--strength must be in (0, 1]", "got 1.5"]),
    (["--init_image", "photo.png", "--strength", "0.01"], ["--strength 0.01 of 2 steps leaves no step to run"]),
    (["--mask", "mask.png"], ["--mask needs --inpaint"]),
    (["--inpaint", "photo.png"], ["--inpaint needs --mask", "white where the model paints"]),
    (["--strength", "0.5"], ["--strength is a setting of --init_image"]),
    (["--jump_length", "5"], ["--jump_length is a setting of RePaint", "--inpaint"]),
    (["--inpaint", "photo.png", "--mask", "mask.png", "--jump_n_sample", "0"], ["--jump_n_sample must be at least 1"]),
    (["--inpaint", "photo.png", "--mask", "mask.png", "--init_image", "photo.png"],
     ["--inpaint and --init_image are different modes"]),
    (["--init_image", "photo.png", "--interpolate"], ["--init_image and --interpolate are different modes"]),
    (["--inpaint", "photo.png", "--mask", "mask.png", "--scheduler", "ddim"], ["--scheduler does not apply to "
                                                                               "--inpaint", "RePaint"]),
    (["--inpaint", "photo.png", "--mask", "masks"], ["--mask", "masks is a folder but --inpaint is one image"]),
    (["--inpaint", "folder", "--mask", "masks"], ["holds no images", "--mask"]),
    (["--inpaint", "folder", "--mask", "folder"], None),  # a mask folder of the image itself: grey levels
])
def test_editing_input_errors(argv, words, editing_files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(editing_files)
    argv = ["--model_path", "model", "--num_images", "1", "--num_inference_steps", "2", "--output_dir",
            tmp_path / "out", *argv]
    line = assert_user_error(call(inference.main, argv, capsys), *(words or []))
    if words is None:
        assert "photo.png is not black and white" in line
    assert not (tmp_path / "out").exists(), "a mistake in the inputs is found before anything is written"


def test_editing_a_folder_names_the_image_without_a_mask(editing_files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(editing_files)
    (tmp_path / "masks" / "nested").mkdir(parents=True)
    shutil.copy(editing_files / "mask.png", tmp_path / "masks" / "nested" / "other.png")
    result = call(inference.main, ["--model_path", "model", "--inpaint", "folder", "--mask", tmp_path / "masks",
                                   "--output_dir", tmp_path / "out"], capsys)
    assert_user_error(result, "holds no mask for folder/nested/photo.png", "nested/photo.png",
                      "add a mask named as the image")
