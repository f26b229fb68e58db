"""The resumable, seeded shuffle of local shards: the shuffle buffer's content is part of the stream position.

`ShardStream` is what `simmim_hf.data.stream.load_pretrain_dataset` streams local webdataset/parquet shards with
(`simmim_hf.data.shards` reads the files). Each pass, for each reader (a DataLoader worker of a rank; reader id
`rank * W + worker`, `W = max(1, num_workers)`, of `R = world_size * W` readers):

* the shard order is a permutation seeded by (seed, pass), the same on every rank; reader `j` reads shards
  `order[j::R]` one after the other (a "plan");
* what it reads goes through a buffer of `buffer_size` examples: once full, each new example takes the place of a
  buffered one drawn at random, which is yielded; when the plan is read, the rest of the buffer is drawn out one at a
  time. The draws come from a counter-indexed generator (the i-th draw is a pure function of (seed, pass, deal,
  reader, i)), so the generator's state is one integer;
* every example has a KEY: `(shard, byte offset of its first tar member header)` or `(shard, parquet row)` (a
  `broken_file` marker: `(shard, offset, detail)`);
* the reader's state is JSON: `{"plan": [item, ...], "item": i, "offset": o, "buffer": [key, ...], "draws": n,
  "yielded": k, "rng": [deal, reader]}`, an item being `["shard", s, start]` (read shard `s` from `start`) or
  `["keys", [key, ...]]` (read these examples by key); `item`/`offset` is the next read (a byte offset, a row, or
  an index into a key list). Restoring it re-reads the buffered examples by key (tar: a seek to the member; parquet:
  the row group) and continues, so a resumed pass yields exactly the uninterrupted pass's examples in its order.

The per-example cost beyond reading is a key tuple and one event in a log: the reader process sends, with each
batch, only the events since the previous one (`take_delta`: appended, replaced or drawn-out buffer slots, the read
position), and the loader (`StreamLoader`, in the training process) keeps a mirror of each reader's state by
applying them (`apply_delta`), so saving the position never copies a whole buffer per batch.

Resuming with another layout (ranks x workers) or another shard list (`plan_resume`): the remainder of the pass of
ALL the old readers (buffered keys, the rest of partly read shards, unread shards) is pooled and dealt out anew to
the new readers, keys first: every image of the pass is still read exactly once. Shards that are gone, or whose
size changed, are dropped from the resumed pass (their unread rest is lost; logged with the count); shards that are
new join at the next pass (logged). Positions are stored by shard NAME, so a shard's position never moves to
another file.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from simmim_hf.data.faults import add_counts
from simmim_hf.data.shards import iter_shard, read_shard_examples

logger = logging.getLogger(__name__)

_BLOCK = 4096  # draws generated at once
_KEY_CHUNK = 512  # keys read back at once (grouped by shard)

Key = tuple  # (shard, offset) or (shard, offset, detail)


def shard_list(files: Sequence[str]) -> list[list[Any]]:
    """`[[name, size in bytes, mtime in seconds], ...]` of the shard files (what a stream state records)."""
    listing = []
    for name in files:
        stat = os.stat(name)
        listing.append([str(name), int(stat.st_size), int(stat.st_mtime)])
    return listing


class _Draws:
    """Uniform draws in [0, 1) indexed by a counter: draw i is a pure function of (words, i)."""

    def __init__(self, words: Sequence[int], count: int = 0) -> None:
        self.words = [int(w) % 2**63 for w in words]
        self.count = int(count)
        self._block_index, self._block = -1, np.empty(0)

    def below(self, n: int) -> int:
        """A uniform integer in [0, n); advances the counter."""
        block, within = divmod(self.count, _BLOCK)
        if block != self._block_index:
            self._block = np.random.default_rng([*self.words, block]).random(_BLOCK).tolist()
            self._block_index = block
        self.count += 1
        return min(n - 1, int(self._block[within] * n))


def fresh_state(num_shards: int, seed: int, epoch: int, reader: int, readers: int) -> dict[str, Any]:
    """Reader `reader`'s state at the start of a fresh pass `epoch` over `num_shards` shards."""
    order = np.random.default_rng([int(seed) % 2**63, int(epoch)]).permutation(num_shards).tolist()
    plan = [["shard", shard, 0] for shard in order[reader::readers]]
    return {"plan": plan, "item": 0, "offset": 0, "buffer": [], "draws": 0, "yielded": 0, "rng": [0, reader]}


