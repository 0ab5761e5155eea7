"""Class-conditional training and classifier-free guidance: labels from every source, the label dropout, guided
sampling (one batched forward, addressed by seed, every sampler), the saved model, and one short conditional run that
is resumed and asked for a class."""

from __future__ import annotations

import dataclasses
import json
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import inference
import train_ddpm
from config import Config, DataConfig, InferenceConfig, ModelConfig, UserError, validate_inference
from conftest import TINY_RUN, assert_user_error, call, make_bars_folder
from model import build_unet, fit_class_embedding
from sampling import (SAMPLER_CLASSES, Guidance, blended_classes, check_guidance, class_indices, classes_by_seed,
                      for_model, generate, initial_noise, make_sampler, predict_noise, sample_images, seeded_generators)


COLOURS = ("red", "green", "blue")


def make_colour_folder(root):
    """Three classes that differ at a glance: red, green or blue images of a shade of their own."""
    rng = np.random.default_rng(0)
    for channel, name in enumerate(COLOURS):
        (root / name).mkdir(parents=True)
        for i in range(6):
            image = np.zeros((16, 16, 3), dtype=np.uint8)
            image[..., channel] = rng.integers(200, 256)
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def load(name, tmp_path, **data):
    return dataset.load_dataset(name, 16, DataConfig(data_dir=str(tmp_path / "data"), **data), progress=False)


def test_labels_from_folders_zips_and_datasets(tmp_path):
    bars = make_bars_folder(tmp_path / "bars")
    cache = load("custom", tmp_path, dataset_path=str(bars))
    assert cache.classes == ["bar_bottom", "bar_middle", "bar_top"] and cache.class_counts() == [6, 6, 6]
    assert cache.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # sorted files: each with its sub-folder's class
    line = cache.describe(random_flip=False)
    assert f"3 classes in the sub-folders of {bars} (labels available: --class_conditional" in line
    assert f"3 classes from the sub-folders of {bars}, class-conditional" in cache.describe(False, True)
    images, labels = dataset.Labelled(cache).__getitems__([13, 0, 7])
    assert labels.tolist() == [2, 0, 1] and torch.equal(images, cache.__getitems__([13, 0, 7]))

    # A ZIP of the folder: its top folder is dropped, the sub-folders below are the classes.
    archive = shutil.make_archive(str(tmp_path / "bars"), "zip", tmp_path, "bars")
    assert load("custom", tmp_path, dataset_path=archive).labels.tolist() == cache.labels.tolist()
    # Images outside every sub-folder: no labels, and nothing said of them.
    shutil.copy(bars / "bar_top" / "0.png", bars / "loose.png")
    loose = load("custom", tmp_path, dataset_path=str(bars))
    assert loose.classes is None and "classes" not in loose.describe(False)

    # A datasets folder: its ClassLabel column found by itself, or a column of names named with --label_column.
    import datasets

    pictures = [Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)) for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "kind": datasets.ClassLabel(names=["cat", "dog"]),
                                  "colour": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": pictures, "kind": [1, 0, 1, 1], "colour": ["red", "red", "blue", "red"]},
                               features=features).save_to_disk(str(tmp_path / "hf"))
    found = load(str(tmp_path / "hf"), tmp_path)
    assert found.classes == ["cat", "dog"] and found.labels.tolist() == [1, 0, 1, 1]
    assert "2 classes in the ClassLabel column kind" in found.describe(False)
    named = load(str(tmp_path / "hf"), tmp_path, label_column="colour")  # other labels: the cache is rebuilt
    assert named.classes == ["blue", "red"] and named.labels.tolist() == [1, 1, 0, 1]
    assert named.path != found.path and not found.path.exists()
    with pytest.raises(UserError, match="--label_column size: .* has no such column; its columns: image"):
        load(str(tmp_path / "hf"), tmp_path, label_column="size")


def test_mnist_keeps_its_labels(mnist_dir):
    from torchvision.datasets import MNIST

    cache = dataset.load_dataset("mnist", 16, DataConfig(data_dir=str(mnist_dir)), progress=False)
    assert cache.classes[0] == "0 - zero" and len(cache.classes) == 10
    assert cache.labels.tolist() == MNIST(str(mnist_dir), train=True).targets.tolist()
    assert "10 classes from mnist's labels, class-conditional" in cache.describe(False, True)


