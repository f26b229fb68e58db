"""Pretraining on one's own images: measured normalisation statistics, the greyscale-on-colour warning, the default
warmup, the run header, a quiet console, and a model card that names the data."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage.data
from huggingface_hub import ModelCard

from simmim_hf.configuration_simmim import IMAGENET_MEAN, SimMIMConfig
from simmim_hf.data.stats import apply_image_stats, resolve_image_stats
from simmim_hf.data.stream import DataArguments
from simmim_hf.data.write_shards import PrepareDataArguments, prepare_data
from simmim_hf.errors import UsageError
from simmim_hf.pretrain.arguments import ModelArguments, SimMIMTrainingArguments
from simmim_hf.pretrain.console import configure_logging
from simmim_hf.publish.model_card import card_title, pretraining_data

ROOT = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """12 crops of scikit-image's colour photos (JPEG) and 2 of its greyscale ones (PNG, mode L)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for index in range(12):
        photo = [skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea][index % 3]()
        top, left = rng.integers(0, 200, size=2)
        PIL.Image.fromarray(photo[top : top + 96, left : left + 80]).save(folder / f"colour-{index}.jpg", quality=90)
    for index, photo in enumerate((skimage.data.camera(), skimage.data.moon())):
        PIL.Image.fromarray(photo[100:164, 100:180]).save(folder / f"grey-{index}.png")
    return folder


@pytest.fixture(scope="module")
def photo_shards(photo_folder, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("photo-shards")
    prepare_data(PrepareDataArguments(source=str(photo_folder), output=str(output), num_shards=2, overwrite=True))
    return output


def test_prepare_data_records_statistics_equal_to_numpys(photo_folder, photo_shards):
    stats = json.loads((photo_shards / "prepare_data.json").read_text())["image_stats"]
    images = [PIL.Image.open(path) for path in sorted(photo_folder.iterdir())]  # 96x80 colour, 64x80 grey
    rgb = np.concatenate([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3) for im in images]) / 255
    grey = np.concatenate([np.asarray(im.convert("L"), dtype=np.float64).ravel() for im in images]) / 255
    # Each image weighs as one image: a pixel of image i weighs 1 / (N * pixels of image i).
    weights = np.concatenate(
        [np.full(im.width * im.height, 1.0 / (len(images) * im.width * im.height)) for im in images]
    )
    for values, mean_key, std_key in ((rgb, "mean", "std"), (grey[:, None], "grey_mean", "grey_std")):
        mean = np.average(values, axis=0, weights=weights)
        std = np.sqrt(np.average(np.square(values - mean), axis=0, weights=weights))
        np.testing.assert_allclose(stats[mean_key], mean, atol=6e-5)
        np.testing.assert_allclose(stats[std_key], std, atol=6e-5)
    assert stats["num_images"] == 14 and stats["num_colour_images"] == 12


def _shards_args(shards: Path) -> DataArguments:
    return DataArguments(dataset_name="webdataset", data_files=[str(shards / "train-*.tar")])


def _resolve(model_args, data_args, config):
    """(the run's config, the statistics' source), as pretraining resolves and applies them."""
    stats = resolve_image_stats(model_args, data_args, config)
    return apply_image_stats(config, stats, data_args), stats.source


def test_colour_corpus_with_greyscale_statistics_warns_once(photo_shards, caplog):
    config = SimMIMConfig.from_preset("demo")  # Fashion-MNIST's grey statistics on every channel
    with caplog.at_level(logging.WARNING, logger="simmim_hf"):
        config, source = _resolve(ModelArguments(), _shards_args(photo_shards), config)
    warnings = [r for r in caplog.records if "greyscale statistics" in r.getMessage()]
    assert len(warnings) == 1 and "12 of 14" in warnings[0].getMessage()
    assert "preset demo" in source and config.image_mean == [0.286] * 3


