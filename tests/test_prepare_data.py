"""scripts/prepare_data.py and simmim_hf.data.write_shards: shards that `load_dataset` streams back pixel for pixel."""

import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
from pretrain_helpers import write_png_tar

from simmim_hf.cli import run_script
from simmim_hf.configuration_simmim import SimMIMConfig
from simmim_hf.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageDecoder,
    ImageTooLargeError,
    build_pretrain_transform,
    open_image,
)
from simmim_hf.data.stats import resolve_image_stats
from simmim_hf.data.stream import DataArguments
from simmim_hf.data.write_shards import PrepareDataArguments, main, prepare_data
from simmim_hf.errors import UsageError
from simmim_hf.pretrain.arguments import ModelArguments

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
    with pytest.raises(UsageError, match="--overwrite"):
        prepare_data(PrepareDataArguments(**args))
    assert (tmp_path / "keep.txt").exists()
    summary = prepare_data(PrepareDataArguments(**args, overwrite=True))
    assert summary["num_written"] == 4 and not (tmp_path / "keep.txt").exists()


def test_rejects_more_shards_than_images_and_bad_format(tmp_path, fashion_mnist_dir):
    with pytest.raises(UsageError, match="--num_shards 8: the source has only 4 images"):
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


def blank_png(path: Path, width: int, height: int, value: int = 255) -> bytes:
    """Writes (and returns) a valid single-colour greyscale PNG, compressed 100 rows at a time: 12000x12000 takes
    about 0.6 s, 0.66 MB on disk and a few MB of memory (PIL would hold all 144 MB of pixels to write it)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    compressor, rows = zlib.compressobj(1), (b"\x00" + bytes([value]) * width) * 100  # filter byte 0 + pixels
    parts = [compressor.compress(rows) for _ in range(height // 100)]
    parts += [compressor.compress(rows[: (height % 100) * (width + 1)]), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return data


def ten_images(fashion_test) -> list[PIL.Image.Image]:
    """8 Fashion-MNIST images (28x28 grey), scikit-image's camera (512x512 grey) and chelsea (451x300 colour)."""
    import skimage.data

    images, _ = fashion_test
    return [PIL.Image.fromarray(image) for image in images[:8]] + [
        PIL.Image.fromarray(skimage.data.camera()),
        PIL.Image.fromarray(skimage.data.chelsea()),
    ]


@pytest.fixture(scope="module")
def odd_corpus(tmp_path_factory, fashion_test):
    """Three folders of the same ten images, the third and fourth with one more single-colour (white) PNG: 2000x2000
    (4 Mpixel, under the limit) and 12000x12000 (144 Mpixel, above it); each sharded once by prepare_data."""
    root = tmp_path_factory.mktemp("odd")
    folders = {name: root / name for name in ("ten", "odd_2k", "odd_12k")}
    for folder in folders.values():
        folder.mkdir()
        for index, image in enumerate(ten_images(fashion_test)):
            image.save(folder / f"image{index}.png")
    blank_png(folders["odd_2k"] / "zz-odd.png", 2000, 2000)
    blank_png(folders["odd_12k"] / "zz-odd.png", 12000, 12000)
    summaries = {
        name: prepare_data(PrepareDataArguments(source=str(folder), output=str(root / f"{name}-shards"), num_shards=1))
        for name, folder in folders.items()
    }
    return root, summaries


