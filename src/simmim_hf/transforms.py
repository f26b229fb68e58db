"""Image decoding and the SimMIM pretraining augmentation.

`build_pretrain_transform(config)` is a torchvision transforms v2 pipeline: PIL image of any mode -> normalised float
tensor `(C, H, W)`. `ImageDecoder` turns the raw `{"bytes", "path"}` cells that `datasets` keeps when an image column
is cast to `Image(decode=False)` into PIL images, so that decoding happens lazily inside the DataLoader workers and a
corrupt file costs one skipped example instead of a crashed run.

Images are recognised by their content (PIL sniffs the bytes), never by a file extension. An image whose header
announces more than `max_image_pixels` pixels is refused before its pixels are decoded (`too_large`).

Reproducible augmentation: an `ImageDecoder` built with a `seed` (the streaming pipeline's) draws each example's
random crop and flip from a generator seeded with (seed, pass, digest of the image's raw bytes), inside
`torch.random.fork_rng`, so the augmentation of an example is a pure function of the run seed, the pass and the
image itself: the same in an uninterrupted run and in a resumed one, whichever worker or rank reads it, and the
process's global RNG is left as it was. The pass is the one the stream reader announced for the decoder's key
(`faults.set_stream_epoch`; `StreamLoader` does it), 0 otherwise. Without a seed (map-style datasets), the transform
draws from the global RNG as usual.
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms import v2

from .faults import fault_snapshot, record_fault, stream_epoch

logger = logging.getLogger(__name__)

# Paper values (SimMIM, Xie et al. 2022): a mild crop, so most of the object stays in view for reconstruction.
CROP_SCALE = (0.67, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# PIL modes that hold more than 8 bits per pixel; `convert("RGB"/"L")` would clip them instead of rescaling.
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# PIL's own limit for decompression bombs (Image.MAX_IMAGE_PIXELS), the default of --max_image_pixels.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


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


def _cell_parts(cell: Any) -> tuple[bytes | None, str | None]:
    """`(bytes, path)` of an image cell: raw bytes, a path, or a `{"bytes": ..., "path": ...}` dict."""
    if isinstance(cell, dict):
        return cell.get("bytes"), cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell), None
    if isinstance(cell, str):
        return None, cell
    raise TypeError(f"cannot decode an image from {type(cell).__name__}")


class ImageTooLargeError(ValueError):
    """The image header announces more pixels than allowed; its pixels were not decoded."""


def open_image(data: bytes | None, path: str | None = None, max_pixels: int | None = None) -> PIL.Image.Image:
    """Opens an image lazily (header only) and refuses it before decoding when it has more than `max_pixels` pixels.

    Raises `ImageTooLargeError` for an oversized image (PIL's own decompression-bomb refusal included), and whatever
    PIL raises for bytes it does not recognise.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            image = PIL.Image.open(io.BytesIO(data) if data is not None else path)
        except PIL.Image.DecompressionBombError as error:
            raise ImageTooLargeError(str(error)) from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(f"{width}x{height} = {width * height} pixels > max_image_pixels={max_pixels}")
    return image


def is_image(data: bytes) -> bool:
    """Whether PIL recognises `data` as an image (reads the header only; nothing is decoded)."""
    try:
        open_image(data).close()
    except ImageTooLargeError:
        return True
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is not an image
        return False
    return True


def decode_image(cell: Any, max_pixels: int | None = None) -> PIL.Image.Image:
    """Decodes one image cell: a PIL image, raw bytes, a path, or a `{"bytes": ..., "path": ...}` dict.

    Fully loads the pixels (so truncated files fail here, not later in the transform) and applies the EXIF orientation.
    Raises `ImageTooLargeError` before decoding an image above `max_pixels` pixels, and whatever PIL raises on anything
    it cannot read.
    """
    if isinstance(cell, PIL.Image.Image):
        image = cell
    else:
        data, path = _cell_parts(cell)
        if data is None and not path:
            raise ValueError("image cell has neither bytes nor path")
        image = open_image(data, path, max_pixels)
    image.load()
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH_MODES:
        image = _to_8bit(image)
    return image


def augmentation_seed(seed: int, epoch: int, data: bytes) -> int:
    """The seed of one example's augmentation: a function of the run seed, the pass and the image's raw bytes."""
    digest = hashlib.blake2b(data, digest_size=16).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return int(np.random.SeedSequence([int(seed), int(epoch), *words]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ImageDecoder:
    """Decodes and transforms raw image cells; a cell that fails to decode becomes `None` and is counted.

    Picklable. Faults are counted per reason in the current process (`simmim_hf.faults`), shared by all copies of
    this decoder (each DataLoader worker process has its own counts); each is logged at warning level with the
    worker id and the file name, the first `log_first` of a reason one by one, then every 100th (a broken file is
    always logged).

    Args:
        transform: PIL image -> tensor, e.g. `build_pretrain_transform(config)`.
        log_first: how many failures of each reason to log one by one.
        seed: when given, each example's augmentation is seeded from (seed, pass, image bytes) (module docstring).
        max_image_pixels: images above this many pixels are skipped (`too_large`) before decoding; None: no limit.
    """

    def __init__(
        self,
        transform: Callable[[PIL.Image.Image], torch.Tensor],
        log_first: int = 10,
        seed: int | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        self.transform = transform
        self.log_first = log_first
        self.seed = seed
        self.max_image_pixels = max_image_pixels
        self.key = uuid.uuid4().hex

    @property
    def num_skipped(self) -> int:
        """Images this decoder (or any copy of it) refused or failed to decode in the current process."""
        counts = fault_snapshot(self.key)
        return counts["undecodable"] + counts["too_large"]

    def fault_counts(self) -> dict[str, int]:
        """Faults per reason met by this decoder (or any copy of it) in the current process."""
        return fault_snapshot(self.key)

    def record(self, reason: str, detail: str) -> None:
        """Counts one fault and logs it (see the class docstring)."""
        count = record_fault(self.key, reason)
        if reason == "broken_file" or count <= self.log_first or count % 100 == 0:
            worker = torch.utils.data.get_worker_info()
            where = f"worker {worker.id}" if worker is not None else "main process"
            logger.warning("Skipping %s: %s (%d %s so far in the %s)", reason, detail, count, reason, where)

    def _augment(self, image: PIL.Image.Image, data: bytes | None) -> torch.Tensor:
        if self.seed is None or data is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(augmentation_seed(self.seed, stream_epoch(self.key), data))
            return self.transform(image)

    def __call__(self, cell: Any) -> torch.Tensor | None:
        """Returns `pixel_values: (C, H, W)` or None when the image cannot be decoded."""
        name = None
        try:
            if isinstance(cell, PIL.Image.Image):
                data, image = None, decode_image(cell)
            else:
                data, name = _cell_parts(cell)
                if data is None:
                    if not name:
                        raise ValueError("image cell has neither bytes nor path")
                    data = Path(name).read_bytes()
                image = decode_image(data, self.max_image_pixels)
            return self._augment(image, data)
        except Exception as error:  # noqa: BLE001 - any unreadable image must cost one example, not the run
            reason = "too_large" if isinstance(error, ImageTooLargeError) else "undecodable"
            self.record(reason, f"image {name or '<bytes>'} ({type(error).__name__}: {error})")
            return None

    def decode_example(self, example: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """Streaming `map` function: `{"pixel_values": raw cell}` -> `{"pixel_values": (C, H, W) or None}`.

        An example that a shard reader marked as a fault (`_fault`: reason, `_detail`: what) is counted and dropped.
        """
        fault = example.get("_fault")
        if fault:
            self.record(fault, example.get("_detail") or "")
            return {"pixel_values": None}
        return {"pixel_values": self(example["pixel_values"])}

    def decode_batch(self, batch: dict[str, Sequence[Any]]) -> dict[str, list[torch.Tensor | None]]:
        """Map-style `with_transform` function: a batch of raw cells -> a list of tensors (None for failures)."""
        return {"pixel_values": [self(cell) for cell in batch["pixel_values"]]}