def test_dataset_statistics_are_the_recorded_ones_and_silence_the_warning(photo_shards, caplog):
    recorded = json.loads((photo_shards / "prepare_data.json").read_text())["image_stats"]
    config = SimMIMConfig.from_preset("demo")
    with caplog.at_level(logging.WARNING, logger="simmim_hf"):
        run_config, source = _resolve(ModelArguments(image_stats="dataset"), _shards_args(photo_shards), config)
    assert not caplog.records
    assert run_config.image_mean == recorded["mean"] and run_config.image_std == recorded["std"]
    assert config.image_mean == [0.286] * 3  # the config it started from is left as it was
    assert "prepare_data.py" in source
    grey = SimMIMConfig.from_preset("demo", num_channels=1)
    grey, _ = _resolve(ModelArguments(image_stats="dataset"), _shards_args(photo_shards), grey)
    assert grey.image_mean == recorded["grey_mean"]


def test_dataset_statistics_are_measured_on_the_stream_when_not_recorded(photo_shards, tmp_path):
    for path in photo_shards.glob("*.tar"):
        (tmp_path / path.name).write_bytes(path.read_bytes())  # the shards without their prepare_data.json
    recorded = json.loads((photo_shards / "prepare_data.json").read_text())["image_stats"]
    config = SimMIMConfig.from_preset("demo")
    args = ModelArguments(image_stats="dataset", image_stats_samples=100)
    config, source = _resolve(args, _shards_args(tmp_path), config)
    assert "first 14 images of the stream" in source
    np.testing.assert_allclose(config.image_mean, recorded["mean"], atol=1e-4)


def test_explicit_and_imagenet_statistics_and_their_errors(photo_shards):
    data = _shards_args(photo_shards)
    config = SimMIMConfig.from_preset("demo")
    assert _resolve(ModelArguments(image_stats="imagenet"), data, config)[0].image_mean == IMAGENET_MEAN
    given = ModelArguments(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2])
    assert _resolve(given, data, config)[0].image_mean == [0.5, 0.4, 0.3]
    for bad, field in [
        (dict(image_mean=[0.5, 0.5]), "image_mean/image_std"),
        (dict(image_mean=[0.5, 0.5], image_std=[0.2, 0.2]), r"need one value per channel \(num_channels=3\)"),
        (dict(image_mean=[0.5] * 3, image_std=[0.2, 0.0, 0.2]), r"image_std must be .*\(--image_mean/--image_std\)"),
        (dict(image_stats="mine"), "image_stats"),
        (dict(image_stats="imagenet", image_mean=[0.5] * 3, image_std=[0.2] * 3), "either"),
    ]:
        with pytest.raises(UsageError, match=field):
            _resolve(ModelArguments(**bad), data, SimMIMConfig.from_preset("demo"))


def test_short_runs_get_a_default_warmup_unless_one_is_given(tmp_path):
    default = SimMIMTrainingArguments(output_dir=str(tmp_path), max_steps=30, report_to="none")
    assert default.get_warmup_steps(30) == 3 and default.warmup_origin == "default"
    given = SimMIMTrainingArguments(output_dir=str(tmp_path), max_steps=30, warmup_steps=0, report_to="none")
    assert given.get_warmup_steps(30) == 0 and given.warmup_origin == "given"


def test_the_trainer_epoch_line_is_dropped_even_at_info():
    import transformers

    configure_logging(True)
    trainer_logger = transformers.utils.logging.get_logger("transformers.trainer")
    record = trainer_logger.makeRecord("transformers.trainer", logging.INFO, __file__, 1, "  Num Epochs = 9", (), None)
    assert not all(f.filter(record) for f in trainer_logger.filters)
    assert transformers.utils.logging.get_verbosity() == logging.WARNING


