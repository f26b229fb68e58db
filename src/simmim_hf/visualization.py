"""Original / masked / reconstructed image grids: what a SimMIM model sees and what it paints back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .modeling_simmim import SimMIMForMaskedImageModeling, cell_statistics, upsample_mask


def denormalize(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """pixel_values: (N, C, H, W) normalised -> (N, C, H, W) in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=pixel_values.dtype, device=pixel_values.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=pixel_values.dtype, device=pixel_values.device).view(1, -1, 1, 1)
    return (pixel_values * std_t + mean_t).clamp(0, 1)


@torch.no_grad()
def reconstruction_rows(
    model: SimMIMForMaskedImageModeling, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor
) -> torch.Tensor:
    """Three rows per image, in [0, 1]: original, masked input (masked cells greyed), reconstruction pasted into
    the masked cells (visible pixels are the original, as the loss only asks for the masked ones). A `norm_target`
    model predicts each cell in units of its own statistics: shown de-normalised with the cell's mean and std.

    pixel_values: (N, C, H, W), normalised; bool_masked_pos: (N, num_patches), 1 = masked.
    Returns (3, N, C, H, W).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    bool_masked_pos = bool_masked_pos.to(device)
    reconstruction = model(pixel_values, bool_masked_pos=bool_masked_pos).reconstruction
    model.train(was_training)
    config = model.config
    if getattr(config, "norm_target", False):
        mean, std = cell_statistics(pixel_values, config.mask_patch_size)
        reconstruction = reconstruction * std + mean
    height, width = pixel_values.shape[-2:]
    patch = config.model_patch_size
    pixel_mask = upsample_mask(bool_masked_pos, (height // patch, width // patch), patch).to(dtype)
    original = denormalize(pixel_values.float(), config.image_mean, config.image_std)
    pasted = denormalize(
        (reconstruction * pixel_mask + pixel_values * (1 - pixel_mask)).float(), config.image_mean, config.image_std
    )
    masked = original * (1 - pixel_mask.float()) + 0.5 * pixel_mask.float()
    return torch.stack([original, masked, pasted]).cpu()


def grid_image(rows: torch.Tensor, padding: int = 2, scale: int = 1) -> Image.Image:
    """rows: (R, N, C, H, W) in [0, 1] -> one PIL image, R rows by N columns, white padding."""
    num_rows, num_cols, channels, height, width = rows.shape
    canvas = torch.ones(channels, num_rows * (height + padding) + padding, num_cols * (width + padding) + padding)
    for r in range(num_rows):
        for c in range(num_cols):
            top, left = padding + r * (height + padding), padding + c * (width + padding)
            canvas[:, top : top + height, left : left + width] = rows[r, c]
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode="L" if channels == 1 else "RGB")
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def reconstruction_grid(
    model: SimMIMForMaskedImageModeling,
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    scale: int | None = None,
) -> Image.Image:
    """The original / masked / reconstruction grid as one image; small images are upscaled to stay visible."""
    rows = reconstruction_rows(model, pixel_values, bool_masked_pos)
    if scale is None:
        scale = max(1, 128 // rows.shape[-1])
    return grid_image(rows, scale=scale)


def save_reconstruction_grid(
    model: SimMIMForMaskedImageModeling,
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    path: str | Path,
    scale: int | None = None,
) -> Path:
    """Writes `reconstruction_grid` as a PNG at `path` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reconstruction_grid(model, pixel_values, bool_masked_pos, scale).save(path)
    return path
