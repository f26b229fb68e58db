"""`scripts/visualize.py`: pictures of a model on your images, as a PNG.

* default: the original / masked / reconstruction grid of a SimMIM checkpoint (the pretraining output_dir);
* `--features pca`: the PCA of the last feature map (three principal components as RGB) of any encoder that
  `AutoModel` loads (a folder or Hub id: ViT, DeiT, BEiT, Swin, ConvNeXt, ResNet; a SimMIM run uses its encoder);
* `--features attention`: the last block's CLS-to-patch attention per head (plain ViT/DeiT/BEiT encoders).

The images are preprocessed by the model's own image processor (`--image_processor` to override). Colour images
shown to a 1-channel (greyscale) model are converted to grey, as in pretraining, and one line says so. transformers'
"Loading weights" progress bars are off (`transformers.utils.logging.disable_progress_bar`).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import huggingface_hub.utils
import numpy as np
import torch
import transformers

from simmim_hf.cli import parse_script_arguments
from simmim_hf.data.images import decode_image
from simmim_hf.errors import UsageError
from simmim_hf.feature_pictures import attention_picture, has_cls_attention, pca_picture
from simmim_hf.masking import SimMIMMaskGenerator
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling
from simmim_hf.publish.convert import image_processor_for
from simmim_hf.publish.run_dir import RunDir
from simmim_hf.visualization import save_reconstruction_grid

FEATURES = ("pca", "attention")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="SimMIM checkpoint (reconstructions) or any AutoModel encoder (--features)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument(
        "--features", choices=FEATURES, default=None, help="feature picture instead of reconstructions"
    )
    parser.add_argument(
        "--output", default=None, help="PNG to write (default: reconstruction.png / features_<kind>.png)"
    )
    parser.add_argument("--mask_ratio", type=float, default=None, help="override the checkpoint's mask ratio")
    parser.add_argument("--seed", type=int, default=0, help="mask seed")
    parser.add_argument("--image_processor", default=None, help="AutoImageProcessor folder or Hub id (--features)")
    return parse_script_arguments(parser, argv)


def read_images(paths: list[str], num_channels: int) -> list[Any]:
    """The images decoded as in pretraining (`UsageError` naming an unreadable file). For a 1-channel model, prints
    one line when any of them has colour (it is averaged to grey, which changes what the pictures show)."""
    images, colour = [], 0
    for path in paths:
        try:
            image = decode_image(path)
        except OSError as error:
            raise UsageError(f"cannot read image {path}: {error}") from error
        colour += num_channels == 1 and has_colour(image)
        images.append(decode_image(image, num_channels=num_channels))
    if colour:
        print(
            f"note: {colour} of {len(paths)} image(s) have colour; the model takes 1 channel, so they are converted "
            "to greyscale (as in its pretraining)"
        )
    return images


def has_colour(image: Any) -> bool:
    """Whether an image's pixels differ between colour channels anywhere (a grey image stored as RGB has none)."""
    if image.mode in ("1", "L", "LA", "I", "F"):
        return False
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb.max(axis=-1) != rgb.min(axis=-1)).any())


def load_pixels(paths: list[str], config: Any) -> torch.Tensor:
    """The images decoded as in pretraining and preprocessed as the exported encoder is: (N, C, H, W)."""
    return image_processor_for(config)(images=read_images(paths, config.num_channels), return_tensors="pt")[
        "pixel_values"
    ]


def feature_picture(model: str, images: list[str], kind: str, image_processor: str | None = None) -> Any:
    """The `kind` picture (`pca` or `attention`) of the encoder `model` on the image files, as a PIL image."""
    from simmim_hf.eval.features import load_encoder

    with tempfile.TemporaryDirectory(prefix="simmim_visualize_") as workdir:
        try:
            encoder = load_encoder(model, image_processor=image_processor, workdir=workdir)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot load {model} as an encoder: {str(error).splitlines()[0]}") from error
    if kind == "attention" and not has_cls_attention(encoder.model):
        raise UsageError(f"--features attention needs a plain ViT/DeiT/BEiT encoder; {model} is not one (use pca)")
    processor = encoder.processor
    pixel_values = processor(images=read_images(images, encoder.num_channels), return_tensors="pt")["pixel_values"]
    mean = getattr(processor, "image_mean", None) or [0.0] * encoder.num_channels
    std = getattr(processor, "image_std", None) or [1.0] * encoder.num_channels
    draw = pca_picture if kind == "pca" else attention_picture
    return draw(encoder.model, pixel_values, mean, std)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # No "Loading weights" bar per from_pretrained; the Hub's download bars stay (as in pretraining's console).
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()
    if args.features is not None:
        output = args.output or (RunDir.PCA_NAME if args.features == "pca" else RunDir.ATTENTION_NAME)
        feature_picture(args.checkpoint, args.images, args.features, args.image_processor).save(output)
        rows = "original, PCA as RGB" if args.features == "pca" else "original, then one row per attention head"
        print(f"wrote {output} (rows: {rows})")
        return
    model = SimMIMForMaskedImageModeling.from_pretrained(args.checkpoint).eval()
    config = model.config
    pixel_values = load_pixels(args.images, config)
    generator = SimMIMMaskGenerator.from_config(config, mask_ratio=args.mask_ratio)
    mask = generator(len(pixel_values), generator=torch.Generator().manual_seed(args.seed))
    path = save_reconstruction_grid(model, pixel_values, mask, args.output or RunDir.RECONSTRUCTION_NAME)
    print(f"wrote {path} (rows: original, masked input, reconstruction)")
