"""Where images come from: every data source and name alias in one table, and the loaders that open them.

Every script and module asks this module what a `--dataset_name` / `--source` means, so the same name is the same
data in pretraining, `prepare_data.py`, evaluation and the model card:

* `fashion-mnist` (and each alias in `FASHION_MNIST_ALIASES`, e.g. `fashion_mnist`): the embedded corpus, read from
  Debian's package with no Hub access (`simmim_hf.data.fashion_mnist`); on the Hub the same images are
  `FASHION_MNIST_HUB_ID`, which, named explicitly, is a Hub download like any other id;
* a folder written by `save_to_disk`;
* the local builders `webdataset` / `parquet` (read by the fault-tolerant `simmim_hf.data.shards`), `imagefolder`,
  ..., with `--data_files` (one syntax everywhere: `parse_data_files`) or `--data_dir`;
* anything else: a Hub dataset id for `datasets.load_dataset`.

Columns are found by one rule each: `detect_image_column` (`IMAGE_COLUMN_NAMES`) and `detect_label_column`
(`LABEL_COLUMN_NAMES`).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError

from simmim_hf.data.shards import KINDS as SHARD_KINDS
from simmim_hf.data.shards import shard_stream
from simmim_hf.errors import UsageError

logger = logging.getLogger(__name__)

FASHION_MNIST = "fashion-mnist"
# Every name of the embedded corpus (compared in lower case).
FASHION_MNIST_ALIASES = frozenset(
    {FASHION_MNIST, "fashion_mnist", "fashionmnist", "embedded", "simmim_hf/fashion_mnist", "simmim_hf.fashion_mnist"}
)
# The Hub copy of the same images: what a model card links for the embedded corpus.
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
# Loaders of the `datasets` library that take local files: a run that used them has no Hub dataset to link.
LOCAL_BUILDERS = frozenset({"imagefolder", "webdataset", "parquet", "arrow", "csv", "json", "text", "audiofolder"})
# Fallback names when no column is typed `Image` (e.g. a parquet file with raw bytes, or a webdataset "jpg" key).
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
# Label column names, in order of preference (CIFAR-100's `fine_label` before nothing; `label` before `target`).
LABEL_COLUMN_NAMES = ("label", "labels", "cls", "class", "target", "fine_label")
# Shards used when a map-style source (the embedded Fashion-MNIST, a save_to_disk folder) is streamed; 48 splits
# evenly over 1, 2, 3, 4, 6, 8, 12, 16, 24 and 48 readers.
STREAM_SHARDS = 48
_GLOB_CHARACTERS = ("*", "?", "[")
DATA_FILES_HELP = (
    "Data files for a local builder (webdataset, parquet, imagefolder, ...): one or more paths or globs, e.g. "
    "`shards/train-*.tar`, of the split read; or `SPLIT=PATTERN` entries, comma-separated, e.g. "
    "`train=a/*.parquet,test=b/*.parquet`. The same syntax in every script."
)


def is_fashion_mnist(name: str | None, include_hub: bool = False) -> bool:
    """Whether `name` (a `--dataset_name` or `--source`) is the embedded Fashion-MNIST, under any of its aliases.

    `include_hub`: also its Hub copy `FASHION_MNIST_HUB_ID` (the same images, so the same data for a model card; as a
    source to read, that id is a Hub download).
    """
    if not name:
        return False
    name = str(name).lower()
    return name in FASHION_MNIST_ALIASES or include_hub and name == FASHION_MNIST_HUB_ID


def normalize_source(name: str) -> str:
    """The canonical name of a source: `fashion-mnist` for every alias of the embedded corpus, else `name` itself."""
    return FASHION_MNIST if is_fashion_mnist(name) else name


def parse_data_files(
    data_files: str | Sequence[str] | None, default_split: str = "train"
) -> dict[str, list[str]] | None:
    """The one `--data_files` syntax of every script: split name -> file patterns (paths, globs or URLs).

    `data_files` is one string or a list of them. An entry without `=` is a pattern of `default_split`; an entry
    with `=` is a comma-separated list of `split=pattern` (`'train=a/*.parquet,test=b/*.parquet'`). So
    `['a-*.tar', 'b.tar']`, `'shards/*.parquet'` and `'train=tr/*.tar,test=te/*.tar'` work for pretraining,
    evaluation and any other reader. Returns None when no file is given.
    """
    if not data_files:
        return None
    entries = [data_files] if isinstance(data_files, str) else list(data_files)
    parsed: dict[str, list[str]] = {}
    for entry in entries:
        entry = str(entry)
        if "=" not in entry:
            parsed.setdefault(default_split, []).append(entry)
            continue
        for item in entry.split(","):
            split, _, pattern = item.partition("=")
            if not split.strip() or not pattern.strip():
                raise UsageError(f"--data_files: bad entry {item!r}; expected PATTERN or SPLIT=PATTERN")
            parsed.setdefault(split.strip(), []).append(pattern.strip())
    return parsed


def resolve_split_files(
    name: str, data_files: str | Sequence[str] | None, default_split: str = "train"
) -> dict[str, list[str]] | None:
    """`parse_data_files`, with the local files of a local builder (`LOCAL_BUILDERS`) expanded and checked by
    `resolve_data_files` (a `UsageError` naming --data_files for a missing file); a Hub dataset's data files are
    paths inside its repository and URLs are remote, so both pass through unchanged."""
    parsed = parse_data_files(data_files, default_split)
    if parsed is None:
        return None
    return {split: _expand_patterns(name, patterns) for split, patterns in parsed.items()}


def split_files(name: str, data_files: str | Sequence[str] | None, split: str) -> list[str] | None:
    """The data files of one `split` of `--data_files`, parsed once (`split_data_files`) and, for a local builder,
    expanded and checked once (`resolve_data_files`: a glob that matches nothing is a `UsageError` naming
    --data_files). What every reader of the run's files uses - the training stream, the shard reader and the
    statistics lookup - so they all see the same list. None when no file is given."""
    patterns = split_data_files(data_files, split)
    return None if patterns is None else _expand_patterns(name, patterns)


def _expand_patterns(name: str, patterns: list[str]) -> list[str]:
    """A local builder's local files expanded and checked (`resolve_data_files`); a Hub dataset's data files (paths
    inside its repository) and URLs pass through unchanged."""
    if name.lower() not in LOCAL_BUILDERS or any(is_remote(p) for p in patterns):
        return list(patterns)
    return resolve_data_files(patterns)


def split_data_files(data_files: str | Sequence[str] | None, split: str) -> list[str] | None:
    """The file patterns of `split` in `--data_files` (`parse_data_files`); UsageError when it names other splits only."""
    parsed = parse_data_files(data_files, default_split=split)
    if parsed is None:
        return None
    if split not in parsed:
        raise UsageError(f"--data_files: no files for the split {split!r}; it names the split(s) {sorted(parsed)}")
    return parsed[split]


def is_remote(path: str) -> bool:
    return "://" in str(path)


def resolve_data_files(patterns: str | Sequence[str] | None, field: str = "--data_files") -> list[str]:
    """Expands local data files and globs into a sorted list of readable files.

    Raises `UsageError` naming `field` for an empty list, a glob that matches nothing, a missing file, a folder, or a
    file this process may not read.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise UsageError(f"{field}: no data file given")
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if any(character in pattern for character in _GLOB_CHARACTERS):
            matches = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
            if not matches:
                raise UsageError(f"{field}: {pattern!r} matches no file")
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise UsageError(f"{field}: {pattern!r} is a folder; give the shard files or a glob such as '{pattern}/*'")
        elif not os.path.isfile(pattern):
            raise UsageError(f"{field}: {pattern!r} does not exist")
        else:
            files.append(pattern)
    for path in files:
        if not os.access(path, os.R_OK):
            raise UsageError(f"{field}: {path!r} is not readable (permissions)")
    return list(dict.fromkeys(files))


