"""Image decoding and the SimMIM pretraining augmentation.

`build_pretrain_transform(config)` is the SimMIM augmentation (`SimMIMAugmentation`): PIL image of any mode ->
normalised float tensor `(C, H, W)`, or with `uint8=True` the same pixels as a uint8 tensor, normalised later on the
training device (`normalize_pixel_values`; 4x less to collate, pin and copy). It draws torchvision's
`RandomResizedCrop` (same algorithm, scale and ratio) and flip from a `random.Random`, crops and resizes with PIL
exactly as torchvision v2 does on PIL images, and decodes JPEGs at a reduced scale (PIL `draft`, 1/2 to 1/8) when
the crop, drawn on the full size, still has at least the output's resolution at that scale. `ImageDecoder` turns the raw `{"bytes", "path"}` cells that `datasets` keeps when an image column
is cast to `Image(decode=False)` into PIL images, so that decoding happens lazily inside the DataLoader workers and a
corrupt file costs one skipped example instead of a crashed run.

Images are recognised by their content (PIL sniffs the bytes), never by a file extension. An image whose header
announces more than `max_image_pixels` pixels is refused before its pixels are decoded (`too_large`).

Reproducible augmentation: an `ImageDecoder` built with a `seed` (the streaming pipeline's) draws each example's
random crop and flip from a generator seeded with (seed, pass, digest of the image's raw bytes) (a `random.Random`
handed to `SimMIMAugmentation`; any other transform runs inside `torch.random.fork_rng` seeded the same way), so the
augmentation of an example is a pure function of the run seed, the pass and the
image itself: the same in an uninterrupted run and in a resumed one, whichever worker or rank reads it, and the
process's global RNG is left as it was. The pass is the one the stream reader announced for the decoder's key
(`faults.set_stream_epoch`; `StreamLoader` does it), 0 otherwise. Without a seed (map-style datasets), the transform
draws from the global RNG as usual.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import random
import struct
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from simmim_hf.configuration_simmim import to_pair
from simmim_hf.data.faults import fault_snapshot, record_fault, stream_epoch
from simmim_hf.errors import UsageError

logger = logging.getLogger(__name__)

# Paper values (SimMIM, Xie et al. 2022): a mild crop, so most of the object stays in view for reconstruction.
CROP_SCALE = (0.67, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# PIL modes that hold more than 8 bits per pixel; `convert("RGB"/"L")` would clip them instead of rescaling.
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# The one image-size limit (`--max_image_pixels` of prepare_data.py and of pretraining, and the statistics): PIL's own
# decompression-bomb threshold (Image.MAX_IMAGE_PIXELS) by default.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
MAX_IMAGE_PIXELS_HELP = (
    "Images with more pixels (width x height, read from the file header: never decoded) are skipped and counted as "
    "`too_large`; prepare_data.py, the image statistics and pretraining share this limit. Default: PIL's own "
    "decompression-bomb limit."
)


def _config_values(config: Any) -> tuple[tuple[int, int], int, list[float], list[float]]:
    """`(size (height, width), num_channels, mean, std)` of a SimMIMConfig-like object (checked by the consumer)."""
    for name in ("image_size", "num_channels", "image_mean", "image_std"):
        if not hasattr(config, name):
            raise ValueError(f"config has no `{name}` attribute; expected a SimMIMConfig-like object")
    return (
        to_pair(config.image_size),
        int(config.num_channels),
        [float(m) for m in config.image_mean],
        [float(s) for s in config.image_std],
    )


def normalize_pixel_values(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels -> normalised float32, on the tensor's device.

    `pixel_values: (..., C, H, W)` uint8 (0-255); returns `(pixel_values / 255 - mean) / std` per channel, float32.
    """
    mean_t, std_t = channel_statistics(
        tuple(float(v) for v in mean), tuple(float(v) for v in std), pixel_values.device
    )
    return pixel_values.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)


