"""Loading labelled image data for downstream evaluation: the embedded Fashion-MNIST or any `datasets` source.

`load_eval_data(args)` finds the image/label columns, maps labels to ids `0..C-1` and takes seeded class-balanced
subsets, returning an `EvalData` that the probes and fine-tuning (`eval/`) and the pretraining monitor
(`pretrain/monitor.py`) share. `args` is anything with `EvaluationArguments`' data fields (dataset_name,
dataset_config_name, data_files, data_dir, cache_dir, train_split, eval_split, image_column, label_column,
train_samples, eval_samples, seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from simmim_hf.data.images import decode_image
from simmim_hf.data.sources import (
    detect_image_column,
    detect_label_column,
    is_fashion_mnist,
    is_saved_dataset,
    load_dataset,
    resolve_split_files,
)

_EVAL_SPLITS = ("validation", "valid", "val", "test")


@dataclass
class EvalData:
    """Train/eval image datasets with integer labels `0..num_classes-1` kept alongside, in row order."""

    train: Any
    eval: Any
    image_column: str
    train_labels: np.ndarray
    eval_labels: np.ndarray
    class_names: list[str]
    eval_split: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def native_size(self) -> int:
        """Longest side of the first training image (the raw-pixel baseline's default resolution)."""
        return max(decode_image(self.train[0][self.image_column]).size)

    @property
    def native_channels(self) -> int:
        """1 when the first training image is greyscale, else 3 (the raw-pixel baseline's channel count)."""
        return 1 if decode_image(self.train[0][self.image_column]).mode in ("1", "L", "LA") else 3


def class_balanced_subset(labels: np.ndarray | list[int], num_samples: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subset of `num_samples` rows with classes as equal as the data allows.

    Per-class counts differ by at most one, except that a class with too few rows gives all it has and the others
    share its shortfall. Rows within a class, and which classes get the odd extra row, are drawn from `seed`.
    """
    labels = np.asarray(labels)
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if num_samples > len(labels):
        raise ValueError(f"asked for {num_samples} samples but the split has only {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    # Water-filling from the smallest class up: each class takes an even share of what is left, or all its rows.
    # Ties in size are ordered at random, so the odd extra rows go to random classes.
    order = sorted(classes, key=lambda c: (len(pools[c]), rng.random()))
    remaining, picked = num_samples, []
    for position, c in enumerate(order):
        take = min(len(pools[c]), remaining // (len(order) - position))
        picked.append(pools[c][:take])
        remaining -= take
    return np.sort(np.concatenate(picked))


def detect_columns(features: Any, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """The image and label column names: given ones are checked, missing ones found by the rules of pretraining and
    `prepare_data.py` (`simmim_hf.data.sources.detect_image_column` / `detect_label_column`)."""
    image = detect_image_column(features, image_column)
    label = detect_label_column(features, label_column)
    if label is None:
        raise ValueError(f"cannot tell the label column among {list(features)}; pass --label_column")
    if image == label:
        raise ValueError(f"image and label columns are both {image!r}")
    return image, label


def _fashion_mnist_data(args: Any) -> EvalData:
    """The embedded corpus, subset on the raw arrays so that only the kept images are wrapped in a Dataset."""
    from simmim_hf.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist, to_dataset

    eval_split = args.eval_split or "test"
    parts = []
    for split, samples in ((args.train_split, args.train_samples), (eval_split, args.eval_samples)):
        if split not in ("train", "test"):
            raise ValueError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
        images, labels = load_fashion_mnist(split)
        if samples is not None:
            keep = class_balanced_subset(labels, samples, args.seed)
            images, labels = images[keep], labels[keep]
        parts += [to_dataset(images, labels), labels]
    train, train_labels, test, eval_labels = parts
    return EvalData(train, test, "image", train_labels, eval_labels, list(CLASS_NAMES), eval_split)


def _load_splits(args: Any) -> tuple[Any, Any, str]:
    import datasets

    if is_saved_dataset(args.dataset_name):  # a `save_to_disk` folder, as pretraining and prepare_data.py read it
        loaded = datasets.load_from_disk(args.dataset_name)
        splits = loaded if isinstance(loaded, datasets.DatasetDict) else {args.train_split: loaded}
    else:
        splits = load_dataset(
            args.dataset_name,
            args.dataset_config_name,
            data_files=resolve_split_files(args.dataset_name, args.data_files, args.train_split),
            data_dir=args.data_dir,
            cache_dir=args.cache_dir,
        )
    if args.train_split not in splits:
        raise ValueError(f"no split {args.train_split!r}; the dataset has {list(splits)}")
    if args.eval_split is not None:
        if args.eval_split not in splits:
            raise ValueError(f"no split {args.eval_split!r}; the dataset has {list(splits)}")
        return splits[args.train_split], splits[args.eval_split], args.eval_split
    for name in _EVAL_SPLITS:
        if name in splits and name != args.train_split:
            return splits[args.train_split], splits[name], name
    # No held-out split: carve a seeded 10% out of train (stratified when the labels are a ClassLabel).
    train = splits[args.train_split]
    label = detect_label_column(train.features, args.label_column)  # dense-task data may have none
    stratify = label if label and isinstance(train.features[label], datasets.ClassLabel) else None
    parts = train.train_test_split(test_size=0.1, seed=args.seed, stratify_by_column=stratify)
    return parts["train"], parts["test"], f"{args.train_split}[heldout-10%]"


def load_eval_data(args: Any) -> EvalData:
    """Loads the train/eval splits, finds the columns, maps labels to ids and takes the seeded subsets."""
    import datasets

    if is_fashion_mnist(args.dataset_name) and not args.data_files:
        return _fashion_mnist_data(args)
    train, test, eval_split = _load_splits(args)
    image_column, label_column = detect_columns(train.features, args.image_column, args.label_column)
    feature = train.features[label_column]
    train_values, eval_values = list(train[label_column]), list(test[label_column])
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
        train_labels, eval_labels = np.asarray(train_values, np.int64), np.asarray(eval_values, np.int64)
    else:  # plain ints or strings: classes are the sorted distinct training values
        class_names = sorted({str(v) for v in train_values}, key=lambda v: (len(v), v) if v.isdigit() else (0, v))
        ids = {name: i for i, name in enumerate(class_names)}
        unseen = sorted({str(v) for v in eval_values} - set(ids))
        if unseen:
            raise ValueError(f"labels {unseen[:5]} of the eval split never occur in the train split")
        train_labels = np.asarray([ids[str(v)] for v in train_values], np.int64)
        eval_labels = np.asarray([ids[str(v)] for v in eval_values], np.int64)
    if args.train_samples is not None:
        keep = class_balanced_subset(train_labels, args.train_samples, args.seed)
        train, train_labels = train.select(keep), train_labels[keep]
    if args.eval_samples is not None:
        keep = class_balanced_subset(eval_labels, args.eval_samples, args.seed)
        test, eval_labels = test.select(keep), eval_labels[keep]
    return EvalData(train, test, image_column, train_labels, eval_labels, class_names, eval_split)