def weighted_stats(images: list[PIL.Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Reference (RGB mean, RGB std): every pixel of image i weighs 1 / (N * pixels of image i), so each image weighs
    1/N; mean = sum_p w_p x_p, var = sum_p w_p (x_p - mean)^2 over all pixels p of all N images."""
    values = np.concatenate([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255 for im in images])
    weights = np.concatenate(
        [np.full(im.width * im.height, 1 / (len(images) * im.width * im.height)) for im in images]
    )
    mean = np.average(values, axis=0, weights=weights)
    return mean, np.sqrt(np.average(np.square(values - mean), axis=0, weights=weights))


def test_statistics_weigh_each_image_once_so_one_odd_image_moves_them_by_its_weight(odd_corpus, fashion_test):
    _, summaries = odd_corpus
    ten, odd = summaries["ten"]["image_stats"], summaries["odd_2k"]["image_stats"]
    assert (ten["num_images"], odd["num_images"], ten["num_colour_images"]) == (10, 11, 1)
    images = ten_images(fashion_test)
    # The recorded figures are rounded to 4 decimals: 5e-5, plus float error.
    for recorded, reference in (
        (ten, weighted_stats(images)),
        (odd, weighted_stats([*images, PIL.Image.new("L", (2000, 2000), 255)])),
    ):
        np.testing.assert_allclose(recorded["mean"], reference[0], atol=6e-5)
        np.testing.assert_allclose(recorded["std"], reference[1], atol=6e-5)
    # Adding one image of constant value c to n images of mean m and variance v (equal weights):
    # mean' = (n m + c) / (n + 1), var' = n v / (n + 1) + n (c - m)^2 / (n + 1)^2.
    n, c, m, v = 10, 1.0, np.array(ten["mean"]), np.square(ten["std"])
    np.testing.assert_allclose(odd["mean"], (n * m + c) / (n + 1), atol=2e-4)
    np.testing.assert_allclose(odd["std"], np.sqrt(n * v / (n + 1) + n * (c - m) ** 2 / (n + 1) ** 2), atol=2e-4)
    # So the odd image moves the mean by |c - m| / (n + 1) <= 1/11 of the [0, 1] range, and here the std by less
    # (0.06); weighted by its pixels (1 Mpixel once box-reduced for measuring, against the ten's 0.4 Mpixel), as the
    # statistics were before, it pulled the mean to 0.84-0.86 and the std to 0.25-0.29.
    assert np.all(np.abs(np.array(odd["mean"]) - ten["mean"]) <= 1 / (n + 1))
    assert np.all(np.abs(np.array(odd["std"]) - ten["std"]) <= 1 / (n + 1))


def test_an_image_above_the_one_limit_is_skipped_and_counted_everywhere(odd_corpus, caplog):
    root, summaries = odd_corpus
    # One limit, one flag name: prepare_data.py and pretraining share the default (and the statistics use the run's).
    assert PrepareDataArguments(source="x", output="y").max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert DataArguments().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS < 12000 * 12000
    # prepare_data: written 10, skipped 1 as too_large; its statistics are those of the ten images, the skip counted.
    summary = summaries["odd_12k"]
    assert (summary["num_written"], summary["num_skipped"]) == (10, 1)
    assert summary["num_skipped_by_reason"] == {"undecodable": 0, "too_large": 1}
    assert "zz-odd.png: too_large" in summary["skipped"][0] and "12000x12000" in summary["skipped"][0]
    stats, ten = summary["image_stats"], summaries["ten"]["image_stats"]
    assert (stats["mean"], stats["std"], stats["num_skipped"]) == (ten["mean"], ten["std"], {"too_large": 1})

    # The trainer's decoder refuses it from the header: `too_large`, not decoded (decoding would succeed).
    big = (root / "odd_12k" / "zz-odd.png").read_bytes()
    decoder = ImageDecoder(
        build_pretrain_transform(SimMIMConfig.from_preset("demo")), max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS
    )
    assert decoder(big) is None and decoder.fault_counts()["too_large"] == 1

    # --image_stats dataset on shards without a record measures the stream with the run's limit and counts the skip.
    tar_path = write_png_tar(
        root / "stream" / "train-0.tar", [p.read_bytes() for p in sorted((root / "odd_12k").iterdir())]
    )
    config = SimMIMConfig.from_preset("demo")
    data_args = DataArguments(dataset_name="webdataset", data_files=[str(tar_path)])
    stats = resolve_image_stats(ModelArguments(image_stats="dataset", image_stats_samples=100), data_args, config)
    assert stats.source == "measured on the first 10 images of the stream; skipped too_large 1"
    np.testing.assert_allclose(stats.overrides["image_mean"], ten["mean"], atol=1e-4)
    np.testing.assert_allclose(stats.overrides["image_std"], ten["std"], atol=1e-4)

    # Statistics recorded with a larger limit than the run's: one warning naming both limits.
    shards = DataArguments(
        dataset_name="webdataset", data_files=[str(root / "ten-shards" / "train-*.tar")], max_image_pixels=1000
    )
    with caplog.at_level(logging.WARNING, logger="simmim_hf"):
        resolve_image_stats(ModelArguments(image_stats="dataset"), shards, SimMIMConfig.from_preset("demo"))
    assert [r.getMessage() for r in caplog.records if "--max_image_pixels" in r.getMessage()] == [
        f"{root / 'ten-shards' / 'prepare_data.json'} was written with --max_image_pixels {DEFAULT_MAX_IMAGE_PIXELS}, "
        "this run skips images above 1000: its statistics may include images the run skips (rerun prepare_data.py "
        "with --max_image_pixels 1000)."
    ]


def test_the_limit_is_the_only_one_even_above_pils_own(monkeypatch):
    """PIL refuses images above twice PIL.Image.MAX_IMAGE_PIXELS by itself; a larger --max_image_pixels wins."""
    buffer = io.BytesIO()
    PIL.Image.new("L", (50, 50)).save(buffer, format="PNG")  # 2500 pixels
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would refuse above 2000
    with pytest.raises(ImageTooLargeError):
        open_image(buffer.getvalue(), max_pixels=2499)
    assert open_image(buffer.getvalue(), max_pixels=2500).size == (50, 50)


def run_prepare_data(argv: list[str], capsys) -> tuple[int, str]:
    """scripts/prepare_data.py's `main` under `cli.run_script`, in this process: exit status and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--source", "{empty}"], "--source {empty}: no image files (.jpg, .jpeg, .png"),
        (["--source", "{tmp}/nowhere/photos"], "--source: the folder '{tmp}/nowhere/photos' does not exist"),
        (["--source", "{tmp}/notes.txt"], "--source '{tmp}/notes.txt': not fashion-mnist, a save_to_disk folder"),
        (["--output", "{tmp}/notes.txt"], "--output {tmp}/notes.txt: exists and is a file, not a folder"),
        (["--output", "{photos}"], "--output {photos}: must not be the source folder or inside it"),
        (["--output", "{tmp}", "--overwrite", "true"], "--output {tmp}: holds the source {photos}"),
        (["--output", "{empty}"], "--output {empty}: the folder is not empty; pass --overwrite"),
        (["--num_shards", "0"], "--num_shards must be >= 1, got 0"),
        (["--num_shards", "9"], "--num_shards 9: the source has only 4 images; lower --num_shards"),
        (["--num_shards", "two"], "argument --num_shards/--num-shards: invalid int value: 'two'"),
        (["--shards", "2"], "Some specified arguments are not used by the HfArgumentParser: ['--shards', '2']"),
        (["--format", "zip"], "--format must be one of webdataset, parquet, got 'zip'"),
        (["--source", "fashion-mnist", "--split", "validation"], "--split: fashion-mnist has the splits train, test"),
        (["--max_samples", "0"], "--max_samples must be >= 1, got 0"),
        (["--stats_max_images", "-1"], "--stats_max_images must be >= 0"),
        (["--max_image_pixels", "0"], "--max_image_pixels must be an integer >= 1, got 0"),
        (
            ["--max_image_pixels", "100"],
            "--source {photos}: none of its images could be written (skipped too_large 4;",
        ),
    ],
)
def test_mistakes_are_one_error_line_exit_2_and_leave_nothing(tmp_path, capsys, fashion_test, argv, message):
    photos, empty = tmp_path / "photos", tmp_path / "empty"
    for index, image in enumerate(fashion_test[0][:4]):
        write_png(photos / f"{index}.png", image)
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    (tmp_path / "notes.txt").write_text("not an image")
    names = {"tmp": tmp_path, "photos": photos, "empty": empty}
    defaults = {"--source": str(photos), "--output": str(tmp_path / "new" / "shards"), "--num_shards": "2"}
    argv = [item.format(**names) for item in argv]
    given = dict(zip(argv[::2], argv[1::2]))
    argv += [item for flag, value in defaults.items() if flag not in given for item in (flag, value)]
    before = files_under(tmp_path)
    status, stderr = run_prepare_data(argv, capsys)
    assert status == 2
    lines = [line for line in stderr.splitlines() if line and not line.startswith("Writing ")]  # no progress bar
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(**names)), stderr
    assert files_under(tmp_path) == before  # no output folder, no staging folder, no parent folder left


