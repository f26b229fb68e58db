"""Per-channel normalisation statistics of an image corpus, and the choice of statistics for a pretraining run.

`ImageStatsAccumulator` measures mean and standard deviation per channel over the images it is given, each image
weighing as one image (values in [0, 1], images converted to RGB as the pretraining transform does, plus the greyscale
"L" channel for 1-channel models), counts the images that carry colour and those skipped (above `--max_image_pixels`,
undecodable). `scripts/prepare_data.py` records the result in its output folder's `prepare_data.json`;
`resolve_image_stats` reads it back for `--image_stats dataset` (or measures the first images of the stream, with the
run's `--max_image_pixels`, when no record is found); `apply_image_stats` applies the choice through the config's own
validation and warns when greyscale statistics meet colour images.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import PIL.Image

from simmim_hf.data.faults import format_counts
from simmim_hf.data.sources import split_files
from simmim_hf.errors import UsageError

logger = logging.getLogger(__name__)

STATS_KEY = "image_stats"
SUMMARY_FILE = "prepare_data.json"  # written by simmim_hf.data.write_shards.prepare_data
CHOICES = ("preset", "imagenet", "dataset")
# Images larger than this many pixels are box-reduced by an integer factor before measuring (a 12-Mpixel photo would
# otherwise need ~300 MB of float64); the mean is unchanged by box averaging, the std drops slightly.
MAX_MEASURED_PIXELS = 1024 * 1024
# An image "has colour" when its channels differ by more than this on average (JPEG noise on grey stays far below).
COLOUR_THRESHOLD = 0.02
# Statistics whose channels agree this closely are greyscale statistics.
GREY_TOLERANCE = 1e-3


class ImageStatsAccumulator:
    """Per-channel mean/std over images, each image weighing as one image, whatever its size.

    `add(image)` takes a PIL image of any mode; it is measured as RGB (greyscale replicated) and as "L". With image i's
    per-channel pixel mean m_i and mean square q_i (over its own pixels), `result()` gives the statistics of the
    equal-weight mixture of the N images:

        mean = (1/N) sum_i m_i
        var  = (1/N) sum_i q_i - mean^2 = (1/N) sum_i v_i + (1/N) sum_i (m_i - mean)^2,   v_i = q_i - m_i^2

    (mean within-image variance plus the variance of the image means). That is what pretraining sees: every image is
    cropped and resized to the same `image_size` (RandomResizedCrop), so each contributes the same number of pixels
    to a batch; one huge image shifts the mean and std by at most 1/N of the value range, not by its pixel share.

    `skip(reason)` counts an image that was not measured (`too_large`: above `--max_image_pixels`, from its header;
    `undecodable`; or another `simmim_hf.data.faults` reason); `result()["num_skipped"]` reports them.
    """

    def __init__(self) -> None:
        self.mean_sums = np.zeros(4, dtype=np.float64)  # sum over images of m_i: R, G, B, L
        self.square_sums = np.zeros(4, dtype=np.float64)  # sum over images of q_i
        self.num_images = 0
        self.num_colour_images = 0
        self.skipped: dict[str, int] = {}

    def add(self, image: PIL.Image.Image) -> None:
        factor = int(np.ceil(np.sqrt(image.width * image.height / MAX_MEASURED_PIXELS)))
        if factor > 1:
            image = image.reduce(factor)
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3)
        grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None] / 255.0  # (H, W, 1)
        values = np.concatenate([rgb, grey], axis=-1).reshape(-1, 4)  # (H * W, 4)
        self.mean_sums += values.mean(axis=0)
        self.square_sums += np.square(values).mean(axis=0)
        self.num_images += 1
        chroma = (rgb.max(axis=-1) - rgb.min(axis=-1)).mean()
        self.num_colour_images += bool(chroma > COLOUR_THRESHOLD)

    def skip(self, reason: str) -> None:
        """Counts one image left out of the statistics, by reason (`too_large`, `undecodable`, ...)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def result(self) -> dict[str, Any]:
        """`{"mean": [r, g, b], "std": [...], "grey_mean": [l], "grey_std": [l], "num_images", "num_colour_images",
        "num_skipped": {reason: count}, "weighting": "per_image"}`."""
        if not self.num_images:
            skipped = f" ({format_counts(self.skipped)} skipped)" if self.skipped else ""
            raise ValueError(f"no image was measured{skipped}")
        mean = self.mean_sums / self.num_images
        std = np.sqrt(np.maximum(self.square_sums / self.num_images - np.square(mean), 0.0))
        return {
            "mean": [round(float(v), 4) for v in mean[:3]],
            "std": [round(float(v), 4) for v in std[:3]],
            "grey_mean": [round(float(mean[3]), 4)],
            "grey_std": [round(float(std[3]), 4)],
            "num_images": self.num_images,
            "num_colour_images": self.num_colour_images,
            "num_skipped": dict(self.skipped),
            "weighting": "per_image",
        }