@functools.lru_cache(maxsize=16)
def channel_statistics(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean`, `std` as float32 `(C, 1, 1)` tensors on `device`, built once per (values, device) and reused every
    step (no host-to-device copy per batch). Callers must not modify them in place."""
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1),
        torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1),
    )


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: Sequence[float] = CROP_SCALE,
    ratio: Sequence[float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """A `RandomResizedCrop` box `(top, left, height, width)` on a `width` x `height` image, drawn from `rng`.

    The algorithm (and so the distribution) of torchvision's `RandomResizedCrop.get_params`: up to 10 tries of an
    area fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`, else the largest central crop within
    `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randrange(height - h + 1), rng.randrange(width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _exif_rotated(image: PIL.Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: let the full decode path deal with it
        return True


class SimMIMAugmentation:
    """SimMIM's pretraining augmentation: channel conversion, `RandomResizedCrop(size, scale, CROP_RATIO)`
    (bilinear, antialiased; `scale` defaults to the paper's `CROP_SCALE`), horizontal flip with probability 1/2.
    Fine-tuning uses it too (`simmim_hf.eval.finetune.train_transform`, with its own minimum crop scale).

    Call it on a PIL image (`augmentation(image, rng)`), or on encoded bytes (`decode_and_augment`), which decodes a
    JPEG at a reduced scale when the crop allows it. Returns `pixel_values: (channels, height, width)`: float32
    normalised with `mean`/`std`, or uint8 when built with `uint8=True` (normalise with `normalize_pixel_values`).
    The crop and flip come from `rng` (a `random.Random`); without one, from a generator seeded by one draw of
    torch's global RNG. Picklable.
    """

    def __init__(
        self,
        size: tuple[int, int],
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        uint8: bool = False,
        draft: bool = True,
        scale: Sequence[float] = CROP_SCALE,
    ) -> None:
        # The raw-argument entry (fine-tuning builds it from an image processor, not a SimMIMConfig): checked here.
        if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
            raise ValueError(f"config.image_size must be a positive int or [height, width], got {list(size)!r}")
        if int(channels) not in (1, 3):
            raise ValueError(f"config.num_channels must be 1 or 3, got {channels}")
        if len(mean) != int(channels) or len(std) != int(channels):
            raise ValueError(f"image_mean/image_std need {channels} values each, got {list(mean)} / {list(std)}")
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"image_std must be positive, got {list(std)}")
        if not 0.0 < float(scale[0]) <= float(scale[1]) <= 1.0:
            raise ValueError(f"the crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        self.size = (int(size[0]), int(size[1]))  # (height, width)
        self.channels = int(channels)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.uint8 = uint8
        self.draft = draft
        self.scale = (float(scale[0]), float(scale[1]))

    def with_uint8(self, uint8: bool = True) -> SimMIMAugmentation:
        """A copy that returns uint8 pixels (or normalised floats with `uint8=False`)."""
        return type(self)(
            self.size, self.channels, self.mean, self.std, uint8=uint8, draft=self.draft, scale=self.scale
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, channels={self.channels}, scale={self.scale}, "
            f"ratio={CROP_RATIO}, flip=0.5, uint8={self.uint8}, draft={self.draft})"
        )

    @staticmethod
    def _global_rng() -> random.Random:
        return random.Random(int(torch.randint(0, 2**62, (1,)).item()))

    def _convert(self, image: PIL.Image.Image) -> PIL.Image.Image:
        # "L" stays one channel when three are wanted: replicated after the resize (exactly what RGB would give).
        if self.channels == 3:
            return image if image.mode in ("RGB", "L") else image.convert("RGB")
        return image if image.mode == "L" else image.convert("L")

    def _finish(self, image: PIL.Image.Image, flip: bool) -> torch.Tensor:
        if flip:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        if pixels.ndim == 2:
            pixels = pixels.unsqueeze(0).expand(self.channels, -1, -1).contiguous()
        else:
            pixels = pixels.permute(2, 0, 1).contiguous()
        return pixels if self.uint8 else normalize_pixel_values(pixels, self.mean, self.std)

    def __call__(self, image: PIL.Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """`image`: a decoded PIL image of any mode. Returns `pixel_values: (C, H, W)` (class docstring)."""
        rng = rng if rng is not None else self._global_rng()
        image = self._convert(image)
        top, left, height, width = random_resized_crop_box(image.width, image.height, rng, self.scale)
        flip = rng.random() < 0.5
        # Crop, then resize: what torchvision's resized_crop does on a PIL image.
        image = image.crop((left, top, left + width, top + height))
        if image.size != self.size[::-1]:
            image = image.resize(self.size[::-1], PIL.Image.Resampling.BILINEAR)
        return self._finish(image, flip)

    def decode_and_augment(
        self, data: bytes, max_pixels: int | None = None, rng: random.Random | None = None
    ) -> torch.Tensor:
        """Decodes encoded image bytes and augments them; JPEGs at a reduced scale when the crop allows it.

        The crop box is drawn on the full (header) size, then the JPEG is decoded at the largest DCT scale 1/s
        (s in 1, 2, 4, 8) at which the box still covers at least the output size, and the box, divided by s, is
        resized to the output. Same draws (hence the same crop and flip) as `__call__` on the fully decoded image.
        Raises as `decode_image` does (`ImageTooLargeError`, PIL errors, truncated files).
        """
        image = open_image(data, None, max_pixels)
        if not (self.draft and image.format == "JPEG" and image.mode in ("L", "RGB") and not _exif_rotated(image)):
            return self(decode_image(image), rng)
        rng = rng if rng is not None else self._global_rng()
        full_width, full_height = image.size
        top, left, height, width = random_resized_crop_box(full_width, full_height, rng, self.scale)
        flip = rng.random() < 0.5
        out_height, out_width = self.size
        request = (math.ceil(full_width * out_width / width), math.ceil(full_height * out_height / height))
        drafted = image.draft(image.mode, request)
        reduction = full_width / drafted[1][2] if drafted else 1.0
        image.load()
        image = self._convert(image)
        if reduction == 1.0:
            image = image.crop((left, top, left + width, top + height))
            if image.size != (out_width, out_height):
                image = image.resize((out_width, out_height), PIL.Image.Resampling.BILINEAR)
        else:
            box = (left / reduction, top / reduction, (left + width) / reduction, (top + height) / reduction)
            image = image.resize((out_width, out_height), PIL.Image.Resampling.BILINEAR, box=box)
        return self._finish(image, flip)


def build_pretrain_transform(config: Any, uint8: bool = False) -> SimMIMAugmentation:
    """The SimMIM pretraining augmentation for `config` (`SimMIMAugmentation`).

    `config` is any object with `image_size` (int, or [height, width]), `num_channels` (1 or 3), `image_mean` and
    `image_std` (one float per channel), e.g. a `SimMIMConfig`. The returned callable maps a PIL image of any mode
    (L, RGB, RGBA, P, ...) to `pixel_values: (num_channels, height, width)` float32, normalised with the config's
    mean/std; with `uint8=True`, to the same pixels as uint8 (normalise them with `normalize_pixel_values`).
    """
    return SimMIMAugmentation(*_config_values(config), uint8=uint8)


def build_image_processor(
    image_size: int | Sequence[int], image_mean: Sequence[float], image_std: Sequence[float], resample: int = 3
) -> Any:
    """The inference preprocessing, as the stock `ViTImageProcessor`: resize to `image_size` (int or [height,
    width]; `resample` a PIL code, 3 = bicubic), rescale to [0, 1], normalise with `image_mean`/`image_std` (one
    value per channel); for 3 channels greyscale/RGBA/palette inputs become RGB. Exported with every encoder
    (`simmim_hf.publish.convert.image_processor_for`), and used by evaluation and `scripts/visualize.py`.
    Maps images to `pixel_values: (B, C, H, W)`.
    """
    from transformers import ViTImageProcessor

    height, width = to_pair(image_size)
    return ViTImageProcessor(
        do_resize=True,
        size={"height": int(height), "width": int(width)},
        resample=resample,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(m) for m in image_mean],
        image_std=[float(s) for s in image_std],
        do_convert_rgb=len(image_mean) == 3,
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
    if isinstance(cell, (str, Path)):
        return None, str(cell)
    raise TypeError(f"cannot decode an image from {type(cell).__name__}")


class ImageTooLargeError(ValueError):
    """The image header announces more pixels than allowed; its pixels were not decoded."""


def check_max_image_pixels(value: int) -> None:
    """`UsageError` naming `--max_image_pixels` unless it is a positive pixel count."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--max_image_pixels must be an integer >= 1, got {value!r}")


def _lift_pil_limit(max_pixels: int) -> None:
    """PIL refuses, on its own, images above twice `PIL.Image.MAX_IMAGE_PIXELS`; raises that threshold (never lowers
    it) so that `max_pixels` is the only limit (PIL has no per-call setting: this is process-wide)."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and 2 * limit < max_pixels:
        PIL.Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2


def open_image(data: bytes | None, path: str | None = None, max_pixels: int | None = None) -> PIL.Image.Image:
    """Opens an image lazily (header only) and refuses it before decoding when it has more than `max_pixels` pixels.

    Raises `ImageTooLargeError` for an oversized image (PIL's own decompression-bomb refusal included), and whatever
    PIL raises for bytes it does not recognise.
    """
    if max_pixels is not None:
        _lift_pil_limit(max_pixels)
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


def decode_image(cell: Any, max_pixels: int | None = None, *, num_channels: int | None = None) -> PIL.Image.Image:
    """The one image decoder (pretraining, sharding, evaluation, statistics and visualisation all use it).

    `cell`: a PIL image, raw bytes, a path (str or Path), a `{"bytes": ..., "path": ...}` dict, or an array (`(H, W)` or
    `(H, W, C)`, as `datasets` gives for an `Array` column). Fully loads the pixels (so truncated files fail here, not
    later in the transform), applies the EXIF orientation and rescales 16/32-bit and float greyscale images to 8-bit
    "L" by their own range (a plain PIL `convert` would clip them). With `num_channels`, returns mode "RGB" (3:
    greyscale replicated) or "L" (1: colour averaged); without, keeps the mode. Raises `ImageTooLargeError` before
    decoding an image above `max_pixels` pixels, and whatever PIL raises on anything it cannot read.
    """
    if isinstance(cell, PIL.Image.Image):
        image = cell
    elif isinstance(cell, (dict, bytes, bytearray, str, Path)):
        data, path = _cell_parts(cell)
        if data is None and not path:
            raise ValueError("image cell has neither bytes nor path")
        image = open_image(data, path, max_pixels)
    else:
        image = PIL.Image.fromarray(np.asarray(cell))
    image.load()
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH_MODES:
        image = _to_8bit(image)
    if num_channels is None:
        return image
    mode = "RGB" if num_channels == 3 else "L"
    return image if image.mode == mode else image.convert(mode)


def augmentation_seed(seed: int, epoch: int, data: bytes) -> int:
    """The seed of one example's augmentation: a function of the run seed, the pass and the image's raw bytes.

    A BLAKE2b digest of the bytes keyed with (seed, pass): one C call, no seed-sequence mixing.
    """
    key = struct.pack("<qq", int(seed) % 2**63, int(epoch) % 2**63)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little") >> 1


class ImageDecoder:
    """Decodes and transforms raw image cells; a cell that fails to decode becomes `None` and is counted.

    Picklable. Faults are counted per reason in the current process (`simmim_hf.data.faults`), shared by all copies of
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

    def _rng(self, data: bytes | None) -> random.Random | None:
        if self.seed is None or data is None:
            return None
        return random.Random(augmentation_seed(self.seed, stream_epoch(self.key), data))

    def _augment(self, image: PIL.Image.Image, data: bytes | None) -> torch.Tensor:
        if isinstance(self.transform, SimMIMAugmentation):
            return self.transform(image, self._rng(data))
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
                if isinstance(self.transform, SimMIMAugmentation):
                    return self.transform.decode_and_augment(data, self.max_image_pixels, self._rng(data))
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
