"""The pretraining data pipeline: which images to read, and how to stream them to the DataLoader.

`load_pretrain_dataset` returns a `datasets` dataset whose examples are `{"pixel_values": (C, H, W) float tensor}`
(uint8 with `uint8=True`, normalised later on the training device).
Streaming (the default) goes: `load_dataset(..., streaming=True)` -> keep the image column, cast it to
`Image(decode=False)` (bytes only) -> `shuffle(seed, buffer_size)` -> `split_dataset_by_node(rank, world_size)` ->
`map(decode + transform)` -> drop undecodable images. Decoding and augmentation therefore run lazily inside the
DataLoader workers. Local `webdataset`/`parquet` shards are read by `simmim_hf.data.shards` instead of the stock
builders, so a broken file costs that file's remainder (counted, one warning) instead of the run; every data fault is
counted per reason (`simmim_hf.data.faults`). Each example's augmentation is seeded from (seed, pass, image bytes), so a
resumed stream draws the same crops as an uninterrupted one (`simmim_hf.data.images`). Feed the result to `simmim_hf.collate.StreamLoader`, which repeats it endlessly (one reshuffled
epoch after another, bounded by the Trainer's `max_steps`) and can save/restore the stream position.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import torch
from datasets.distributed import split_dataset_by_node

from simmim_hf.data.faults import record_read
from simmim_hf.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageDecoder, SimMIMAugmentation, build_pretrain_transform
from simmim_hf.data.shards import KINDS as SHARD_KINDS
from simmim_hf.data.shards import is_remote, resolve_data_files, shard_stream
from simmim_hf.errors import UsageError

logger = logging.getLogger(__name__)

FASHION_MNIST = "fashion-mnist"
# Fallback names when no column is typed `Image` (e.g. a parquet file with raw bytes, or a webdataset "jpg" key).
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
# Shards used when a map-style source (the embedded Fashion-MNIST, a save_to_disk folder) is streamed; 48 splits
# evenly over 1, 2, 3, 4, 6, 8, 12, 16, 24 and 48 readers.
STREAM_SHARDS = 48


@dataclass
class DataArguments:
    """Which images to pretrain on and how to read them (parsed by `transformers.HfArgumentParser`)."""

    dataset_name: str = field(
        default=FASHION_MNIST,
        metadata={
            "help": "A Hub dataset id, a local builder (`webdataset`, `parquet`, `imagefolder`, with --data_files or "
            "--data_dir), a folder written by `save_to_disk`, or `fashion-mnist` (the embedded default corpus)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Data files or globs for a local builder, e.g. `shards/train-*.tar`."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Data folder for a local builder or a Hub dataset."})
    train_split: str = field(default="train", metadata={"help": "The split to pretrain on."})
    streaming: bool = field(
        default=True,
        metadata={"help": "Stream the data (no full download, lazy decoding); `--streaming false` loads map-style."},
    )
    image_column: str | None = field(
        default=None,
        metadata={
            "help": "The image column. Default: the single column typed Image, else a column named "
            + "/".join(IMAGE_COLUMN_NAMES)
            + "."
        },
    )
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Examples held in the streaming shuffle buffer (per DataLoader worker)."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Truncate each epoch to about this many images in total (for quick runs). When streaming it is "
            "split evenly over ranks and DataLoader workers."
        },
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": "Images with more pixels (read from the header) are skipped and counted as `too_large` before "
            "any decoding. Default: PIL's own decompression-bomb limit."
        },
    )
    max_bad_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Stop with an error when more than this fraction of a pass's examples are data faults "
            "(undecodable, too_large, no_image; a broken file counts as one)."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1, got {self.max_train_samples}")
        if self.max_image_pixels < 1:
            raise UsageError(f"--max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if not 0.0 < self.max_bad_fraction <= 1.0:
            raise UsageError(f"--max_bad_fraction must be in (0, 1], got {self.max_bad_fraction}")


def detect_image_column(features: datasets.Features | Sequence[str] | None, image_column: str | None = None) -> str:
    """Picks the image column from a dataset's `features` (or bare column names when the types are unknown).

    An explicit `image_column` must exist. Otherwise: the single `Image`-typed feature; failing that, the single column
    named one of `IMAGE_COLUMN_NAMES`. Raises `ValueError` listing the columns when there is none or more than one.
    """
    columns = list(features or [])
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"image_column {image_column!r} is not a column of the dataset; columns: {columns}")
        return image_column
    if isinstance(features, (datasets.Features, dict)):
        typed = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if len(typed) == 1:
            return typed[0]
        if len(typed) > 1:
            raise ValueError(f"Several Image columns {typed}: pass --image_column. Columns: {columns}")
    named = [name for name in columns if name.lower() in IMAGE_COLUMN_NAMES]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ValueError(f"Several candidate image columns {named}: pass --image_column. Columns: {columns}")
    raise ValueError(
        f"No image column found (looked for an Image feature or {IMAGE_COLUMN_NAMES}); columns: {columns}"
    )


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    folder = Path(path)
    return folder.is_dir() and any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def dataset_features(dataset: datasets.Dataset | datasets.IterableDataset) -> datasets.Features | list[str]:
    """The dataset's features, or just its column names (read from the first example) when a stream has no types."""
    if dataset.features is not None:
        return dataset.features
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError("The dataset is empty")
    return list(first)


