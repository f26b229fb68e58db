#!/usr/bin/env python
"""Original / masked / reconstruction grid of a SimMIM checkpoint on your images, as a PNG.

python scripts/visualize.py runs/demo img1.png img2.jpg --output recon.png [--mask_ratio 0.6] [--seed 0]
python scripts/visualize.py --config grid.yaml     # the same arguments (`checkpoint:`, `images:` too) from a file
"""

from __future__ import annotations

import argparse

import torch

from simmim_hf import SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from simmim_hf.cli import parse_script_arguments, run_script
from simmim_hf.data.images import decode_image
from simmim_hf.publish.convert import image_processor_for
from simmim_hf.publish.run_dir import RunDir
from simmim_hf.visualization import save_reconstruction_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="SimMIM checkpoint folder or Hub id (the pretraining output_dir)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--output", default=RunDir.RECONSTRUCTION_NAME, help="PNG to write")
    parser.add_argument("--mask_ratio", type=float, default=None, help="override the checkpoint's mask ratio")
    parser.add_argument("--seed", type=int, default=0, help="mask seed")
    return parse_script_arguments(parser, argv)


def load_pixels(paths: list[str], config) -> torch.Tensor:
    """The images decoded as in pretraining and preprocessed as the exported encoder is: (N, C, H, W)."""
    images = []
    for path in paths:
        try:
            images.append(decode_image(path, num_channels=config.num_channels))
        except OSError as error:
            raise SystemExit(f"error: cannot read image {path}: {error}") from error
    return image_processor_for(config)(images=images, return_tensors="pt")["pixel_values"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = SimMIMForMaskedImageModeling.from_pretrained(args.checkpoint).eval()
    config = model.config
    pixel_values = load_pixels(args.images, config)
    generator = SimMIMMaskGenerator.from_config(config, mask_ratio=args.mask_ratio)
    mask = generator(len(pixel_values), generator=torch.Generator().manual_seed(args.seed))
    path = save_reconstruction_grid(model, pixel_values, mask, args.output)
    print(f"wrote {path} (rows: original, masked input, reconstruction)")


if __name__ == "__main__":
    run_script(main)