def test_a_moved_image_rebuilds_the_cache_with_its_new_label(tmp_path):
    bars = make_bars_folder(tmp_path / "bars")
    before = load("custom", tmp_path, dataset_path=str(bars))
    (bars / "bar_top" / "0.png").rename(bars / "bar_bottom" / "moved.png")
    after = load("custom", tmp_path, dataset_path=str(bars))
    assert after.path != before.path and not before.path.exists()
    assert after.class_counts() == [7, 6, 5]


def test_label_dropout_draws_on_the_device(monkeypatch):
    """No host sync: every method that would copy a value to the host fails while the labels are dropped."""
    labels = torch.arange(4).repeat(2500)
    for name in ("item", "__bool__", "tolist", "cpu", "numpy", "nonzero", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("a host sync in drop_labels"))
    kept, dropped, half = (train_ddpm.drop_labels(labels, p, 4) for p in (0.0, 1.0, 0.5))
    monkeypatch.undo()
    assert torch.equal(kept, labels) and (dropped == 4).all()
    share = (half == 4).float().mean().item()
    assert 0.47 < share < 0.53 and torch.equal(half[half != 4], labels[half != 4])


def tiny_conditional_unet(num_classes: int = 3, size: int = 8, channels: int = 3):
    torch.manual_seed(0)
    m = ModelConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    return build_unet(m, size, channels, num_classes).eval()