def fashion_mnist_subset(split: str = "train", max_samples: int | None = None) -> datasets.Dataset:
    """The embedded Fashion-MNIST as a map-style dataset (`image` PIL "L", `label`).

    A subset encodes only the rows kept. The full split (PNG-encoding 60k images takes ~15 s) is built once and kept
    as Arrow files next to the IDX files' cache (`$SIMMIM_HF_CACHE`), so later runs and every rank memory-map it.
    """
    from simmim_hf.data.fashion_mnist import default_cache_dir, load_fashion_mnist, to_dataset

    cached = default_cache_dir().parent / "fashion-mnist-arrow" / split
    if max_samples is None and is_saved_dataset(cached):
        return datasets.load_from_disk(str(cached))
    images, labels = load_fashion_mnist(split)
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    dataset = to_dataset(images, labels)
    if max_samples is None:
        # Write to a private folder, then rename: ranks starting together never read a half-written cache.
        temporary = cached.with_name(f"{split}.tmp-{os.getpid()}")
        dataset.save_to_disk(str(temporary))
        try:
            temporary.rename(cached)
        except OSError:  # another process won the race
            shutil.rmtree(temporary, ignore_errors=True)
        if is_saved_dataset(cached):
            dataset = datasets.load_from_disk(str(cached))
    return dataset


