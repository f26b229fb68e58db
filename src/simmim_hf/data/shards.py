"""Fault-tolerant streaming of local WebDataset tar shards and parquet files.

`shard_stream(kind, files)` is what `simmim_hf.data.sources` opens for `--dataset_name webdataset|parquet
--data_files ...` when every data file is local: a `datasets.IterableDataset.from_generator` over the list of files, so `datasets` still deals the files out
across ranks (`split_dataset_by_node`) and DataLoader workers, shuffles their order each pass, and saves/restores the
stream position (`state_dict`) exactly as for its own builders. Unlike the stock builders, a broken file never
crashes the run or drops data silently:

* a tar file that cannot be opened, ends in the middle of a member, stops at a corrupt header, or lacks its
  end-of-archive marker, and a parquet file that cannot be opened or fails while reading, ends THAT file's read: the
  examples before the fault are kept, and one `broken_file` fault marker naming the file is emitted;
* the image of a WebDataset sample is its first member that PIL recognises as an image, whatever its extension (a
  JPEG stored as `.png`, a member with no extension); a sample with none is a `no_image` marker (so is an empty
  parquet cell).

Examples are `{"pixel_values": {"bytes", "path"} | None, "_fault": reason | "", "_detail": str}`. Markers carry no
image; they travel through the shuffle buffer like examples and are counted and dropped after it by
`ImageDecoder.decode_example`, so a fault is counted once even when a resume re-reads a file up to its saved
position (the generator has no side effects).
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


def iter_tar(path: str) -> Iterator[dict[str, Any]]:
    """The samples of one WebDataset tar file, then a `broken_file` marker if it could not be read to its end."""
    key, members = None, []
    try:
        compressed = path.endswith((".gz", ".tgz", ".bz2", ".xz"))
        with tarfile.open(path, mode="r:*" if compressed else "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                member_key = sample_key(info.name)[0]
                if members and member_key != key:
                    yield _sample(path, key, members)
                    members = []
                key = member_key
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is cut short ({len(data)} of {info.size} bytes)")
                members.append((info.name, data))
            problem = _tar_end_problem(tar)
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
    else:
        if members:
            yield _sample(path, key, members)
        members = []
    if problem is not None:
        yield _broken(path, problem)


def iter_parquet(path: str, column: str) -> Iterator[dict[str, Any]]:
    """The image cells of one parquet file's `column`, then a `broken_file` marker if reading it failed."""
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        if column not in parquet.schema_arrow.names:
            raise ValueError(f"no column {column!r} (columns: {parquet.schema_arrow.names})")
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            for cell in batch.column(0).to_pylist():
                data, name = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
                if data is None and not name:
                    yield _example(None, "no_image", f"row {row} of {path} has no image")
                else:
                    yield _example({"bytes": data, "path": name or f"{path}[{row}]"})
                row += 1
    except Exception as error:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        yield _broken(path, f"{type(error).__name__}: {error} (after {row} rows)")


def generate_shard_examples(files: list[str], kind: str, column: str | None = None) -> Iterator[dict[str, Any]]:
    """`from_generator` function: the examples of `files`, one after the other (no side effects, see module doc)."""
    for path in files:
        if kind == "webdataset":
            yield from iter_tar(path)
        else:
            yield from iter_parquet(path, column or "image")


def shard_stream(kind: str, files: Sequence[str], column: str | None = None) -> datasets.IterableDataset:
    """A streaming dataset over local shard files (one `datasets` shard per file); examples as in the module doc.

    `column`: the image column of parquet shards (`simmim_hf.data.sources.parquet_image_column`; default `image`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    names = [str(Path(path)) for path in files]
    return datasets.IterableDataset.from_generator(
        generate_shard_examples, gen_kwargs={"files": names, "kind": kind, "column": column}
    )