def _normalised(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with keys as tuples (JSON turns them into lists)."""
    state = copy.deepcopy(state)
    state["buffer"] = [tuple(key) for key in state["buffer"]]
    for item in state["plan"]:
        if item[0] == "keys":
            item[1] = [tuple(key) for key in item[1]]
    return state


def remainder(state: dict[str, Any]) -> tuple[list[Key], list[list[Any]]]:
    """What a reader had not yielded: (its buffered keys, the items left to read, the current one cut at its
    position)."""
    items: list[list[Any]] = []
    for index in range(int(state["item"]), len(state["plan"])):
        item = state["plan"][index]
        current = index == int(state["item"])
        if item[0] == "shard":
            items.append(["shard", int(item[1]), int(state["offset"]) if current else int(item[2])])
        else:
            keys = item[1][int(state["offset"]) :] if current else item[1]
            items.append(["keys", [tuple(key) for key in keys]])
    return [tuple(key) for key in state["buffer"]], items


def _start(item: list[Any]) -> int:
    return int(item[2]) if item[0] == "shard" else 0


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's stream of decoded examples `{"pixel_values": (C, H, W) tensor}` from local shards (module doc).

    Args:
        kind: `webdataset` or `parquet`; files: the shard files (every rank the same list, in the same order);
        column: the parquet image column.
        decoder: an `ImageDecoder` (`decode_example`); faulty examples are counted by it and dropped.
        seed, rank, world_size, num_workers: the run seed and this rank's place; `num_workers` DataLoader workers.
        buffer_size: examples held in each reader's shuffle buffer.
        max_samples: about this many examples per pass in all (each reader yields `ceil(max / readers)`).

    Used like a `datasets.IterableDataset` by `StreamLoader`: `set_epoch`, `epoch`, `load_state_dict` (the next
    iteration's start, for the reader of the process that iterates), `take_delta`.
    """

    def __init__(
        self,
        kind: str,
        files: Sequence[str],
        column: str | None,
        decoder: Any,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        buffer_size: int = 1,
        max_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.column, self.decoder = kind, column, decoder
        self.files = [str(name) for name in files]
        self.shards = shard_list(self.files)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_workers = int(num_workers)
        self.buffer_size = int(buffer_size)
        self.readers = self.world_size * max(1, self.num_workers)
        self.limit = math.ceil(max_samples / self.readers) if max_samples is not None else None
        self.epoch = 0
        self._restore: dict[str, Any] | None = None
        self._state: dict[str, Any] | None = None
        self._log: list[tuple] = []

    @property
    def num_shards(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def reader_id(self, worker: int) -> int:
        return self.rank * max(1, self.num_workers) + int(worker)

    def start_state(self, worker: int) -> dict[str, Any]:
        """The state of this rank's reader `worker` at the start of a fresh pass `self.epoch`."""
        return fresh_state(self.num_shards, self.seed, self.epoch, self.reader_id(worker), self.readers)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Where the next iteration (in this process) starts: a reader state, or None for a fresh pass."""
        self._restore = _normalised(state) if state is not None else None

    def state_dict(self) -> dict[str, Any] | None:
        """The current reader's whole state (a copy), None before any iteration."""
        return copy.deepcopy(self._state)

    def take_delta(self) -> dict[str, Any]:
        """The buffer events since the last call and the read position: `apply_delta` turns a mirror of the
        reader's state at the last call into its state now."""
        state, log = self._state, self._log[:]
        self._log.clear()  # in place: the reading generator holds this list
        if state is None:
            return {"events": log}
        return {
            "events": log,
            "item": state["item"],
            "offset": state["offset"],
            "draws": state["draws"],
            "yielded": state["yielded"],
        }

    @staticmethod
    def apply_delta(state: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
        """Applies `take_delta` output to a mirror `state` (in place); returns it."""
        buffer = state["buffer"]
        for event in delta["events"]:
            if event[0] == "a":
                buffer.append(event[1])
            elif event[0] == "r":
                buffer[event[1]] = event[2]
            else:
                buffer[event[1]] = buffer[-1]
                buffer.pop()
        for name in ("item", "offset", "draws", "yielded"):
            if name in delta:
                state[name] = delta[name]
        return state

    # -- reading ----------------------------------------------------------------------------------------------
    def _read_keys(self, keys: Sequence[Key]) -> list[dict[str, Any]]:
        """The examples at `keys`, in that order (markers rebuilt from their key)."""
        wanted: dict[int, list[int]] = {}
        for key in keys:
            if len(key) == 2:
                wanted.setdefault(key[0], []).append(key[1])
        found = {
            shard: read_shard_examples(self.files[shard], self.kind, self.column, offsets)
            for shard, offsets in wanted.items()
        }
        examples = []
        for key in keys:
            if len(key) == 2:
                examples.append(found[key[0]][key[1]])
            else:
                examples.append({"pixel_values": None, "_fault": "broken_file", "_detail": key[2]})
        return examples

    def _inputs(self, state: dict[str, Any]) -> Iterator[tuple[Key, dict[str, Any]]]:
        """(key, raw example) in plan order; the position in `state` is past each example when it is yielded."""
        plan = state["plan"]
        while state["item"] < len(plan):
            item = plan[state["item"]]
            if item[0] == "shard":
                shard = item[1]
                for offset, following, example in iter_shard(
                    self.files[shard], self.kind, self.column, int(state["offset"])
                ):
                    key = (
                        (shard, offset, example["_detail"]) if example["_fault"] == "broken_file" else (shard, offset)
                    )
                    if following is None:
                        self._advance(state)
                    else:
                        state["offset"] = following
                    yield key, example
                    if following is None:
                        break
                else:
                    self._advance(state)  # a file with nothing (left) in it
            else:
                keys, index = item[1], state["item"]
                while state["item"] == index and state["offset"] < len(keys):
                    start = int(state["offset"])
                    chunk = keys[start : start + _KEY_CHUNK]
                    for key, example in zip(chunk, self._read_keys(chunk)):
                        state["offset"] += 1
                        if state["offset"] >= len(keys):
                            self._advance(state)  # the chunk's last key: the loop ends here
                        yield key, example
                if state["item"] == index:
                    self._advance(state)  # an empty key list

    @staticmethod
    def _advance(state: dict[str, Any]) -> None:
        state["item"] += 1
        plan = state["plan"]
        state["offset"] = _start(plan[state["item"]]) if state["item"] < len(plan) else 0

    def _shuffled(self, state: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The raw examples in buffer-shuffled order, from `state` on (module docstring)."""
        keys: list[Key] = state["buffer"]
        examples = self._read_keys(keys) if keys else []
        draws = _Draws([self.seed, self.epoch, *state["rng"]], state["draws"])
        log, size, limit = self._log, self.buffer_size, self.limit
        if limit is not None and state["yielded"] >= limit:
            return
        for key, example in self._inputs(state):
            if len(keys) < size:
                keys.append(key)
                examples.append(example)
                log.append(("a", key))
                continue
            slot = draws.below(size)
            out = examples[slot]
            keys[slot], examples[slot] = key, example
            log.append(("r", slot, key))
            state["draws"] = draws.count
            state["yielded"] += 1
            yield out
            if limit is not None and state["yielded"] >= limit:
                return
        while keys:
            slot = draws.below(len(keys))
            out = examples[slot]
            keys[slot], examples[slot] = keys[-1], examples[-1]
            keys.pop()
            examples.pop()
            log.append(("p", slot))
            state["draws"] = draws.count
            state["yielded"] += 1
            yield out
            if limit is not None and state["yielded"] >= limit:
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker_info = get_worker_info()
        worker = worker_info.id if worker_info is not None else 0
        state = self._restore if self._restore is not None else self.start_state(worker)
        self._restore = None
        self._state, self._log = state, []
        decode = self.decoder.decode_example
        for example in self._shuffled(state):
            decoded = decode(example)
            if decoded["pixel_values"] is not None:
                yield decoded


# -- resuming --------------------------------------------------------------------------------------------------------


def _shard_mapping(saved: Sequence[Sequence[Any]], current: Sequence[Sequence[Any]]) -> tuple[dict[int, int], list]:
    """Old shard index -> new index for the shards kept (same name and size); and the old entries dropped."""
    by_name = {entry[0]: (index, entry) for index, entry in enumerate(current)}
    mapping, dropped = {}, []
    for index, entry in enumerate(saved):
        match = by_name.get(entry[0])
        if match is not None and int(match[1][1]) == int(entry[1]):
            mapping[index] = match[0]
        else:
            dropped.append(entry)
    return mapping, dropped


def _remap_key(key: Sequence[Any], mapping: dict[int, int]) -> Key | None:
    shard = mapping.get(int(key[0]))
    return None if shard is None else (shard, *key[1:])


def _remapped(state: dict[str, Any], mapping: dict[int, int]) -> tuple[list[Key], list[list[Any]], int]:
    """`remainder(state)` with old shard indices turned into new ones and dropped shards left out; and how many
    buffered or listed keys were left out."""
    buffer, items = remainder(state)
    kept_buffer = [k for k in (_remap_key(key, mapping) for key in buffer) if k is not None]
    lost = len(buffer) - len(kept_buffer)
    kept_items: list[list[Any]] = []
    for item in items:
        if item[0] == "shard":
            if int(item[1]) in mapping:
                kept_items.append(["shard", mapping[int(item[1])], item[2]])
            continue
        keys = [k for k in (_remap_key(key, mapping) for key in item[1]) if k is not None]
        lost += len(item[1]) - len(keys)
        if keys:
            kept_items.append(["keys", keys])
    return kept_buffer, kept_items, lost


def _reader_state(plan: list[list[Any]], buffer: list[Key], draws: int, yielded: int, rng: list[int]) -> dict:
    return {
        "plan": plan,
        "item": 0,
        "offset": _start(plan[0]) if plan else 0,
        "buffer": buffer,
        "draws": int(draws),
        "yielded": int(yielded),
        "rng": [int(value) for value in rng],
    }


def plan_resume(
    stream: ShardStream, rank_state: dict[str, Any] | None, states: Sequence[dict[str, Any] | None] = ()
) -> tuple[int, dict[int, dict[str, Any]], dict[str, Any]] | None:
    """Reader states for this rank's workers to resume a saved pass with (module docstring).

    `rank_state`: this rank's saved `StreamLoader.state_dict()` (None if it has none); `states`: those of every old
    rank (index = old rank), needed when the layout (ranks x workers) changed. Returns `(epoch, {worker: reader
    state}, notes)`, notes: `dealt` (pooled and dealt out anew), `lost` (buffered or listed examples of dropped
    shards, and of ranks a pass behind), `dropped`/`added` (shard names), and when dealt `keys`, `partial`,
    `unread` (what was pooled); or None when the position cannot be mapped (a changed layout, not every state).
    """
    base = rank_state if rank_state is not None else next((state for state in states if state), None)
    if base is None:
        return None
    saved_shards = base.get("shards") or []
    mapping, dropped = _shard_mapping(saved_shards, stream.shards)
    kept_names = {saved_shards[index][0] for index in mapping}
    notes: dict[str, Any] = {
        "dropped": [entry[0] for entry in dropped],
        "added": [entry[0] for entry in stream.shards if entry[0] not in kept_names],
        "lost": 0,
        "dealt": False,
    }
    layout = base.get("layout", {})
    old_world, old_workers = int(layout.get("world_size", 1)), int(base.get("num_workers", 0))
    epoch = int(base["epoch"])

    def readers_of(state: dict[str, Any], old_rank: int) -> list[dict[str, Any]]:
        saved = state.get("workers", {})
        result = []
        for worker in range(max(1, old_workers)):
            progress = saved.get(str(worker))
            if progress is not None and progress.get("state") is not None:
                result.append(progress["state"])
            else:  # the pass had not started for it: its fresh plan (of the old layout and shard list)
                reader = old_rank * max(1, old_workers) + worker
                readers = old_world * max(1, old_workers)
                result.append(fresh_state(len(saved_shards), stream.seed, int(state["epoch"]), reader, readers))
        return result

    same_layout = (
        rank_state is not None
        and old_world == stream.world_size
        and int(layout.get("rank", -1)) == stream.rank
        and old_workers == stream.num_workers
    )
    if same_layout:
        result = {}
        for worker, reader in enumerate(readers_of(rank_state, stream.rank)):
            buffer, plan, lost = _remapped(reader, mapping)
            notes["lost"] += lost
            result[worker] = _reader_state(plan, buffer, reader["draws"], reader["yielded"], reader["rng"])
        return epoch, result, notes

    if len(states) != old_world or any(state is None for state in states):
        return None
    epochs = [int(state["epoch"]) for state in states]
    epoch = max(epochs)
    pooled_keys: list[Key] = []
    pooled_items: list[list[Any]] = []
    deal, yielded = 0, 0
    for old_rank, state in enumerate(states):
        for reader in readers_of(state, old_rank):
            deal = max(deal, int(reader["rng"][0]))
            buffer, items, lost = _remapped(reader, mapping)
            if int(state["epoch"]) != epoch:  # a rank a pass behind: the rest of its pass is not carried over
                notes["lost"] += len(buffer) + sum(len(item[1]) for item in items if item[0] == "keys")
                continue
            notes["lost"] += lost
            yielded += int(reader["yielded"])
            pooled_keys.extend(buffer)
            for item in items:
                if item[0] == "keys":
                    pooled_keys.extend(item[1])
                else:
                    pooled_items.append(item)
    pooled_keys.sort(key=lambda key: (key[0], key[1]))
    notes.update(
        dealt=True,
        behind=sum(value != epoch for value in epochs),
        keys=len(pooled_keys),
        partial=sum(1 for item in pooled_items if item[2]),
        unread=sum(1 for item in pooled_items if not item[2]),
    )
    result = {}
    for worker in range(max(1, stream.num_workers)):
        reader = stream.reader_id(worker)
        keys = pooled_keys[reader :: stream.readers]
        plan = ([["keys", keys]] if keys else []) + pooled_items[reader :: stream.readers]
        result[worker] = _reader_state(plan, [], 0, math.ceil(yielded / stream.readers), [deal + 1, reader])
    return epoch, result, notes


def merged_counts(states: Sequence[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """(fault totals, images skipped at resumes) of all old ranks together: their whole-run totals."""
    faults = add_counts(
        *(state.get("faults_before_pass", {}) for state in states),
        *(p.get("faults", {}) for state in states for p in state.get("workers", {}).values()),
    )
    return faults, sum(int(state.get("skipped_at_resume", 0)) for state in states)
