"""Data faults for the fault matrix: each function breaks a tiny real-image stream one way and reports what happened.

    from fault_matrix_data import DATA_FAULTS, run_data_faults
    rows = run_data_faults(workdir)   # [{"fault": ..., "outcome": ..., "figures": ...}, ...]

Every function takes an empty work folder and returns one row: `fault` (what was broken), `outcome` ("handled: ..."
when the pipeline behaved as documented, "FAILED: ..." otherwise) and `figures` (images read, faults counted per
reason). The builders (`write_tar`, `truncate_tar_end`, ...) are shared with tests/test_data_faults.py. Images are
Fashion-MNIST test images (fetched once from Debian's package by `simmim_hf.data.fashion_mnist`).
"""

from __future__ import annotations

import io
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import PIL.Image

from simmim_hf.data.collate import SimMIMCollator
from simmim_hf.data.faults import DataFaultError, format_counts
from simmim_hf.data.stream import DataArguments, StreamLoader, load_pretrain_dataset
from simmim_hf.errors import UsageError
from simmim_hf.masking import SimMIMMaskGenerator

CONFIG = SimpleNamespace(image_size=16, num_channels=1, image_mean=[0.286], image_std=[0.353])
PER_SHARD = 8


# --- builders -------------------------------------------------------------------------------------------------------


def fashion_images(count: int, offset: int = 0) -> list[PIL.Image.Image]:
    from simmim_hf.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    return [PIL.Image.fromarray(image) for image in images[offset : offset + count]]


def encode(image: PIL.Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(images: list[PIL.Image.Image], first_key: int = 0) -> list[tuple[str, bytes]]:
    """WebDataset samples: `KEY.png` and `KEY.cls` for each image."""
    members = []
    for index, image in enumerate(images, start=first_key):
        members += [(f"{index:06d}.png", encode(image)), (f"{index:06d}.cls", b"0")]
    return members


def write_shards(folder: Path, num_shards: int = 4, per_shard: int = PER_SHARD) -> list[Path]:
    """`num_shards` clean tar shards of `per_shard` Fashion-MNIST samples each (different images in each)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = fashion_images(num_shards * per_shard)
    return [
        write_tar(
            folder / f"shard-{shard:02d}.tar",
            sample_members(images[shard * per_shard : (shard + 1) * per_shard], shard * per_shard),
        )
        for shard in range(num_shards)
    ]


def member_offsets(path: Path) -> list[tuple[int, int, int]]:
    """(header offset, data offset, size) of each member of a tar file."""
    with tarfile.open(path) as tar:
        return [(info.offset, info.offset_data, info.size) for info in tar.getmembers()]


def truncate_tar_end(path: Path) -> None:
    """Cuts the file in the middle of its last member's data (as an interrupted copy would)."""
    _, data_offset, size = member_offsets(path)[-2]  # the last image member (the last member is its .cls)
    with open(path, "r+b") as handle:
        handle.truncate(data_offset + size // 2)


def corrupt_tar_header(path: Path, member: int) -> None:
    """Overwrites the header of the `member`-th member with bytes that are not a tar header."""
    header_offset, _, _ = member_offsets(path)[member]
    with open(path, "r+b") as handle:
        handle.seek(header_offset)
        handle.write(bytes(range(256)) * 2)


def write_parquet_shards(folder: Path, num_shards: int = 4, per_shard: int = PER_SHARD) -> list[Path]:
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    images = fashion_images(num_shards * per_shard)
    features = datasets.Features({"image": datasets.Image()})
    paths = []
    for shard in range(num_shards):
        rows = {"image": [{"bytes": encode(image), "path": None} for image in images[shard::num_shards]]}
        path = folder / f"shard-{shard:02d}.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
        paths.append(path)
    return paths


def truncate_file(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep))


def oversized_png(width: int = 12_000, height: int = 12_000) -> bytes:
    """A valid greyscale PNG of `width` x `height` black pixels, built row by row (a few hundred KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, parts, row = zlib.compressobj(9), [], b"\x00" * (width + 1)
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


# --- one pass -------------------------------------------------------------------------------------------------------


def read_one_pass(
    files: list[str], kind: str = "webdataset", num_workers: int = 0, batch_size: int = 1, **data_overrides: Any
) -> tuple[int, dict[str, int]]:
    """Images delivered in one pass over `files` and the fault counts, through the real pipeline and loader."""
    args = DataArguments(
        dataset_name=kind, data_files=[str(f) for f in files], shuffle_buffer_size=1, **data_overrides
    )
    dataset = load_pretrain_dataset(args, seed=0, num_workers=num_workers, config=CONFIG)
    collator = SimMIMCollator(SimMIMMaskGenerator(16, 4, 2, 0.5))
    loader = StreamLoader(dataset, collator, batch_size=batch_size, num_workers=num_workers, endless=False)
    images = sum(len(batch["pixel_values"]) for batch in loader)
    return images, loader.fault_counts()


def _row(fault: str, ok: bool, expected: str, images: int, counts: dict[str, int]) -> dict[str, str]:
    outcome = f"handled: {expected}" if ok else f"FAILED: expected {expected}"
    return {"fault": fault, "outcome": outcome, "figures": f"{images} images read; faults: {format_counts(counts)}"}


def fault_truncated_tar(workdir: Path) -> dict[str, str]:
    files = write_shards(workdir)
    truncate_tar_end(files[1])
    images, counts = read_one_pass(files)
    ok = counts["broken_file"] == 1 and images == 4 * PER_SHARD - 1 and sum(counts.values()) == 1
    return _row(
        "tar shard truncated at its end", ok, "that file ends, 1 broken_file, the pass goes on", images, counts
    )


def fault_corrupt_tar_header(workdir: Path) -> dict[str, str]:
    files = write_shards(workdir)
    corrupt_tar_header(files[2], member=6)  # the header of sample 3 of 8: samples 0-2 are kept
    images, counts = read_one_pass(files)
    ok = counts["broken_file"] == 1 and images == 3 * PER_SHARD + 3 and sum(counts.values()) == 1
    return _row(
        "corrupt tar header mid-shard", ok, "rest of that file skipped and counted (not silent)", images, counts
    )


def fault_truncated_parquet(workdir: Path) -> dict[str, str]:
    files = write_parquet_shards(workdir)
    truncate_file(files[0])
    images, counts = read_one_pass(files, kind="parquet")
    ok = counts["broken_file"] == 1 and images == 3 * PER_SHARD and sum(counts.values()) == 1
    return _row("parquet file truncated", ok, "that file skipped, 1 broken_file, the pass goes on", images, counts)


def _single_tar(workdir: Path, members: list[tuple[str, bytes]]) -> list[Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    return [write_tar(workdir / "shard.tar", members)]


def fault_jpeg_named_png(workdir: Path) -> dict[str, str]:
    images = fashion_images(4)
    members = sample_members(images[:3]) + [("000003.png", encode(images[3], "JPEG"))]
    count, counts = read_one_pass(_single_tar(workdir, members))
    ok = count == 4 and sum(counts.values()) == 0
    return _row("valid JPEG stored as .png", ok, "decoded (recognised by content)", count, counts)


def fault_member_without_extension(workdir: Path) -> dict[str, str]:
    images = fashion_images(4)
    members = sample_members(images[:3]) + [("000003", encode(images[3]))]
    count, counts = read_one_pass(_single_tar(workdir, members))
    ok = count == 4 and sum(counts.values()) == 0
    return _row("image member with no extension", ok, "decoded (recognised by content)", count, counts)


def fault_sample_without_image(workdir: Path) -> dict[str, str]:
    images = fashion_images(4)
    members = sample_members(images) + [("000009.txt", b"a caption and no image"), ("000009.cls", b"1")]
    count, counts = read_one_pass(_single_tar(workdir, members))
    ok = count == 4 and counts["no_image"] == 1 and sum(counts.values()) == 1
    return _row("sample with no image member", ok, "counted as no_image", count, counts)


def fault_undecodable_image(workdir: Path) -> dict[str, str]:
    images = fashion_images(4)
    members = sample_members(images) + [("000009.png", encode(images[0])[:60])]
    count, counts = read_one_pass(_single_tar(workdir, members))
    ok = count == 4 and counts["undecodable"] == 1 and sum(counts.values()) == 1
    return _row("image cut in half", ok, "counted as undecodable", count, counts)


def fault_oversized_png(workdir: Path) -> dict[str, str]:
    import PIL.ImageFile

    images = fashion_images(4)
    members = sample_members(images[:2]) + [("000002.png", oversized_png())] + sample_members(images[2:], 3)
    loaded: list[tuple[int, int]] = []
    original = PIL.ImageFile.ImageFile.load

    def recording_load(self):
        loaded.append(self.size)
        return original(self)

    PIL.ImageFile.ImageFile.load = recording_load
    try:
        count, counts = read_one_pass(_single_tar(workdir, members))
    finally:
        PIL.ImageFile.ImageFile.load = original
    ok = count == 4 and counts["too_large"] == 1 and (12_000, 12_000) not in loaded
    return _row("12000 x 12000 PNG", ok, "skipped as too_large before decoding", count, counts)


def fault_mostly_broken_stream(workdir: Path) -> dict[str, str]:
    files = write_shards(workdir)
    for path in files[:3]:
        truncate_file(path, keep=0.001)  # only part of the first header is left
    try:
        images, counts = read_one_pass(files, max_bad_fraction=0.25)
    except DataFaultError as error:
        outcome = "handled: stops with one clear error" if "broken_file 3" in str(error) else "FAILED: wrong message"
        return {
            "fault": "3 of 4 shards unreadable, --max_bad_fraction 0.25",
            "outcome": outcome,
            "figures": str(error),
        }
    return _row("3 of 4 shards unreadable, --max_bad_fraction 0.25", False, "a DataFaultError", images, counts)


def fault_glob_matches_nothing(workdir: Path) -> dict[str, str]:
    try:
        read_one_pass([str(workdir / "missing-*.tar")])
    except UsageError as error:
        return {"fault": "--data_files glob matching nothing", "outcome": "handled: UsageError", "figures": str(error)}
    return {"fault": "--data_files glob matching nothing", "outcome": "FAILED: no UsageError", "figures": ""}


DATA_FAULTS: list[Callable[[Path], dict[str, str]]] = [
    fault_truncated_tar,
    fault_corrupt_tar_header,
    fault_truncated_parquet,
    fault_jpeg_named_png,
    fault_member_without_extension,
    fault_sample_without_image,
    fault_undecodable_image,
    fault_oversized_png,
    fault_mostly_broken_stream,
    fault_glob_matches_nothing,
]


def run_data_faults(workdir: Path) -> list[dict[str, str]]:
    """Runs every data fault in its own sub-folder of `workdir`; returns the rows."""
    return [fault(Path(workdir) / fault.__name__) for fault in DATA_FAULTS]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for row in run_data_faults(Path(folder)):
            print(f"{row['fault']}: {row['outcome']} ({row['figures']})")
    sys.exit(0)
