#!/usr/bin/env python
"""Original / masked / reconstruction grid of a SimMIM checkpoint on your images, as a PNG.

python scripts/visualize.py runs/demo img1.png img2.jpg --output recon.png [--mask_ratio 0.6] [--seed 0]
python scripts/visualize.py --config grid.yaml     # the same arguments (`checkpoint:`, `images:` too) from a file
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from simmim_hf import SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from simmim_hf.cli import parse_script_arguments, run_script
from simmim_hf.configuration_simmim import to_pair
from simmim_hf.visualization import save_reconstruction_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="SimMIM checkpoint folder or Hub id (the pretraining output_dir)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--output", default="reconstruction.png", help="PNG to write")
    parser.add_argument("--mask_ratio", type=float, default=None, help="override the checkpoint's mask ratio")
    parser.add_argument("--seed", type=int, default=0, help="mask seed")
    return parse_script_arguments(parser, argv)


def load_pixels(paths: list[str], config) -> torch.Tensor:
    """Resize to the model's input, scale to [0, 1], normalise with the pretraining statistics: (N, C, H, W)."""
    from torchvision.transforms import v2

    size = to_pair(config.image_size)
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(size, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(config.image_mean, config.image_std),
        ]
    )
    mode = "RGB" if config.num_channels == 3 else "L"
    images = []
    for path in paths:
        try:
            images.append(transform(Image.open(path).convert(mode)))
        except OSError as error:
            raise SystemExit(f"error: cannot read image {path}: {error}") from error
    return torch.stack(images)


def main() -> None:
    args = parse_args()
    model = SimMIMForMaskedImageModeling.from_pretrained(args.checkpoint).eval()
    config = model.config
    pixel_values = load_pixels(args.images, config)
    generator = SimMIMMaskGenerator(
        config.image_size, config.mask_patch_size, config.model_patch_size, args.mask_ratio or config.mask_ratio
    )
    mask = generator(len(pixel_values), generator=torch.Generator().manual_seed(args.seed))
    path = save_reconstruction_grid(model, pixel_values, mask, args.output)
    print(f"wrote {path} (rows: original, masked input, reconstruction)")


if __name__ == "__main__":
    run_script(main)
