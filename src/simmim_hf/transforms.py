"""Image decoding and the SimMIM pretraining augmentation.

`build_pretrain_transform(config)` is a torchvision transforms v2 pipeline: PIL image of any mode -> normalised float
tensor `(C, H, W)`. `ImageDecoder` turns the raw `{"bytes", "path"}` cells that `datasets` keeps when an image column
is cast to `Image(decode=False)` into PIL images, so that decoding happens lazily inside the DataLoader workers and a
corrupt file costs one skipped example instead of a crashed run.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms import v2

logger = logging.getLogger(__name__)

# Paper values (SimMIM, Xie et al. 2022): a mild crop, so most of the object stays in view for reconstruction.
CROP_SCALE = (0.67, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# PIL modes that hold more than 8 bits per pixel; `convert("RGB"/"L")` would clip them instead of rescaling.
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Skip counts per decoder, per process. `datasets` copies the map function along with its pipeline (pickling into
# workers, deep copies when iterating), so the count lives here under the decoder's id rather than on one instance.
_SKIPPED: Counter[str] = Counter()


def _check_config(config: Any) -> tuple[tuple[int, int], int, list[float], list[float]]:
    for name in ("image_size", "num_channels", "image_mean", "image_std"):
        if not hasattr(config, name):
            raise ValueError(f"config has no `{name}` attribute; expected a SimMIMConfig-like object")
    size, channels = config.image_size, int(config.num_channels)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)  # (height, width)
    if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
        raise ValueError(f"config.image_size must be a positive int or [height, width], got {config.image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"config.num_channels must be 1 or 3, got {channels}")
    mean, std = [float(m) for m in config.image_mean], [float(s) for s in config.image_std]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"image_mean/image_std need {channels} values each, got {mean} / {std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"image_std must be positive, got {std}")
    return size, channels, mean, std


def build_pretrain_transform(config: Any) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """The SimMIM pretraining augmentation as a torchvision v2 pipeline.

    `config` is any object with `image_size` (int, or [height, width]), `num_channels` (1 or 3), `image_mean` and
    `image_std` (one float per channel), e.g. a `SimMIMConfig`. The returned callable maps a PIL image of any mode
    (L, RGB, RGBA, P, ...) to `pixel_values: (num_channels, height, width)` float32, normalised with the config's
    mean/std.
    """
    size, channels, mean, std = _check_config(config)
    to_channels = v2.RGB() if channels == 3 else v2.Grayscale(num_output_channels=1)
    return v2.Compose(
        [
            to_channels,
            v2.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=mean, std=std),
            v2.ToPureTensor(),
        ]
    )


def _to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """Rescales 16/32-bit greyscale images to 8-bit "L" by their own range (PIL's convert would saturate them)."""
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    return PIL.Image.fromarray(scaled.round().astype(np.uint8), mode="L")


def decode_image(cell: Any) -> PIL.Image.Image:
    """Decodes one image cell: a PIL image, raw bytes, a path, or a `{"bytes": ..., "path": ...}` dict.

    Fully loads the pixels (so truncated files fail here, not later in the transform) and applies the EXIF orientation.
    Raises on anything PIL cannot read.
    """
    if isinstance(cell, PIL.Image.Image):
        image = cell
    else:
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
        elif isinstance(cell, (bytes, bytearray)):
            data, path = cell, None
        elif isinstance(cell, str):
            data, path = None, cell
        else:
            raise TypeError(f"cannot decode an image from {type(cell).__name__}")
        if data is not None:
            image = PIL.Image.open(io.BytesIO(data))
        elif path:
            image = PIL.Image.open(path)
        else:
            raise ValueError("image cell has neither bytes nor path")
    image.load()
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH_MODES:
        image = _to_8bit(image)
    return image


class ImageDecoder:
    """Decodes and transforms raw image cells; a cell that fails to decode becomes `None` and is counted.

    Picklable. `num_skipped` counts the failures in the current process, shared by all copies of this decoder (each
    DataLoader worker process has its own count); each skip is logged at warning level with the worker id and the
    file name, the first `log_first` one by one, then every 100th.

    Args:
        transform: PIL image -> tensor, e.g. `build_pretrain_transform(config)`.
        log_first: how many failures to log one by one.
    """

    def __init__(self, transform: Callable[[PIL.Image.Image], torch.Tensor], log_first: int = 10) -> None:
        self.transform = transform
        self.log_first = log_first
        self.key = uuid.uuid4().hex

    @property
    def num_skipped(self) -> int:
        """Images this decoder (or any copy of it) failed to decode in the current process."""
        return _SKIPPED[self.key]

    def __call__(self, cell: Any) -> torch.Tensor | None:
        """Returns `pixel_values: (C, H, W)` or None when the image cannot be decoded."""
        try:
            return self.transform(decode_image(cell))
        except Exception as error:  # noqa: BLE001 - any unreadable image must cost one example, not the run
            _SKIPPED[self.key] += 1
            if self.num_skipped <= self.log_first or self.num_skipped % 100 == 0:
                worker = torch.utils.data.get_worker_info()
                where = f"worker {worker.id}" if worker is not None else "main process"
                name = cell.get("path") if isinstance(cell, dict) else None
                logger.warning(
                    "Skipping undecodable image %s (%s: %s); %d skipped so far in the %s",
                    name or "<bytes>",
                    type(error).__name__,
                    error,
                    self.num_skipped,
                    where,
                )
            return None

    def decode_example(self, example: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """Streaming `map` function: `{"pixel_values": raw cell}` -> `{"pixel_values": (C, H, W) or None}`."""
        return {"pixel_values": self(example["pixel_values"])}

    def decode_batch(self, batch: dict[str, Sequence[Any]]) -> dict[str, list[torch.Tensor | None]]:
        """Map-style `with_transform` function: a batch of raw cells -> a list of tensors (None for failures)."""
        return {"pixel_values": [self(cell) for cell in batch["pixel_values"]]}