def detect_label_column(features: datasets.Features | Sequence[str], label_column: str | None = None) -> str | None:
    """The label column of a dataset, or None when it has none.

    An explicit `label_column` must exist (`ValueError`). Otherwise: the single `ClassLabel`-typed feature; failing
    that, the first name of `LABEL_COLUMN_NAMES` (in that order of preference) that is a column.
    """
    columns = list(features or [])
    if label_column is not None:
        if label_column not in columns:
            raise ValueError(f"--label_column {label_column!r} is not a column; columns: {columns}")
        return label_column
    if isinstance(features, (datasets.Features, dict)):
        typed = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
        if len(typed) == 1:
            return typed[0]
    return next((name for name in LABEL_COLUMN_NAMES if name in columns), None)


def detect_image_column(features: datasets.Features | Sequence[str] | None, image_column: str | None = None) -> str:
    """Picks the image column from a dataset's `features` (or bare column names when the types are unknown).

    An explicit `image_column` must exist. Otherwise: the single `Image`-typed feature; failing that, the single column
    named one of `IMAGE_COLUMN_NAMES`. Raises `ValueError` listing the columns when there is none or more than one.
    """
    columns = list(features or [])
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"image_column {image_column!r} is not a column of the dataset; columns: {columns}")
        return image_column
    if isinstance(features, (datasets.Features, dict)):
        typed = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if len(typed) == 1:
            return typed[0]
        if len(typed) > 1:
            raise ValueError(f"Several Image columns {typed}: pass --image_column. Columns: {columns}")
    named = [name for name in columns if name.lower() in IMAGE_COLUMN_NAMES]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ValueError(f"Several candidate image columns {named}: pass --image_column. Columns: {columns}")
    raise ValueError(
        f"No image column found (looked for an Image feature or {IMAGE_COLUMN_NAMES}); columns: {columns}"
    )


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    folder = Path(path)
    return folder.is_dir() and any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def dataset_features(dataset: datasets.Dataset | datasets.IterableDataset) -> datasets.Features | list[str]:
    """The dataset's features, or just its column names (read from the first example) when a stream has no types."""
    if dataset.features is not None:
        return dataset.features
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError("The dataset is empty")
    return list(first)


