"""The pretraining data pipeline: which images to read, and how to stream them to the DataLoader.

`load_pretrain_dataset` returns a stream whose examples are `{"pixel_values": (C, H, W) float tensor}` (uint8 with
`uint8=True`, normalised later on the training device). Two kinds of stream, both decoded lazily inside the
DataLoader workers (`simmim_hf.data.images`: one decode, the augmentation), undecodable images dropped and every data
fault counted per reason (`simmim_hf.data.faults`):

  * local `webdataset`/`parquet` shards (what `scripts/prepare_data.py` writes, the job's usual input):
    `simmim_hf.data.shard_stream.ShardStream`. The files are read by the fault-tolerant `simmim_hf.data.shards`
    (a broken file costs that file's remainder, counted, one warning), dealt out by whole shards to the readers
    (ranks x DataLoader workers) in an order seeded per pass, and shuffled by our own seeded buffer, whose content
    (the KEYS of the buffered examples: shard and tar byte offset or parquet row) is part of the stream position.
    Resuming is therefore exact, with any buffer size, and with another number of ranks or workers the rest of the
    pass is dealt out anew (each image of the pass still read once). The state records the shard list (name, size,
    mtime): a shard that is gone or changed size is dropped from the resumed pass (logged with the count), a new one
    joins at the next pass (logged); positions follow the shard's name, never its index;
  * any other source (Hub datasets, `save_to_disk` folders, the embedded Fashion-MNIST, imagefolder):
    `datasets.load_dataset(..., streaming=True)` -> keep the image column, cast to `Image(decode=False)` ->
    `shuffle(seed, buffer_size)` (datasets' buffer) -> `split_dataset_by_node(rank, world_size)` -> `map(decode)`.
    `datasets` does not save its buffer's content: a resume skips what the buffers held (never more than one buffer
    per worker), logs how many and reads nothing twice; it needs the same `num_workers`, else the next pass starts.

Each example's augmentation is seeded from (seed, pass, image bytes), so a resumed stream draws the same crops as an
uninterrupted one (`simmim_hf.data.images`). Sources and their aliases are `simmim_hf.data.sources`.

`StreamLoader` wraps a torch DataLoader around either stream and
  * repeats it endlessly, calling `dataset.set_epoch(epoch)` before each pass, so every pass reshuffles the shard order
    and the shuffle buffer (the Trainer's `max_steps` ends the run). Doing the repetition here rather than through the
    Trainer's epoch loop keeps every rank in one long Trainer epoch, so ranks whose shards differ in length never end
    an epoch at different steps (which would misalign gradient accumulation across ranks);
  * forms the batches inside the reading process (`_BatchStream`: each DataLoader worker, or the main process),
    attaching to each one the reader's position, its batch index in the pass and its fault counts, all captured
    right after the batch's last example was read; a worker that finishes its share of the pass sends a last item
    without images, so nothing it met is left uncounted. A `datasets` stream sends its whole `state_dict()`; a
    `ShardStream` sends only what changed since its previous batch (`take_delta`: one event per example) and the
    loader keeps a mirror of each reader's state (`apply_delta`), so no batch carries a copy of the buffer;
  * yields the batches in a fixed order, round robin over the workers starting from worker 0 at the start of a pass
    (skipping those that finished), whatever order the DataLoader delivers them in. `state_dict()` is therefore the
    exact position of what was consumed (in-flight prefetched batches excluded), including whose turn is next, and
    `load_state_dict()` restores it per worker (`all_ranks`: the states of every saved rank, for a changed layout).

Randomness is a pure function of the run seed and the stream position, so a resumed stream continues the
uninterrupted one exactly:
  * masks: the generator of a batch is seeded from (seed, rank, pass, worker, batch index of that worker in the pass);
    the batch index is part of the saved state (after a layout change it continues from the largest saved one);
  * augmentation: each example's crop and flip are seeded from (seed, pass, digest of its raw bytes) in the decoder
    (`simmim_hf.data.images`), which learns the pass from `_BatchStream`;
  * the shard order and the `ShardStream` buffer draws: seeded from (seed, pass) and (seed, pass, deal, reader, draw
    count); the count is part of the saved state.
For local shards a loader restored from `state_dict()` after k batches yields exactly batches k+1, k+2, ... of the
uninterrupted loader, with any buffer size; for `datasets` streams only with a buffer of 1.

A resume position at the end of a pass (e.g. every shard read and the buffer drawn out) is not an error: the restored
pass yields what is left, possibly nothing, and the loader moves on to the next pass. A pass that starts from its
beginning and yields no batch is an error. So is a pass in which more than `max_bad_fraction` of the examples read
were faults (`simmim_hf.data.faults.DataFaultError`, naming the counts per reason). `fault_counts()` totals the faults of
the whole run (all workers, all passes, earlier sessions included: the totals are part of the saved state).
State versions: 3 (this one); 2 (no shard list) still loads for `datasets` streams with its skip behaviour, and for
local shards starts the next pass with a warning (its positions are `datasets`' own and cannot be mapped).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import PIL.Image
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, get_worker_info

from simmim_hf.data.faults import (
    DataFaultError,
    add_counts,
    fault_snapshot,
    format_counts,
    read_count,
    record_read,
    set_stream_epoch,
    subtract_counts,
)
from simmim_hf.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS_HELP,
    ImageDecoder,
    SimMIMAugmentation,
    build_pretrain_transform,
)
from simmim_hf.data.shard_stream import ShardStream, merged_counts, plan_resume
from simmim_hf.data.sources import (
    DATA_FILES_HELP,
    FASHION_MNIST,
    IMAGE_COLUMN_NAMES,
    dataset_features,
    detect_image_column,
    load_source_dataset,
    normalize_source,
)
from simmim_hf.errors import UsageError

logger = logging.getLogger(__name__)

STATE_VERSION = 3


@dataclass
class DataArguments:
    """Which images to pretrain on and how to read them (parsed by `transformers.HfArgumentParser`)."""

    help_section = "SimMIM data"  # its `--help` section (`sectioned_parser`)

    dataset_name: str = field(
        default=FASHION_MNIST,
        metadata={
            "help": "A Hub dataset id, a local builder (`webdataset`, `parquet`, `imagefolder`, with --data_files or "
            "--data_dir), a folder written by `save_to_disk`, or `fashion-mnist` (the embedded default corpus)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    data_files: list[str] | None = field(default=None, metadata={"help": DATA_FILES_HELP})
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
        metadata={"help": MAX_IMAGE_PIXELS_HELP},
    )
    max_bad_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Stop with an error when more than this fraction of a pass's examples are data faults "
            "(undecodable, too_large, no_image; a broken file counts as one)."
        },
    )

    def __post_init__(self) -> None:
        self.dataset_name = normalize_source(self.dataset_name)
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
) -> ShardStream | datasets.IterableDataset | datasets.Dataset:
    """The pretraining stream for one rank: examples `{"pixel_values": (C, H, W) float tensor}`.

    Args:
        data_args: where to read images from.
        seed: shuffle seed; must be the same on every rank (the shard order is shuffled with it before splitting).
        rank, world_size: this process's slice; streaming splits by shards (`split_dataset_by_node`).
        num_workers: DataLoader workers per rank, only used to check the shard count and split `max_train_samples`.
        config: a SimMIMConfig-like object for `build_pretrain_transform`; or pass `transform` directly.
        transform: PIL image -> tensor; overrides `config`.
        uint8: with the built-in augmentation (`SimMIMAugmentation`), yield uint8 pixels instead of normalised
            floats, to be normalised on the training device (`simmim_hf.data.images.normalize_pixel_values`);
            the pretraining job does. Other transforms are left as they are.

    Streaming returns a `ShardStream` for local webdataset/parquet shards, else a `datasets.IterableDataset`
    (module docstring), decoded and transformed lazily, faulty examples dropped and counted per reason
    (`dataset.simmim_decoder.fault_counts()` in the process that iterates it; `StreamLoader` totals them over
    workers and passes). Map-style
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
    shard_source = getattr(dataset, "simmim_shard_source", None)
    if shard_source is not None:  # local shards: our own resumable shuffle (simmim_hf.data.shard_stream)
        kind, files, column = shard_source
        if len(files) < world_size:
            raise UsageError(
                f"--data_files: {len(files)} shard file(s) for {world_size} ranks; each rank reads whole shards and "
                "needs at least one (write more with `scripts/prepare_data.py --num_shards N`)"
            )
        stream = ShardStream(
            kind,
            files,
            column,
            decoder,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            buffer_size=data_args.shuffle_buffer_size,
            max_samples=data_args.max_train_samples,
        )
        stream.simmim_decoder = decoder
        stream.simmim_num_workers = num_workers
        stream.simmim_max_bad_fraction = data_args.max_bad_fraction
        return stream
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