def test_evaluate_scores_a_class_against_its_own_reference_images(tmp_path, capsys, inception_weights):
    import evaluate
    from diffusers import DDPMScheduler

    from model import save_model

    bars, folder = make_bars_folder(tmp_path / "bars"), tmp_path / "model"
    save_model(folder, tiny_conditional_unet(size=16, channels=1), DDPMScheduler(),
               {"_provenance": {"classes": ["bar_bottom", "bar_middle", "bar_top"], "class_counts": [6, 6, 6]}})
    flags = ["--model_path", folder, "--reference", "custom", "--dataset_path", bars, "--data_dir", tmp_path / "data",
             "--num_images", 4, "--scheduler", "ddim", "--num_inference_steps", 2, "--batch_size", 4,
             "--inception_weights", inception_weights, "--output_dir", tmp_path / "eval"]
    result = call(evaluate.main, [*flags, "--class_label", "bar_top", "--guidance_scale", 2], capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["reference"]["class"] == "bar_top" and metrics["reference"]["images"] == 6
    assert metrics["reference"]["statistics_file"].endswith("-class2.npz")
    assert metrics["model"]["class"] == "bar_top" and metrics["model"]["guidance_scale"] == 2
    assert "of class bar_top, guidance 2.0 vs custom (6 of that class)" in result.stdout
    assert_user_error(call(evaluate.main, [*flags, "--class_label", "bar_left"], capsys), "--class_label bar_left",
                      "bar_bottom, bar_middle, bar_top")


def test_a_fine_tune_gets_a_class_embedding_that_starts_from_the_pretrained_model():
    pretrained = tiny_conditional_unet(num_classes=0)
    fitted = fit_class_embedding(pretrained, 3)
    assert fitted.config.num_class_embeds == 4 and not fitted.class_embedding.weight.any()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(300)
    with torch.no_grad():
        torch.testing.assert_close(fitted(x, t, class_labels=torch.tensor([0, 3])).sample, pretrained(x, t).sample)
    assert fit_class_embedding(fitted, 3) is fitted  # the same classes: kept as trained
    with pytest.raises(UserError, match="is a class-conditional model \\(3 classes\\); fine-tune it with "
                                        "--class_conditional"):
        fit_class_embedding(fitted, 0)


def test_a_resume_on_other_classes_is_refused(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text(json.dumps({"_provenance": {"classes": ["cat", "dog"]}}))
    cfg = Config()
    cfg.training.resume_from_checkpoint = str(tmp_path / "checkpoint")
    labelled = types.SimpleNamespace(classes=["cat", "dog", "owl"], meta={"source": "pets"})
    with pytest.raises(UserError, match=r"are not the 2 the checkpoint was trained on; resume on the same classes"):
        train_ddpm.check_classes(cfg, labelled)
    train_ddpm.check_classes(cfg, types.SimpleNamespace(classes=["cat", "dog"], meta={}))
    with pytest.raises(UserError, match="--class_conditional needs labels, and pets has none: put each class's"):
        train_ddpm.check_classes(cfg, types.SimpleNamespace(classes=None, meta={"source": "pets"}))


def test_guidance_is_one_forward_of_both_passes():
    unet = tiny_conditional_unet()
    calls = []
    unet.register_forward_hook(lambda module, args, kwargs, out: calls.append(len(args[0])), with_kwargs=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(500)
    guidance = Guidance(torch.tensor([0, 2]), null_class=3, scale=3.0)
    with torch.no_grad():
        guided = predict_noise(unet, x, t, guidance)
        assert calls == [4]  # conditional and unconditional halves in one batch
        conditional = unet(x, t, class_labels=torch.tensor([0, 2])).sample
        unconditional = unet(x, t, class_labels=torch.tensor([3, 3])).sample
        assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)
        assert torch.equal(predict_noise(unet, x, t, dataclasses.replace(guidance, scale=1.0)), conditional)
        assert torch.equal(predict_noise(unet, x, t, dataclasses.replace(guidance, scale=0.0)), unconditional)
        assert torch.equal(predict_noise(unet, x, t, None), unconditional)  # no class asked: unconditional


def test_guided_images_are_addressed_by_seed_class_and_scale_with_every_sampler():
    unet = tiny_conditional_unet()
    seeds, labels = [3, 4, 5], [0, 2, 1]
    for name in SAMPLER_CLASSES:
        sampler = make_sampler(name, {"num_train_timesteps": 1000})
        one_by_one = generate(unet, sampler, seeds, 2, batch_size=1, progress=False,
                              guidance=for_model(unet, labels, 2.0))
        together = generate(unet, sampler, seeds, 2, batch_size=3, progress=False,
                            guidance=for_model(unet, labels, 2.0))
        torch.testing.assert_close(one_by_one, together, atol=1e-4, rtol=0, msg=name)
        assert torch.isfinite(together).all()
    other_class = generate(unet, sampler, seeds[:1], 2, batch_size=1, progress=False,
                           guidance=for_model(unet, [1], 2.0))
    assert not torch.allclose(other_class, together[:1], atol=1e-3)


def test_interpolating_between_two_classes_ends_at_each_class():
    unet = tiny_conditional_unet()
    sampler = make_sampler("ddim", {"num_train_timesteps": 1000})
    noise = initial_noise(seeded_generators([5]), (3, 8, 8)).repeat(3, 1, 1, 1)
    with blended_classes(unet, 0, 2, [0.0, 0.5, 1.0]) as labels:
        assert labels == [4, 5, 6]  # after the 3 classes and the null class, which keeps its label
        frames = sample_images(unet, sampler, noise, seeded_generators([5] * 3), 3, 3, progress=False,
                               guidance=for_model(unet, labels, 2.0))
    assert unet.class_embedding.num_embeddings == 4  # the UNet's own embedding is back
    ends = generate(unet, sampler, [5, 5], 3, 2, progress=False, guidance=for_model(unet, [0, 2], 2.0))
    torch.testing.assert_close(frames[[0, 2]], ends, atol=1e-5, rtol=0)
    assert not torch.allclose(frames[1], ends[0], atol=1e-3) and not torch.allclose(frames[1], ends[1], atol=1e-3)


def test_classes_by_seed_and_by_name():
    seeds = list(range(3000))
    drawn = classes_by_seed(seeds, [1, 1, 2], 3)
    assert drawn == classes_by_seed(seeds, [1, 1, 2], 3) and drawn[:10] == classes_by_seed(seeds[:10], [1, 1, 2], 3)
    shares = np.bincount(drawn, minlength=3) / len(seeds)
    assert np.allclose(shares, [0.25, 0.25, 0.5], atol=0.03)
    assert class_indices(["dog", "0"], ["cat", "dog"]) == [1, 0]
    with pytest.raises(UserError, match=r"--class_label 7 is not one of the model's classes: cat, dog \(or their "
                                        r"numbers 0-1\)"):
        class_indices(["7"], ["cat", "dog"])
    with pytest.raises(UserError, match="trained without classes"):
        class_indices(["cat"], None)
    with pytest.raises(UserError, match="pass one or two --class_label, not 3"):
        validate_inference(InferenceConfig(model_path="m", interpolate=True, class_label=("a", "b", "c")))
    # A guidance scale asked of a model without classes would change nothing: an error, unless it is the default.
    with pytest.raises(UserError, match=r"--guidance_scale 3 needs a class-conditional model; this one was trained "
                                        r"without classes \(leave --guidance_scale out"):
        check_guidance(3.0, None)
    check_guidance(InferenceConfig(model_path="m").guidance_scale, None)
    check_guidance(3.0, ["cat", "dog"])


def test_conditional_run_resumes_and_draws_the_class_asked_for(tmp_path, capsys):
    """The issue's demonstration: red, green and blue squares; a tiny conditional model asked for red draws red. The
    run stops at a checkpoint and is resumed; its checkpoints and final model keep the class names and load in
    diffusers."""
    from diffusers import UNet2DModel

    colours, out = make_colour_folder(tmp_path / "colours"), tmp_path / "run"
    flags = [*TINY_RUN, "--dataset_name", "custom", "--dataset_path", colours, "--data_dir", tmp_path / "data",
             "--output_dir", out, "--class_conditional", "--checkpointing_steps", 100, "--save_image_epochs", 1000,
             "--save_model_epochs", 1000, "--logging_steps", 50]
    first = call(train_ddpm.main, [*flags, "--max_train_steps", 100], capsys)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 classes from the sub-folders of" in first.stdout and "class-conditional" in first.stdout
    resumed = call(train_ddpm.main, [*flags, "--max_train_steps", 200, "--resume_from_checkpoint", "latest"], capsys)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-step-100'} at step 100" in resumed.stdout
    assert "done: 200 steps" in resumed.stdout

    for saved in (out / "checkpoint-step-100", out / "final_model"):
        names = json.loads((saved / "unet" / "class_names.json").read_text())
        assert names == {"classes": ["blue", "green", "red"], "counts": [6, 6, 6], "null_class": 3}
        assert UNet2DModel.from_pretrained(saved / "unet").config.num_class_embeds == 4
    # The preview: a row per class, 2 images each (num_preview_images 4), each cell 256 px with 2 px padding.
    with Image.open(out / "final_samples.png") as preview:
        assert preview.size == (2 * 258 + 2, 3 * 258 + 2)

    asked = call(inference.main, ["--model_path", out / "final_model", "--class_label", *COLOURS, "--num_images", 4,
                                  "--scheduler", "ddim", "--num_inference_steps", 10, "--output_dir",
                                  tmp_path / "asked"], capsys)
    assert asked.returncode == 0, asked.stderr[-3000:]
    manifest = json.loads((tmp_path / "asked" / "manifest.json").read_text())
    assert manifest["guidance_scale"] == 1.5 and manifest["classes"] == ["blue", "green", "red"]
    assert [f["file"] for f in manifest["files"][:5]] == [f"red_seed{s:06d}.png" for s in range(4)] + [
        "green_seed000000.png"]
    assert {f["class"] for f in manifest["files"][4:8]} == {"green"}
    # Channel means [class asked, RGB] over the 4 seeds; each channel leads the others most where its class was asked.
    means = np.stack([np.stack([np.asarray(Image.open(tmp_path / "asked" / f["file"]), dtype=float)
                                for f in manifest["files"][4 * k:4 * k + 4]]).mean(axis=(0, 1, 2))
                      for k in range(3)])
    assert means[0, 0] > max(means[0, 1], means[0, 2]), means  # asked for red, the red channel dominates
    lead = means - (means.sum(axis=1, keepdims=True) - means) / 2  # each channel over the mean of the other two
    assert (lead.argmax(axis=0) == [0, 1, 2]).all(), means

    wrong = call(inference.main, ["--model_path", out / "final_model", "--class_label", "purple",
                                  "--output_dir", tmp_path / "wrong"], capsys)
    assert_user_error(wrong, "--class_label purple", "blue, green, red")