def test_card_data_names_the_source_not_the_file_format():
    fmnist = {"dataset_name": "webdataset", "data_source": "fashion-mnist", "data_source_type": "fashion-mnist"}
    assert pretraining_data(fmnist)[::2] == ("Fashion-MNIST", "zalando-datasets/fashion_mnist")
    assert "WebDataset tar shards" in pretraining_data(fmnist)[1]
    hub = {"dataset_name": "parquet", "data_source": "ILSVRC/imagenet-1k", "data_source_type": "dataset"}
    assert pretraining_data(hub)[2] == "ILSVRC/imagenet-1k"
    folder = {"dataset_name": "webdataset", "data_source": "/data/my/photos", "data_source_type": "folder"}
    assert pretraining_data(folder)[::2] == ("photos", None)
    unnamed = pretraining_data({"dataset_name": "webdataset"})
    assert unnamed[0] == "unnamed local images" and unnamed[2] is None
    assert card_title({"preset": "demo"}, "me/vit-s-photos", "vit") == "vit-s-photos"
    assert (
        card_title(fmnist | {"preset": "demo"}, None, "vit") == "SimMIM ViT (demo preset) pretrained on Fashion-MNIST"
    )


@pytest.fixture(scope="module")
def fashion_run(fashion_mnist_dir, tmp_path_factory):
    """A tiny pretraining run (subprocess, as a user runs it) on 64 Fashion-MNIST images in 2 webdataset shards."""
    shards = tmp_path_factory.mktemp("fm-shards")
    prepare_data(PrepareDataArguments(source="fashion-mnist", output=str(shards), num_shards=2, max_samples=64))
    output = tmp_path_factory.mktemp("fm-run") / "run"
    command = [
        sys.executable, "scripts/pretrain.py", "--preset", "demo", "--config_overrides", TINY,
        "--dataset_name", "webdataset", "--data_files", str(shards / "train-*.tar"), "--output_dir", str(output),
        "--max_steps", "3", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--report_to", "none",
        "--shuffle_buffer_size", "1", "--num_visualize_images", "2", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout + result.stderr


def test_run_header_once_and_no_trainer_dumps(fashion_run):
    output, log = fashion_run
    assert log.count("SimMIM pretraining\n") == 1
    assert "learning rate 1.56e-06 = base 0.0001 x 8 / 512" in log
    assert "1 warmup (default 0.1 of max_steps)" in log
    assert "Num Epochs" not in log and "Model config" not in log and "Running training" not in log
    assert "LOAD REPORT" not in log and "Writing model shards" not in log
    summary = json.loads((output / "simmim_run.json").read_text())
    assert summary["warmup_steps"] == math.ceil(0.1 * 3) and summary["data_source"] == "fashion-mnist"


def test_card_of_a_fashion_mnist_run_names_the_data_and_has_a_title(fashion_run):
    output, _ = fashion_run
    card = ModelCard.load(output / "README.md")
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert card.data.model_name == "SimMIM ViT (demo preset) pretrained on Fashion-MNIST"
    assert card.text.lstrip().startswith("# SimMIM ViT (demo preset) pretrained on Fashion-MNIST\n")
    assert "on webdataset" not in card.text and "64 images, read from WebDataset tar shards" in card.text
    assert f'AutoModel.from_pretrained("{output / "encoder"}")' in card.text


def test_evaluation_loads_an_exported_encoder_without_a_pooler_report(tmp_path, capfd):
    from tiny_configs import tiny_simmim_config

    from simmim_hf import SimMIMForMaskedImageModeling, export_encoder
    from simmim_hf.eval.features import load_encoder
    from simmim_hf.eval.finetune import build_classifier

    folder = export_encoder(SimMIMForMaskedImageModeling(tiny_simmim_config("vit")), tmp_path / "encoder")
    capfd.readouterr()
    encoder = load_encoder(str(folder))
    classifier = build_classifier(str(folder), ["a", "b"])
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err, err
    assert type(encoder.model).__name__ == "ViTModel" and classifier.config.num_labels == 2