def is_stream(dataset: Any) -> bool:
    """Whether `dataset` is a stream that `StreamLoader` takes (a `datasets.IterableDataset` or a `ShardStream`)."""
    return isinstance(dataset, (datasets.IterableDataset, ShardStream))


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


_PARENT_EXITING: Any = None  # a multiprocessing Event, set when this (training) process exits


def _parent_exiting() -> Any:
    """The event that tells DataLoader workers that the SIGTERM they get is their parent's own (its exit)."""
    global _PARENT_EXITING
    if _PARENT_EXITING is None:
        import atexit
        import multiprocessing

        _PARENT_EXITING = multiprocessing.Event()
        # Registered after multiprocessing's own exit handler, so it runs before that one terminates the workers.
        atexit.register(_PARENT_EXITING.set)
    return _PARENT_EXITING


def ignore_stop_signals(parent_exiting: Any, worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn` (bound to `_parent_exiting()`): a stop signal sent to every process of a job
    (SLURM at the time limit, Ctrl-C in a terminal, `kill` of a process group) is left to the training process
    (`pretrain.preemption`: agree, checkpoint, exit), which then shuts its workers down. SIGINT and SIGUSR1 are
    ignored; SIGTERM, which is also how a parent ends its workers at exit (`multiprocessing`), ends the worker only
    once its parent is exiting, and is ignored before. A worker whose parent died still ends (torch's watchdog)."""

    def on_sigterm(signum: int, frame: Any) -> None:
        if parent_exiting.is_set():
            os._exit(0)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)


def _identity(item: Any) -> Any:
    return item


def _held(progress: dict[str, Any]) -> int:
    """Examples a reader had read but not yet consumed (they sat in its shuffle buffer) at the captured position."""
    if progress["read"] is None:  # the buffer's input is not counted (`data.count_buffer_input`)
        return 0
    consumed = progress["images"] + sum(progress["faults"].values()) + progress["skipped"]
    return max(0, progress["read"] - consumed)


class _BatchStream(torch.utils.data.IterableDataset):
    """Forms batches in the reading process and tags each with that reader's position and counts (module docstring).

    Yields `{"batch": collated or None, "worker", "epoch", "index", "state", "images", "read", "skipped", "faults",
    "end"}`; the last item of a reader's pass has `end=True` and no batch.
    """

    def __init__(self, dataset: datasets.IterableDataset, collate_fn: Any, batch_size: int, drop_last: bool) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        decoder = getattr(dataset, "simmim_decoder", None)
        self.key = getattr(decoder, "key", None) or "<no decoder>"
        self.counts_reads = bool(getattr(dataset, "simmim_counts_buffer_input", False))
        # A ShardStream sends the changes of its state since the last batch; the loader keeps the whole state.
        self.position = dataset.take_delta if isinstance(dataset, ShardStream) else dataset.state_dict
        self.restore: dict[int, dict[str, Any]] = {}
        self.restore_epoch: int | None = None

    def _collate(self, examples: list[Any], epoch: int, worker: int, index: int) -> Any:
        if hasattr(self.collate_fn, "set_stream_position"):
            self.collate_fn.set_stream_position(epoch, worker, index)
        return self.collate_fn(examples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker_info = get_worker_info()
        worker = worker_info.id if worker_info is not None else 0
        epoch = self.dataset.epoch
        saved = self.restore.get(worker) if self.restore_epoch == epoch else None
        # Also clears a position loaded for an earlier pass (the main process keeps one dataset object).
        self.dataset.load_state_dict(saved["state"] if saved else None)
        set_stream_epoch(self.key, epoch)
        base = saved or {"index": 0, "images": 0, "read": 0, "skipped": 0, "faults": {}}
        faults_start, read_start = fault_snapshot(self.key), read_count(self.key)
        index, images = int(base["index"]), int(base["images"])

        def progress(end: bool = False) -> dict[str, Any]:
            return {
                "worker": worker,
                "epoch": epoch,
                "index": index,
                "state": self.position(),
                "images": images,
                "read": int(base["read"] or 0) + read_count(self.key) - read_start if self.counts_reads else None,
                "skipped": int(base["skipped"]),
                "faults": add_counts(base["faults"], subtract_counts(fault_snapshot(self.key), faults_start)),
                "end": end,
            }

        examples: list[Any] = []
        for example in self.dataset:
            examples.append(example)
            images += 1
            if len(examples) == self.batch_size:
                batch = self._collate(examples, epoch, worker, index)
                index += 1
                examples = []
                yield {"batch": batch, **progress()}
        if examples and not self.drop_last:
            batch = self._collate(examples, epoch, worker, index)
            index += 1
            yield {"batch": batch, **progress()}
        yield {"batch": None, **progress(end=True)}


class StreamLoader:
    """Endless, resumable batches from a streaming dataset (see the module docstring).

    Args:
        dataset: a `datasets.IterableDataset`, e.g. from `load_pretrain_dataset`.
        collate_fn: e.g. a `SimMIMCollator`; must return a dict.
        batch_size: examples per batch.
        num_workers, pin_memory, persistent_workers, prefetch_factor: as for `torch.utils.data.DataLoader`.
        drop_last: drop each pass's last incomplete batch (constant batch size; default True).
        endless: repeat passes forever (default); False stops after one pass and lets `set_epoch` pick the epoch.
        max_bad_fraction: stop when more than this fraction of a pass's examples are data faults (default: the
            dataset's `simmim_max_bad_fraction` from `load_pretrain_dataset`, else 0.5).

    Use with `transformers.Trainer`: return it from `get_train_dataloader` (it is not wrapped by accelerate, so a
    dataset already split by rank is not split again), set `max_steps`, and resume with `ignore_data_skip=True` plus
    `load_state_dict` (the Trainer's own resume would rebuild a plain DataLoader and replay batches instead).
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        collate_fn: Any,
        batch_size: int,
        num_workers: int = 0,
        *,
        drop_last: bool = True,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        endless: bool = True,
        max_bad_fraction: float | None = None,
    ) -> None:
        if not is_stream(dataset):
            raise TypeError(f"StreamLoader needs a datasets.IterableDataset or a ShardStream, got {type(dataset)}")
        expected = getattr(dataset, "simmim_num_workers", None)
        if expected is not None and expected != num_workers:
            raise ValueError(
                f"The dataset was built for num_workers={expected} (load_pretrain_dataset) but the loader has "
                f"{num_workers}; pass the same number to both, or resuming the stream position fails"
            )
        self.dataset = dataset
        self.shards = isinstance(dataset, ShardStream)  # positions are mirrored reader states (`apply_delta`)
        self.num_workers = int(num_workers)
        self.endless = endless
        self.max_bad_fraction = float(
            max_bad_fraction if max_bad_fraction is not None else getattr(dataset, "simmim_max_bad_fraction", 0.5)
        )
        self.epoch = 0
        self.skipped_at_resume = 0
        # Images of one pass on this rank: measured at the end of each pass (kept across resumes), or until then an
        # estimate the job may set; `run_epoch` divides by it.
        self.pass_images: int | None = None
        self.expected_pass_images: int | None = None
        self._progress: dict[int, dict[str, Any]] = {}
        self._next_worker = 0
        self._faults_before_pass = add_counts()
        self._stream = _BatchStream(dataset, collate_fn, batch_size, drop_last)
        self._loader = DataLoader(
            self._stream,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and self.num_workers > 0,
            prefetch_factor=prefetch_factor if self.num_workers > 0 else None,
            worker_init_fn=functools.partial(ignore_stop_signals, _parent_exiting()) if self.num_workers > 0 else None,
        )

    def _following(self, worker: int, finished: set[int]) -> int:
        """The next worker after `worker`, round robin, that has not finished the pass (`worker` if none)."""
        readers = max(1, self.num_workers)
        for step in range(1, readers + 1):
            candidate = (worker + step) % readers
            if candidate not in finished:
                return candidate
        return worker

    def _ordered_batches(self) -> Iterator[Any]:
        """This pass's batches, round robin over the workers from `_next_worker` (module docstring)."""
        readers = max(1, self.num_workers)
        pending: dict[int, deque] = {worker: deque() for worker in range(readers)}
        finished: set[int] = set()

        def ready() -> Iterator[Any]:
            while len(finished) < readers and pending[self._next_worker]:
                worker = self._next_worker
                item = pending[worker].popleft()
                batch = item.pop("batch")
                if self.shards:
                    item["state"] = ShardStream.apply_delta(self._progress[worker]["state"], item["state"])
                self._progress[worker] = item
                if item["end"]:
                    finished.add(worker)
                self._next_worker = self._following(worker, finished)
                if batch is not None:
                    yield batch

        for item in self._loader:
            pending[item["worker"]].append(item)
            yield from ready()
        yield from ready()

    def __iter__(self) -> Iterator[Any]:
        while True:
            self.dataset.set_epoch(self.epoch)
            restored = self._stream.restore_epoch == self.epoch
            if self.shards and not restored:
                self._progress = {worker: self._fresh_progress(worker) for worker in range(max(1, self.num_workers))}
            num_batches = 0
            for batch in self._ordered_batches():
                num_batches += 1
                yield batch
            self._end_pass(num_batches, restored)
            if not self.endless:
                return
            self.epoch += 1

    def _fresh_progress(self, worker: int, state: dict[str, Any] | None = None, index: int = 0) -> dict[str, Any]:
        return {
            "worker": worker,
            "epoch": self.epoch,
            "index": index,
            "state": state if state is not None else self.dataset.start_state(worker),
            "images": 0,
            "read": None,
            "skipped": 0,
            "faults": add_counts(),
            "end": False,
        }

    def _pass_faults(self) -> dict[str, int]:
        return add_counts(*(progress["faults"] for progress in self._progress.values()))

    def _end_pass(self, num_batches: int, restored: bool) -> None:
        faults = self._pass_faults()
        bad = sum(faults.values())
        examples = bad + sum(progress["images"] for progress in self._progress.values())
        if bad > self.max_bad_fraction * examples:
            raise DataFaultError(
                f"Pass {self.epoch}: {bad} of the {examples} examples read were data faults ({format_counts(faults)}), "
                f"more than --max_bad_fraction={self.max_bad_fraction}; the data is broken, see the warnings above"
            )
        if bad:
            logger.warning("Pass %d skipped %d of %d examples: %s", self.epoch, bad, examples, format_counts(faults))
        if num_batches == 0 and not restored:
            raise RuntimeError("The dataset gave no full batch in a whole pass; it is empty or too small")
        if num_batches == 0:
            logger.info("The resumed pass %d had no full batch left; starting pass %d", self.epoch, self.epoch + 1)
        self._faults_before_pass = add_counts(self._faults_before_pass, faults)
        self.pass_images = sum(progress["images"] for progress in self._progress.values()) or self.pass_images
        self._progress, self._next_worker = {}, 0
        self._stream.restore, self._stream.restore_epoch = {}, None

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each of its epochs; endless loaders count their own passes and ignore it."""
        if not self.endless:
            self.epoch = int(epoch)

    def run_epoch(self) -> float:
        """Passes over the data so far, earlier sessions included: the passes completed plus the fraction of this one
        consumed (its images over `pass_images`, or `expected_pass_images` during the first pass; 0 when neither is
        known). What the Trainer logs as `epoch`."""
        length = self.pass_images or self.expected_pass_images
        if not length:
            return float(self.epoch)
        images = sum(progress["images"] for progress in self._progress.values())
        return self.epoch + min(1.0, images / length)

    def fault_counts(self) -> dict[str, int]:
        """Data faults per reason for the whole run so far (this rank: all workers, passes and earlier sessions)."""
        return add_counts(self._faults_before_pass, self._pass_faults())

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded, and the fault totals: JSON-serialisable."""
        state = {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "num_workers": self.num_workers,
            "next_worker": self._next_worker,
            "workers": copy.deepcopy({str(worker): progress for worker, progress in sorted(self._progress.items())}),
            "faults_before_pass": dict(self._faults_before_pass),
            "skipped_at_resume": self.skipped_at_resume,
            "pass_images": self.pass_images,
        }
        if self.shards:
            state["stream"] = "shards"
            state["layout"] = {"world_size": self.dataset.world_size, "rank": self.dataset.rank}
            state["shards"] = copy.deepcopy(self.dataset.shards)
        return state

    def load_state_dict(self, state: dict[str, Any], all_ranks: Sequence[dict[str, Any] | None] = ()) -> None:
        """Resumes from `state_dict()`: the next iteration continues the saved pass where it stopped.

        `all_ranks`: the saved states of every rank of the saved run (index = rank; `state` is this rank's, or None
        when the saved run had fewer ranks). Local shards (`ShardStream`) resume exactly, and with another number of
        ranks or workers deal the rest of the pass out anew (that needs `all_ranks`), a changed shard list
        included (`simmim_hf.data.shard_stream.plan_resume`). Other streams (`datasets`) resume per worker with the
        same `num_workers` only, skipping what sat in the shuffle buffers; with a different `num_workers`, or a
        state that cannot be mapped (an older format for local shards), the loader warns and starts the next pass.
        """
        if state is None:
            state = next((value for value in all_ranks if value), None)
            if state is None:
                raise ValueError("load_state_dict needs this rank's state or those of all ranks")
            own = None
        else:
            own = state
        version = state.get("version")
        if version not in (1, 2, STATE_VERSION):
            raise ValueError(f"Unknown stream state version {version!r} (expected {STATE_VERSION})")
        epoch = int(state["epoch"])
        self.pass_images = state.get("pass_images") or self.pass_images
        self._progress, self._next_worker = {}, 0
        self._stream.restore, self._stream.restore_epoch = {}, None
        self._faults_before_pass = add_counts(state.get("faults_before_pass", {}) if own else {})
        self.skipped_at_resume = int(state.get("skipped_at_resume", 0)) if own else 0
        if self.shards and state.get("stream") == "shards":
            self._resume_shards(own, list(all_ranks))
            return
        if own is None:
            return self._next_pass(state, "no stream position for this rank")
        if self.shards:
            return self._next_pass(state, "an older simmim_hf (a datasets position)")
        if int(state["num_workers"]) != self.num_workers:
            return self._next_pass(state, f"num_workers={state['num_workers']}")
        if version != STATE_VERSION and version != 2:
            return self._next_pass(state, "an older simmim_hf")
        self.epoch = epoch
        progress = {int(worker): dict(value) for worker, value in state["workers"].items()}
        skipped = 0
        for value in progress.values():
            if not value["end"]:
                held = _held(value)
                value["skipped"] += held
                skipped += held
        self.skipped_at_resume += skipped
        if any(value["read"] is None for value in progress.values()):
            logger.warning(
                "Resuming pass %d: the images that sat in the shuffle buffer(s) are skipped (count unknown)", epoch
            )
        elif skipped:
            logger.warning(
                "Resuming pass %d: %d image(s) that sat in the shuffle buffer(s) when the checkpoint was saved are "
                "skipped for this pass (the buffer content is not saved)",
                epoch,
                skipped,
            )
        self._progress, self._next_worker = progress, int(state["next_worker"])
        self._stream.restore, self._stream.restore_epoch = progress, epoch

    def _next_pass(self, state: dict[str, Any], why: str) -> None:
        """The saved position cannot be mapped: start the pass after the saved one (faults carried over)."""
        epoch = int(state["epoch"])
        logger.warning(
            "Stream state was saved with %s; this loader (num_workers=%d) cannot continue its pass: starting pass %d "
            "from its start",
            why,
            self.num_workers,
            epoch + 1,
        )
        self._faults_before_pass = add_counts(
            self._faults_before_pass, *(p.get("faults", {}) for p in state.get("workers", {}).values())
        )
        self.epoch = epoch + 1

    def _resume_shards(self, own: dict[str, Any] | None, all_ranks: list[dict[str, Any] | None]) -> None:
        """`load_state_dict` for local shards (`plan_resume`): exact, or dealt out anew, and the changed shards."""
        base = own if own is not None else next(value for value in all_ranks if value)
        planned = plan_resume(self.dataset, own, all_ranks)
        layout = base.get("layout", {})
        saved = f"{layout.get('world_size', '?')} rank(s) x num_workers={base.get('num_workers')}"
        if planned is None:
            return self._next_pass(base, f"{saved} and not every rank's state at hand")
        epoch, readers, notes = planned
        self.epoch = epoch
        if notes["dealt"]:
            states = [value for value in all_ranks if value]
            if self.dataset.rank == 0:  # the run's totals live on one rank (the Trainer sums over ranks)
                self._faults_before_pass, self.skipped_at_resume = merged_counts(states)
            else:
                self._faults_before_pass, self.skipped_at_resume = add_counts(), 0
            index = 1 + max(
                (
                    int(p["index"])
                    for value in states
                    if int(value["epoch"]) == epoch
                    for p in value["workers"].values()
                ),
                default=-1,
            )
            self._progress = {worker: self._fresh_progress(worker, readers[worker], index) for worker in readers}
            logger.warning(
                "Stream state saved with %s, resumed with %d rank(s) x num_workers=%d: the rest of pass %d (%d "
                "buffered or listed image(s), %d partly read and %d unread shard(s)) is dealt out anew; each image of "
                "the pass is still read once",
                saved,
                self.dataset.world_size,
                self.num_workers,
                epoch,
                notes["keys"],
                notes["partial"],
                notes["unread"],
            )
            if notes["behind"]:
                logger.warning(
                    "%d rank(s) were a pass behind: the rest of their pass %d is skipped", notes["behind"], epoch - 1
                )
        else:
            progress = {}
            for worker, reader in readers.items():
                value = (own.get("workers") or {}).get(str(worker))
                progress[worker] = {**value, "state": reader} if value else self._fresh_progress(worker, reader)
            self._progress, self._next_worker = progress, int(own["next_worker"])
        lost = notes["lost"] if (not notes["dealt"] or self.dataset.rank == 0) else 0
        self.skipped_at_resume += lost
        if notes["dropped"]:
            logger.warning(
                "%d shard(s) of the saved pass are gone or changed size (%s): dropped from the resumed pass %d "
                "(their unread rest is lost, %d buffered image(s) of them included); the shard list of the run "
                "is now the current one",
                len(notes["dropped"]),
                ", ".join(notes["dropped"][:3]) + (", ..." if len(notes["dropped"]) > 3 else ""),
                epoch,
                notes["lost"],
            )
        if notes["added"]:
            logger.warning(
                "%d new shard(s) (%s) join at pass %d",
                len(notes["added"]),
                ", ".join(notes["added"][:3]) + (", ..." if len(notes["added"]) > 3 else ""),
                epoch + 1,
            )
        self._stream.restore, self._stream.restore_epoch = self._progress, epoch
