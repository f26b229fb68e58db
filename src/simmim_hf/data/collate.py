"""Batching for SimMIM pretraining: `SimMIMCollator` stacks `pixel_values` and samples `bool_masked_pos`.

Inside a `simmim_hf.data.stream.StreamLoader` each batch's masks are seeded from its place in the stream (pass, worker,
batch index), so a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from simmim_hf.masking import SimMIMMaskGenerator

logger = logging.getLogger(__name__)


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
