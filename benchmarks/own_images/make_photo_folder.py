#!/usr/bin/env python
"""A folder of real photos for trying `prepare_data.py` + pretraining: random crops of scikit-image's bundled colour
photos (astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry, retina), saved as JPEG files.

    python benchmarks/own_images/make_photo_folder.py OUTPUT_DIR [--count 480] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image
import skimage.data

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--count", type=int, default=480)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    photos = [PIL.Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]
    for index in range(args.count):
        name, photo = PHOTOS[index % len(PHOTOS)], photos[index % len(PHOTOS)]
        # A crop covering 10-60% of the photo's area, aspect 3:4 to 4:3, resized so its short side is 128-256 px.
        area = photo.width * photo.height * rng.uniform(0.1, 0.6)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        width = int(min(photo.width, round(np.sqrt(area * aspect))))
        height = int(min(photo.height, round(np.sqrt(area / aspect))))
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        crop = photo.crop((left, top, left + width, top + height))
        short = int(rng.integers(128, 257))
        scale = short / min(width, height)
        crop = crop.resize((max(1, round(width * scale)), max(1, round(height * scale))), PIL.Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        crop.save(output / f"{name}-{index:04d}.jpg", quality=90)
    print(f"Wrote {args.count} JPEG photos into {output}")


if __name__ == "__main__":
    main()
