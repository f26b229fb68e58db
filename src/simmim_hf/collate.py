"""Batching for SimMIM pretraining: the masking collator and an endless, resumable loader over a streaming dataset.

`SimMIMCollator` stacks `pixel_values` and samples `bool_masked_pos` with a generator seeded from (seed, rank, worker,
worker seed, batch counter), so masks differ across ranks, workers and steps and a rerun draws the same ones.

`StreamLoader` wraps a torch DataLoader around a `datasets.IterableDataset` and
  * repeats it endlessly, calling `dataset.set_epoch(epoch)` before each pass, so every pass reshuffles the shard order
    and the shuffle buffer (the Trainer's `max_steps` ends the run). Doing the repetition here rather than through the
    Trainer's epoch loop keeps every rank in one long Trainer epoch, so ranks whose shards differ in length never end
    an epoch at different steps (which would misalign gradient accumulation across ranks);
  * records, for each batch it yields, the reading worker's `dataset.state_dict()` (captured in the worker right after
    the batch's last example was read), so `state_dict()` is the exact stream position of what was consumed, in-flight
    prefetched batches excluded. `load_state_dict()` restores it per worker (through `worker_init_fn`), with the same
    `num_workers`. As `datasets` documents, the shuffle buffer is not saved: the examples it held are skipped.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from .masking import SimMIMMaskGenerator

logger = logging.getLogger(__name__)

STATE_KEY = "_simmim_stream_state"
STATE_VERSION = 1


class SimMIMCollator:
    """Collates `{"pixel_values": (C, H, W)}` examples into a SimMIM batch.

    Returns `{"pixel_values": (B, C, H, W), "bool_masked_pos": (B, num_patches) bool}` (1 = masked). Examples that are
    `None` or whose `pixel_values` is `None` (failed to decode) are dropped; `num_dropped` counts them in this process.

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

    def _generator(self) -> torch.Generator:
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


class _CaptureStreamState:
    """collate_fn wrapper that attaches the reading process's dataset position to the batch."""

    def __init__(self, collate_fn: Any, dataset: datasets.IterableDataset) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __getstate__(self) -> dict[str, Any]:
        # Workers read their own dataset copy from `get_worker_info()`; don't ship a second one.
        return {"collate_fn": self.collate_fn, "dataset": None}

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        batch = self.collate_fn(examples)
        worker = get_worker_info()
        dataset = worker.dataset if worker is not None else self.dataset
        batch[STATE_KEY] = {"worker": worker.id if worker is not None else 0, "state": dataset.state_dict()}
        return batch


class _RestoreWorkerState:
    """worker_init_fn: loads each worker's saved position into that worker's dataset copy."""

    def __init__(self, states: dict[int, dict]) -> None:
        self.states = states

    def __call__(self, worker_id: int) -> None:
        if worker_id in self.states:
            get_worker_info().dataset.load_state_dict(self.states[worker_id])


class StreamLoader:
    """Endless, resumable batches from a streaming dataset (see the module docstring).

    Args:
        dataset: a `datasets.IterableDataset`, e.g. from `load_pretrain_dataset`.
        collate_fn: e.g. a `SimMIMCollator`; must return a dict.
        batch_size: examples per batch.
        num_workers, pin_memory, persistent_workers, prefetch_factor: as for `torch.utils.data.DataLoader`.
        drop_last: drop each pass's last incomplete batch (constant batch size; default True).
        endless: repeat passes forever (default); False stops after one pass and lets `set_epoch` pick the epoch.

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
        self.epoch = 0
        self._worker_states: dict[int, dict] = {}
        self._restore: dict[int, dict] | None = None
        self._loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=_CaptureStreamState(collate_fn, dataset),
            num_workers=self.num_workers,
            drop_last=drop_last,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and self.num_workers > 0,
            prefetch_factor=prefetch_factor if self.num_workers > 0 else None,
        )

    def _start_pass(self) -> None:
        self.dataset.set_epoch(self.epoch)
        if self._restore is None:
            return
        if self.num_workers == 0:
            self.dataset.load_state_dict(self._restore.get(0))
        else:
            self._loader.worker_init_fn = _RestoreWorkerState(self._restore)

    def _end_pass(self) -> None:
        if self._restore is not None:
            self._restore = None
            self._loader.worker_init_fn = None
            if self.num_workers == 0:
                self.dataset.load_state_dict(None)

    def __iter__(self):
        while True:
            self._start_pass()
            num_batches = 0
            for batch in self._loader:
                captured = batch.pop(STATE_KEY)
                self._worker_states[captured["worker"]] = captured["state"]
                num_batches += 1
                yield batch
            self._end_pass()
            if not self.endless:
                return
            if num_batches == 0:
                raise RuntimeError("The dataset gave no full batch in a whole pass; it is empty or too small")
            self.epoch += 1
            self._worker_states = {}

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each of its epochs; endless loaders count their own passes and ignore it."""
        if not self.endless:
            self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded: JSON-serialisable, one entry per worker that produced a batch."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "num_workers": self.num_workers,
            "worker_states": {str(worker): state for worker, state in sorted(self._worker_states.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from `state_dict()`: the next iteration continues the saved pass where it stopped.

        With a different `num_workers` the shards are dealt out differently, so the position cannot be mapped: the
        loader then warns and starts the next pass (fresh shuffle) instead of replaying the saved one.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Unknown stream state version {state.get('version')!r} (expected {STATE_VERSION})")
        epoch = int(state["epoch"])
        if int(state["num_workers"]) != self.num_workers:
            logger.warning(
                "Stream state was saved with num_workers=%s but this loader has %d; starting pass %d from its start",
                state["num_workers"],
                self.num_workers,
                epoch + 1,
            )
            self.epoch, self._restore, self._worker_states = epoch + 1, None, {}
            return
        self.epoch = epoch
        self._worker_states = {int(worker): value for worker, value in state["worker_states"].items()}
        self._restore = dict(self._worker_states) if self._worker_states else None
