"""scripts/prepare_data.py and simmim_hf.data.write_shards: shards that `load_dataset` streams back pixel for pixel."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest

from simmim_hf.data.write_shards import PrepareDataArguments, prepare_data

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, NUM_SHARDS = 64, 4


@pytest.fixture(scope="module")
def fashion_test(fashion_mnist_dir):
    from simmim_hf.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist("test")


def read_back(output: Path, fmt: str) -> datasets.IterableDataset:
    if fmt == "webdataset":
        return datasets.load_dataset(
            "webdataset", data_files={"train": str(output / "*.tar")}, split="train", streaming=True
        )
    return datasets.load_dataset(
        "parquet", data_files={"train": str(output / "*.parquet")}, split="train", streaming=True
    )


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_fashion_mnist_shards_stream_back_pixel_for_pixel(tmp_path, fashion_test, fmt):
    images, labels = fashion_test
    args = PrepareDataArguments(
        source="fashion-mnist",
        output=str(tmp_path),
        num_shards=NUM_SHARDS,
        format=fmt,
        max_samples=NUM_IMAGES,
        split="test",
    )
    summary = prepare_data(args)
    assert summary["num_written"] == NUM_IMAGES and summary["num_skipped"] == 0
    assert summary["shard_counts"] == [NUM_IMAGES // NUM_SHARDS] * NUM_SHARDS
    assert len(list(tmp_path.glob(f"*.{'tar' if fmt == 'webdataset' else 'parquet'}"))) == NUM_SHARDS

    dataset = read_back(tmp_path, fmt)
    assert dataset.num_shards == NUM_SHARDS
    image_column, label_column = ("png", "cls") if fmt == "webdataset" else ("image", "label")
    assert isinstance(dataset.features[image_column], datasets.Image)
    seen = set()
    for example in dataset.cast_column(image_column, datasets.Image(decode=False)):
        cell = example[image_column]
        key = example["__key__"] if fmt == "webdataset" else Path(cell["path"]).stem
        index = int(key)
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(cell["bytes"]))), images[index])
        assert example[label_column] == labels[index]
        seen.add(index)
    assert seen == set(range(NUM_IMAGES))


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def test_image_folder_skips_unreadable_files_and_labels_by_subfolder(tmp_path, fashion_test):
    import skimage.data

    images, _ = fashion_test
    source = tmp_path / "photos"
    for index in range(3):
        write_png(source / "shoes" / f"shoe{index}.png", images[index])
    (source / "cats").mkdir()
    PIL.Image.fromarray(skimage.data.chelsea()).save(source / "cats" / "chelsea.jpg")
    write_png(source / "cats" / "nested" / "cat.png", images[3])
    good = (source / "shoes" / "shoe0.png").read_bytes()
    (source / "shoes" / "broken.png").write_bytes(good[: len(good) // 2])
    (source / "cats" / "notes.txt").write_text("not an image")

    summary = prepare_data(PrepareDataArguments(source=str(source), output=str(tmp_path / "out"), num_shards=2))
    assert summary["num_written"] == 5 and summary["num_skipped"] == 1
    assert "broken.png" in summary["skipped"][0]
    assert summary["class_names"] == ["cats", "shoes"]

    examples = list(read_back(tmp_path / "out", "webdataset").cast_column("jpg", datasets.Image(decode=False)))
    # The first file (cats/chelsea.jpg) fixes the extension: datasets' reader needs the same fields in every sample,
    # so the four PNGs were re-encoded as JPEG and the JPEG itself kept byte for byte.
    assert summary["num_reencoded"] == 4
    assert sorted(example["cls"] for example in examples) == [0, 0, 1, 1, 1]
    by_name = {example["__key__"]: example["jpg"]["bytes"] for example in examples}
    assert by_name["000000000"] == (source / "cats" / "chelsea.jpg").read_bytes()
    shoe = np.asarray(PIL.Image.open(io.BytesIO(by_name["000000002"])))
    assert np.abs(shoe.astype(int) - images[0]).mean() < 3  # shoes/shoe0.png, through JPEG at quality 95


def test_saved_dataset_source_keeps_class_names(tmp_path, fashion_test):
    from simmim_hf.data.fashion_mnist import CLASS_NAMES

    images, labels = fashion_test
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(
        {"image": list(images[:6]), "label": labels[:6].tolist()}, features=features
    ).save_to_disk(str(saved))
    summary = prepare_data(
        PrepareDataArguments(source=str(saved), output=str(tmp_path / "out"), num_shards=3, format="parquet")
    )
    assert summary["num_written"] == 6
    dataset = read_back(tmp_path / "out", "parquet")
    assert dataset.features["label"].names == CLASS_NAMES
    assert sorted(example["label"] for example in dataset) == sorted(labels[:6].tolist())


def test_refuses_to_overwrite_without_flag(tmp_path, fashion_mnist_dir):
    (tmp_path / "keep.txt").write_text("precious")
    args = dict(source="fashion-mnist", output=str(tmp_path), num_shards=2, max_samples=4, split="test")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_data(PrepareDataArguments(**args))
    assert (tmp_path / "keep.txt").exists()
    summary = prepare_data(PrepareDataArguments(**args, overwrite=True))
    assert summary["num_written"] == 4 and not (tmp_path / "keep.txt").exists()


def test_rejects_more_shards_than_images_and_bad_format(tmp_path, fashion_mnist_dir):
    with pytest.raises(ValueError, match="cannot fill 8 shards"):
        prepare_data(
            PrepareDataArguments(
                source="fashion-mnist", output=str(tmp_path), num_shards=8, max_samples=4, split="test"
            )
        )
    with pytest.raises(ValueError, match="format"):
        PrepareDataArguments(source="fashion-mnist", output=str(tmp_path), format="zip")


def test_command_line(tmp_path, fashion_mnist_dir):
    env = {**os.environ, "SIMMIM_FASHION_MNIST_DIR": str(fashion_mnist_dir)}
    command = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--source", "fashion-mnist"]
    command += ["--output", str(tmp_path), "--num_shards", "2", "--max_samples", "8", "--split", "test"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Wrote 8 images into 2 webdataset shards" in result.stdout
    summary = json.loads((tmp_path / "prepare_data.json").read_text())
    assert summary["shard_counts"] == [4, 4]
