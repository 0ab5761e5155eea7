"""The config tree and the command line generated from it."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

import config
import train_ddpm


def parse(*argv):
    cfg, _ = train_ddpm.parse_config([str(a) for a in argv])
    return cfg


def test_defaults_are_the_readmes():
    cfg = parse()
    t, m, s = cfg.training, cfg.model, cfg.scheduler
    assert (t.dataset_name, t.image_size, t.train_batch_size, t.num_epochs) == ("cifar10", 64, 16, 100)
    assert (t.gradient_accumulation_steps, t.output_dir, t.save_image_epochs, t.save_model_epochs) == (1, "./results", 10, 10)
    assert m.block_out_channels == (128, 128, 256, 256, 512, 512) and m.layers_per_block == 2
    assert m.down_block_types[4] == "AttnDownBlock2D" and m.up_block_types[1] == "AttnUpBlock2D"
    assert m.attention_head_dim == 8 and cfg.data.data_dir == "./data"
    assert (s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule, s.prediction_type) == (
        1000, 1e-4, 0.02, "log_sigma", "v_prediction")  # both measured (bench/RESULTS.md); the README's DDPM had
    assert t.timestep_max_phase == 3.2  # linear and epsilon, and diffusers' UNet reads every timestep sinusoid


def test_every_field_has_a_flag_with_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.parse_config(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in config.flags_of(*config.TRAINING_SECTIONS).values():
        assert re.search(rf"--{flag.name}\b(?!_)", text), flag.name
        assert flag.help, f"{flag.name} has no comment in config.py"


def test_flags_override_defaults_with_types_lists_switches_and_none():
    cfg = parse("--dataset_name", "mnist", "--learning-rate", "3e-4", "--block_out_channels", 32, 64,
                "--down_block_types", "DownBlock2D", "AttnDownBlock2D", "--up_block_types", "AttnUpBlock2D",
                "UpBlock2D", "--no_random_flip", "--use_ema", "--max_train_steps", 20, "--seed", "none",
                "--image_size", 32)
    assert cfg.training.dataset_name == "mnist" and cfg.training.learning_rate == 3e-4
    assert cfg.model.block_out_channels == (32, 64) and cfg.model.down_block_types[1] == "AttnDownBlock2D"
    assert cfg.data.random_flip is False and cfg.training.use_ema is True
    assert cfg.training.max_train_steps == 20 and cfg.training.seed is None


def test_editing_config_py_changes_the_defaults(monkeypatch):
    monkeypatch.setattr(config.training_config, "num_epochs", 7)
    monkeypatch.setattr(config.data_config, "dataset_path", "/some/images")
    cfg = parse()
    assert cfg.training.num_epochs == 7 and cfg.data.dataset_path == "/some/images"
    assert parse("--num_epochs", 3).training.num_epochs == 3


def test_config_file_then_preset_then_flags(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"num_epochs": 9, "learning_rate": 5e-4, "block_out_channels": [32, 64] * 3}))
    cfg = parse("--config", flat)
    assert cfg.training.num_epochs == 9 and cfg.model.block_out_channels == (32, 64) * 3
    cfg = parse("--config", flat, "--model_preset", "ddpm-cifar10", "--learning_rate", 1e-3)
    assert cfg.model.block_out_channels == (128, 256, 256, 256)  # the preset beats the file
    assert cfg.training.learning_rate == 1e-3 and cfg.training.num_epochs == 9  # flags beat both


def test_a_saved_config_json_round_trips_without_its_per_run_fields(tmp_path):
    cfg = parse("--num_epochs", 4, "--resume_from_checkpoint", "none", "--overwrite_output_dir")
    saved = tmp_path / "config.json"
    record = {**dataclasses.asdict(cfg), "_provenance": {"seed": 1}}
    record["training"]["resume_from_checkpoint"] = "latest"
    saved.write_text(json.dumps(record))
    again = parse("--config", saved)
    assert again.training.num_epochs == 4 and again.model == cfg.model
    assert again.training.resume_from_checkpoint is None and again.training.overwrite_output_dir is False


def test_presets_hold_only_known_fields():
    fields = config.flags_of(*config.TRAINING_SECTIONS)
    for preset in config.PRESETS.values():
        assert set(preset) <= set(fields)
