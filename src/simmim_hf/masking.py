"""SimMIM's random masking: coarse `mask_patch_size` cells, upsampled to the encoder's patch grid.

Convention throughout the project: in `bool_masked_pos`, **True (1) = masked**, False (0) = visible.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .configuration_simmim import to_pair


class SimMIMMaskGenerator:
    """The paper's mask sampler.

    The image is cut into `mask_patch_size` cells; exactly `ceil(num_cells * mask_ratio)` cells are masked per image,
    chosen uniformly at random, and each cell is upsampled to `mask_patch_size // model_patch_size` model patches per
    side.

    Args:
        input_size: image size in pixels, `int` or `(height, width)`.
        mask_patch_size: side of a masking cell in pixels (32 in the paper).
        model_patch_size: side of the encoder's patch in pixels (4 for Swin, 16 for ViT).
        mask_ratio: fraction of cells masked, in (0, 1).

    Returns from `__call__`: `bool_masked_pos: (batch_size, num_patches)` with `num_patches = (H / model_patch) *
    (W / model_patch)` in row-major order, 1 = masked.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        height, width = to_pair(input_size)
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if mask_patch_size <= 0 or model_patch_size <= 0:
            raise ValueError("mask_patch_size and model_patch_size must be positive")
        if height % mask_patch_size or width % mask_patch_size:
            raise ValueError(f"input_size {(height, width)} must be divisible by mask_patch_size={mask_patch_size}")
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} must be a multiple of model_patch_size={model_patch_size}"
            )
        self.input_size = (height, width)
        self.mask_patch_size = int(mask_patch_size)
        self.model_patch_size = int(model_patch_size)
        self.mask_ratio = float(mask_ratio)
        self.cell_grid = (height // mask_patch_size, width // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.num_cells = self.cell_grid[0] * self.cell_grid[1]
        self.num_masked_cells = int(math.ceil(self.num_cells * self.mask_ratio))
        self.patch_grid = (self.cell_grid[0] * self.scale, self.cell_grid[1] * self.scale)
        self.num_patches = self.patch_grid[0] * self.patch_grid[1]

    @classmethod
    def from_config(cls, config: Any, mask_ratio: float | None = None) -> SimMIMMaskGenerator:
        """Builds the generator from a `SimMIMConfig` (image size, mask cell, encoder patch, ratio); `mask_ratio`
        overrides the config's (e.g. `scripts/visualize.py --mask_ratio`)."""
        return cls(
            input_size=config.image_size,
            mask_patch_size=config.mask_patch_size,
            model_patch_size=config.model_patch_size,
            mask_ratio=config.mask_ratio if mask_ratio is None else mask_ratio,
        )

    def sample_cells(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Cell-level mask. Returns `(batch_size, cells_h, cells_w)` bool, 1 = masked."""
        if device is None and generator is not None:
            device = generator.device
        # argsort of iid uniform noise is a uniformly random permutation per row; its first k entries are the
        # masked cells. Vectorised, so the whole batch is one kernel on any device.
        noise = torch.rand(batch_size, self.num_cells, generator=generator, device=device)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        cells = ranks < self.num_masked_cells
        return cells.view(batch_size, *self.cell_grid)

    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Returns `bool_masked_pos: (batch_size, num_patches)`, 1 = masked."""
        cells = self.sample_cells(batch_size, generator=generator, device=device)
        patches = cells.repeat_interleave(self.scale, dim=1).repeat_interleave(self.scale, dim=2)
        return patches.reshape(batch_size, self.num_patches)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )
