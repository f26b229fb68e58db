"""Writes an image corpus as N shards that stream well: WebDataset tar files or parquet files with an Image column.

Sources: a folder of images (searched recursively; the first-level sub-folder names become labels when every image
sits in one), a `datasets` dataset (a Hub id, or a folder written by `save_to_disk`), or `fashion-mnist` (the
embedded corpus). Every image is fully decoded with PIL before it is written; unreadable ones, and those above
`--max_image_pixels` (the limit pretraining applies, read from the header without decoding), are skipped and counted
by reason. Examples are dealt round-robin, so shard sizes differ by at most one.

Mistakes in the arguments (a folder without images, an output that is a file or not empty, more shards than images,
an unknown source or split) stop with one `UsageError` line before any image is read. The shards are written into a
staging folder inside `--output` and moved up when complete, so a failed or interrupted run leaves nothing.

Read the result back with `load_dataset("webdataset", data_files="DIR/*.tar")` (keys `__key__`, `png`/`jpg`, and
`cls` when there are labels) or `load_dataset("parquet", data_files="DIR/*.parquet")` (`image`, and `label`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from simmim_hf.data.faults import format_counts
from simmim_hf.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_IMAGE_PIXELS_HELP,
    ImageTooLargeError,
    check_max_image_pixels,
    decode_image,
    open_image,
)
from simmim_hf.data.scenes import is_fashion_mnist_scenes, write_scenes
from simmim_hf.data.sources import (
    FASHION_MNIST,
    dataset_features,
    detect_image_column,
    detect_label_column,
    is_fashion_mnist,
    is_saved_dataset,
    load_source_dataset,
    normalize_source,
)
from simmim_hf.data.stats import STATS_KEY, ImageStatsAccumulator
from simmim_hf.errors import UsageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMATS = ("webdataset", "parquet")
FASHION_MNIST_SPLITS = {"train": 60_000, "test": 10_000}
SUMMARY_FILE = "prepare_data.json"
STAGING_PREFIX = ".prepare_data.tmp-"  # the folder inside --output where a run writes before moving its files up
SKIP_REASONS = ("undecodable", "too_large")  # the `simmim_hf.data.faults` reasons an image can be skipped for here
_PARQUET_ROWS_PER_GROUP = 256


@dataclass
class PrepareDataArguments:
    """Command line of `scripts/prepare_data.py` (parsed by `transformers.HfArgumentParser`)."""

    source: str = field(
        metadata={"help": "An image folder, a `datasets` dataset (Hub id or save_to_disk folder), or `fashion-mnist`."}
    )
    output: str = field(metadata={"help": "Folder to write the shards to."})
    num_shards: int = field(default=8, metadata={"help": "Number of shards (use a multiple of GPUs x workers)."})
    format: str = field(default="webdataset", metadata={"help": "`webdataset` (tar) or `parquet`."})
    split: str = field(default="train", metadata={"help": "Split of a dataset source (ignored for a folder)."})
    max_samples: int | None = field(default=None, metadata={"help": "Write at most this many images."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of a Hub dataset."})
    image_column: str | None = field(default=None, metadata={"help": "Image column of a dataset (default: detect)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the contents of a non-empty output folder."})
    stats_max_images: int = field(
        default=10_000,
        metadata={
            "help": "Measure per-channel mean/std on the first N images written, each image weighing the same "
            "(recorded in prepare_data.json for `--image_stats dataset`; 0 = do not measure)."
        },
    )
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={"help": MAX_IMAGE_PIXELS_HELP})
    seed: int = field(default=0, metadata={"help": "fashion-mnist-scenes only: the seed the scenes are drawn from."})

    def __post_init__(self) -> None:
        if not str(self.source or "").strip():
            raise UsageError(
                "--source: give an image folder, a dataset (Hub id or save_to_disk folder) or fashion-mnist"
            )
        if not str(self.output or "").strip():
            raise UsageError("--output: give the folder to write the shards to")
        self.source = normalize_source(self.source)
        if self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.num_shards < 1:
            raise UsageError(f"--num_shards must be >= 1, got {self.num_shards}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"--max_samples must be >= 1, got {self.max_samples}")
        if self.stats_max_images < 0:
            raise UsageError(f"--stats_max_images must be >= 0 (0: do not measure), got {self.stats_max_images}")
        check_max_image_pixels(self.max_image_pixels)
        if is_fashion_mnist(self.source) and self.split not in FASHION_MNIST_SPLITS:
            raise UsageError(
                f"--split: fashion-mnist has the splits {', '.join(FASHION_MNIST_SPLITS)}, not {self.split!r}"
            )


@dataclass
class _Record:
    name: str  # for error messages
    data: bytes | None
    path: str | None
    label: int | None


def _read_cell(cell: Any) -> tuple[bytes | None, str | None]:
    if isinstance(cell, dict):
        return cell.get("bytes"), cell.get("path")
    if isinstance(cell, PIL.Image.Image):
        buffer = io.BytesIO()
        cell.save(buffer, format="PNG")
        return buffer.getvalue(), None
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell), None
    return None, str(cell)


def _folder_records(folder: Path) -> tuple[list[_Record], list[str] | None]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"--source {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
    parents = [p.relative_to(folder).parts for p in files]
    class_names = sorted({parts[0] for parts in parents}) if all(len(parts) > 1 for parts in parents) else None
    index = {name: i for i, name in enumerate(class_names or [])}
    records = [
        _Record(str(p), None, str(p), index[parts[0]] if class_names else None) for p, parts in zip(files, parents)
    ]
    return records, class_names


def _fashion_records(split: str) -> Iterator[_Record]:
    from simmim_hf.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist(split)
    for i, (image, label) in enumerate(zip(images, labels)):
        data, _ = _read_cell(PIL.Image.fromarray(image, mode="L"))
        yield _Record(f"{FASHION_MNIST}/{split}/{i}", data, None, int(label))


def _dataset_records(dataset: Any, image_column: str | None) -> tuple[Iterator[_Record], list[str] | None]:
    features = dataset_features(dataset)
    column = detect_image_column(features, image_column)
    label_column = detect_label_column(features)
    label_feature = features[label_column] if label_column and isinstance(features, dict) else None
    class_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    dataset = dataset.cast_column(column, datasets.Image(decode=False))

    def records() -> Iterator[_Record]:
        for i, example in enumerate(dataset):
            data, path = _read_cell(example[column])
            label = example[label_column] if label_column else None
            yield _Record(path or f"example {i}", data, path, _label_id(label, class_names))

    return records(), class_names


def _label_id(label: Any, class_names: list[str] | None) -> int | None:
    """An integer class id; string labels are looked up in the ClassLabel names (else no label is written)."""
    if label is None or isinstance(label, bool):
        return None
    if isinstance(label, (int, np.integer)):
        return int(label)
    if isinstance(label, str) and class_names and label in class_names:
        return class_names.index(label)
    return None


def encode_image(record: _Record, target: str | None = None, max_pixels: int | None = None) -> tuple[bytes, str, bool]:
    """Decodes the record fully (raising if PIL cannot) and returns `(bytes, "png"|"jpg", re-encoded?)`.

    An image above `max_pixels` pixels raises `ImageTooLargeError` from its header, before any pixel is decoded.

    PNG and JPEG files are kept byte for byte unless `target` asks for the other one. Anything else, and any file
    whose format differs from `target`, is re-encoded (PNG losslessly, JPEG at quality 95) from what the one decoder
    (`simmim_hf.data.images.decode_image`) gives: EXIF orientation applied, 16-bit and float images rescaled to 8 bits
    rather than clipped. So a re-encoded PNG reads back as the same pixels as decoding the original directly.
    """
    data = record.data
    if data is None:
        if not record.path:
            raise ValueError("no bytes and no path")
        data = Path(record.path).read_bytes()
    with open_image(data, max_pixels=max_pixels) as opened:
        opened.load()
        kept = {"PNG": "png", "JPEG": "jpg"}.get(opened.format or "")
        if kept is not None and kept == (target or kept):
            return data, kept, False
        image = decode_image(opened)
        buffer = io.BytesIO()
        if (target or "png") == "jpg":
            image.convert("L" if image.mode in ("1", "L") else "RGB").save(buffer, "JPEG", quality=95)
            return buffer.getvalue(), "jpg", True
        if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "png", True


class _TarShards:
    def __init__(self, paths: list[Path], has_labels: bool) -> None:
        self.tars = [tarfile.open(path, "w") for path in paths]
        self.has_labels = has_labels

    def _add(self, shard: int, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible shards
        self.tars[shard].addfile(info, io.BytesIO(data))

    def write(self, shard: int, key: str, data: bytes, ext: str, label: int | None) -> None:
        self._add(shard, f"{key}.{ext}", data)
        if self.has_labels:  # every sample needs the same fields; -1 marks a missing label
            self._add(shard, f"{key}.cls", str(-1 if label is None else label).encode())

    def close(self) -> None:
        for tar in self.tars:
            tar.close()


class _ParquetShards:
    def __init__(self, paths: list[Path], features: datasets.Features) -> None:
        self.paths, self.features = paths, features
        self.schema = features.arrow_schema  # carries the `huggingface` metadata, so `image` loads as Image
        self.writers = [pq.ParquetWriter(path, self.schema) for path in paths]
        self.rows: list[list[dict[str, Any]]] = [[] for _ in paths]

    def _flush(self, shard: int) -> None:
        if self.rows[shard]:
            self.writers[shard].write_table(pa.Table.from_pylist(self.rows[shard], schema=self.schema))
            self.rows[shard] = []

    def write(self, shard: int, key: str, data: bytes, ext: str, label: int | None) -> None:
        row: dict[str, Any] = {"image": {"bytes": data, "path": f"{key}.{ext}"}}
        if "label" in self.features:
            row["label"] = label
        self.rows[shard].append(row)
        if len(self.rows[shard]) >= _PARQUET_ROWS_PER_GROUP:
            self._flush(shard)

    def close(self) -> None:
        for shard, writer in enumerate(self.writers):
            self._flush(shard)
            writer.close()


def _local_path(source: str) -> Path | None:
    """The source as a local path when it is one (a folder or save_to_disk dataset), else None."""
    path = Path(source).expanduser()
    return path.resolve() if path.exists() else None


def _check_output(output: Path, source: str, overwrite: bool) -> None:
    """`UsageError` for an output that is a file, a non-empty folder without `--overwrite`, or a folder that overlaps
    the source (inside it, or holding it: `--overwrite` would delete the source)."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output}: exists and is a file, not a folder")
    source_path = None if is_fashion_mnist(source) else _local_path(source)
    if source_path is not None:
        resolved = output.expanduser().resolve()
        if resolved == source_path or source_path in resolved.parents:
            raise UsageError(f"--output {output}: must not be the source folder or inside it ({source})")
        if resolved in source_path.parents:
            raise UsageError(f"--output {output}: holds the source {source}; choose a folder outside it")
    if output.is_dir() and _contents(output) and not overwrite:
        raise UsageError(f"--output {output}: the folder is not empty; pass --overwrite to replace its contents")