def load_source_dataset(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    data_files: str | Sequence[str] | None = None,
    data_dir: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Opens one split of any supported source: `fashion-mnist`, a `save_to_disk` folder, or `load_dataset(name)`.

    `max_samples` only pre-truncates `fashion-mnist` (to skip encoding rows that would be dropped anyway).
    """
    if name == FASHION_MNIST:
        dataset = fashion_mnist_subset(split, max_samples)
        return dataset.to_iterable_dataset(num_shards=min(STREAM_SHARDS, len(dataset))) if streaming else dataset
    if is_saved_dataset(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"split {split!r} not in the saved dataset {name}; splits: {list(loaded)}")
            loaded = loaded[split]
        return loaded.to_iterable_dataset(num_shards=min(STREAM_SHARDS, len(loaded))) if streaming else loaded
    if isinstance(data_files, str):
        data_files = [data_files]
    check_local_source(name, data_files, data_dir)
    if streaming and name in SHARD_KINDS and data_files and not any(is_remote(f) for f in data_files):
        dataset = shard_stream(name, resolve_data_files(data_files))
        dataset.simmim_shard_reader = True  # examples are already `pixel_values` + fault markers
        return dataset
    if data_files and not any(is_remote(f) for f in data_files):
        data_files = resolve_data_files(data_files)
    files = {split: list(data_files)} if data_files else None
    return datasets.load_dataset(
        name, config_name, data_dir=data_dir, data_files=files, split=split, streaming=streaming
    )


def looks_like_path(name: str) -> bool:
    """Whether `--dataset_name` can only be a local folder (a Hub id is `name` or `owner/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_local_source(name: str, data_files: Sequence[str] | None, data_dir: str | None) -> None:
    """Raises `UsageError` (one line naming the argument) for a local folder or file that is not there."""
    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise UsageError(f"--dataset_name: the folder {name!r} does not exist")
    if data_dir is not None and not is_remote(data_dir) and name in (*SHARD_KINDS, "imagefolder"):
        if not os.path.isdir(os.path.expanduser(data_dir)):
            raise UsageError(f"--data_dir: the folder {data_dir!r} does not exist")
    if name in SHARD_KINDS and not data_files and data_dir is None:
        raise UsageError(f"--data_files: --dataset_name {name} needs the shard files (e.g. 'shards/train-*.tar')")


def check_shard_count(num_shards: int, world_size: int = 1, num_workers: int = 0, source: str = "") -> bool:
    """Warns unless `num_shards` is a multiple of `world_size * max(1, num_workers)`; returns whether it is.

    Streaming splits a dataset by *shards* (files): with fewer shards than readers some workers idle, and with an
    uneven count some readers see more data than others.
    """
    readers = world_size * max(1, num_workers)
    if num_shards % readers == 0:
        return True
    logger.warning(
        "The dataset %s has %d shard(s), not a multiple of world_size * num_workers = %d * %d = %d readers: some "
        "readers will get more data than others, or none. A local imagefolder streams as ONE shard; write tar or "
        "parquet shards with `scripts/prepare_data.py --num_shards N` (N a multiple of the reader count).",
        source,
        num_shards,
        world_size,
        max(1, num_workers),
        readers,
    )
    return False


def raw_image_dataset(
    data_args: DataArguments, streaming: bool = True, max_samples: int | None = None
) -> datasets.IterableDataset | datasets.Dataset:
    """The run's split with its image column as `pixel_values`, cells undecoded (`{"bytes", "path"}`).

    Local webdataset/parquet shards come from the fault-tolerant shard reader, whose fault markers have
    `pixel_values` None plus `_fault`/`_detail` columns. `max_samples` only pre-truncates `fashion-mnist`.
    """
    dataset = load_source_dataset(
        data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.train_split,
        data_args.data_files,
        data_args.data_dir,
        streaming=streaming,
        max_samples=max_samples,
    )
    if getattr(dataset, "simmim_shard_reader", False):
        return dataset
    column = detect_image_column(dataset_features(dataset), data_args.image_column)
    # Cast first: later steps (select, rename) re-apply the features, and must not decode the images in the reader.
    dataset = dataset.cast_column(column, datasets.Image(decode=False)).select_columns([column])
    if column != "pixel_values":
        # Named like the model input, so the Trainer's `remove_unused_columns` keeps it.
        dataset = dataset.rename_column(column, "pixel_values")
    return dataset


def load_pretrain_dataset(
    data_args: DataArguments,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    *,
    config: Any = None,
    transform: Callable[[PIL.Image.Image], torch.Tensor] | None = None,
    uint8: bool = False,
) -> datasets.IterableDataset | datasets.Dataset:
    """The pretraining stream for one rank: examples `{"pixel_values": (C, H, W) float tensor}`.

    Args:
        data_args: where to read images from.
        seed: shuffle seed; must be the same on every rank (the shard order is shuffled with it before splitting).
        rank, world_size: this process's slice; streaming splits by shards (`split_dataset_by_node`).
        num_workers: DataLoader workers per rank, only used to check the shard count and split `max_train_samples`.
        config: a SimMIMConfig-like object for `build_pretrain_transform`; or pass `transform` directly.
        transform: PIL image -> tensor; overrides `config`.
        uint8: with the built-in augmentation (`SimMIMAugmentation`), yield uint8 pixels instead of normalised
            floats, to be normalised on the training device (`transforms.normalize_pixel_values`); the pretraining
            job does. Other transforms are left as they are.

    Streaming returns a `datasets.IterableDataset`, decoded and transformed lazily, faulty examples dropped and
    counted per reason (`dataset.simmim_decoder.fault_counts()` in the process that iterates it; `StreamLoader`
    totals them over workers and passes). Map-style
    (`streaming=False`) returns a `datasets.Dataset` whose `with_transform` yields `None` for an undecodable image,
    which `SimMIMCollator` drops; it is not split by rank (the Trainer's distributed sampler does that).
    """
    if transform is None:
        if config is None:
            raise ValueError("load_pretrain_dataset needs `config` (to build the transform) or `transform`")
        transform = build_pretrain_transform(config)
    if uint8 and isinstance(transform, SimMIMAugmentation):
        transform = transform.with_uint8()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    dataset = raw_image_dataset(data_args, streaming=data_args.streaming, max_samples=data_args.max_train_samples)

    if not data_args.streaming:
        decoder = ImageDecoder(transform, max_image_pixels=data_args.max_image_pixels)
        if data_args.max_train_samples is not None:
            dataset = dataset.select(range(min(data_args.max_train_samples, len(dataset))))
        dataset = dataset.with_transform(decoder.decode_batch)
        dataset.simmim_decoder = decoder
        return dataset

    decoder = ImageDecoder(transform, seed=seed, max_image_pixels=data_args.max_image_pixels)
    check_shard_count(dataset.num_shards, world_size, num_workers, source=data_args.dataset_name)
    dataset = dataset.map(_add_fault_columns)  # every source gets the fault-marker columns of the shard reader
    dataset = dataset.shuffle(
        seed=seed,
        buffer_size=data_args.shuffle_buffer_size,
        max_buffer_input_shards=interleaved_shards(dataset.num_shards, world_size, num_workers),
    )
    counts_buffer_input = count_buffer_input(dataset, decoder.key)
    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if data_args.max_train_samples is not None:
        # `take` counts per DataLoader worker (each iterates its own shards), hence the split.
        readers = world_size * max(1, num_workers)
        dataset = dataset.take(math.ceil(data_args.max_train_samples / readers))
    dataset = dataset.map(decoder.decode_example, remove_columns=["_fault", "_detail"])
    dataset = dataset.filter(_is_decoded)
    dataset.simmim_decoder = decoder
    dataset.simmim_num_workers = num_workers  # StreamLoader checks it: the shuffle above was sized for it
    dataset.simmim_max_bad_fraction = data_args.max_bad_fraction
    dataset.simmim_counts_buffer_input = counts_buffer_input  # StreamLoader: how many images a resume skips
    return dataset


def _add_fault_columns(example: dict[str, Any]) -> dict[str, str]:
    return {"_fault": example.get("_fault") or "", "_detail": example.get("_detail") or ""}


class _ReadCounter:
    """Counts each example that enters the shuffle buffer (in this process), returning no new column."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        record_read(self.key)
        return {}


def count_buffer_input(dataset: datasets.IterableDataset, key: str) -> bool:
    """Counts the examples entering the shuffle buffer of `dataset` (fresh from `shuffle`) under `key`.

    What entered the buffer but was not consumed when a stream position was saved sat in the buffer, which `datasets`
    does not save: `StreamLoader` reports that many images as skipped by a resume. The count must be taken right at
    the buffer's input, above the shard interleaving (which reads ahead and rewinds on resume), which the public API
    cannot reach: this wraps the buffer's input in a `MappedExamplesIterable` (`datasets` internals). Returns False
    (nothing counted; the skip count is then unknown) if this `datasets` version is built differently.
    """
    from datasets.iterable_dataset import BufferShuffledExamplesIterable, MappedExamplesIterable

    buffer = getattr(dataset, "_ex_iterable", None)
    if not isinstance(buffer, BufferShuffledExamplesIterable) or not hasattr(buffer, "ex_iterable"):
        logger.info("Cannot count the shuffle buffer's input with this datasets version; resume skips go unreported")
        return False
    buffer.ex_iterable = MappedExamplesIterable(buffer.ex_iterable, function=_ReadCounter(key))
    return True


def interleaved_shards(num_shards: int, world_size: int = 1, num_workers: int = 0, limit: int = 10) -> int:
    """How many shards each reader interleaves into its shuffle buffer (`shuffle(max_buffer_input_shards=...)`).

    `datasets` loads a saved stream position twice inside a DataLoader worker: first into the rank's whole stream,
    then into the worker's slice. With the default of 10 interleaved shards the two have different numbers of sources
    (e.g. 4 vs 2 for 4 shards and 2 workers) and the first load raises `IndexError`. Interleaving at most
    `num_shards // readers` shards gives both the same structure, so resuming works with any number of workers.
    """
    per_reader = num_shards // (world_size * max(1, num_workers))
    return max(1, min(limit, per_reader))


def _is_decoded(example: dict[str, Any]) -> bool:
    return example["pixel_values"] is not None
