import math

import pytest
import torch

from simmim_hf import SimMIMConfig, SimMIMMaskGenerator


def test_exact_count_of_masked_cells_per_image():
    generator = SimMIMMaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    mask = generator(batch_size=8)
    assert mask.shape == (8, 48 * 48) and mask.dtype == torch.bool
    cells = math.ceil(36 * 0.6)  # 22 of the 6x6 cells
    assert mask.sum(dim=1).tolist() == [cells * 8 * 8] * 8


def test_masked_patches_form_whole_aligned_cells():
    generator = SimMIMMaskGenerator(input_size=(64, 96), mask_patch_size=32, model_patch_size=8, mask_ratio=0.5)
    mask = generator(batch_size=4).view(4, 8, 12)
    # Every 4x4 block of model patches (one 32 px cell) is either fully masked or fully visible.
    blocks = mask.view(4, 2, 4, 3, 4).permute(0, 1, 3, 2, 4).reshape(4, 2, 3, 16)
    assert torch.all(blocks.all(-1) | (~blocks).all(-1))
    assert blocks.all(-1).sum(dim=(1, 2)).tolist() == [3] * 4  # ceil(6 * 0.5)


def test_seeded_generator_is_reproducible_and_seeds_differ():
    generator = SimMIMMaskGenerator(input_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    first = generator(6, generator=torch.Generator().manual_seed(3))
    again = generator(6, generator=torch.Generator().manual_seed(3))
    other = generator(6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_masks_are_uniform_over_cells():
    generator = SimMIMMaskGenerator(input_size=64, mask_patch_size=16, model_patch_size=16, mask_ratio=0.25)
    frequency = generator(4000, generator=torch.Generator().manual_seed(0)).float().mean(0)
    assert torch.allclose(frequency, torch.full((16,), 0.25), atol=0.03)


def test_device_argument_and_meta_device():
    generator = SimMIMMaskGenerator(input_size=32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6)
    assert generator(2, device="cpu").device.type == "cpu"
    assert generator(2, device="meta").device.type == "meta"


def test_from_config_matches_config():
    config = SimMIMConfig.from_preset("swin-base-window6-192", mask_ratio=0.4)
    generator = SimMIMMaskGenerator.from_config(config)
    assert (generator.input_size, generator.model_patch_size, generator.mask_ratio) == ((192, 192), 4, 0.4)
    assert generator(1).sum() == math.ceil(36 * 0.4) * 64


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(input_size=100, mask_patch_size=32), "input_size"),
        (dict(input_size=64, mask_patch_size=32, model_patch_size=6), "model_patch_size"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=0.0), "mask_ratio"),
    ],
)
def test_invalid_arguments_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SimMIMMaskGenerator(**kwargs)
