"""Counts of data faults met while streaming: what was skipped, and why.

A data fault costs the examples it touches, never the run. Reasons (`FAULT_REASONS`):

* `undecodable`: PIL could not decode the image (corrupt or truncated bytes, unknown format).
* `too_large`: the image header announces more than `--max_image_pixels` pixels; it is skipped before its pixels are
  decoded.
* `no_image`: a WebDataset sample (or a parquet row) has no member that PIL recognises as an image.
* `broken_file`: a shard file could not be read to its end (truncated tar, corrupt tar header, unreadable parquet);
  the examples read before the fault are kept, the rest of that file is lost for the pass, and one warning names it.

The counters live in the process that reads the stream (a DataLoader worker, or the main process), keyed by the
stream's key (`ImageDecoder.key`), because `datasets` copies the functions of a pipeline into every worker and on every
iteration. `simmim_hf.data.stream.StreamLoader` snapshots them per batch, like the stream position, and totals them for
the whole run (all workers, all passes, across resumes); the Trainer sums them over ranks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping

FAULT_REASONS = ("undecodable", "too_large", "no_image", "broken_file")

_FAULTS: defaultdict[str, Counter[str]] = defaultdict(Counter)
_READS: Counter[str] = Counter()
_EPOCHS: dict[str, int] = {}


class DataFaultError(RuntimeError):
    """Too large a fraction of a pass failed (`--max_bad_fraction`): the data, not one file, is broken."""


def record_fault(key: str, reason: str) -> int:
    """Counts one fault of `reason` for stream `key` in this process; returns the count for that reason so far."""
    if reason not in FAULT_REASONS:
        raise ValueError(f"unknown data fault reason {reason!r}; expected one of {FAULT_REASONS}")
    _FAULTS[key][reason] += 1
    return _FAULTS[key][reason]


def fault_snapshot(key: str) -> dict[str, int]:
    """This process's fault counts for stream `key`, every reason present (zeros included)."""
    counts = _FAULTS.get(key, Counter())
    return {reason: int(counts[reason]) for reason in FAULT_REASONS}


def record_read(key: str) -> None:
    """Counts one example read from the source of stream `key` (before the shuffle buffer), in this process."""
    _READS[key] += 1


def read_count(key: str) -> int:
    return int(_READS[key])


def set_stream_epoch(key: str, epoch: int) -> None:
    """The pass that stream `key` is reading in this process (the augmentation seed depends on it)."""
    _EPOCHS[key] = int(epoch)


def stream_epoch(key: str) -> int:
    return _EPOCHS.get(key, 0)


def add_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    """Sums fault-count dicts reason by reason (every reason present in the result)."""
    total = {reason: 0 for reason in FAULT_REASONS}
    for count in counts:
        for reason, value in count.items():
            total[reason] = total.get(reason, 0) + int(value)
    return total


def subtract_counts(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {reason: int(after.get(reason, 0)) - int(before.get(reason, 0)) for reason in FAULT_REASONS}


def format_counts(counts: Mapping[str, int]) -> str:
    """`"undecodable 3, too_large 1"`: the nonzero reasons, in `FAULT_REASONS` order ("none" when all are zero)."""
    parts = [f"{reason} {int(counts.get(reason, 0))}" for reason in FAULT_REASONS if counts.get(reason)]
    return ", ".join(parts) or "none"