def _contents(output: Path) -> list[Path]:
    """What `output` holds, leaving out the staging folders of runs that were killed."""
    return [path for path in output.iterdir() if not path.name.startswith(STAGING_PREFIX)]


def _move_into_place(staging: Path, output: Path) -> None:
    """Replaces the contents of `output` (empty, or --overwrite) by the complete files of `staging`, inside it: the
    folder itself (a link, a mount point, its permissions) stays; the summary goes last, as it marks a finished run."""
    for path in _contents(output):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in sorted(staging.iterdir(), key=lambda path: path.name == SUMMARY_FILE):
        path.rename(output / path.name)
    staging.rmdir()


def _open_source(args: PrepareDataArguments) -> tuple[Iterator[_Record], list[str] | None, str, int | None]:
    """`(records, class names, source type, number of images or None)`; a source that cannot be opened is a
    `UsageError` naming `--source` (or `--image_column`)."""
    source_path = Path(args.source)
    if is_fashion_mnist(args.source):
        from simmim_hf.data.fashion_mnist import CLASS_NAMES

        return _fashion_records(args.split), list(CLASS_NAMES), FASHION_MNIST, FASHION_MNIST_SPLITS[args.split]
    if source_path.is_dir() and not is_saved_dataset(source_path):
        folder_records, class_names = _folder_records(source_path)
        return iter(folder_records), class_names, "folder", len(folder_records)
    streaming = not is_saved_dataset(source_path)  # Hub datasets stream, so --max_samples downloads little
    try:
        dataset = load_source_dataset(args.source, args.dataset_config_name, args.split, streaming=streaming)
    except UsageError as error:  # the shared loader names the pretraining flag
        raise UsageError(str(error).replace("--dataset_name", "--source")) from None
    except ValueError as error:  # a wrong split or config name of a dataset
        raise UsageError(f"--source {args.source}: {error}") from None
    try:
        records, class_names = _dataset_records(dataset, args.image_column)
    except UsageError:
        raise
    except ValueError as error:  # no (or an unknown) image column, or an empty dataset
        raise UsageError(f"--image_column: {error} (source {args.source})") from None
    return records, class_names, "dataset" if streaming else "saved-dataset", None if streaming else len(dataset)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist yet, or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def prepare_data(args: PrepareDataArguments) -> dict[str, Any]:
    """Writes the shards and `prepare_data.json` (a summary, also returned) into `args.output`.

    Everything the arguments say is checked before the first image is read (`UsageError`); the files are written into
    a staging folder inside `args.output` and moved up when complete, replacing the old contents only then. On any
    failure the staging folder goes, and so do `args.output` and its parents when this call created them.
    """
    output = Path(args.output)
    _check_output(output, args.source, args.overwrite)
    if is_fashion_mnist_scenes(args.source):  # masks and boxes: a save_to_disk folder, not image shards
        return write_scenes(output, args.max_samples, args.seed, overwrite=args.overwrite)
    records, class_names, source_type, total = _open_source(args)
    if total is not None and args.max_samples is not None:
        total = min(total, args.max_samples)
    if total is not None and total < args.num_shards:
        raise UsageError(f"--num_shards {args.num_shards}: the source has only {total} images; lower --num_shards")
    try:
        first = next(records, None)
    except ValueError as error:  # a streamed dataset that fails on its first example
        raise UsageError(f"--source {args.source}: {error}") from None
    if first is None:
        raise UsageError(f"--source {args.source}: the source has no examples")

    created = _first_missing(output)
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(f"{STAGING_PREFIX}*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    staging = output / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir()
    try:
        summary = _write_shards(args, first, records, class_names, source_type, total, staging, output)
        _move_into_place(staging, output)  # the old contents (--overwrite) go only now that the new ones are complete
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return summary


def _write_shards(
    args: PrepareDataArguments,
    first: _Record,
    records: Iterator[_Record],
    class_names: list[str] | None,
    source_type: str,
    total: int | None,
    folder: Path,
    output: Path,
) -> dict[str, Any]:
    """Writes the shards and the summary into `folder` (the staging folder; `output` is where they will live)."""
    suffix = "tar" if args.format == "webdataset" else "parquet"
    names = [f"{args.split}-{i:05d}-of-{args.num_shards:05d}.{suffix}" for i in range(args.num_shards)]
    has_labels = first.label is not None
    if args.format == "webdataset":
        writer: _TarShards | _ParquetShards = _TarShards([folder / name for name in names], has_labels)
    else:
        label = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int64")
        features = datasets.Features({"image": datasets.Image(), **({"label": label} if has_labels else {})})
        writer = _ParquetShards([folder / name for name in names], features)

    # datasets' webdataset reader requires every sample of a tar to carry the same extensions, so the first image
    # fixes png or jpg and later images of the other format are re-encoded to it. Parquet keeps each file's format.
    target: str | None = None
    counts, skipped, written, reencoded = [0] * args.num_shards, [], 0, 0
    skipped_by_reason: dict[str, int] = {}
    stats = ImageStatsAccumulator()
    progress = tqdm(total=total, desc=f"Writing {args.num_shards} {args.format} shards", unit="img")
    try:
        for record in _chain(first, records):
            if args.max_samples is not None and written >= args.max_samples:
                break
            progress.update(1)
            try:
                data, ext, changed = encode_image(record, target, args.max_image_pixels)
            except Exception as error:  # noqa: BLE001 - a bad file costs one image, not the whole conversion
                reason = "too_large" if isinstance(error, ImageTooLargeError) else "undecodable"
                skipped_by_reason[reason] = skipped_by_reason.get(reason, 0) + 1
                skipped.append(f"{record.name}: {reason}: {type(error).__name__}: {error}")
                if written < args.stats_max_images:
                    stats.skip(reason)
                continue
            if args.format == "webdataset" and target is None:
                target = ext
            reencoded += changed
            if written < args.stats_max_images:
                stats.add(decode_image(data))
            shard = written % args.num_shards
            writer.write(shard, f"{written:09d}", data, ext, record.label)
            counts[shard] += 1
            written += 1
    finally:
        progress.close()
        writer.close()
    if not written:
        raise UsageError(
            f"--source {args.source}: none of its images could be written (skipped {format_counts(skipped_by_reason)}"
            f"; first: {skipped[0] if skipped else 'none'})"
        )
    if skipped:
        logger.warning(
            "Skipped %d image(s) (%s), e.g. %s", len(skipped), format_counts(skipped_by_reason), skipped[:3]
        )
    if min(counts) == 0:
        logger.warning("Some shards are empty (%d images for %d shards)", written, args.num_shards)
    summary = {
        "arguments": asdict(args),
        "source_type": source_type,  # fashion-mnist, folder, dataset (Hub or load_dataset id), saved-dataset
        "num_written": written,
        "num_skipped": len(skipped),
        "num_skipped_by_reason": {reason: skipped_by_reason.get(reason, 0) for reason in SKIP_REASONS},
        "num_reencoded": reencoded,
        "skipped": skipped[:100],
        "shards": names,
        "shard_counts": counts,
        "class_names": class_names,
        "data_files": str(output / f"{args.split}-*.{suffix}"),
    }
    if stats.num_images:
        summary[STATS_KEY] = stats.result()
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _chain(first: _Record, rest: Iterator[_Record]) -> Iterator[_Record]:
    yield first
    yield from rest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`scripts/prepare_data.py`: parses the arguments (flags, or a YAML/JSON file), writes the shards and prints a
    summary; returns the summary."""
    from transformers import HfArgumentParser

    from simmim_hf.cli import parse_arguments

    (args,) = parse_arguments(HfArgumentParser(PrepareDataArguments), sys.argv[1:] if argv is None else argv)
    summary = prepare_data(args)
    if summary.get("format") == "save_to_disk":  # the scenes: `write_scenes` printed its own line
        return summary
    skipped = f"skipped {summary['num_skipped']}"
    if summary["num_skipped"]:
        skipped += f" ({format_counts(summary['num_skipped_by_reason'])})"
    if summary["num_skipped_by_reason"]["too_large"]:
        skipped += f"; too_large: more than --max_image_pixels {args.max_image_pixels} pixels"
    print(
        f"Wrote {summary['num_written']} images into {len(summary['shards'])} {args.format} shards "
        f"({min(summary['shard_counts'])}-{max(summary['shard_counts'])} per shard) in {args.output}; {skipped}."
    )
    if summary["num_skipped"]:
        print("First skipped:", json.dumps(summary["skipped"][:5], indent=2))
    if STATS_KEY in summary:
        stats = summary[STATS_KEY]
        print(
            f"Image statistics of the first {stats['num_images']} images ({stats['num_colour_images']} in colour, "
            f"each image weighing the same): mean {stats['mean']}, std {stats['std']} (pretrain with --image_stats "
            "dataset to use them)"
        )
    print(f"Read back with data_files={summary['data_files']!r}")
    return summary