def stats_for_channels(stats: dict[str, Any], channels: int) -> tuple[list[float], list[float]]:
    """The (mean, std) pair for a model with `channels` input channels (3: RGB, 1: the "L" channel)."""
    if channels == 3:
        return list(stats["mean"]), list(stats["std"])
    if channels == 1:
        return list(stats["grey_mean"]), list(stats["grey_std"])
    raise UsageError(f"image_stats dataset: measured statistics exist for 1 or 3 channels, not {channels}")


def is_greyscale_stats(mean: list[float], std: list[float]) -> bool:
    """Whether per-channel statistics are the same number on every channel of a multi-channel model."""
    return len(mean) > 1 and max(mean) - min(mean) < GREY_TOLERANCE and max(std) - min(std) < GREY_TOLERANCE


def _data_files_of(data_args: Any) -> list[str]:
    """The run's data files: its split's `--data_files`, expanded as the training stream expands them
    (`sources.split_files`)."""
    split = getattr(data_args, "train_split", "train")
    return split_files(data_args.dataset_name, data_args.data_files, split) or []


def find_prepare_summary(data_args: Any) -> tuple[dict[str, Any], Path] | None:
    """The `prepare_data.json` written with the run's data: next to the data files (or in `--data_dir`, or in a
    folder given as `--dataset_name`) and listing those files. `(summary, path)`, or None."""
    files = _data_files_of(data_args)
    folders = [Path(path).parent for path in files]
    for name in (data_args.data_dir, data_args.dataset_name):
        if name and Path(name).is_dir():
            folders.append(Path(name))
    names = {Path(path).name for path in files}
    for folder in dict.fromkeys(folders):
        summary_path = folder / SUMMARY_FILE
        if not summary_path.is_file():
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(summary, dict) and (not names or names & set(summary.get("shards", []))):
            return summary, summary_path
    return None


def find_recorded_stats(data_args: Any) -> tuple[dict[str, Any], Path] | None:
    """The statistics `prepare_data.py` recorded for the run's data, with the file's path; None when there are none."""
    found = find_prepare_summary(data_args)
    if found is None or STATS_KEY not in found[0]:
        return None
    return found[0][STATS_KEY], found[1]


def data_provenance(data_args: Any) -> dict[str, Any]:
    """What the run's data is, for the run summary and the model card: the source `prepare_data.py` sharded (the
    embedded Fashion-MNIST, a Hub dataset id, a save_to_disk folder or an image folder), its kind, the file format and
    the image count. Empty values when the data was not written by prepare_data.py, or when its files can no longer
    be listed: this runs after training, for the record, and a shard deleted since must not stop the export."""
    try:
        found = find_prepare_summary(data_args)
    except UsageError as error:
        logger.warning("data provenance not recorded: %s", error)
        found = None
    if found is None:
        return {"data_source": None, "data_source_type": None, "data_format": None, "num_source_images": None}
    summary = found[0]
    arguments = summary.get("arguments", {})
    return {
        "data_source": arguments.get("source"),
        "data_source_type": summary.get("source_type"),
        "data_format": arguments.get("format"),
        "num_source_images": summary.get("num_written"),
    }


