"""Fault-tolerant reading of local WebDataset tar shards and parquet files, by position and by key.

`iter_tar` / `iter_parquet` (`iter_shard`) read one file from a position (a tar byte offset, a parquet row) and
yield each example with its KEY (the byte where the sample's first member header starts, or its row) and the
position after it; `read_tar_samples` / `read_parquet_rows` (`read_shard_examples`) read examples back by key (a
seek; a row-group read). `simmim_hf.data.shard_stream.ShardStream` builds the pretraining stream on them (its
resumable shuffle saves keys and positions). `shard_stream(kind, files)` is what `simmim_hf.data.sources` opens for
`--dataset_name webdataset|parquet --data_files ...` when every data file is local: a plain
`datasets.IterableDataset.from_generator` over the files (used as is for image statistics), tagged with
`simmim_shard_source` so that `simmim_hf.data.stream.load_pretrain_dataset` streams the same files with
`ShardStream`. Unlike the stock builders, a broken file never crashes the run or drops data silently:

* a tar file that cannot be opened, ends in the middle of a member, stops at a corrupt header, or lacks its
  end-of-archive marker, and a parquet file that cannot be opened or fails while reading, ends THAT file's read: the
  examples before the fault are kept, and one `broken_file` fault marker naming the file is emitted (read from a
  later position, the same file gives the same marker; an example that cannot be read back by key is one too);
* the image of a WebDataset sample is its first member that PIL recognises as an image, whatever its extension (a
  JPEG stored as `.png`, a member with no extension); a sample with none is a `no_image` marker (so is an empty
  parquet cell).

Examples are `{"pixel_values": {"bytes", "path"} | None, "_fault": reason | "", "_detail": str}`. Markers carry no
image; they travel through the shuffle buffer like examples and are counted and dropped after it by
`ImageDecoder.decode_example`, so a fault is counted once per pass, resumed or not (reading has no side effects).
Compressed tars (`.gz`, `.bz2`, `.xz`) are read through their decompressor: a seek there re-reads the file up to
the position, so resuming inside one is slow; `prepare_data.py` writes plain tars.
"""

from __future__ import annotations

import bisect
import bz2
import gzip
import itertools
import logging
import lzma
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import datasets

from simmim_hf.data.images import is_image

logger = logging.getLogger(__name__)

KINDS = ("webdataset", "parquet")
# Extensions tried first when a sample has several members PIL recognises (e.g. an image and a segmentation mask).
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_PARQUET_BATCH_ROWS = 256


def _example(cell: dict[str, Any] | None, fault: str = "", detail: str = "") -> dict[str, Any]:
    return {"pixel_values": cell, "_fault": fault, "_detail": detail}


def _broken(path: str, problem: str) -> dict[str, Any]:
    return _example(None, "broken_file", f"file {path}: {problem}; the rest of this file is skipped for this pass")


def sample_key(name: str) -> tuple[str, str]:
    """WebDataset naming: `dir/abc.seg.png` -> key `dir/abc`, extension `seg.png` (no dot: the whole name, "")."""
    folder, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _pick_image(members: list[tuple[str, bytes]]) -> tuple[str, bytes] | None:
    preferred = [m for m in members if sample_key(m[0])[1].rsplit(".", 1)[-1] in _IMAGE_EXTENSIONS]
    others = [m for m in members if m not in preferred]
    return next((member for member in preferred + others if is_image(member[1])), None)


def _sample(path: str, key: str, members: list[tuple[str, bytes]]) -> dict[str, Any]:
    picked = _pick_image(members)
    if picked is None:
        names = ", ".join(name for name, _ in members)
        return _example(None, "no_image", f"sample {key} of {path} has no image member ({names})")
    return _example({"bytes": picked[1], "path": f"{path}/{picked[0]}"})


def _tar_end_problem(tar: tarfile.TarFile) -> str | None:
    """Why the member iteration stopped, when it was not at an end-of-archive marker (None when it was)."""
    fileobj = tar.fileobj
    fileobj.seek(tar.offset)
    block = fileobj.read(tarfile.BLOCKSIZE)
    if block == tarfile.NUL * tarfile.BLOCKSIZE:
        return None
    if not block:
        return f"ends at byte {tar.offset} without the end-of-archive marker (truncated?)"
    return f"invalid tar header at byte {tar.offset}"


def _open_tar_stream(path: str) -> IO[bytes]:
    """The file as an uncompressed, seekable tar stream (gz/bz2/xz are decompressed: their seeks re-read)."""
    if path.endswith((".gz", ".tgz")):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115 - closed by the callers


def iter_tar(path: str, start: int = 0) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    """The samples of one WebDataset tar file from byte `start` on, then a `broken_file` marker if it could not be
    read to its end.

    Yields `(offset, next, example)`: `offset` is the byte where the sample's first member header starts (its key:
    `read_tar_samples` reads it back from there), `next` where the following sample starts, the position to resume
    from once this sample has been taken (None after the last item: the file is done).
    """
    key, members, offset = None, [], start
    try:
        with _open_tar_stream(path) as stream:
            stream.seek(start)
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    member_key = sample_key(info.name)[0]
                    if members and member_key != key:
                        yield offset, info.offset, _sample(path, key, members)
                        members = []
                    if not members:
                        offset = info.offset
                    key = member_key
                    handle = tar.extractfile(info)
                    data = handle.read() if handle is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} is cut short ({len(data)} of {info.size} bytes)")
                    members.append((info.name, data))
                problem, end = _tar_end_problem(tar), tar.offset
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
    else:
        if members:  # resuming after it reaches the problem again (a marker), or nothing when there is none
            yield offset, None if problem is None else end, _sample(path, key, members)
        members = []
    if problem is not None:
        yield offset, None, _broken(path, problem)