def fashion_mnist_subset(split: str = "train", max_samples: int | None = None) -> datasets.Dataset:
    """The embedded Fashion-MNIST as a map-style dataset (`image` PIL "L", `label`).

    A subset encodes only the rows kept. The full split (PNG-encoding 60k images takes ~15 s) is built once and kept
    as Arrow files next to the IDX files' cache (`$SIMMIM_HF_CACHE`), so later runs and every rank memory-map it.
    """
    from simmim_hf.data.fashion_mnist import default_cache_dir, load_fashion_mnist, to_dataset

    cached = default_cache_dir().parent / "fashion-mnist-arrow" / split
    if max_samples is None and is_saved_dataset(cached):
        return datasets.load_from_disk(str(cached))
    images, labels = load_fashion_mnist(split)
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    dataset = to_dataset(images, labels)
    if max_samples is None:
        # Write to a private folder, then rename: ranks starting together never read a half-written cache.
        temporary = cached.with_name(f"{split}.tmp-{os.getpid()}")
        dataset.save_to_disk(str(temporary))
        try:
            temporary.rename(cached)
        except OSError:  # another process won the race
            shutil.rmtree(temporary, ignore_errors=True)
        if is_saved_dataset(cached):
            dataset = datasets.load_from_disk(str(cached))
    return dataset


def load_source_dataset(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    data_files: str | Sequence[str] | None = None,
    data_dir: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Opens one split of any supported source: `fashion-mnist`, a `save_to_disk` folder, or `load_dataset(name)`.

    `max_samples` only pre-truncates `fashion-mnist` (to skip encoding rows that would be dropped anyway).
    """
    if is_fashion_mnist(name):
        dataset = fashion_mnist_subset(split, max_samples)
        return dataset.to_iterable_dataset(num_shards=min(STREAM_SHARDS, len(dataset))) if streaming else dataset
    if is_saved_dataset(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UsageError(f"split {split!r} not in the saved dataset {name}; splits: {list(loaded)}")
            loaded = loaded[split]
        return loaded.to_iterable_dataset(num_shards=min(STREAM_SHARDS, len(loaded))) if streaming else loaded
    check_local_source(name, data_files, data_dir)
    files = split_files(name, data_files, split)
    if streaming and name in SHARD_KINDS and files and not any(is_remote(f) for f in files):
        column = parquet_image_column(files) if name == "parquet" else None
        dataset = shard_stream(name, files, column)
        dataset.simmim_shard_reader = True  # examples are already `pixel_values` + fault markers
        return dataset
    return load_dataset(
        name, config_name, data_dir=data_dir, data_files=files and {split: files}, split=split, streaming=streaming
    )


def load_dataset(name: str, *args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset(name, ...)`, where an unknown name or an unreachable Hub dataset (offline, no network)
    is an input mistake: a `UsageError` naming `--dataset_name`, not a traceback."""
    try:
        return datasets.load_dataset(name, *args, **kwargs)
    except (DatasetNotFoundError, FileNotFoundError, ConnectionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"--dataset_name {name!r}: not fashion-mnist, a save_to_disk folder, a builder with --data_files or "
            f"--data_dir, nor a reachable Hub dataset ({reason})"
        ) from error


def looks_like_path(name: str) -> bool:
    """Whether `--dataset_name` can only be a local folder (a Hub id is `name` or `owner/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_local_source(name: str, data_files: str | Sequence[str] | None, data_dir: str | None) -> None:
    """Raises `UsageError` (one line naming the argument) for a local folder or file that is not there."""
    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise UsageError(f"--dataset_name: the folder {name!r} does not exist")
    if data_dir is not None and not is_remote(data_dir) and name in (*SHARD_KINDS, "imagefolder"):
        if not os.path.isdir(os.path.expanduser(data_dir)):
            raise UsageError(f"--data_dir: the folder {data_dir!r} does not exist")
    if name in SHARD_KINDS and not data_files and data_dir is None:
        raise UsageError(f"--data_files: --dataset_name {name} needs the shard files (e.g. 'shards/train-*.tar')")


def parquet_image_column(files: Sequence[str], image_column: str | None = None) -> str:
    """The image column of parquet shards, from the schema of the first file that opens."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            schema = pq.read_schema(path)
        except Exception:  # noqa: BLE001 - a broken file is reported when it is read
            continue
        try:
            features = datasets.Features.from_arrow_schema(schema)
        except Exception:  # noqa: BLE001 - no `huggingface` metadata: fall back to the column names
            features = list(schema.names)
        try:
            return detect_image_column(features, image_column)
        except ValueError as error:
            raise UsageError(f"--image_column: {error} (in {path})") from None
    logger.warning("No parquet file could be opened to find the image column; assuming %r", image_column or "image")
    return image_column or "image"