def stream_images(
    data_args: Any, count: int, accumulator: ImageStatsAccumulator | None = None
) -> Iterator[PIL.Image.Image]:
    """The first `count` decodable images of the run's data, in stored order (no shuffle, no augmentation).

    Images are skipped as in training: above `data_args.max_image_pixels` (from the header, never decoded), or not
    decodable; each skip is counted in `accumulator` when one is given.
    """
    from simmim_hf.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, decode_image
    from simmim_hf.data.stream import raw_image_dataset

    max_pixels = getattr(data_args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    dataset = raw_image_dataset(data_args, streaming=True)
    images = 0
    for example in dataset:
        if example["pixel_values"] is None:  # a fault marker of the shard reader (broken file, no image)
            if accumulator is not None:
                accumulator.skip(example.get("_fault") or "no_image")
            continue
        try:
            image = decode_image(example["pixel_values"], max_pixels)
        except Exception as error:  # noqa: BLE001 - an unreadable image is skipped here as in training
            if accumulator is not None:
                accumulator.skip("too_large" if isinstance(error, ImageTooLargeError) else "undecodable")
            continue
        yield image
        images += 1
        if images >= count:
            return


class ImageStats(NamedTuple):
    """The run's choice of normalisation statistics (`resolve_image_stats`): the `image_mean` / `image_std` overrides
    (empty: the config's own), where they came from, and (images with colour, images looked at) when measured."""

    overrides: dict[str, list[float]]
    source: str
    colour: tuple[int, int] | None = None


def resolve_image_stats(model_args: Any, data_args: Any, config: Any) -> ImageStats:
    """The run's choice of normalisation statistics for `config` (left untouched; `apply_image_stats` applies them).

    `model_args.image_mean/image_std` (explicit lists) win; else `model_args.image_stats`: `preset` (the default:
    the preset's or checkpoint's own), `imagenet`, or `dataset` (recorded by prepare_data.py, else measured on the
    first `image_stats_samples` images).
    """
    mean = getattr(model_args, "image_mean", None)
    std = getattr(model_args, "image_std", None)
    choice = getattr(model_args, "image_stats", None) or "preset"
    channels = int(config.num_channels)
    colour: tuple[int, int] | None = None  # (images with colour, images looked at)
    if choice not in CHOICES:
        raise UsageError(f"image_stats: expected one of {', '.join(CHOICES)}, got {choice!r}")
    if (mean is None) != (std is None):
        raise UsageError("image_mean/image_std: give both (one value per channel) or neither")
    if mean is not None:
        if getattr(model_args, "image_stats", None) not in (None, "preset"):
            raise UsageError("image_stats: give either --image_stats or --image_mean/--image_std, not both")
        source = "--image_mean/--image_std"
    elif choice == "imagenet":
        from simmim_hf.configuration_simmim import IMAGENET_MEAN, IMAGENET_STD, _default_stat

        mean, std, source = _default_stat(IMAGENET_MEAN, channels), _default_stat(IMAGENET_STD, channels), "ImageNet"
    elif choice == "dataset":
        found = find_recorded_stats(data_args)
        if found is not None:
            stats = found[0]  # the source names no path: it goes into the model card
            source = f"measured by prepare_data.py on {stats['num_images']} images"
            _warn_on_other_limit(data_args, found[1])
        else:
            count = int(getattr(model_args, "image_stats_samples", 1000))
            accumulator = ImageStatsAccumulator()
            for image in stream_images(data_args, count, accumulator):
                accumulator.add(image)
            stats = accumulator.result()
            skipped = f"; skipped {format_counts(accumulator.skipped)}" if accumulator.skipped else ""
            source = f"measured on the first {stats['num_images']} images of the stream{skipped}"
        mean, std = stats_for_channels(stats, channels)
        colour = (stats["num_colour_images"], stats["num_images"])
    else:
        where = f"preset {config.preset}" if config.preset else "checkpoint"
        return ImageStats({}, f"the {where}'s own")
    return ImageStats({"image_mean": [float(v) for v in mean], "image_std": [float(v) for v in std]}, source, colour)


def apply_image_stats(config: Any, stats: ImageStats, data_args: Any, warn: bool = True) -> Any:
    """`config` with the chosen statistics, through `SimMIMConfig.with_overrides` (so its own validation applies,
    to measured statistics as to given ones: a `UsageError` naming the field and where the values came from), the
    same config when there is nothing to change. Warns (when `warn`) if greyscale statistics meet colour images."""
    if stats.overrides:
        try:
            config = config.with_overrides(**stats.overrides)
        except ValueError as error:
            raise UsageError(f"{error} ({stats.source})") from None
    if warn and is_greyscale_stats(config.image_mean, config.image_std):
        _warn_on_colour(config, data_args, stats)
    return config


def _warn_on_colour(config: Any, data_args: Any, stats: ImageStats) -> None:
    colour = stats.colour
    if colour is None:
        found = find_recorded_stats(data_args)
        if found is not None:
            colour = (found[0]["num_colour_images"], found[0]["num_images"])
        else:
            sample = ImageStatsAccumulator()
            try:
                for image in itertools.islice(stream_images(data_args, 16), 16):
                    sample.add(image)
            except Exception as error:  # noqa: BLE001 - the check is advice; the run reports data errors itself
                logger.debug("Could not sample images for the colour check: %s", error)
            colour = (sample.num_colour_images, sample.num_images)
    if colour[0] > 0:
        logger.warning(
            "Normalising colour images with greyscale statistics (mean %s, std %s: %s): %d of %d images looked "
            "at have colour. Pass --image_stats dataset (the data's own statistics), --image_stats imagenet, or "
            "--image_mean/--image_std.",
            _short(config.image_mean),
            _short(config.image_std),
            stats.source,
            colour[0],
            colour[1],
        )


def _warn_on_other_limit(data_args: Any, summary_path: Path) -> None:
    """Warns when prepare_data.py measured its statistics with a larger `--max_image_pixels` than this run's: they
    may include images that the run skips."""
    try:
        recorded = json.loads(summary_path.read_text()).get("arguments", {}).get("max_image_pixels")
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    limit = getattr(data_args, "max_image_pixels", None)
    if isinstance(recorded, int) and isinstance(limit, int) and recorded > limit:
        logger.warning(
            "%s was written with --max_image_pixels %d, this run skips images above %d: its statistics may include "
            "images the run skips (rerun prepare_data.py with --max_image_pixels %d).",
            summary_path,
            recorded,
            limit,
            limit,
        )


def _short(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"