def read_tar_samples(path: str, offsets: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The samples whose first member header starts at each of `offsets` (keys from `iter_tar`), read by seeking;
    a sample that cannot be read back (the file changed) is a `broken_file` marker."""
    samples: dict[int, dict[str, Any]] = {}
    wanted = sorted(set(offsets))
    try:
        stream = _open_tar_stream(path)
    except OSError as error:
        return {offset: _broken(path, f"{type(error).__name__}: {error}") for offset in wanted}
    with stream:
        for offset in wanted:
            key, members = None, []
            try:
                stream.seek(offset)
                tar = tarfile.open(fileobj=stream, mode="r:")
                for info in tar:
                    if not info.isfile():
                        continue
                    member_key = sample_key(info.name)[0]
                    if members and member_key != key:
                        break
                    key = member_key
                    handle = tar.extractfile(info)
                    members.append((info.name, handle.read() if handle is not None else b""))
                if not members:
                    raise tarfile.ReadError(f"no sample at byte {offset}")
                samples[offset] = _sample(path, key, members)
            except (tarfile.TarError, OSError, EOFError, ValueError) as error:
                samples[offset] = _broken(path, f"{type(error).__name__}: {error} (re-reading byte {offset})")
    return samples


def _parquet_cell(path: str, row: int, cell: Any) -> dict[str, Any]:
    data, name = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
    if data is None and not name:
        return _example(None, "no_image", f"row {row} of {path} has no image")
    return _example({"bytes": data, "path": name or f"{path}[{row}]"})


def _open_parquet(path: str, column: str) -> Any:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        raise ValueError(f"no column {column!r} (columns: {parquet.schema_arrow.names})")
    return parquet


def _row_group_starts(parquet: Any) -> list[int]:
    starts = [0]
    for group in range(parquet.metadata.num_row_groups):
        starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
    return starts


def iter_parquet(path: str, column: str, start: int = 0) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
    """The image cells of one parquet file's `column` from row `start` on, then a `broken_file` marker if reading it
    failed. Yields `(row, next row, example)` as `iter_tar` does (the row is the key)."""
    row = start
    try:
        parquet = _open_parquet(path, column)
        starts = _row_group_starts(parquet)
        first = max(0, bisect.bisect_right(starts, start) - 1)
        groups = list(range(first, parquet.metadata.num_row_groups))
        position = starts[first]
        if groups:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column], row_groups=groups):
                cells = batch.column(0).to_pylist()
                skip = max(0, row - position)
                position += len(cells)
                for cell in cells[skip:]:
                    yield row, row + 1, _parquet_cell(path, row, cell)
                    row += 1
    except Exception as error:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        yield row, None, _broken(path, f"{type(error).__name__}: {error} (after {row} rows)")


def read_parquet_rows(path: str, column: str, rows: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The cells of `rows` (keys from `iter_parquet`), one row-group read per group; unreadable: `broken_file`."""
    wanted = sorted(set(rows))
    try:
        parquet = _open_parquet(path, column)
        starts = _row_group_starts(parquet)
        cells: dict[int, dict[str, Any]] = {}
        for group, group_rows in itertools.groupby(wanted, key=lambda row: bisect.bisect_right(starts, row) - 1):
            group_rows = list(group_rows)
            if group >= parquet.metadata.num_row_groups:
                raise IndexError(f"row {group_rows[0]} is past the end ({starts[-1]} rows)")
            column_cells = parquet.read_row_group(group, columns=[column]).column(0)
            for row in group_rows:
                cells[row] = _parquet_cell(path, row, column_cells[row - starts[group]].as_py())
        return cells
    except Exception as error:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        return {row: _broken(path, f"{type(error).__name__}: {error} (re-reading row {row})") for row in wanted}


def iter_shard(
    path: str, kind: str, column: str | None = None, start: int = 0
) -> Iterator[tuple[int, int | None, Any]]:
    """`iter_tar` or `iter_parquet` by `kind`."""
    if kind == "webdataset":
        return iter_tar(path, start)
    return iter_parquet(path, column or "image", start)


def read_shard_examples(path: str, kind: str, column: str | None, keys: Iterable[int]) -> dict[int, dict[str, Any]]:
    """`read_tar_samples` or `read_parquet_rows` by `kind`: the examples at `keys` (offsets / rows) of one file."""
    if kind == "webdataset":
        return read_tar_samples(path, keys)
    return read_parquet_rows(path, column or "image", keys)


def generate_shard_examples(files: list[str], kind: str, column: str | None = None) -> Iterator[dict[str, Any]]:
    """`from_generator` function: the examples of `files`, one after the other (no side effects, see module doc)."""
    for path in files:
        for _, _, example in iter_shard(path, kind, column):
            yield example


def shard_stream(kind: str, files: Sequence[str], column: str | None = None) -> datasets.IterableDataset:
    """A streaming dataset over local shard files (one `datasets` shard per file); examples as in the module doc.

    `column`: the image column of parquet shards (`simmim_hf.data.sources.parquet_image_column`; default `image`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    names = [str(Path(path)) for path in files]
    dataset = datasets.IterableDataset.from_generator(
        generate_shard_examples, gen_kwargs={"files": names, "kind": kind, "column": column}
    )
    # `simmim_hf.data.stream.load_pretrain_dataset` reads these files with its own resumable reader
    # (`simmim_hf.data.shard_stream.ShardStream`); this dataset serves plain reads (image statistics).
    dataset.simmim_shard_source = (kind, names, column)
    return dataset
