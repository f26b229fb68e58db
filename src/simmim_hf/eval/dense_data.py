"""Data of the dense-prediction protocols: images with a segmentation mask column and/or COCO-style boxes.

`load_dense_data(args, task)` opens the embedded `fashion-mnist-scenes` (generated from `--seed`, see
`simmim_hf.data.scenes`) or any `datasets` source with the `scene_parse_150` layout (an image column and a mask
column such as `annotation`) or an `objects` column of `{"bbox": [[x, y, w, h], ...], "category": [...]}`. Every
input check (the columns, each mask's size against its image's) runs before any training, as a `UsageError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from simmim_hf.data.images import _cell_parts, open_image
from simmim_hf.data.scenes import (
    DETECTION_CLASS_NAMES,
    SEGMENTATION_CLASS_NAMES,
    is_fashion_mnist_scenes,
    scenes_dataset,
)
from simmim_hf.data.sources import detect_image_column
from simmim_hf.errors import UsageError

if TYPE_CHECKING:
    from simmim_hf.eval.arguments import EvaluationArguments

# Mask column names, in order of preference (`scene_parse_150` calls it `annotation`).
MASK_COLUMN_NAMES = ("annotation", "mask", "segmentation_mask", "semantic_mask", "label_mask", "seg_mask")
OBJECTS_COLUMN_NAMES = ("objects",)


@dataclass
class DenseData:
    """Train/eval datasets of a dense task and what their columns mean."""

    train: Any
    eval: Any
    image_column: str
    target_column: str  # the mask column (segmentation) or the objects column (detection)
    class_names: list[str]
    eval_split: str

    @property
    def num_labels(self) -> int:
        return len(self.class_names)


def detect_target_column(columns: list[str], task: str, given: str | None) -> str:
    """The mask (segmentation) or objects (detection) column; `UsageError` naming the flag when there is none."""
    flag, names = (
        ("--mask_column", MASK_COLUMN_NAMES) if task == "segmentation" else ("--objects_column", OBJECTS_COLUMN_NAMES)
    )
    if given is not None:
        if given not in columns:
            raise UsageError(f"{flag} {given!r} is not a column of the dataset; columns: {columns}")
        return given
    found = next((name for name in names if name in columns), None)
    if found is None:
        what = "segmentation mask" if task == "segmentation" else "objects (COCO-style boxes)"
        raise UsageError(f"{flag}: the dataset has no {what} column (looked for {list(names)}); columns: {columns}")
    return found


def mask_array(value: Any) -> np.ndarray:
    """A mask cell (PIL image, path, bytes or nested lists) as an integer array `(H, W)`."""
    if isinstance(value, (list, np.ndarray)):
        return np.asarray(value, dtype=np.int64)
    # Never through `decode_image`: it rescales 16-bit images, and a mask's values are class ids.
    image = value if hasattr(value, "getpixel") else open_image(*_cell_parts(value))
    array = np.asarray(image)
    if array.ndim == 3:  # an RGB-encoded mask: the first channel holds the class ids (ADE20K-style exports)
        array = array[..., 0]
    return array.astype(np.int64)


def _size(value: Any) -> tuple[int, int]:
    """`(height, width)` of an image or mask cell (PIL reads only the header)."""
    if isinstance(value, (list, np.ndarray)):
        return tuple(np.asarray(value).shape[:2])  # type: ignore[return-value]
    image = value if hasattr(value, "getpixel") else open_image(*_cell_parts(value))
    width, height = image.size
    return height, width


def check_mask_sizes(dataset: Any, image_column: str, mask_column: str, split: str) -> None:
    """`UsageError` for the first row whose mask is not the size of its image."""
    for index in range(len(dataset)):
        row = dataset[index]
        image, mask = _size(row[image_column]), _size(row[mask_column])
        if image != mask:
            raise UsageError(
                f"--mask_column {mask_column!r}: row {index} of the {split} split has a {mask[1]}x{mask[0]} mask for "
                f"a {image[1]}x{image[0]} image; masks must have their image's size"
            )


def _subset(dataset: Any, samples: int | None, seed: int) -> Any:
    if samples is None:
        return dataset
    if samples <= 0 or samples > len(dataset):
        raise UsageError(f"--train_samples/--eval_samples: {samples} is not in 1..{len(dataset)}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:samples])
    return dataset.select(keep)


def _class_names(args: EvaluationArguments, train: Any, task: str, target: str) -> list[str]:
    """Class names from `--num_labels`, a ClassLabel, or the largest id in the training targets."""
    import datasets

    if task == "detection":
        feature = train.features[target]
        category = feature.get("category") if isinstance(feature, dict) else None
        inner = getattr(category, "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            return list(inner.names)
        if args.num_labels:
            return [str(i) for i in range(args.num_labels)]
        return [str(i) for i in range(1 + max((max(row["category"], default=-1) for row in train[target]), default=0))]
    if args.num_labels:
        return [str(i) for i in range(args.num_labels)]
    largest = 0
    for value in train[target]:
        mask = mask_array(value)
        if args.reduce_labels:
            mask = mask - 1
        valid = mask[(mask >= 0) & (mask != args.ignore_index)]
        largest = max(largest, int(valid.max()) if valid.size else 0)
    return [str(i) for i in range(largest + 1)]


def load_dense_data(args: EvaluationArguments, task: str) -> DenseData:
    """The train/eval splits of a dense task (`"segmentation"` or `"detection"`), checked and subset."""
    if is_fashion_mnist_scenes(args.dataset_name):
        eval_split = args.eval_split or "test"
        for split in (args.train_split, eval_split):
            if split not in ("train", "test"):
                raise UsageError(f"--dataset_name fashion-mnist-scenes has splits 'train' and 'test', not {split!r}")
        # Scenes are generated in sequence, so N scenes are the first N of the seed's full split.
        train = scenes_dataset(args.train_split, args.train_samples, args.seed)
        test = scenes_dataset(eval_split, args.eval_samples, args.seed)
        target = "annotation" if task == "segmentation" else "objects"
        names = SEGMENTATION_CLASS_NAMES if task == "segmentation" else DETECTION_CLASS_NAMES
        return DenseData(train, test, "image", target, list(names), eval_split)
    from simmim_hf.data.labelled import _load_splits

    train, test, eval_split = _load_splits(args)
    columns = list(train.features)
    target = detect_target_column(columns, task, args.mask_column if task == "segmentation" else args.objects_column)
    image_column = detect_image_column(
        {name: feature for name, feature in train.features.items() if name != target}, args.image_column
    )
    train = _subset(train, args.train_samples, args.seed)
    test = _subset(test, args.eval_samples, args.seed)
    if task == "segmentation":
        check_mask_sizes(train, image_column, target, args.train_split)
        check_mask_sizes(test, image_column, target, eval_split)
    return DenseData(train, test, image_column, target, _class_names(args, train, task, target), eval_split)
