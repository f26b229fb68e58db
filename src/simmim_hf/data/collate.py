"""Batching for SimMIM pretraining: the masking collator and an endless, resumable loader over a streaming dataset.

`SimMIMCollator` stacks `pixel_values` and samples `bool_masked_pos`.

`StreamLoader` wraps a torch DataLoader around a `datasets.IterableDataset` and
  * repeats it endlessly, calling `dataset.set_epoch(epoch)` before each pass, so every pass reshuffles the shard order
    and the shuffle buffer (the Trainer's `max_steps` ends the run). Doing the repetition here rather than through the
    Trainer's epoch loop keeps every rank in one long Trainer epoch, so ranks whose shards differ in length never end
    an epoch at different steps (which would misalign gradient accumulation across ranks);
  * forms the batches inside the reading process (`_BatchStream`: each DataLoader worker, or the main process),
    attaching to each one the reader's `dataset.state_dict()`, its batch index in the pass and its fault counts, all
    captured right after the batch's last example was read; a worker that finishes its share of the pass sends a last
    item without images, so nothing it met is left uncounted;
  * yields the batches in a fixed order, round robin over the workers starting from worker 0 at the start of a pass
    (skipping those that finished), whatever order the DataLoader delivers them in. `state_dict()` is therefore the
    exact position of what was consumed (in-flight prefetched batches excluded), including whose turn is next, and
    `load_state_dict()` restores it per worker (with the same `num_workers`).

Randomness is a pure function of the run seed and the stream position, so a resumed stream continues the
uninterrupted one exactly:
  * masks: the generator of a batch is seeded from (seed, rank, pass, worker, batch index of that worker in the pass);
    the batch index is part of the saved state;
  * augmentation: each example's crop and flip are seeded from (seed, pass, digest of its raw bytes) in the decoder
    (`simmim_hf.data.images`), which learns the pass from `_BatchStream`.
With a shuffle buffer of 1, a loader restored from `state_dict()` after k batches yields exactly batches k+1, k+2, ...
of the uninterrupted loader. With a real buffer, the examples the buffers held when the state was saved are not saved
(as `datasets` documents): a resume skips them (never more than one buffer per worker), logs how many, and reads
nothing twice in the pass.

A resume position at the end of a pass (e.g. every shard read, only the buffer left) is not an error: the restored
pass yields what is left, possibly nothing, and the loader moves on to the next pass. A pass that starts from its
beginning and yields no batch is an error. So is a pass in which more than `max_bad_fraction` of the examples read
were faults (`simmim_hf.faults.DataFaultError`, naming the counts per reason). `fault_counts()` totals the faults of
the whole run (all workers, all passes, earlier sessions included: the totals are part of the saved state).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from simmim_hf.data.faults import (
    DataFaultError,
    add_counts,
    fault_snapshot,
    format_counts,
    read_count,
    set_stream_epoch,
    subtract_counts,
)
from simmim_hf.masking import SimMIMMaskGenerator

logger = logging.getLogger(__name__)

STATE_KEY = "_simmim_stream_state"
STATE_VERSION = 2


class SimMIMCollator:
    """Collates `{"pixel_values": (C, H, W)}` examples into a SimMIM batch.

    Returns `{"pixel_values": (B, C, H, W), "bool_masked_pos": (B, num_patches) bool}` (1 = masked). Examples that are
    `None` or whose `pixel_values` is `None` (failed to decode) are dropped; `num_dropped` counts them in this process.

    Masks are drawn from a generator seeded with (seed, rank, position). Inside a `StreamLoader` the position is the
    batch's place in the stream (pass, worker, batch index), set through `set_stream_position` before each call, so
    a resumed run draws the same masks as an uninterrupted one. Used on its own (e.g. by a plain DataLoader), the
    position is (worker id, worker seed, batches collated so far by this copy), as before.

    Args:
        mask_generator: a `SimMIMMaskGenerator` (e.g. `SimMIMMaskGenerator.from_config(config)`).
        seed: run seed; with the same seed a rerun draws the same masks.
        rank: the process rank, so ranks draw different masks.
    """

    def __init__(self, mask_generator: SimMIMMaskGenerator, seed: int = 0, rank: int = 0) -> None:
        if seed < 0 or rank < 0:
            raise ValueError(f"seed and rank must be non-negative, got seed={seed}, rank={rank}")
        self.mask_generator = mask_generator
        self.seed = int(seed)
        self.rank = int(rank)
        self.num_dropped = 0
        self._batches = 0
        self._stream_position: tuple[int, int, int] | None = None

    def set_stream_position(self, epoch: int, worker: int, batch: int) -> None:
        """The position of the next batch in a stream: pass, DataLoader worker (0 without workers), batch index."""
        self._stream_position = (int(epoch), int(worker), int(batch))

    def _generator(self) -> torch.Generator:
        if self._stream_position is not None:
            entropy = [self.seed, self.rank, *self._stream_position, 1]
            self._stream_position = None
            state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
            return torch.Generator().manual_seed(int(state[0]) % (2**63))
        worker = get_worker_info()
        # The worker's seed changes with every DataLoader iterator (torch draws it from the main process's RNG), so
        # workers restarted for a new epoch do not replay the previous epoch's masks.
        worker_id, worker_seed = (worker.id + 1, worker.seed) if worker is not None else (0, 0)
        entropy = [self.seed, self.rank, worker_id, worker_seed, self._batches]
        state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
        self._batches += 1
        return torch.Generator().manual_seed(int(state[0]) % (2**63))

    def __call__(self, examples: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        kept = [example for example in examples if example is not None and example.get("pixel_values") is not None]
        dropped = len(examples) - len(kept)
        if dropped:
            self.num_dropped += dropped
            logger.warning("Dropped %d undecodable example(s) from a batch (%d so far)", dropped, self.num_dropped)
        if not kept:
            raise ValueError(f"All {len(examples)} examples of the batch failed to decode; check the dataset")
        pixel_values = torch.stack([example["pixel_values"] for example in kept])
        bool_masked_pos = self.mask_generator(len(kept), generator=self._generator())
        return {"pixel_values": pixel_values, "bool_masked_pos": bool_masked_pos}


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
                "state": self.dataset.state_dict(),
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
        if not isinstance(dataset, datasets.IterableDataset):
            raise TypeError(f"StreamLoader needs a datasets.IterableDataset, got {type(dataset).__name__}")
        expected = getattr(dataset, "simmim_num_workers", None)
        if expected is not None and expected != num_workers:
            raise ValueError(
                f"The dataset was built for num_workers={expected} (load_pretrain_dataset) but the loader has "
                f"{num_workers}; pass the same number to both, or resuming the stream position fails"
            )
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.endless = endless
        self.max_bad_fraction = float(
            max_bad_fraction if max_bad_fraction is not None else getattr(dataset, "simmim_max_bad_fraction", 0.5)
        )
        self.epoch = 0
        self.skipped_at_resume = 0
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
            num_batches = 0
            for batch in self._ordered_batches():
                num_batches += 1
                yield batch
            self._end_pass(num_batches, restored)
            if not self.endless:
                return
            self.epoch += 1

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
        self._progress, self._next_worker = {}, 0
        self._stream.restore, self._stream.restore_epoch = {}, None

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each of its epochs; endless loaders count their own passes and ignore it."""
        if not self.endless:
            self.epoch = int(epoch)

    def fault_counts(self) -> dict[str, int]:
        """Data faults per reason for the whole run so far (this rank: all workers, passes and earlier sessions)."""
        return add_counts(self._faults_before_pass, self._pass_faults())

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded, and the fault totals: JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "num_workers": self.num_workers,
            "next_worker": self._next_worker,
            "workers": {str(worker): progress for worker, progress in sorted(self._progress.items())},
            "faults_before_pass": dict(self._faults_before_pass),
            "skipped_at_resume": self.skipped_at_resume,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from `state_dict()`: the next iteration continues the saved pass where it stopped.

        With a different `num_workers` the shards are dealt out differently, so the position cannot be mapped: the
        loader then warns and starts the next pass (fresh shuffle) instead of replaying the saved one; so it does for
        a state saved by an older version (which held no fault counts).
        """
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"Unknown stream state version {version!r} (expected {STATE_VERSION})")
        epoch = int(state["epoch"])
        self._faults_before_pass = add_counts(state.get("faults_before_pass", {}))
        self.skipped_at_resume = int(state.get("skipped_at_resume", 0))
        self._progress, self._next_worker = {}, 0
        self._stream.restore, self._stream.restore_epoch = {}, None
        if int(state["num_workers"]) != self.num_workers or version != STATE_VERSION:
            mismatch = int(state["num_workers"]) != self.num_workers
            why = f"num_workers={state['num_workers']}" if mismatch else "an older simmim_hf"
            logger.warning(
                "Stream state was saved with %s but this loader has num_workers=%d; starting pass %d from its start",
                why,
                self.num_workers,
                epoch + 1,
            )
            self._faults_before_pass = add_counts(
                self._faults_before_pass, *(p.get("faults", {}) for p in state.get("workers", {}).values())
            )
            self.epoch = epoch + 1
            return
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
