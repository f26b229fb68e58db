"""simmim_hf.data.sources: one table of sources and aliases, one label-column rule, one `--data_files` syntax, and one
image decoder whatever path an image takes (direct decoding, prepare_data's shards, evaluation)."""

import io
import tarfile
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from pretrain_helpers import write_png_tar

from simmim_hf.data.images import decode_image
from simmim_hf.data.labelled import detect_columns, load_eval_data
from simmim_hf.data.sources import (
    FASHION_MNIST,
    FASHION_MNIST_ALIASES,
    FASHION_MNIST_HUB_ID,
    detect_label_column,
    is_fashion_mnist,
    load_source_dataset,
    parse_data_files,
    resolve_split_files,
    split_data_files,
)
from simmim_hf.data.stream import DataArguments, load_pretrain_dataset
from simmim_hf.data.write_shards import PrepareDataArguments, prepare_data
from simmim_hf.errors import UsageError
from simmim_hf.eval.arguments import EvaluationArguments
from simmim_hf.publish.model_card import hub_dataset_id, pretraining_data


def _pixels(image: PIL.Image.Image) -> torch.Tensor:
    """The identity "augmentation": PIL -> `(C, H, W)` uint8, so the tensor shows exactly what was decoded."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)


# --- one alias table -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", sorted(FASHION_MNIST_ALIASES) + ["Fashion_MNIST"])
def test_a_fashion_mnist_alias_is_the_embedded_corpus_in_every_script_and_the_card(alias, fashion_mnist_dir):
    assert is_fashion_mnist(alias)
    assert DataArguments(dataset_name=alias).dataset_name == FASHION_MNIST  # scripts/pretrain.py
    assert PrepareDataArguments(source=alias, output="unused").source == FASHION_MNIST  # scripts/prepare_data.py
    embedded = load_source_dataset(alias, split="test", max_samples=4)  # offline: no Hub download
    assert len(embedded) == 4 and embedded.features["label"].names[0] == "T-shirt/top"
    eval_args = EvaluationArguments(model="pixels", dataset_name=alias, train_samples=10, eval_samples=10)
    assert eval_args.dataset_name == FASHION_MNIST  # scripts/evaluate.py, so its results JSON names one dataset
    data = load_eval_data(eval_args)
    assert data.eval_split == "test" and data.num_classes == 10
    assert hub_dataset_id(alias) == FASHION_MNIST_HUB_ID  # the model card
    assert pretraining_data({"dataset_name": alias})[0] == "Fashion-MNIST"


def test_the_hub_copy_is_a_hub_dataset_but_the_card_names_it_fashion_mnist():
    assert not is_fashion_mnist(FASHION_MNIST_HUB_ID) and is_fashion_mnist(FASHION_MNIST_HUB_ID, include_hub=True)
    assert DataArguments(dataset_name=FASHION_MNIST_HUB_ID).dataset_name == FASHION_MNIST_HUB_ID
    assert pretraining_data({"dataset_name": FASHION_MNIST_HUB_ID})[:1] == ("Fashion-MNIST",)
    assert not is_fashion_mnist("mnist") and not is_fashion_mnist(None)


# --- one label-column rule -----------------------------------------------------------------------------------------


def test_label_column_rule_is_one_ordered_list():
    names = datasets.ClassLabel(names=["a", "b"])
    # A single ClassLabel wins, whatever its name.
    assert detect_label_column(datasets.Features({"image": datasets.Image(), "category": names})) == "category"
    # Otherwise the first name of LABEL_COLUMN_NAMES, in that list's order (not the dataset's column order).
    assert detect_label_column(["image", "target", "label"]) == "label"
    assert detect_label_column(["image", "class", "cls"]) == "cls"
    two = datasets.Features({"img": datasets.Image(), "coarse_label": names, "fine_label": names})
    assert detect_label_column(two) == "fine_label"  # CIFAR-100
    assert detect_label_column(["image", "caption"]) is None
    with pytest.raises(ValueError, match="label_column"):
        detect_label_column(["image"], "label")


def test_prepare_data_and_evaluation_pick_the_same_label_column(tmp_path):
    images = [PIL.Image.new("L", (8, 8), value) for value in (10, 20, 30, 40)]
    table = {"image": images, "target": [7, 7, 7, 7], "label": [0, 1, 0, 1]}
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "saved"))
    features = datasets.load_from_disk(str(tmp_path / "saved")).features
    assert detect_columns(features, None, None) == ("image", "label")
    prepare_data(PrepareDataArguments(source=str(tmp_path / "saved"), output=str(tmp_path / "out"), num_shards=1))
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        labels = [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".cls")]
    assert labels == ["0", "1", "0", "1"]  # `label`, not `target`


# --- one --data_files syntax ---------------------------------------------------------------------------------------


def test_data_files_syntax():
    assert parse_data_files(None) is None and parse_data_files([]) is None
    assert parse_data_files("shards/*.parquet") == {"train": ["shards/*.parquet"]}
    assert parse_data_files(["a-*.tar", "b.tar"], default_split="val") == {"val": ["a-*.tar", "b.tar"]}
    both = {"train": ["tr/*.tar"], "test": ["te/*.tar", "x.tar"]}
    assert parse_data_files("train=tr/*.tar,test=te/*.tar,test=x.tar") == both
    assert parse_data_files(["train=tr/*.tar", "test=te/*.tar,test=x.tar"]) == both
    assert split_data_files("train=tr/*.tar,test=te/*.tar", "test") == ["te/*.tar"]
    with pytest.raises(UsageError, match="no files for the split 'train'"):
        split_data_files("test=te/*.tar", "train")
    with pytest.raises(UsageError, match="SPLIT=PATTERN"):
        parse_data_files("train=")


def test_pretraining_and_evaluation_accept_the_same_data_files(tmp_path):
    images = [PIL.Image.new("RGB", (8, 8), (v, v, v)) for v in range(0, 200, 20)]
    labels = [i % 2 for i in range(len(images))]
    for split, rows in (("train", slice(0, 8)), ("test", slice(8, 10))):
        table = {"image": images[rows], "label": labels[rows]}
        datasets.Dataset.from_dict(table).to_parquet(str(tmp_path / f"{split}.parquet"))
    spec = f"train={tmp_path}/train.parquet,test={tmp_path}/test.parquet"
    data = load_eval_data(EvaluationArguments(model="pixels", dataset_name="parquet", data_files=[spec]))
    assert (len(data.train), len(data.eval), data.eval_split) == (8, 2, "test")
    args = DataArguments(dataset_name="parquet", data_files=[spec], shuffle_buffer_size=1)
    assert len(list(load_pretrain_dataset(args, transform=_pixels))) == 8  # the train split only


def test_local_data_files_are_checked_the_same_way_and_hub_ones_pass_through(tmp_path):
    missing = str(tmp_path / "missing-*.parquet")
    assert resolve_split_files("owner/data", "train=data/*.parquet") == {"train": ["data/*.parquet"]}
    with pytest.raises(UsageError, match="--data_files: .* matches no file"):
        resolve_split_files("parquet", f"train={missing}")
    with pytest.raises(UsageError, match="--data_files: .* matches no file"):  # evaluation
        load_eval_data(EvaluationArguments(model="pixels", dataset_name="parquet", data_files=[missing]))
    with pytest.raises(UsageError, match="--data_files: .* matches no file"):  # pretraining
        load_pretrain_dataset(DataArguments(dataset_name="parquet", data_files=[missing]), transform=_pixels)


# --- one decoder: the same tensor through shards as directly ---------------------------------------------------------


def _high_depth_images(folder: Path) -> list[Path]:
    """A 16-bit greyscale PNG ('I;16'), the same pixels as a 16-bit TIFF, and a 32-bit ('I') TIFF, values above 255."""
    ramp = (np.arange(16 * 12, dtype=np.uint16).reshape(12, 16) * 300 + 1000).astype(np.uint16)
    folder.mkdir()
    paths = [folder / "a.png", folder / "b.tif", folder / "c.tif"]
    PIL.Image.fromarray(ramp).save(paths[0])  # mode I;16
    PIL.Image.fromarray(ramp).save(paths[1])
    PIL.Image.fromarray(ramp.astype(np.int32) * 40).save(paths[2])  # mode I
    assert PIL.Image.open(paths[0]).mode == "I;16" and PIL.Image.open(paths[2]).mode == "I"
    return paths


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_16_bit_image_gives_the_same_tensor_through_shards_as_through_direct_decoding(tmp_path, fmt):
    paths = _high_depth_images(tmp_path / "images")
    direct = [_pixels(decode_image(path)) for path in paths]
    assert all(pixels.max() == 255 and pixels.min() == 0 for pixels in direct)  # rescaled, not clipped to 255
    prepare_data(
        PrepareDataArguments(source=str(tmp_path / "images"), output=str(tmp_path / "out"), num_shards=1, format=fmt)
    )
    suffix = "tar" if fmt == "webdataset" else "parquet"
    args = DataArguments(dataset_name=fmt, data_files=[str(tmp_path / f"out/*.{suffix}")], shuffle_buffer_size=1)
    through_shards = list(load_pretrain_dataset(args, transform=_pixels))
    assert len(through_shards) == len(paths)
    for expected, example in zip(direct, through_shards):
        torch.testing.assert_close(example["pixel_values"], expected, rtol=0, atol=0)


def test_a_16_bit_png_reencoded_to_jpeg_is_rescaled_not_clipped(tmp_path):
    # The first image (a JPEG) makes every image of the tar shards a JPEG: the 16-bit PNG is re-encoded.
    paths = _high_depth_images(tmp_path / "images")[:1]
    buffer = io.BytesIO()
    PIL.Image.new("L", (16, 12), 128).save(buffer, "JPEG")
    (tmp_path / "images" / "0.jpg").write_bytes(buffer.getvalue())
    prepare_data(PrepareDataArguments(source=str(tmp_path / "images"), output=str(tmp_path / "out"), num_shards=1))
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        members = sorted(m.name for m in tar.getmembers())
        reencoded = tar.extractfile(members[1]).read()
    assert members[1].endswith(".jpg")
    got = np.asarray(decode_image(reencoded), dtype=np.int16)
    expected = np.asarray(decode_image(paths[0]), dtype=np.int16)
    assert np.abs(got - expected).max() <= 8  # JPEG is lossy; clipping would have made it flat 255


def test_visualisation_and_fine_tuning_use_the_one_decoder_and_augmentation(tmp_path):
    import importlib.util

    from PIL import Image
    from tiny_configs import tiny_simmim_config

    from simmim_hf.data.images import SimMIMAugmentation
    from simmim_hf.eval.finetune import train_transform
    from simmim_hf.publish.convert import image_processor_for

    path = _high_depth_images(tmp_path / "images")[0]  # 16-bit greyscale PNG
    spec = importlib.util.spec_from_file_location("visualize", Path(__file__).parents[1] / "scripts" / "visualize.py")
    visualize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(visualize)
    config = tiny_simmim_config("vit")
    pixels = visualize.load_pixels([str(path)], config)
    expected = image_processor_for(config)(
        images=[decode_image(path, num_channels=config.num_channels)], return_tensors="pt"
    )
    torch.testing.assert_close(pixels, expected["pixel_values"])
    assert pixels.std() > 0.1  # rescaled from 16 bits; PIL's plain convert would have made it a flat white image
    rgb = decode_image(path, num_channels=3)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 0], np.asarray(decode_image(path)))

    processor = image_processor_for(config)
    augmentation = train_transform(processor, crop_min_scale=0.5)
    assert isinstance(augmentation, SimMIMAugmentation) and augmentation.scale == (0.5, 1.0)
    assert augmentation(Image.new("RGB", (40, 40))).shape == (config.num_channels, *augmentation.size)


def test_a_save_to_disk_folder_is_the_same_source_for_pretraining_and_evaluation(tmp_path):
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(12)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})

    def split(start, stop):
        return datasets.Dataset.from_dict(
            {"image": images[start:stop], "label": [i % 2 for i in range(start, stop)]}, features=features
        )

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": split(0, 8), "test": split(8, 12)}).save_to_disk(str(folder))
    pretraining = load_source_dataset(str(folder), split="train")
    data = load_eval_data(EvaluationArguments(model="pixels", dataset_name=str(folder)))
    assert len(pretraining) == len(data.train) == 8 and len(data.eval) == 4 and data.eval_split == "test"
    assert data.num_classes == 2


# --- one home for --data_files: stats and training see the same files ------------------------------------------------
def _tar_of(path: Path, levels: list[int]) -> None:
    write_png_tar(path, [PIL.Image.new("RGB", (8, 8), (level, level, level)) for level in levels])


def test_statistics_and_training_expand_a_glob_to_the_same_files(tmp_path):
    """A recursive `**` glob reaching shards two folders down: the statistics lookup finds the prepare_data.json
    beside them (the files it lists are the ones the stream reads), and the stream trains on exactly those files."""
    import json

    from simmim_hf.configuration_simmim import SimMIMConfig
    from simmim_hf.data.stats import resolve_image_stats
    from simmim_hf.pretrain.arguments import ModelArguments

    deep = tmp_path / "corpus" / "part" / "shards"
    _tar_of(deep / "train-0.tar", [10, 20, 30])
    _tar_of(deep / "train-1.tar", [40, 50])
    (deep / "train-2.tar").mkdir()  # a folder the glob also matches: neither reader takes it
    stats = {"mean": [0.1] * 3, "std": [0.2] * 3, "grey_mean": [0.1], "grey_std": [0.2], "num_images": 5,
             "num_colour_images": 0, "num_skipped": {}, "weighting": "per_image"}  # fmt: skip
    summary = {"shards": ["train-0.tar", "train-1.tar"], "image_stats": stats}
    (deep / "prepare_data.json").write_text(json.dumps(summary))
    args = DataArguments(
        dataset_name="webdataset", data_files=[str(tmp_path / "corpus" / "**" / "train-*.tar")], shuffle_buffer_size=1
    )
    chosen = resolve_image_stats(ModelArguments(image_stats="dataset"), args, SimMIMConfig.from_preset("demo"))
    assert chosen.source == "measured by prepare_data.py on 5 images"  # found through the recursive glob
    assert chosen.overrides["image_std"] == [0.2] * 3
    dataset = load_source_dataset("webdataset", data_files=args.data_files, streaming=True)
    assert dataset.simmim_shard_source[1] == [str(deep / "train-0.tar"), str(deep / "train-1.tar")]
    levels = sorted(
        int(example["pixel_values"][0, 0, 0]) for example in load_pretrain_dataset(args, transform=_pixels)
    )
    assert levels == [10, 20, 30, 40, 50]


def test_a_glob_with_no_match_is_one_error_naming_data_files_for_stats_and_training(tmp_path, capsys):
    import sys

    from simmim_hf.cli import run_script

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import pretrain
    finally:
        sys.path.pop(0)
    missing = str(tmp_path / "nowhere" / "train-*.tar")
    # The statistics lookup first (measuring them), or the training stream: ImageNet statistics are not grey, so no
    # lookup of recorded statistics runs before the stream opens the files.
    for stats in ("dataset", "imagenet"):
        argv = ["--preset", "demo", "--dataset_name", "webdataset", "--data_files", missing, "--streaming", "true",
                "--image_stats", stats, "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
                "--report_to", "none"]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            run_script(lambda argv=argv: pretrain.main(argv))
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, stderr
        assert stderr == f"error: --data_files: {missing!r} matches no file\n", stderr
        assert not (tmp_path / "run").exists()


def test_data_provenance_after_training_survives_shards_deleted_since(tmp_path, caplog):
    """The run summary's provenance is read after training: a glob that matches nothing by then is logged and
    recorded as unknown, not an error that would stop the export."""
    from types import SimpleNamespace

    from simmim_hf.data.stats import data_provenance

    args = SimpleNamespace(dataset_name="webdataset", data_files=str(tmp_path / "gone" / "train-*.tar"),
                           data_dir=None, train_split="train")  # fmt: skip
    with caplog.at_level("WARNING"):
        provenance = data_provenance(args)
    assert provenance == {
        "data_source": None,
        "data_source_type": None,
        "data_format": None,
        "num_source_images": None,
    }
    assert "data provenance not recorded" in caplog.text and "matches no file" in caplog.text