def test_a_failed_overwrite_keeps_the_old_shards(tmp_path, capsys, fashion_test):
    photos, output = tmp_path / "photos", tmp_path / "shards"
    for index, image in enumerate(fashion_test[0][:4]):
        write_png(photos / f"{index}.png", image)
    prepare_data(PrepareDataArguments(source=str(photos), output=str(output), num_shards=2))
    before = {name: (output / name).read_bytes() for name in files_under(output)}
    argv = ["--source", str(photos), "--output", str(output), "--num_shards", "2", "--overwrite", "true"]
    status, stderr = run_prepare_data([*argv, "--max_image_pixels", "100"], capsys)
    assert status == 2 and "none of its images could be written (skipped too_large 4" in stderr
    assert {name: (output / name).read_bytes() for name in files_under(output)} == before
    assert [name for name in files_under(tmp_path) if not name.startswith("photos")] == [
        "shards",
        *(f"shards/{name}" for name in before),
    ]


def test_an_output_link_stays_a_link_and_a_killed_runs_staging_is_ignored(tmp_path, fashion_test):
    photos, target, link = tmp_path / "photos", tmp_path / "disk", tmp_path / "shards"
    for index, image in enumerate(fashion_test[0][:2]):
        write_png(photos / f"{index}.png", image)
    (target / ".prepare_data.tmp-999999").mkdir(parents=True)  # what a SIGKILLed run leaves
    link.symlink_to(target)
    summary = prepare_data(PrepareDataArguments(source=str(photos), output=str(link), num_shards=2))
    assert summary["num_written"] == 2 and link.is_symlink()
    assert files_under(target) == ["prepare_data.json", "train-00000-of-00002.tar", "train-00001-of-00002.tar"]
