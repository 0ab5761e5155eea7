"""--report_to: the scalars, the hyper-parameters and the image grids go to the tracker chosen (MLflow here, read back
through its own client from its local file store), and a tracker that is not installed is one error line before
anything is written. TensorBoard, the default, is checked by test_train_e2e."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import train_ddpm
from config import TRACKER_PACKAGES
from conftest import EPOCHS, STEPS_PER_EPOCH, TINY_RUN, assert_user_error, call


def tiny_run(image_folder, tmp_path, *flags) -> list:
    return [*TINY_RUN, "--dataset_name", "custom", "--dataset_path", image_folder, "--data_dir", tmp_path / "data",
            "--output_dir", tmp_path / "run", *flags]


def test_a_tracker_that_is_not_installed_is_named_before_anything_is_written(image_folder, tmp_path, capsys):
    from accelerate.tracking import get_available_trackers

    installed = {str(tracker) for tracker in get_available_trackers()}
    missing = next((name for name in ("wandb", "comet_ml", "mlflow") if name not in installed), None)
    if missing is None:
        pytest.skip("wandb, comet_ml and mlflow are all installed here")
    result = call(train_ddpm.main, tiny_run(image_folder, tmp_path, "--report_to", missing), capsys)
    assert_user_error(result, f"--report_to {missing}", f"pip install {TRACKER_PACKAGES[missing]}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


# MLflow names a logged image images/{key}+step+{step}+timestamp+{ms}+{uuid}.png (older versions: % for +), beside a
# compressed thumbnail of it.
MLFLOW_IMAGE = re.compile(r"images/(?P<key>\w+)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]\d+[+%][\w-]+\.png")


def test_mlflow_receives_the_scalars_hyperparameters_and_grids(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())  # a local file store, no server
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this before it writes one
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # tests never touch the network
    mlflow = pytest.importorskip("mlflow", reason="MLflow is an optional tracker: pip install -r requirements-dev.txt")
    result = call(train_ddpm.main, tiny_run(image_folder, tmp_path, "--num_epochs", EPOCHS, "--save_image_epochs", 1,
                                            "--report_to", "mlflow"), capsys)
    assert result.returncode == 0, result.stderr

    client = mlflow.MlflowClient()  # MLflow's own reader, on the store the run wrote
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm").experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params  # every field of the resolved config
    assert params["seed"] == "7" and params["report_to"] == "mlflow" and params["block_out_channels"] == "(16, 32)"
    assert float(params["learning_rate"]) > 0  # "auto" resolved before it was logged
    total = EPOCHS * STEPS_PER_EPOCH
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, total + 1))
    assert all(0 < m.value < 10 for m in losses)
    assert {"train/lr", "train/img_per_s", "train/nonfinite_steps"} <= set(run.data.metrics)

    images = {}
    for artifact in client.list_artifacts(run.info.run_id, "images"):
        match = MLFLOW_IMAGE.fullmatch(artifact.path)
        if match:
            images[match["key"], int(match["step"])] = artifact.path
    expected = {("training_data", 0), ("final_samples", total), *(("samples", STEPS_PER_EPOCH * (e + 1))
                                                                  for e in range(EPOCHS))}
    assert set(images) == expected
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=images["final_samples", total],
                                                dst_path=str(tmp_path / "downloaded"))
    grid = np.asarray(Image.open(local).convert("RGB"))
    assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 4 images of 16 px, 2 per row, padding 2: native size
    assert grid[2:-2, 2:-2].std() > 10, "the grid holds images, not a blank"
    assert not list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*")), "only the tracker chosen gets logs"
