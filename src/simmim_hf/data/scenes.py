"""`fashion-mnist-scenes`: dense-prediction data derived from the embedded Fashion-MNIST, generated from a seed.

Each scene is a black greyscale canvas (`SCENE_SIZE` px square) with 1 to `MAX_ITEMS` real Fashion-MNIST items
pasted at seeded random positions and scales. An item is first cropped to its own extent (its pixels above 0), then
resized (bilinear) so that its longer side is a seeded size in `ITEM_SIDES`, then pasted: where its resized pixels
are at least `FOREGROUND` they replace the canvas, so a later item covers an earlier one.

Columns, in the `scene_parse_150` layout plus COCO-style boxes:

* `image`: the scene (PIL, mode "L");
* `annotation`: the segmentation mask (PIL, mode "L", same size): 0 where no item is visible (background), and
  `class + 1` where an item of Fashion-MNIST class `class` (0 = T-shirt/top ... 9 = Ankle boot) is visible, so the
  11 segmentation classes are `SEGMENTATION_CLASS_NAMES` (background first) and class 0 is not confused with the
  background;
* `objects`: `{"bbox": [[x, y, w, h], ...], "category": [class, ...], "source_index": [i, ...]}`, one entry per
  pasted item in paste order: the pasted rectangle (the item's extent, occluded parts included), its Fashion-MNIST
  class (0..9, `DETECTION_CLASS_NAMES`) and its row in the Fashion-MNIST split.

Train scenes use Fashion-MNIST train items and test scenes test items; the same `seed` gives the same scenes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from simmim_hf.data.fashion_mnist import CLASS_NAMES

FASHION_MNIST_SCENES = "fashion-mnist-scenes"
SCENE_ALIASES = frozenset({FASHION_MNIST_SCENES, "fashion_mnist_scenes", "fashion-mnist_scenes"})
SCENE_SIZE = 64
MAX_ITEMS = 3
ITEM_SIDES = (16, 40)  # inclusive range of an item's longer side, in pixels
FOREGROUND = 32  # a resized item pixel at least this bright is the item's (and replaces the canvas)
# Default number of scenes per split.
SCENE_COUNTS = {"train": 1000, "test": 200}
SEGMENTATION_CLASS_NAMES = ["background", *CLASS_NAMES]
DETECTION_CLASS_NAMES = list(CLASS_NAMES)
_SPLIT_STREAMS = {"train": 0, "test": 1}


def is_fashion_mnist_scenes(name: str | None) -> bool:
    """Whether `name` (a `--dataset_name` or `--source`) is the generated scenes, under any of their aliases."""
    return bool(name) and str(name).lower() in SCENE_ALIASES


def _resize(item: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(item).resize((width, height), Image.BILINEAR))


def compose_scene(
    items: list[np.ndarray], labels: list[int], rng: np.random.Generator, size: int = SCENE_SIZE
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Pastes `items` (each `(28, 28)` uint8) onto a black `(size, size)` canvas.

    Returns the scene `(size, size)` uint8, its mask `(size, size)` uint8 (0 background, `label + 1` where an item
    is visible) and the pasted rectangles `[x, y, w, h]` in paste order.
    """
    scene = np.zeros((size, size), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    boxes = []
    for item, label in zip(items, labels):
        rows, cols = np.flatnonzero(item.any(axis=1)), np.flatnonzero(item.any(axis=0))
        crop = item[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] if len(rows) else item
        side = int(rng.integers(ITEM_SIDES[0], ITEM_SIDES[1] + 1))
        scale = side / max(crop.shape)
        height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
        resized = _resize(crop, height, width)
        y, x = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
        visible = resized >= FOREGROUND
        scene[y : y + height, x : x + width][visible] = resized[visible]
        mask[y : y + height, x : x + width][visible] = label + 1
        boxes.append([x, y, width, height])
    return scene, mask, boxes


def generate_scenes(split: str = "train", num_scenes: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The raw scenes of `split`: `{"image": (N, S, S) uint8, "annotation": (N, S, S) uint8, "objects": [...]}`."""
    from simmim_hf.data.fashion_mnist import load_fashion_mnist

    if split not in _SPLIT_STREAMS:
        raise ValueError(f"{FASHION_MNIST_SCENES} has splits 'train' and 'test', not {split!r}")
    num_scenes = SCENE_COUNTS[split] if num_scenes is None else num_scenes
    images, labels = load_fashion_mnist(split)
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    scenes, masks, objects = [], [], []
    for _ in range(num_scenes):
        picks = rng.choice(len(images), size=int(rng.integers(1, MAX_ITEMS + 1)), replace=False)
        chosen = [int(i) for i in picks]
        scene, mask, boxes = compose_scene([images[i] for i in chosen], [int(labels[i]) for i in chosen], rng)
        scenes.append(scene)
        masks.append(mask)
        objects.append({"bbox": boxes, "category": [int(labels[i]) for i in chosen], "source_index": chosen})
    return {"image": np.stack(scenes), "annotation": np.stack(masks), "objects": objects}


def scenes_dataset(split: str = "train", num_scenes: int | None = None, seed: int = 0) -> Any:
    """The scenes of `split` as a `datasets.Dataset` (`image`, `annotation`, `objects`; see the module docstring)."""
    import datasets

    raw = generate_scenes(split, num_scenes, seed)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "objects": {
                "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("int32"), length=4)),
                "category": datasets.Sequence(datasets.ClassLabel(names=DETECTION_CLASS_NAMES)),
                "source_index": datasets.Sequence(datasets.Value("int64")),
            },
        }
    )
    return datasets.Dataset.from_dict(
        {"image": list(raw["image"]), "annotation": list(raw["annotation"]), "objects": raw["objects"]},
        features=features,
    )


def write_scenes(
    output: Path, num_scenes: int | None = None, seed: int = 0, overwrite: bool = False
) -> dict[str, Any]:
    """`prepare_data.py --source fashion-mnist-scenes`: both splits (`num_scenes` each, default `SCENE_COUNTS`) as a
    `save_to_disk` folder at `output` (read by `evaluate.py --dataset_name OUTPUT`), written beside it and renamed
    into place, so a failure leaves no partial folder. Returns the summary it also writes as `prepare_data.json`."""
    import datasets

    output = Path(output)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    splits = {split: scenes_dataset(split, num_scenes, seed) for split in SCENE_COUNTS}
    try:
        datasets.DatasetDict(splits).save_to_disk(str(staging))
        summary = {
            "source": FASHION_MNIST_SCENES,
            "seed": seed,
            "format": "save_to_disk",
            "splits": {split: len(dataset) for split, dataset in splits.items()},
            "segmentation_classes": SEGMENTATION_CLASS_NAMES,
            "detection_classes": DETECTION_CLASS_NAMES,
        }
        (staging / "prepare_data.json").write_text(json.dumps(summary, indent=2) + "\n")
        if output.exists():
            if not overwrite and any(output.iterdir()):
                raise FileExistsError(output)
            shutil.rmtree(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {FASHION_MNIST_SCENES} (seed {seed}): {summary['splits']} scenes to {output}")
    return summary
